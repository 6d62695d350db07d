"""Write tiny synthetic checkpoints exactly as MobileVLM publishes them (config keys, key names,
sharding with an index, safetensors or .bin, optional separate CLIP directory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vlm_export.spec.presets import BUNDLED_TOKENIZER, tiny

VISION_KEY = "model.vision_tower.vision_tower."


def tiny_spec(projector: str):
    return tiny().replace(projector_type=projector)


def mobilevlm_config(spec) -> dict:
    llm, vision = spec.llm, spec.vision
    return {
        "architectures": ["MobileLlamaForCausalLM"],
        "model_type": "mobilevlm",
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_attention_heads": llm.num_heads,
        "num_hidden_layers": llm.num_layers,
        "num_key_value_heads": llm.num_kv_heads,
        "vocab_size": llm.vocab_size,
        "max_position_embeddings": llm.max_context,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": spec.projector_type,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "vision_tower_type": "clip",
    }


def clip_config(spec) -> dict:
    v = spec.vision
    return {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
    }


def _save(tensors: dict, path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, str(path))


def write_shards(state: dict, directory: Path, fmt: str, shards: int) -> None:
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = sorted(state)
    if shards == 1:
        _save(state, directory / f"{stem}.{ext}", fmt)
        return
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in names[i::shards]}
        weight_map.update({k: file for k in part})
        _save(part, directory / file, fmt)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def write_checkpoint(root: Path, projector: str, fmt: str = "safetensors", shards: int = 2, bf16: bool = False,
                     separate_vision: bool = False, seed: int = 1) -> Path:
    from vlm_export.model.load import load_reference

    spec = tiny_spec(projector).replace(weights=tiny().weights.__class__(seed=seed))
    model = load_reference(spec)
    dtype = torch.bfloat16 if bf16 else torch.float32
    state = {k: v.detach().to(dtype).clone().contiguous() for k, v in model.state_dict().items()}
    ckpt = root / "checkpoint"
    ckpt.mkdir(parents=True)
    # The tower's CLIP directory: V1 keeps the weights there (passed with --vision-tower); V2
    # embeds them and names the directory in mm_vision_tower, whose config the official code reads.
    clip = root / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps(clip_config(spec)))
    config = mobilevlm_config(spec)
    if separate_vision:
        vision = {k[len(VISION_KEY):]: state.pop(k) for k in list(state) if k.startswith(VISION_KEY)}
        _save(vision, clip / "model.safetensors", "safetensors")
    else:
        config["mm_vision_tower"] = str(clip)
    write_shards(state, ckpt, fmt, shards)
    (ckpt / "config.json").write_text(json.dumps(config))
    shutil.copy(BUNDLED_TOKENIZER.path, ckpt / "tokenizer.model")
    return ckpt

"""Build the reference model from a spec: seeded random weights, then whatever is real.

Sources: a MobileVLM checkpoint directory (safetensors / .bin, sharded or not, bf16 or fp32),
a separate local CLIP directory for the vision tower, a GGUF file for the LLM, and a PEFT LoRA
adapter merged into the weights.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from vlm_export.checkpoint_files import iter_tensors, weight_files
from vlm_export.errors import VlmExportError
from vlm_export.model.mobilevlm import Init, MobileVLMForCausalLM
from vlm_export.spec.hf_config import VISION_PREFIX
from vlm_export.spec.model_spec import ModelSpec

log = logging.getLogger(__name__)

# Buffers that older checkpoints saved and current modules recompute.
IGNORED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")


def _first(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def copy_weights(model: torch.nn.Module, tensors, origin: str, expected_prefixes: tuple[str, ...]) -> None:
    """Copy (name, tensor) pairs into the model; every expected key must be covered exactly once.

    Raises a one-line error naming the first few missing, unexpected or wrong-shape keys.
    """
    params = model.state_dict(keep_vars=True)
    expected = {k for k in params if k.startswith(expected_prefixes)}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    seen, unexpected, wrong_shape = set(), [], []
    with torch.no_grad():
        for name, tensor in tensors:
            if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.config.tie_word_embeddings):
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            target = params[name]
            if tuple(target.shape) != tuple(tensor.shape):
                wrong_shape.append(f"{name} {tuple(tensor.shape)} vs {tuple(target.shape)}")
                continue
            target.copy_(tensor)
            seen.add(name)
    if unexpected:
        raise VlmExportError(f"{origin}: unexpected weights {_first(unexpected)}", "is this a MobileVLM checkpoint of the right version?")
    if wrong_shape:
        raise VlmExportError(f"{origin}: wrong-shape weights {_first(wrong_shape, 2)}", "config.json does not match the weights")
    missing = expected - seen
    if missing:
        raise VlmExportError(f"{origin}: missing weights {_first(missing)}", "download every shard of the checkpoint")


def _load_checkpoint(model: MobileVLMForCausalLM, spec: ModelSpec) -> None:
    directory = Path(spec.weights.path)
    files = weight_files(directory)
    has_vision = spec.weights.vision_tower_path is None
    prefixes = ("model.", "lm_head.")
    if not has_vision:
        # V1 layout: the tower comes from a separate CLIP directory, the checkpoint holds the rest.
        _load_clip_directory(model, Path(spec.weights.vision_tower_path))
        prefixes = tuple(p for p in ("model.embed_tokens", "model.layers.", "model.norm", "model.mm_projector.", "lm_head."))
    names = ", ".join(f.name for f in files[:2]) + ("..." if len(files) > 2 else "")
    copy_weights(model, iter_tensors(files), f"checkpoint {directory} ({names})", prefixes)


def _load_clip_directory(model: MobileVLMForCausalLM, directory: Path) -> None:
    """A CLIPVisionModel or CLIPModel directory: take its `vision_model.*` weights."""
    def vision_only():
        for name, tensor in iter_tensors(weight_files(directory)):
            if name.startswith("vision_model."):
                yield "model.vision_tower.vision_tower." + name, tensor

    copy_weights(model, vision_only(), f"vision tower {directory}", (VISION_PREFIX,))


# llama.cpp's GGUF tensor names -> Hugging Face LLaMA names (llama.cpp's convert_hf_to_gguf.py and
# gguf-py's tensor_mapping.py, read backwards; transformers' GGUF loader maps the same way).
GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
GGUF_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _unpermute_rope_rows(weight, heads: int):
    """llama.cpp stores q_proj/k_proj rows interleaved for its RoPE (convert_hf_to_gguf.py `permute`:
    per head, rows (2, D/2) -> (D/2, 2)); this puts them back in Hugging Face's half-split order."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_llm_tensors(path: Path, num_heads: int, num_kv_heads: int):
    """(Hugging Face name, float32 tensor) for every tensor of a LLaMA GGUF, dequantized by gguf-py
    (every ggml type it knows: Q4_0, Q4_1, Q8_0, K-quants, F16, ...). Raises VlmExportError for a
    tensor name outside the LLaMA layout. ~5 s for SmolLM2-135M where transformers' own GGUF
    loader took ~23 s (the same values: tests/test_gguf.py compares them)."""
    import numpy as np
    from gguf.quants import dequantize

    from vlm_export.spec.gguf_meta import read_gguf_reader

    for tensor in read_gguf_reader(path).tensors:
        name = tensor.name
        values = dequantize(tensor.data, tensor.tensor_type)  # rows of the row length: HF's (out, in)
        parts = name.split(".")
        if name in GGUF_TOP_NAMES:
            hf_name = GGUF_TOP_NAMES[name]
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_BLOCK_NAMES:
            hf_name = f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
            if parts[2] in ("attn_q", "attn_k") and parts[3] == "weight":
                values = _unpermute_rope_rows(values, num_heads if parts[2] == "attn_q" else num_kv_heads)
        elif name == "rope_freqs.weight":  # llama-3 style RoPE scaling factors: derived from the config here
            continue
        else:
            raise VlmExportError(f"GGUF {path} has a tensor '{name}' outside the LLaMA layout",
                                 "use a LLaMA-architecture GGUF file")
        yield hf_name, torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: F32 tensors are read-only views of the file


def _load_gguf_llm(model: MobileVLMForCausalLM, path: Path) -> None:
    log.info("reading LLM weights from %s", path)
    llm = model.spec.llm
    try:
        tensors = list(gguf_llm_tensors(path, llm.num_heads, llm.num_kv_heads))
    except (ValueError, OSError, KeyError) as exc:
        raise VlmExportError(f"cannot read LLM weights from GGUF {path} ({exc})", "use a LLaMA-architecture GGUF file") from exc
    copy_weights(model, tensors, f"GGUF {path}", ("model.embed_tokens", "model.layers.", "model.norm", "lm_head."))


def _merge_lora(model: MobileVLMForCausalLM, directory: Path) -> MobileVLMForCausalLM:
    from peft import PeftModel

    if not (directory / "adapter_config.json").is_file():
        raise VlmExportError(f"{directory} has no adapter_config.json", "pass a PEFT LoRA adapter directory")
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise VlmExportError(f"cannot apply LoRA adapter {directory} ({str(exc).splitlines()[0]})", "use an adapter trained for this model") from exc
    return peft_model.merge_and_unload()


def load_reference(spec: ModelSpec, dtype: torch.dtype = torch.float32, vision: bool = True,
                   llm: bool = True) -> MobileVLMForCausalLM:
    """The reference model with weights from `spec.weights` (seeded random where none are given,
    each part from its own seed: mobilevlm.PART_SEED_OFFSETS). vision=False: the vision tower and
    projector are built on the meta device; llm=False: the LLM is, and a GGUF's weights are not
    read. A part on the meta device has its checkpoint weights still checked for name and shape,
    not kept (an export of only the other part needs neither the memory nor the time).

    Raises VlmExportError when a file misses, adds or reshapes a weight of the parts it provides."""
    source = spec.weights.source
    from_file = {"llm": source in ("checkpoint", "gguf"),
                 "vision_tower": source == "checkpoint" or bool(spec.weights.vision_tower_path),
                 "projector": source == "checkpoint"}
    wanted = {"llm": llm, "vision_tower": vision, "projector": vision}
    inits = {part: Init.ABSENT if not wanted[part] else Init.LOADED if from_file[part] else Init.SEEDED for part in wanted}
    model = MobileVLMForCausalLM(spec, spec.weights.seed, **inits)
    if source == "checkpoint":
        _load_checkpoint(model, spec)
    elif source == "gguf" and llm:
        _load_gguf_llm(model, Path(spec.weights.path))
    if source != "checkpoint" and spec.weights.vision_tower_path:
        _load_clip_directory(model, Path(spec.weights.vision_tower_path))
    if spec.weights.lora_path:
        with warnings.catch_warnings():  # an adapter's LLM weights into a dropped LLM: a no-op torch warns about
            warnings.filterwarnings("ignore", message=".*to a meta parameter in the current model, which is a no-op")
            model = _merge_lora(model, Path(spec.weights.lora_path))
    return model.to(dtype).eval()


def build_on_meta(spec: ModelSpec) -> MobileVLMForCausalLM:
    """The model's structure without allocating weights (parameter counts of 7B shapes in ms)."""
    return MobileVLMForCausalLM(spec, llm=Init.ABSENT, vision_tower=Init.ABSENT, projector=Init.ABSENT)

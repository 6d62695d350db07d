"""Turn a MobileVLM checkpoint directory (Hugging Face layout) into a ModelSpec.

Reads config.json (`mm_projector_type`, `mm_vision_tower`, `mm_hidden_size`,
`mm_vision_select_layer`, `image_aspect_ratio`, LLaMA fields) and the vision tower's CLIP config,
as the official code builds the tower: from the CLIP config of `--vision-tower` or of
`mm_vision_tower` (a local directory, or the published openai/clip-vit-large-patch14-336, whose
config is known), never guessed from weight shapes. A tower embedded in the checkpoint (V2) is
checked against that config, shape by shape.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import VICUNA_V1, LLMSpec, ModelSpec, TokenizerSpec, VisionSpec, WeightsSpec

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise VlmExportError(f"{path} is missing", f"a {what} needs this file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlmExportError(f"{path} is not valid JSON ({exc})", f"restore the {what}'s {path.name}") from exc
    if not isinstance(data, dict):
        raise VlmExportError(f"{path} does not hold a JSON object", f"restore the {what}'s {path.name}")
    return data


def _required(config: dict, key: str, path: Path):
    if key not in config:
        raise VlmExportError(f"{path} has no '{key}'", "this does not look like a MobileVLM config.json")
    return config[key]


def llm_spec_from_config(config: dict, path: Path) -> LLMSpec:
    heads = int(_required(config, "num_attention_heads", path))
    scaling = config.get("rope_scaling") or None
    factor = None
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind != "linear":
            raise VlmExportError(f"{path}: rope_scaling type '{kind}' is not supported", "use linear RoPE scaling")
        factor = float(scaling["factor"])
    eos = config.get("eos_token_id", 2)
    return LLMSpec(
        hidden_size=int(_required(config, "hidden_size", path)),
        intermediate_size=int(_required(config, "intermediate_size", path)),
        num_layers=int(_required(config, "num_hidden_layers", path)),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(_required(config, "vocab_size", path)),
        max_context=int(config.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rope_scaling_factor=factor,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
        pad_token_id=config.get("pad_token_id", 0),
    )


def vision_spec_from_clip_config(config: dict, select_layer: int, select_feature: str, name: str) -> VisionSpec:
    """From a CLIPVisionConfig or a CLIPConfig (its `vision_config`)."""
    config = config.get("vision_config", config)
    return VisionSpec(
        image_size=int(config.get("image_size", 224)),
        patch_size=int(config.get("patch_size", 32)),
        hidden_size=int(config.get("hidden_size", 768)),
        intermediate_size=int(config.get("intermediate_size", 3072)),
        num_layers=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 12)),
        hidden_act=config.get("hidden_act", "quick_gelu"),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        select_layer=select_layer,
        select_feature=select_feature,
        name=name,
    )


# The vision_config of openai/clip-vit-large-patch14-336 as published on the Hugging Face hub
# (its config.json), the tower every MobileVLM config names: known here so that a checkpoint
# naming it needs no download. Keys absent from any config take CLIPVisionConfig's defaults.
PUBLISHED_CLIP_CONFIGS = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
}


def tower_config(tower: Path | None, tower_name: str, checkpoint: Path) -> tuple[dict, str]:
    """The CLIP config the official code would build the tower from: --vision-tower's, else
    mm_vision_tower's (a local directory or a published name). Raises VlmExportError naming
    what is missing when no config is available."""
    if tower is None and Path(tower_name).is_dir():
        tower = Path(tower_name)
    if tower is not None:
        return read_json(tower / "config.json", "CLIP vision tower directory"), str(tower)
    if tower_name in PUBLISHED_CLIP_CONFIGS:
        return PUBLISHED_CLIP_CONFIGS[tower_name], tower_name
    raise VlmExportError(
        f"{checkpoint}: no CLIP config for the vision tower (mm_vision_tower '{tower_name}' is not a local directory "
        "or a known tower), so its num_attention_heads, hidden_act and layer_norm_eps are unknown",
        "pass --vision-tower PATH to the tower's CLIP directory (its config.json is enough when the weights are inside)",
    )


def check_tower_shapes(vision: VisionSpec, shapes: dict[str, tuple], source: str) -> None:
    """An embedded tower's weights must have the shapes its config says (else the config is the wrong one)."""
    layers = {k[len(VISION_PREFIX + "encoder.layers."):].split(".")[0] for k in shapes if k.startswith(VISION_PREFIX + "encoder.layers.")}
    hidden, _, patch, _ = shapes[VISION_PREFIX + "embeddings.patch_embedding.weight"]
    positions = shapes[VISION_PREFIX + "embeddings.position_embedding.weight"][0]
    found = {"hidden_size": hidden, "patch_size": patch, "num_hidden_layers": len(layers),
             "intermediate_size": shapes[VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight"][0],
             "image_size": round((positions - 1) ** 0.5) * patch}
    expected = {"hidden_size": vision.hidden_size, "patch_size": vision.patch_size, "num_hidden_layers": vision.num_layers,
                "intermediate_size": vision.intermediate_size, "image_size": vision.image_size}
    wrong = [f"{k} {expected[k]} (weights: {found[k]})" for k in expected if expected[k] != found[k]]
    if wrong:
        raise VlmExportError(f"the vision tower config of {source} does not fit the checkpoint's tower weights: {', '.join(wrong)}",
                             "pass --vision-tower PATH to the CLIP directory this checkpoint was trained with")


def tokenizer_spec_for(directory: Path) -> TokenizerSpec:
    if (directory / "tokenizer.model").is_file():
        return TokenizerSpec(kind="sentencepiece", path=str(directory / "tokenizer.model"))
    if (directory / "tokenizer.json").is_file():
        return TokenizerSpec(kind="hf", path=str(directory))
    raise VlmExportError(
        f"checkpoint {directory} has no tokenizer (tokenizer.model or tokenizer.json)",
        "copy the tokenizer files of the checkpoint into the directory",
    )


# Multimodal config keys this toolkit understands; any other `mm_*` key could change what the
# model computes, so it is refused rather than silently ignored. Other unknown keys (training
# flags, transformers bookkeeping) do not affect inference and are ignored.
KNOWN_MM_KEYS = {
    "mm_projector_type", "mm_vision_tower", "mm_hidden_size", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr",
}
UNSUPPORTED_VALUES = {"mm_use_im_start_end": True, "mm_use_im_patch_token": True}


def check_multimodal_keys(config: dict, path: Path) -> None:
    unknown = sorted(k for k in config if k.startswith("mm_") and k not in KNOWN_MM_KEYS)
    if unknown:
        raise VlmExportError(f"{path} has multimodal settings this toolkit does not implement: {', '.join(unknown[:3])}",
                             "use a MobileVLM V1/V2 checkpoint, or remove the keys if they do not apply")
    for key, bad in UNSUPPORTED_VALUES.items():
        if config.get(key) == bad:
            raise VlmExportError(f"{path}: {key}={bad} is not supported (MobileVLM uses false)", f"set {key} to false")
    if config.get("image_aspect_ratio", "square") not in ("pad", "square"):
        raise VlmExportError(f"{path}: image_aspect_ratio '{config['image_aspect_ratio']}' is not supported", "use 'pad' or 'square'")


def spec_from_checkpoint(directory: Path, vision_tower: Path | None, weight_shapes: dict[str, tuple]) -> ModelSpec:
    config_path = directory / "config.json"
    config = read_json(config_path, "MobileVLM checkpoint")
    check_multimodal_keys(config, config_path)
    select_layer = int(config.get("mm_vision_select_layer", -2))
    select_feature = config.get("mm_vision_select_feature", "patch")
    tower_name = config.get("mm_vision_tower", "openai/clip-vit-large-patch14-336")
    if vision_tower is None and Path(tower_name).is_dir():
        vision_tower = Path(tower_name)
    if any(k.startswith(VISION_PREFIX) for k in weight_shapes):
        # V2: the weights are the checkpoint's own; the architecture comes from the CLIP config.
        clip_config, source = tower_config(vision_tower, tower_name, directory)
        vision = vision_spec_from_clip_config(clip_config, select_layer, select_feature, tower_name)
        check_tower_shapes(vision, weight_shapes, source)
        vision_tower = None
    elif vision_tower is not None:
        clip_config = read_json(vision_tower / "config.json", "CLIP vision tower directory")
        vision = vision_spec_from_clip_config(clip_config, select_layer, select_feature, str(vision_tower))
    else:
        raise VlmExportError(
            f"checkpoint {directory} holds no vision tower weights and '{tower_name}' is not a local directory",
            "pass --vision-tower PATH to a local CLIP ViT-L/14-336 directory",
        )
    if int(config.get("mm_hidden_size", vision.hidden_size)) != vision.hidden_size:
        raise VlmExportError(
            f"{config_path}: mm_hidden_size {config['mm_hidden_size']} != vision tower width {vision.hidden_size}",
            "pass the vision tower this checkpoint was trained with",
        )
    return ModelSpec(
        name=directory.name,
        vision=vision,
        projector_type=str(_required(config, "mm_projector_type", config_path)),
        llm=llm_spec_from_config(config, config_path),
        template=VICUNA_V1,
        tokenizer=tokenizer_spec_for(directory),
        weights=WeightsSpec(
            source="checkpoint", path=str(directory), vision_tower_path=str(vision_tower) if vision_tower else None
        ),
        # The official process_images pads only when the key says "pad"; no key = resize + centre crop.
        image_aspect_ratio=config.get("image_aspect_ratio", "square"),
    )

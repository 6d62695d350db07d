"""Resolve the MODEL argument of every command: a preset name, a checkpoint directory, or a GGUF."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import VICUNA_V1, ModelSpec, TokenizerSpec, WeightsSpec
from vlm_export.spec.presets import CLIP_L14_336, PRESETS


def _from_gguf(path: Path) -> ModelSpec:
    from vlm_export.spec.gguf_meta import llm_spec_from_gguf

    llm, template = llm_spec_from_gguf(path)
    return ModelSpec(
        name=path.stem, vision=CLIP_L14_336, projector_type="ldpnet", llm=llm, template=template or VICUNA_V1,
        tokenizer=TokenizerSpec(kind="gguf", path=str(path)),
        weights=WeightsSpec(source="gguf", path=str(path), random_parts=("vision_tower", "mm_projector")),
        notes=("vision tower and LDP projector: seeded-random (image answers are meaningless)",),
    )


def resolve_spec(
    model: str,
    *,
    vision_tower: str | None = None,
    lora: str | None = None,
    seed: int = 0,
    rope_scaling_factor: float | None = None,
    image_alpha: str | None = None,
) -> ModelSpec:
    """MODEL (preset name, checkpoint directory or .gguf) -> its ModelSpec, with the options applied.

    image_alpha: how transparent pixels are treated (ALPHA_POLICIES; None keeps the official "drop").
    Raises VlmExportError naming the problem (unknown model, missing files, bad options)."""
    path = Path(model).expanduser()
    if model in PRESETS:
        spec = PRESETS[model]()
    elif path.is_dir():
        from vlm_export.checkpoint_files import weight_shapes
        from vlm_export.spec.hf_config import spec_from_checkpoint

        if not (path / "config.json").is_file():
            raise VlmExportError(
                f"{path} is not a checkpoint directory (no config.json)",
                "pass a MobileVLM checkpoint directory in Hugging Face layout or a preset name",
            )
        tower = Path(vision_tower).expanduser() if vision_tower else None
        if tower is not None and not (tower / "config.json").is_file():
            raise VlmExportError(f"--vision-tower {tower} is not a CLIP directory (no config.json)", "pass a local CLIP model directory")
        spec = spec_from_checkpoint(path, tower, weight_shapes(path))
    elif path.suffix == ".gguf":
        spec = _from_gguf(path)
    elif path.exists():
        raise VlmExportError(
            f"{path} is neither a checkpoint directory nor a .gguf file",
            "pass a MobileVLM checkpoint directory, a .gguf LLM, or a preset name",
        )
    else:
        raise VlmExportError(
            f"unknown model '{model}': not a preset and no such path",
            f"use one of the presets ({', '.join(PRESETS)}) or a checkpoint directory",
        )
    weights = dataclasses.replace(spec.weights, seed=seed, lora_path=lora)
    if lora is not None and not Path(lora).is_dir():
        raise VlmExportError(f"--lora {lora} is not a directory", "pass a PEFT LoRA adapter directory")
    llm = spec.llm
    if rope_scaling_factor is not None:
        llm = dataclasses.replace(llm, rope_scaling_factor=rope_scaling_factor,
                                  max_context=int(llm.max_context * rope_scaling_factor))
    if vision_tower is not None and spec.weights.source != "checkpoint":
        weights = dataclasses.replace(weights, vision_tower_path=vision_tower)
    return spec.replace(weights=weights, llm=llm, image_alpha=image_alpha or spec.image_alpha)

"""`vlm-export inspect MODEL`: the resolved spec and parameter counts per part."""

from __future__ import annotations

import json

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.options import LoraOpt, ModelArg, RopeScalingOpt, VisionTowerOpt


@handles_errors
def inspect(
    model: ModelArg = "smol",
    vision_tower: VisionTowerOpt = None,
    lora: LoraOpt = None,
    rope_scaling: RopeScalingOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    list_presets: bool = typer.Option(False, "--list", help="List the presets and exit."),
):
    """Print the resolved spec (vision tower, projector, LLM dims, tokenizer, template) and parameter counts."""
    from vlm_export.spec import preset_names

    if list_presets:
        typer.echo("\n".join(preset_names()))
        return
    from vlm_export.errors import require_export_extra

    require_export_extra("inspecting a model (parameter counts on the PyTorch reference)")
    from vlm_export.describe import describe_model  # PyTorch + transformers: only when asked

    report = describe_model(model, vision_tower=vision_tower, lora=lora, rope_scaling_factor=rope_scaling)
    typer.echo(json.dumps(report, indent=2) if as_json else report["text"])

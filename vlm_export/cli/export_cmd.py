"""`vlm-export export MODEL`: ONNX graphs (vision, embed, decoder) validated against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.options import ImageAlphaOpt, LoraOpt, ModelArg, QuietOpt, RopeScalingOpt, SeedOpt, VisionTowerOpt
from vlm_export.spec.graph_io import Layout
from vlm_export.spec.layouts import REGISTRY

LAYOUT_HELP = "; ".join(f"{name} = {layout.summary}" for name, layout in REGISTRY.items())


@handles_errors
def export(
    model: ModelArg = "smol",
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default graphs/<model>[-static][-fp16]).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 | fp16")] = "fp32",
    layout: Annotated[str, typer.Option("--layout", help=LAYOUT_HELP)] = "dynamic",
    logits: Annotated[str, typer.Option("--logits", help="all | last: logits of every position or only the last (dynamic layout)")] = "all",
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="static layout: tokens per prefill graph call")] = 128,
    kv_buffer: Annotated[int | None, typer.Option("--kv-buffer", help="static layout: KV buffer length (default min(1024, context))")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    vision_tower: VisionTowerOpt = None,
    lora: LoraOpt = None,
    seed: SeedOpt = 0,
    rope_scaling: RopeScalingOpt = None,
    quiet: QuietOpt = False,
    image_alpha: ImageAlphaOpt = None,
):
    """Export the vision+projector, embedding and decoder graphs, each validated against PyTorch."""
    from vlm_export.errors import require_export_extra

    require_export_extra("exporting graphs (the PyTorch reference model)")
    from vlm_export.export.pipeline import export_model
    from vlm_export.progress import configure
    from vlm_export.spec import resolve_spec
    from vlm_export.spec.graph_io import ExportOptions

    spec = resolve_spec(model, vision_tower=vision_tower, lora=lora, seed=seed, rope_scaling_factor=rope_scaling,
                        image_alpha=image_alpha)
    kv_buffer = kv_buffer or min(1024, spec.llm.max_context)
    opts = ExportOptions(dtype=dtype, layout=layout, logits=logits, prefill_chunk=prefill_chunk, kv_buffer=kv_buffer)
    suffix = (f"-{layout}" if layout != Layout.DYNAMIC else "") + ("-fp16" if dtype == "fp16" else "")
    out = out or Path("graphs") / f"{spec.name}{suffix}"
    configure(quiet=quiet)
    manifest = export_model(spec, out, opts, force=force)
    for graph in manifest["graphs"]:
        if graph.get("cached"):
            typer.echo(f"{graph['file']:<22}  cached   (inputs unchanged since an interrupted run)")
            continue
        stats = ", ".join(f"{k} max|diff| {v['max_abs_diff']:.2e}" for k, v in graph["validation"]["outputs"].items())
        typer.echo(f"{graph['file']:<22} {graph['export_seconds']:>7.1f} s  ORT vs PyTorch: {stats}  [ok]")
    typer.echo(f"wrote {out} in {manifest['export_seconds']} s (peak RSS {manifest['peak_rss_mb']} MB)")

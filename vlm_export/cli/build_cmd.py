"""`vlm-export build MODEL --target T`: graphs -> target artifacts + a build report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.options import LoraOpt, ModelArg, QuietOpt, SeedOpt, VisionTowerOpt


@handles_errors
def build(
    model: ModelArg = "smol",
    target: Annotated[str, typer.Option("--target", help="Build target: cpu | orin | sd888.")] = "cpu",
    graphs: Annotated[Optional[Path], typer.Option("--graphs", help="Exported graphs to build from (default graphs/<model>; exported if absent).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default engines/<target>/<model>).")] = None,
    variants: Annotated[Optional[str], typer.Option("--variants", help="cpu: subset of fp32,int8,int4; orin: subset of fp16,int8; sd888: subset of qnn,cpu-int8,cpu-int4 (comma-separated).")] = None,
    layout: Annotated[Optional[str], typer.Option("--layout", help="cpu: decoder layout, inplace (GroupQueryAttention, in-place KV; default) | dynamic (Concat KV).")] = None,
    vision: Annotated[Optional[str], typer.Option("--vision", help="cpu: vision tower of the int8/int4 variants, int8 (dynamic; default) | fp32.")] = None,
    kv: Annotated[Optional[str], typer.Option("--kv", help="cpu: KV cache of the int8/int4 variants (inplace layout), int8 (calibrated scale per head and channel; default) | fp32.")] = None,
    kernels: Annotated[Optional[str], typer.Option("--kernels", help="cpu: matmuls of the int4 variant, auto (native where the CPU has AVX-512 VNNI and a C compiler is present; default) | native (vlm-export's int4 kernel) | ort (ONNX Runtime's MatMulNBits).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="orin: agx-orin-64gb | agx-orin-32gb | orin-nx-16gb | orin-nx-8gb | orin-nano-8gb")] = None,
    dla: Annotated[Optional[bool], typer.Option("--dla/--no-dla", help="orin: vision graph on DLA core 0, GPU fallback.")] = None,
    max_prompt: Annotated[Optional[int], typer.Option("--max-prompt", help="orin: longest prompt (tokens) the prefill profile takes.")] = None,
    max_context: Annotated[Optional[int], typer.Option("--max-context", help="orin: KV cache length the decode profile takes; sd888: KV buffer of the static graphs.")] = None,
    prefill_chunk: Annotated[Optional[int], typer.Option("--prefill-chunk", help="sd888: prompt tokens per static prefill call.")] = None,
    soc: Annotated[Optional[str], typer.Option("--soc", help="sd888: Snapdragon SoC the QNN context binaries are compiled for (SM8350 = Snapdragon 888).")] = None,
    qnn_graphs: Annotated[Optional[str], typer.Option("--qnn-graphs", help="sd888: graphs put on the NPU, subset of vision,decoder (the others run on the CPU).")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="cpu (int8 KV)/orin/sd888: calibration folder with recipe.json (default: the repository's calibration/).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    vision_tower: VisionTowerOpt = None,
    lora: LoraOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
):
    """Build target artifacts (each variant runnable with `vlm-export run`) and a build report."""
    from vlm_export.build import build_model
    from vlm_export.progress import configure
    from vlm_export.spec import resolve_spec
    from vlm_export.targets import target_module

    target_module(target)  # an unknown target fails before any work
    spec = resolve_spec(model, vision_tower=vision_tower, lora=lora, seed=seed)
    graphs = graphs or Path("graphs") / spec.name
    out = out or Path("engines") / target / spec.name
    given = {"variants": tuple(variants.split(",")) if variants else None, "layout": layout, "vision": vision, "kv": kv, "kernels": kernels, "device": device, "vision_on_dla": dla,
             "max_prompt": max_prompt, "max_context": max_context, "prefill_chunk": prefill_chunk, "soc": soc,
             "qnn_graphs": tuple(qnn_graphs.split(",")) if qnn_graphs else None,
             "calibration": str(calibration) if calibration else None}
    options = {k: v for k, v in given.items() if v is not None}
    configure(quiet=quiet)
    report = build_model(spec, target, out, graphs, options, force)
    typer.echo((out / "report.md").read_text().rstrip())
    typer.echo(f"wrote {out}: {report['message']}")

"""`vlm-export build MODEL --target T`: graphs -> target artifacts + a build report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.options import ImageAlphaOpt, LoraOpt, ModelArg, QuietOpt, SeedOpt, VisionTowerOpt
from vlm_export.targets import TARGETS

OPTION_FIELDS = {"dla": "vision_on_dla"}  # parameter name -> Profile field, where the two differ


class BuildCommand(TyperCommand):
    """`build`, whose per-target options take their help text and help panel from the targets' own
    profile data (`cli_help()`); the targets are imported only when help is shown, not on every start."""

    def format_help(self, ctx, formatter) -> None:
        from vlm_export.targets import option_help

        described = option_help()
        for param in self.params:
            per_target = described.get(OPTION_FIELDS.get(param.name, param.name))
            if not per_target:
                continue
            names = list(per_target)
            param.rich_help_panel = f"--target {names[0]}" if len(names) == 1 else f"--target {' | '.join(names)}"
            param.help = "\n\n".join(f"{t}: {text}." for t, text in per_target.items()) if len(names) > 1 \
                else per_target[names[0]] + "."
        super().format_help(ctx, formatter)


@handles_errors
def build(
    model: ModelArg = "smol",
    target: Annotated[str, typer.Option("--target", help=f"Build target: {' | '.join(TARGETS)}.")] = "cpu",
    graphs: Annotated[Path | None, typer.Option("--graphs", help="Exported graphs to build from (default graphs/<model>; exported if absent).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default engines/<target>/<model>).")] = None,
    variants: Annotated[str | None, typer.Option("--variants")] = None,
    layout: Annotated[str | None, typer.Option("--layout")] = None,
    vision: Annotated[str | None, typer.Option("--vision")] = None,
    kv: Annotated[str | None, typer.Option("--kv")] = None,
    kernels: Annotated[str | None, typer.Option("--kernels")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    dla: Annotated[bool | None, typer.Option("--dla/--no-dla")] = None,
    max_prompt: Annotated[int | None, typer.Option("--max-prompt")] = None,
    max_context: Annotated[int | None, typer.Option("--max-context")] = None,
    prefill_chunk: Annotated[int | None, typer.Option("--prefill-chunk")] = None,
    soc: Annotated[str | None, typer.Option("--soc")] = None,
    qnn_graphs: Annotated[str | None, typer.Option("--qnn-graphs")] = None,
    calibration: Annotated[Path | None, typer.Option("--calibration")] = None,
    eval_tokens: Annotated[int | None, typer.Option("--eval-tokens")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero when a variant misses its quality budget "
                                                        "(the build is still written).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    vision_tower: VisionTowerOpt = None,
    lora: LoraOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    image_alpha: ImageAlphaOpt = None,
):
    """Build target artifacts (each variant runnable with `vlm-export run`) and a build report."""
    from vlm_export.errors import require_export_extra

    require_export_extra("building target artifacts (export from the PyTorch reference, quantization)")
    from vlm_export.build import budget_verdicts, build_model, check_budgets
    from vlm_export.progress import configure
    from vlm_export.spec import resolve_spec
    from vlm_export.targets import target_module

    target_module(target)  # an unknown target fails before any work
    spec = resolve_spec(model, vision_tower=vision_tower, lora=lora, seed=seed, image_alpha=image_alpha)
    graphs = graphs or Path("graphs") / spec.name
    out = out or Path("engines") / target / spec.name
    given = {"variants": tuple(variants.split(",")) if variants else None, "layout": layout, "vision": vision, "kv": kv, "kernels": kernels, "device": device, "vision_on_dla": dla,
             "max_prompt": max_prompt, "max_context": max_context, "prefill_chunk": prefill_chunk, "soc": soc,
             "qnn_graphs": tuple(qnn_graphs.split(",")) if qnn_graphs else None,
             "calibration": str(calibration) if calibration else None, "eval_tokens": eval_tokens}
    options = {k: v for k, v in given.items() if v is not None}
    configure(quiet=quiet)
    report = build_model(spec, target, out, graphs, options, force)
    typer.echo((out / "report.md").read_text().rstrip())
    for name, verdict in budget_verdicts(report):
        typer.echo(f"budget: {name} {verdict['line']}")
    typer.echo(f"wrote {out}: {report['message']}")
    if strict:
        check_budgets(report, out)

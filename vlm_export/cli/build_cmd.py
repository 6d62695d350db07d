"""`vlm-export build MODEL --target T`: graphs -> target artifacts + a build report.

The per-target options are generated from the targets' profiles (targets/<t>/profile.py): every
Profile field declared with `option()` is one option here, in a help panel named after the targets
whose profile has it, with each target's own `cli_help()` text. A new profile field is a new option
with no edit here.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.options import ImageAlphaOpt, LoraOpt, ModelArg, QuietOpt, SeedOpt, VisionTowerOpt
from vlm_export.targets import TARGETS, option_help, profile_module
from vlm_export.targets.recipe import option_flag


def _common(
    model: ModelArg = "smol",
    target: Annotated[str, typer.Option("--target", help=f"Build target: {' | '.join(TARGETS)}.")] = "cpu",
    graphs: Annotated[Path | None, typer.Option("--graphs", help="Exported graphs to build from (default graphs/<model>; exported if absent).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default engines/<target>/<model>).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero when a variant misses its quality budget "
                                                        "(the build is still written).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    vision_tower: VisionTowerOpt = None,
    lora: LoraOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    image_alpha: ImageAlphaOpt = None,
):
    """The options every target takes (the signature only: `build` below runs)."""


COMMON = tuple(inspect.signature(_common, eval_str=True).parameters.values())


def profile_fields() -> dict[str, tuple[dataclasses.Field, object]]:
    """Profile field name -> (the field, its type), over every target's profile, for the fields
    declared with `option()`. The same name means the same option on every target that has it."""
    fields = {}
    for name in TARGETS:
        profile = profile_module(name).Profile
        hints = typing.get_type_hints(profile)
        for field in dataclasses.fields(profile):
            if "cli" in field.metadata:
                fields.setdefault(field.name, (field, hints[field.name]))
    return fields


def _is_list(hint) -> bool:
    return typing.get_origin(hint) is tuple


def _option(name: str, field: dataclasses.Field, hint, described: dict[str, str]) -> inspect.Parameter:
    flag = option_flag(field)
    kinds = set(typing.get_args(hint)) | {hint}
    if bool in kinds:
        kind, declared = bool | None, f"{flag}/--no-{flag[2:]}"
    elif int in kinds:
        kind, declared = int | None, flag
    else:  # text, and comma-separated lists
        kind, declared = str | None, flag
    names = list(described)
    panel = f"--target {' | '.join(names)}"
    text = "\n\n".join(f"{t}: {line}." for t, line in described.items()) if len(names) > 1 else described[names[0]] + "."
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind, typer.Option(declared, help=text, rich_help_panel=panel)])


@handles_errors
def build(**options):
    """Build target artifacts (each variant runnable with `vlm-export run`) and a build report."""
    from vlm_export.errors import require_export_extra

    require_export_extra("building target artifacts (export from the PyTorch reference, quantization)")
    from vlm_export.build import budget_verdicts, build_model, check_budgets
    from vlm_export.progress import configure
    from vlm_export.spec import resolve_spec
    from vlm_export.targets import target_module

    common = {p.name: options.pop(p.name) for p in COMMON}
    target, strict = common["target"], common["strict"]
    target_module(target)  # an unknown target fails before any work
    spec = resolve_spec(common["model"], vision_tower=common["vision_tower"], lora=common["lora"], seed=common["seed"],
                        image_alpha=common["image_alpha"])
    graphs = common["graphs"] or Path("graphs") / spec.name
    out = common["out"] or Path("engines") / target / spec.name
    fields = profile_fields()
    given = {name: tuple(value.split(",")) if _is_list(fields[name][1]) else value
             for name, value in options.items() if value is not None}
    configure(quiet=common["quiet"])
    report = build_model(spec, target, out, graphs, given, common["force"])
    typer.echo((out / "report.md").read_text().rstrip())
    for name, verdict in budget_verdicts(report):
        typer.echo(f"budget: {name} {verdict['line']}")
    done = "reused the finished build of these same inputs in" if report.get("reused") else "wrote"
    typer.echo(f"{done} {out}: {report['message']}")
    if strict:
        check_budgets(report, out)


def _signature() -> inspect.Signature:
    described = option_help()
    # a field without its cli_help() text still becomes an option (tests/test_build_help.py fails on it)
    missing = "(no help text: add it to the target's cli_help())"
    owners = {name: [t for t in TARGETS if name in {f.name for f in dataclasses.fields(profile_module(t).Profile)}]
              for name in profile_fields()}
    generated = [_option(name, field, hint, {t: described.get(name, {}).get(t, missing) for t in owners[name]})
                 for name, (field, hint) in profile_fields().items()]
    return inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in COMMON] + generated)


build.__signature__ = _signature()

"""A target's variants as declared data, and its profile's options as data the CLI is generated from.

A `Recipe` says what a variant is: its precision, the passes that rewrite which graphs, the decoder
layout, the execution providers it runs on, the quality budget it is held to and the stage it is
made from. Each target declares its recipes in its `profile.py` (torch- and ONNX-free, so the CLI
can read them on start) and maps pass names to the code that runs them in its build module; the
one build loop (`build_loop.py`) runs the stages.

A profile field declared with `option()` becomes a `vlm-export build` option (`cli/build_cmd.py`),
grouped under the targets whose profile has it, with the text the target's `cli_help()` gives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from vlm_export.spec.graph_io import GraphRole


class Precision(StrEnum):
    """The arithmetic a variant's matmuls run in (weights / activations as its passes say)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


@dataclass(frozen=True)
class Pass:
    """One rewrite of the graphs of one role (a name in the target's pass registry)."""

    role: GraphRole
    name: str

    def __str__(self) -> str:
        return f"{self.role}: {self.name}"


@dataclass(frozen=True)
class Recipe:
    """One variant (or an internal stage) of a target, as data."""

    name: str  # the variant's folder
    summary: str  # what it is, for `build --help` and reports
    precision: Precision
    passes: tuple[Pass, ...] = ()  # rewrites of the source's graphs, in order
    layout: str | None = None  # the decoder layout it carries (spec/layouts/); None: its source's
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # where it runs (ORT providers, or TensorRT)
    budget: str | None = None  # quality.metrics.BUDGETS entry it is judged by; None: the baseline
    source: str | None = None  # the stage it is made from; None: the exported graphs
    shipped: bool = True  # False: an fp32 stage the variants are made from, not one to run on the device
    over_budget_why: str | None = None  # what the report says when it misses its budget (a known, measured loss)

    def passes_on(self, role: GraphRole) -> list[str]:
        return [p.name for p in self.passes if p.role == role]


def option(default, flag: str | None = None):
    """A profile field that `vlm-export build` takes as `flag` (default `--field-name`; a bool field
    becomes `--flag/--no-flag`; a tuple field takes a comma-separated list). Its help text is the
    target's `cli_help()` entry of the same name."""
    return dataclasses.field(default=default, metadata={"cli": flag})


def option_flag(field: dataclasses.Field) -> str:
    """The command-line flag of a profile field declared with `option()`."""
    return field.metadata.get("cli") or "--" + field.name.replace("_", "-")


def recommended(recipes: dict[str, Recipe], records: dict[str, dict]) -> str | None:
    """The variant to run: the last of a target's variants (its most compressed) that did not miss its
    quality budget (one not judged -- a baseline, or seeded-random weights -- counts as within). None
    when no variant is built."""
    fitting = [name for name, record in records.items() if name in recipes and recipes[name].shipped
               and record.get("built", True) and (record.get("quality_budget") or {}).get("passed", True)]
    return fitting[-1] if fitting else None


def budget_lines(recipes: dict[str, Recipe], records: dict[str, dict]) -> list[str]:
    """A report's verdict per judged variant, with the recipe's reason where one misses its budget,
    then the recommended variant."""
    lines = [f"- {name}: {r['quality_budget']['line']}" + (
             f" -- why: {recipes[name].over_budget_why}" if not r["quality_budget"]["passed"] and recipes[name].over_budget_why else "")
             for name, r in records.items() if name in recipes and r.get("quality_budget")]
    unjudged = [name for name, r in records.items() if name in recipes and recipes[name].budget
                and r.get("accuracy_vs_fp32") and not r.get("quality_budget")]
    if unjudged:
        lines.append(f"- {', '.join(unjudged)}: measured, not judged against a budget (seeded-random LLM weights: "
                     "their quality numbers only show that the path runs)")
    best = recommended(recipes, records)
    return lines + ([f"Recommended: {best} (the lowest-precision variant within its quality budget)."] if best else [])


def weight_lines(records: dict[str, dict]) -> list[str]:
    """'- <variant> weights: <count> <origin>, ...' per variant whose record carries `weights`
    (blocks per origin, as `quantize.weight_only` counts them)."""
    return [f"- {name} weights: " + ", ".join(f"{count} {origin}" for origin, count in r["weights"].items())
            for name, r in records.items() if r.get("weights")]


def choices(table: dict, default: str) -> str:
    """'a = what a is (default); b = ...' for a help text."""
    return "; ".join(f"{k} = {v}" + (" (default)" if k == default else "") for k, v in table.items())


def variants_help(recipes: dict[str, Recipe], default: tuple[str, ...]) -> str:
    """The `--variants` help of a target: its shipped recipes and what each is."""
    shipped = [r for r in recipes.values() if r.shipped]
    return (f"comma-separated subset of {','.join(r.name for r in shipped)} (default {','.join(default)}): "
            + "; ".join(f"{r.name} = {r.summary}" for r in shipped))


def check_variants(target: str, recipes: dict[str, Recipe], variants: tuple[str, ...]) -> None:
    """Raise VlmExportError naming the variants `target` does not declare."""
    from vlm_export.errors import VlmExportError

    known = [name for name, r in recipes.items() if r.shipped]
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise VlmExportError(f"unknown {target} variant(s) {', '.join(unknown)}", f"use {', '.join(known)}")

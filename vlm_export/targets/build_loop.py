"""The one build loop every target runs: its recipes' stages, in order, into an atomic output
directory, each stage cached by a key of everything it depends on (an interrupted or repeated
build reuses what is finished and intact), then the target's report. A finished build of the very
same inputs is reused as it stands (re-running a command is not an error)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from vlm_export.artifacts import MANIFEST, atomic_directory, stage_key, verify, write_json_atomic
from vlm_export.errors import VlmExportError
from vlm_export.progress import note, stage
from vlm_export.targets.recipe import Recipe


def build_stages(manifest: dict, out: Path, force: bool, stages: list[Recipe], report: dict,
                 build_stage: Callable[[Recipe, Path], dict], key: Callable[[Recipe], tuple],
                 markdown: Callable[[dict], str], finish: Callable[[dict, Path], None] | None = None) -> dict:
    """Build `stages` into `out` (atomically: a failure leaves no half-written `out`).

    manifest:    the verified manifest of the exported graphs (its file hashes key every stage)
    build_stage: (recipe, staging folder) -> the stage's report record; it writes staging/recipe.name
    key:         recipe -> what else its output depends on (profile options, format versions)
    markdown:    report -> report.md; `finish(report, staging folder)` completes the report first.
    Returns `report` with report["variants"][name] = each stage's record, and report["build_key"] (what
    the whole build depends on); when `out` already holds a finished build with that key, that
    build's report with "reused": True, each variant verified (VlmExportError if one no longer
    matches its manifest, or if `out` holds a build of other inputs).
    Raises what a stage raises.
    """
    keys = {recipe.name: stage_key(manifest["files"], recipe, *key(recipe)) for recipe in stages}
    build_key = stage_key(keys)
    # the same inputs in parts, so that a refused build can say which of them differ
    inputs = {"graphs": stage_key(manifest["files"]),
              "variants": {recipe.name: {"recipe": stage_key(recipe), "passes": [str(p) for p in recipe.passes],
                                         "settings": stage_key(*key(recipe))} for recipe in stages}}
    if not force and (out / "report.json").is_file():
        with stage(f"checking the finished build in {out} against these inputs"):
            finished = finished_build(out, build_key, list(keys), inputs)
        return {**finished, "reused": True}  # not stored: says so to the caller only
    report.setdefault("variants", {})
    report["build_key"] = build_key
    report["build_inputs"] = inputs
    with atomic_directory(out, force) as staging:
        for recipe in stages:
            stage_id = keys[recipe.name]
            record = staging.cached(recipe.name, stage_id)
            if record is not None:
                note(f"cached {recipe.name} (unchanged inputs: the interrupted run's finished stage)")
            else:
                shutil.rmtree(staging.path / recipe.name, ignore_errors=True)  # leftovers of an interrupted attempt
                with stage(f"building {recipe.name}"):
                    record = build_stage(recipe, staging.path)
                staging.remember(recipe.name, stage_id, [f"{recipe.name}/{MANIFEST}"], record)
            report["variants"][recipe.name] = record
        if finish is not None:
            finish(report, staging.path)
        staging.finish()
        write_json_atomic(staging.path / "report.json", report)
        (staging.path / "report.md").write_text(markdown(report))
    return report


def what_differs(stored: dict | None, inputs: dict) -> str:
    """Which inputs of a finished build (its report's "build_inputs") differ from `inputs`, in words:
    the exported graphs, the variants, a variant's passes (named), the rest of its recipe, its settings."""
    if not isinstance(stored, dict) or not isinstance(stored.get("variants"), dict):
        return "graphs, options or build recipe"  # a report written before the parts were kept
    parts = ["the exported graphs"] if stored.get("graphs") != inputs["graphs"] else []
    had, asked = list(stored["variants"]), list(inputs["variants"])
    if had != asked:
        parts.append(f"the variants: {','.join(had)} there, {','.join(asked)} asked")
    changes: dict[str, list[str]] = {}  # what changed -> the variants it changed in
    for name in (n for n in asked if n in had):
        old, new = stored["variants"][name], inputs["variants"][name]
        if old.get("passes") != new["passes"]:
            gone = [p for p in old.get("passes", []) if p not in new["passes"]]
            added = [p for p in new["passes"] if p not in old.get("passes", [])]
            change = "; ".join([f"without '{p}'" for p in gone] + [f"with '{p}'" for p in added]) or "passes reordered"
            changes.setdefault(change, []).append(name)
        elif old.get("recipe") != new["recipe"]:
            changes.setdefault("another build recipe", []).append(name)
        if old.get("settings") != new["settings"]:
            changes.setdefault("other options or format versions", []).append(name)
    parts += [f"{' and '.join(names)}: {change}" for change, names in changes.items()]
    return "; ".join(parts) or "graphs, options or build recipe"


def finished_build(out: Path, build_key: str, variants: list[str], inputs: dict | None = None) -> dict:
    """The report of the finished build in `out`, which was built from the inputs `build_key` stands
    for (`inputs`: the same in parts), its variants all verified. Raises VlmExportError when it holds
    one of other inputs, naming which (replacing it needs --force), or one that fails verification."""
    import json

    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        report = {}
    if report.get("build_key") != build_key:
        differs = what_differs(report.get("build_inputs"), inputs) if inputs else "graphs, options or build recipe"
        raise VlmExportError(f"{out} already holds a finished build of other inputs ({differs})",
                             "pass --force to rebuild it, or choose another --out")
    for name in variants:
        try:
            verify(out / name)
        except VlmExportError as exc:
            raise VlmExportError(f"{out} holds a finished build of these inputs, but {exc.problem}",
                                 "pass --force to rebuild it") from exc
    return report

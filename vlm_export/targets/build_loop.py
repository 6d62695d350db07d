"""The one build loop every target runs: its recipes' stages, in order, into an atomic output
directory, each stage cached by a key of everything it depends on (an interrupted or repeated
build reuses what is finished and intact), then the target's report."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from vlm_export.artifacts import MANIFEST, atomic_directory, stage_key, write_json_atomic
from vlm_export.progress import stage, step
from vlm_export.targets.recipe import Recipe


def build_stages(manifest: dict, out: Path, force: bool, stages: list[Recipe], report: dict,
                 build_stage: Callable[[Recipe, Path], dict], key: Callable[[Recipe], tuple],
                 markdown: Callable[[dict], str], finish: Callable[[dict, Path], None] | None = None) -> dict:
    """Build `stages` into `out` (atomically: a failure leaves no half-written `out`).

    manifest:    the verified manifest of the exported graphs (its file hashes key every stage)
    build_stage: (recipe, staging folder) -> the stage's report record; it writes staging/recipe.name
    key:         recipe -> what else its output depends on (profile options, format versions)
    markdown:    report -> report.md; `finish(report, staging folder)` completes the report first.
    Returns `report` with report["variants"][name] = each stage's record. Raises what a stage raises.
    """
    report.setdefault("variants", {})
    with atomic_directory(out, force) as staging:
        for recipe in stages:
            stage_id = stage_key(manifest["files"], recipe, *key(recipe))
            record = staging.cached(recipe.name, stage_id)
            if record is not None:
                step(f"{recipe.name}: unchanged inputs, reusing the finished stage")
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

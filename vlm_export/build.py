"""`build_model`: MODEL -> graphs (exported, or reused when already exported and intact) -> target."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.progress import stage, step
from vlm_export.spec import ModelSpec
from vlm_export.targets import target_module


def ensure_graphs(spec: ModelSpec, graphs: Path, on_graph=None) -> Path:
    """Reuse `graphs` if it is a verified export of this model; export it otherwise (`on_graph`:
    export_model's, called per graph exported)."""
    from vlm_export.artifacts import MANIFEST, verify
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec.graph_io import ExportOptions

    if (graphs / MANIFEST).is_file():
        manifest = verify(graphs)
        if manifest.get("model") != json.loads(json.dumps(spec.to_dict())):  # as stored: tuples become lists
            raise VlmExportError(f"{graphs} holds graphs of another model or version", "pass another --graphs DIR or delete that one")
        step(f"reusing verified graphs in {graphs}")
        return graphs
    export_model(spec, graphs, ExportOptions(), force=graphs.exists(), on_graph=on_graph)
    return graphs


def budget_verdicts(report: dict) -> list[tuple[str, dict]]:
    """(variant, quality_budget record) for every variant a target judged against its budget."""
    return [(name, v["quality_budget"]) for name, v in report.get("variants", {}).items()
            if isinstance(v, dict) and v.get("quality_budget")]


def check_budgets(report: dict, out: Path) -> None:
    """--strict: raises VlmExportError naming every variant that missed its quality budget (the
    build itself is complete and stays written)."""
    failed = [f"{name} {v['line']}" for name, v in budget_verdicts(report) if not v["passed"]]
    if failed:
        raise VlmExportError(f"--strict: {'; '.join(failed)} (the build is written to {out})",
                             "ship a variant within its budget, or rebuild with more bits / --kv fp32")


def build_model(spec: ModelSpec, target: str, out: Path, graphs: Path, profile_options: dict, force: bool) -> dict:
    import dataclasses

    from vlm_export.targets import option_flags

    module = target_module(target)
    fields = {f.name for f in dataclasses.fields(module.Profile)}
    foreign = [option_flags().get(name, name) for name in profile_options if name not in fields]
    if foreign:
        raise VlmExportError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to --target {target}",
                             "drop it" if len(foreign) == 1 else "drop them")
    profile = module.Profile(**profile_options)  # each target validates its own typed profile
    if hasattr(module, "preflight"):  # a target's own input checks, before minutes of export
        module.preflight(profile)
    # a target may start work on the graphs as they are exported (cpu: its fp32 images, beside the export)
    beside = getattr(module, "while_exporting", None)
    with stage(f"building {spec.name} for --target {target} in {out}"), \
            (beside(profile, spec) if beside else contextlib.nullcontext()) as on_graph:
        ensure_graphs(spec, graphs, on_graph)
        return module.build(graphs, out, profile, force=force)

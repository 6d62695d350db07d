"""`build_model`: MODEL -> graphs (exported, or reused when already exported and intact) -> target."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from vlm_export.artifacts import MANIFEST
from vlm_export.errors import VlmExportError
from vlm_export.progress import stage, step
from vlm_export.spec import ModelSpec
from vlm_export.spec.graph_io import GraphRole, Layout
from vlm_export.targets import target_module


def ensure_graphs(spec: ModelSpec, graphs: Path, layouts: tuple[str, ...] = (Layout.DYNAMIC,), on_graph=None) -> Path:
    """The exported graphs of `spec` a target builds from, whose decoder is in one of `layouts` (the
    target's `graphs_layouts`, the first the one it prefers): `graphs` when it is such a verified
    export; when an export holds another layout, a copy relaid out into `<graphs>-<layouts[0]>` (vision,
    embed and tokenizer linked, only the decoder exported again; reused as `graphs` is); exported into
    `graphs` in layouts[0] when there is none, so a build never exports a decoder it does not build
    from (a cpu build: the inplace one only). `on_graph`: export_model's, called per graph exported.

    A built variant's artifact set passed as `graphs` is taken as it is (the target's own checks
    judge it). Raises VlmExportError when `graphs` (or its relaid copy) holds another model's graphs."""
    from vlm_export.export.pipeline import EXPORT_KIND, export_model
    from vlm_export.spec.graph_io import ExportOptions

    if not (graphs / MANIFEST).is_file():
        export_model(spec, graphs, ExportOptions(layout=layouts[0]), force=graphs.exists(), on_graph=on_graph)
        return graphs
    manifest = _verified(spec, graphs)
    if decoder_layout(manifest) in layouts or manifest.get("kind") != EXPORT_KIND:  # a built variant: the target judges it
        step(f"reusing verified graphs in {graphs}")
        return graphs
    relaid = graphs.with_name(f"{graphs.name}-{layouts[0]}")
    if (relaid / MANIFEST).is_file() and decoder_layout(_verified(spec, relaid)) == layouts[0]:
        step(f"reusing verified graphs in {relaid} ({graphs} relaid out)")
        return relaid
    export_model(spec, relaid, ExportOptions(**{**manifest["options"], "layout": layouts[0]}), force=relaid.exists(),
                 reuse=graphs, on_graph=on_graph)
    return relaid


def decoder_layout(manifest: dict) -> str:
    """The layout name of an export's decoder graph(s), from its manifest."""
    from vlm_export.spec.layouts import graph_layout

    return next(graph_layout(g).name for g in manifest["graphs"] if g["wrapper"] == GraphRole.DECODER)


def _verified(spec: ModelSpec, graphs: Path) -> dict:
    from vlm_export.artifacts import verify

    manifest = verify(graphs)
    if manifest.get("model") != json.loads(json.dumps(spec.to_dict())):  # as stored: tuples become lists
        raise VlmExportError(f"{graphs} holds graphs of another model or version", "pass another --graphs DIR or delete that one")
    return manifest


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
        graphs = ensure_graphs(spec, graphs, module.graphs_layouts(profile), on_graph)
        return module.build(graphs, out, profile, force=force)

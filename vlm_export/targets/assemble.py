"""One variant = the source artifact set with some graphs rewritten (quantized, compiled) and the
rest hard-linked unchanged, then a manifest of its own. Every target assembles its variants so."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlm_export.artifacts import link_or_copy, write_manifest

# (graph record, source .onnx, destination folder) -> what was done (goes into the manifest);
# it may change the record (a new file name, fixed shapes, the execution provider it needs).
Rewrite = Callable[[dict, Path, Path], dict]


def assemble_variant(source: Path, out: Path, manifest: dict, rewrites: dict[str, Rewrite], **facts) -> dict:
    """`rewrites` maps a graph wrapper kind (vision | embed | decoder) to its rewrite."""
    out.mkdir(parents=True, exist_ok=True)
    records = [dict(g) for g in manifest["graphs"]]
    rewritten = {g["file"]: g for g in records if g["wrapper"] in rewrites}
    done = {}
    for graph in rewritten.values():
        source_file = graph["file"]
        done[source_file] = rewrites[graph["wrapper"]](graph, source / source_file, out)
    skip = set(rewritten) | {f + ".data" for f in rewritten}
    for relative in manifest["files"]:
        if relative not in skip:
            link_or_copy(source / relative, out / relative)
    body = {k: v for k, v in manifest.items() if k not in ("files", "graphs")}
    return write_manifest(out, {**body, "kind": "vlm-export build", **facts, "graphs": records, "rewrites": done})


def export_layout(graphs: Path, out: Path, **overrides) -> dict:
    """The model of `graphs` exported again with other options (a decoder layout a target needs);
    graphs that come out the same (vision, embed) are linked from `graphs`, not exported twice."""
    from vlm_export.artifacts import read_manifest
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec.graph_io import ExportOptions
    from vlm_export.spec.model_spec import spec_from_dict

    manifest = read_manifest(graphs)  # export_model verifies `graphs` (hashes) before reusing any of it
    options = ExportOptions(**{**manifest["options"], **overrides})
    return export_model(spec_from_dict(manifest["model"]), out, options, reuse=graphs)

"""`diff_artifacts`: the reference vs exported graphs and built variants -> JSON + Markdown report.

    per graph      PyTorch reference vs each artifact (Polygraphy Comparator), golden files
    per layer      the graphs' decoder vs PyTorch, and the fp32 graph vs each candidate decoder, block by
                   block (first divergence)
    end to end     teacher-forced perplexity, KL and top-1 on the eval prose, greedy answers, long context
                   (quality/scoring.py; every layout), with the variant's quality budget
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from vlm_export.artifacts import sha256, write_json_atomic
from vlm_export.diff.graph_diff import diff_graph, golden_command
from vlm_export.diff.localize import localize, localize_against_torch, summary
from vlm_export.diff.polygraphy_runners import TorchGraphRunner, ort_runner
from vlm_export.diff.report import markdown
from vlm_export.export.validate import InputSampler
from vlm_export.model.graph_modules import graph_module
from vlm_export.model.load import load_reference
from vlm_export.progress import stage, step
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.spec.graph_io import GraphRole, GraphSpec, diff_cases, make_inputs

SCHEMA_VERSION = 1


@dataclasses.dataclass
class Candidate:
    label: str
    directory: Path
    kind: str  # fp32 | fp16 | int8 | int4
    manifest: dict


def _candidate(directory: Path, label: str | None = None) -> Candidate:
    artifacts = ArtifactSet.open(directory)
    manifest = artifacts.manifest
    kind = manifest.get("variant") or manifest.get("options", {}).get("dtype", "fp32")
    return Candidate(label or f"{kind}:{directory.name}", directory, kind, manifest)


def _io_mismatch(base: dict, candidate: Candidate) -> str | None:
    """Why the candidate's graph cannot take the base graph's feeds (an int8 KV cache), or None."""
    record = next((g for g in candidate.manifest["graphs"] if g["file"] == base["file"]), None)
    if record is None:
        return None
    theirs = {t["name"]: t["dtype"] for t in record["inputs"]}
    changed = sorted(t["name"] for t in base["inputs"] if theirs.get(t["name"], t["dtype"]) != t["dtype"])
    if not changed:
        return None
    return (f"{len(changed)} inputs have another type ({changed[0]}: {theirs[changed[0]]}; an int8 KV cache), so the "
            f"graph cannot take the reference's feeds: compared end to end only")


def _kernel_library(candidate: Candidate, file: str) -> Path | None:
    """The candidate's kernel library when its graph `file` uses vlm-export's own ops."""
    record = next((g for g in candidate.manifest["graphs"] if g["file"] == file), {})
    return candidate.directory / record["custom_op_library"] if record.get("custom_op_library") else None


def _graph_feeds(record: dict, sampler: InputSampler) -> tuple[GraphSpec, list[dict]]:
    graph = GraphSpec.from_dict(record)
    graph = dataclasses.replace(graph, cases=diff_cases(graph))
    rng = np.random.default_rng(1234)
    return graph, [make_inputs(graph, case, rng, sampler) for case in graph.cases]


def _diff_graph(name: str, record: dict, candidates: list, reference, sampler: InputSampler, graphs_dir: Path, out: Path,
                report: dict) -> None:
    """One graph of every candidate against PyTorch (Polygraphy); a changed decoder also localised."""
    graph, feeds = _graph_feeds(record, sampler)
    seen_digests, runners, kinds = set(), {}, {}
    comparable = []
    for c in candidates:
        digest = c.manifest["files"].get(graph.file, {}).get("sha256")
        if digest is None or digest in seen_digests:
            continue  # absent, or the very same file as a candidate already compared
        reason = _io_mismatch(record, c)
        if reason:
            report["not_compared"].append({"graph": name, "candidate": c.label, "reason": reason})
            continue
        comparable.append(c)
        seen_digests.add(digest)
        runners[c.label] = ort_runner(c.directory / graph.file, c.label, library=_kernel_library(c, graph.file))
        kinds[c.label] = c.kind
    golden = out / "golden" / name
    torch_runner = TorchGraphRunner(graph_module(reference, graph.wrapper, graph.attrs), graph)
    report["graphs"][name] = diff_graph(torch_runner, runners, kinds, feeds, graph.atol or 1e-4, graph.rtol, golden)
    report["golden"][name] = golden_command(str(graphs_dir / graph.file), golden, graph.atol or 1e-4, graph.rtol)
    if graph.wrapper == GraphRole.DECODER:
        _localise_decoder(name, graph, feeds, [c for c in candidates if c in comparable], torch_runner.module, graphs_dir, report)


def _localise_decoder(name: str, graph: GraphSpec, feeds: list[dict], comparable: list[Candidate], module, graphs_dir: Path,
                      report: dict) -> None:
    """Block by block: the baseline graphs against PyTorch (hooks on `module`'s blocks), each variant
    whose decoder differs against the baseline's graph (an fp16 / int8 / int4 one: a block is named
    only for a step change over its neighbours' error)."""
    for c in comparable:
        path = c.directory / graph.file
        if c.directory == graphs_dir:
            step(f"localising {c.label} {graph.file} against PyTorch")
            loc = localize_against_torch(module, graph, path, feeds, _kernel_library(c, graph.file), c.kind != "fp32")
        elif path.is_file() and sha256(path) != sha256(graphs_dir / graph.file):
            step(f"localising {c.label} {graph.file}")
            loc = localize(graphs_dir / graph.file, path, feeds, _kernel_library(c, graph.file), c.kind != "fp32")
        else:
            continue
        report["localisation"].setdefault(c.label, {})[name] = loc


def localisation_lines(report: dict, named_only: bool = False) -> list[str]:
    """One console line per localised decoder: where it first diverges, or why no block is named
    (`named_only`: the lines that name a block)."""
    return [f"{label} {graph}: {summary(loc)}" for label, graphs in report["localisation"].items() for graph, loc in graphs.items()
            if not named_only or loc["first_divergence"] is not None]


DIFF_EVAL_TOKENS = 512  # scored positions of the eval prose per candidate, end to end


def diff_artifacts(graphs_dir: Path, variant_dirs: list[Path], out: Path, new_tokens: int = 16,
                   eval_tokens: int = DIFF_EVAL_TOKENS) -> dict:
    """Every graph of `graphs_dir` and of each variant against PyTorch, then end to end (greedy
    answers of `new_tokens`, `eval_tokens` scored positions); writes diff.json and diff.md to `out`."""
    with stage(f"diffing {graphs_dir} and {len(variant_dirs)} variant(s)"):
        return _diff_artifacts(graphs_dir, variant_dirs, out, new_tokens, eval_tokens)


def _diff_artifacts(graphs_dir: Path, variant_dirs: list[Path], out: Path, new_tokens: int, eval_tokens: int) -> dict:
    base = ArtifactSet.open(graphs_dir)
    candidates = [_candidate(graphs_dir, "graphs")] + [_candidate(Path(d)) for d in variant_dirs]
    reference = load_reference(base.spec)
    sampler = InputSampler(reference)
    report = {"schema": SCHEMA_VERSION, "model": base.spec.name, "reference": "pytorch", "graphs_dir": str(graphs_dir),
              "candidates": {c.label: {"dir": str(c.directory), "kind": c.kind} for c in candidates},
              "graphs": {}, "localisation": {}, "end_to_end": {}, "golden": {}, "not_compared": []}
    for name, record in base.graphs.items():
        with stage(f"diffing {record['file']}"):
            _diff_graph(name, record, candidates, reference, sampler, graphs_dir, out, report)
    _end_to_end(graphs_dir, candidates, new_tokens, eval_tokens, report)
    report["passed"] = all(v["passed"] for g in report["graphs"].values() for v in g.values())
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "diff.json", report)
    (out / "diff.md").write_text(markdown(report))
    return report


def _end_to_end(graphs_dir: Path, candidates: list[Candidate], new_tokens: int, eval_tokens: int, report: dict) -> None:
    """Each candidate through the generation loop against the PyTorch reference (quality/scoring.py)."""
    from vlm_export.diff.end_to_end import agreement, open_generator
    from vlm_export.quality import table

    with stage("end-to-end agreement with PyTorch"), open_generator(graphs_dir, "torch") as ref_gen:
        for c in candidates:
            step(c.label)
            with open_generator(c.directory, "ort") as cand_gen:
                result = agreement(ref_gen, cand_gen, eval_tokens, new_tokens)
            judged = table.verdict(result, c.kind)  # int8 / int4 budgets; none for fp32 / fp16
            report["end_to_end"][c.label] = {**result, "budget": judged.to_dict() if judged else None}


def failure_summary(report: dict) -> str:
    failures = [f"{label} {graph} {', '.join(v['failed_outputs'])}"
                for graph, results in report["graphs"].items() for label, v in results.items() if not v["passed"]]
    return "; ".join(failures)


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())

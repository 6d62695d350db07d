"""Per-graph diffs with Polygraphy: the PyTorch reference and each artifact run on the same inputs
(Comparator.run -> RunResults), error statistics per output, golden files for the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from polygraphy.comparator import Comparator, CompareFunc, RunResults
from polygraphy.json import save_json
from polygraphy.logger import G_LOGGER

# Per-variant pass criteria. fp32 also honours the graph's own export tolerance (atol + rtol*max|ref|).
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99, "int4": 0.95}


def error_stats(reference: np.ndarray, candidate: np.ndarray) -> dict:
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    diff = np.abs(ref - cand)
    denominator = np.linalg.norm(ref) * np.linalg.norm(cand)
    return {
        "max_abs_diff": float(diff.max(initial=0.0)),
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "median_abs_diff": float(np.median(diff)) if diff.size else 0.0,
        "max_abs_ref": float(np.abs(ref).max(initial=0.0)),
        "cosine": float(ref @ cand / denominator) if denominator else 1.0,
    }


def output_passes(stats: dict, kind: str, atol: float, rtol: float) -> bool:
    if stats["cosine"] < MIN_COSINE[kind]:
        return False
    return kind != "fp32" or stats["max_abs_diff"] <= atol + rtol * stats["max_abs_ref"]


def _group(name: str) -> str:
    return "present" if name.startswith("present") else name


def diff_graph(reference_runner, candidates: dict, kinds: dict, feeds: list[dict], atol: float, rtol: float,
               golden_dir: Path | None = None) -> dict:
    """candidates: {label: Polygraphy runner}; kinds: {label: fp32 | fp16 | int8 | int4}.
    Returns per-candidate, per-output worst statistics and verdicts."""
    runners = [reference_runner, *candidates.values()]
    results = Comparator.run(runners, data_loader=feeds)
    reference = results[reference_runner.name]
    report = {}
    for variant, runner in candidates.items():
        worst: dict[str, dict] = {}
        for ref_iter, cand_iter in zip(reference, results[runner.name]):
            for name, ref_value in ref_iter.items():
                stats = error_stats(ref_value, cand_iter[name])
                group = _group(name)
                if group not in worst or stats["cosine"] < worst[group]["cosine"] or stats["max_abs_diff"] > worst[group]["max_abs_diff"]:
                    worst[group] = stats
        passed = {g: output_passes(s, kinds[variant], atol, rtol) for g, s in worst.items()}
        # Polygraphy's own verdict with the same absolute/relative tolerance, for the record.
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # its per-output log would repeat the report
            polygraphy = Comparator.compare_accuracy(
                RunResults([(reference_runner.name, reference), (runner.name, results[runner.name])]),
                compare_func=CompareFunc.simple(atol=atol, rtol=max(rtol, 1e-12)),
            )
        report[variant] = {"kind": kinds[variant], "outputs": worst, "passed": all(passed.values()), "failed_outputs": [g for g, ok in passed.items() if not ok],
                           "polygraphy_simple_compare_passed": bool(polygraphy)}
    if golden_dir is not None:
        golden_dir.mkdir(parents=True, exist_ok=True)
        save_json(feeds, str(golden_dir / "inputs.json"))
        RunResults([(reference_runner.name, reference)]).save(str(golden_dir / "reference_outputs.json"))
    return report


def golden_command(graph_file: str, golden_dir: Path, atol: float, rtol: float, backend: str = "--onnxrt") -> str:
    return (f"polygraphy run {graph_file} {backend} --load-inputs {golden_dir / 'inputs.json'} "
            f"--load-outputs {golden_dir / 'reference_outputs.json'} --atol {atol:g} --rtol {rtol:g}")

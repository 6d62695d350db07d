"""Which graph clean-up to use: the raw TorchScript export vs onnxscript's optimizer vs onnxslim,
on the same decoder graph: node count, time to clean, and ORT latency of one decode step.

    python bench/graph_cleanup.py smol        # needs `pip install onnxslim` for the third column
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from vlm_export.export.onnx_export import _trace_to_onnx, optimize_and_save
from vlm_export.export.validate import InputSampler, ort_session
from vlm_export.model.graph_modules import graph_module
from vlm_export.model.load import load_reference
from vlm_export.spec import resolve_spec
from vlm_export.spec.graph_io import ExportOptions, decoder_graphs, make_inputs


def step_ms(path: Path, feeds: dict, repeats: int = 20) -> float:
    session = ort_session(path, threads=2)
    session.run(None, feeds)
    started = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feeds)
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", default="smol", nargs="?")
    args = parser.parse_args()
    spec = resolve_spec(args.model)
    model = load_reference(spec)
    graph = decoder_graphs(spec, ExportOptions())[0]
    sampler = InputSampler(model)
    example = make_inputs(graph, graph.cases[0], np.random.default_rng(0), sampler)
    decode = make_inputs(graph, {"batch": 1, "sequence": 1, "past_sequence": 128, "left_pad": 0}, np.random.default_rng(1), sampler)
    with tempfile.TemporaryDirectory() as scratch:
        raw, scripted, slimmed = (Path(scratch) / n for n in ("raw.onnx", "onnxscript.onnx", "onnxslim.onnx"))
        _trace_to_onnx(graph_module(model, "decoder", graph.attrs), graph, example, raw, 17)
        rows = [("raw TorchScript export", raw, 0.0)]
        started = time.perf_counter()
        optimize_and_save(raw, scripted)
        rows.append(("onnxscript optimizer (chosen)", scripted, time.perf_counter() - started))
        try:
            import onnxslim

            started = time.perf_counter()
            onnx.save(onnxslim.slim(str(raw)), str(slimmed))
            rows.append(("onnxslim", slimmed, time.perf_counter() - started))
        except ImportError:
            pass
        print(f"decoder of `{args.model}`, one decode step at past 128, ORT CPU, 2 threads")
        print("| clean-up | nodes | top ops | clean-up s | decode step ms |")
        print("|---|---|---|---|---|")
        for name, path, seconds in rows:
            nodes = onnx.load(str(path), load_external_data=False).graph.node
            top = ", ".join(f"{op} {n}" for op, n in collections.Counter(n.op_type for n in nodes).most_common(4))
            print(f"| {name} | {len(nodes)} | {top} | {seconds:.1f} | {step_ms(path, decode):.2f} |")


if __name__ == "__main__":
    main()

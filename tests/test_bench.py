"""`vlm-export bench`: engines side by side, reports with the machine's limits, llama.cpp on the same weights."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (pip install '.[bench]')")


def test_a_suite_runs_side_by_side_and_reports(tmp_path):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({
        "name": "test", "settings": {"contexts": [16, 48], "decode_steps": 4, "prefill_tokens": 32, "repeats": 2,
                                     "image": "calibration/eval/chelsea.jpg"},
        "models": [{"model": "tiny", "baseline": "torch", "engines": ["torch", "ort:int4", "ort:int4/4k", "ort-mlas:int4", "torch-cuda",
                                                                  "llama.cpp:F32", "no-such:engine"]}]}))
    result = subprocess.run([sys.executable, "-m", "vlm_export", "bench", suite, "--out", tmp_path / "reports",
                             "--workdir", tmp_path], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "unknown benchmark engine 'no-such:engine'" in result.stderr  # bad names fail first

    spec = json.loads(suite.read_text())
    spec["models"][0]["engines"].pop()
    suite.write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, "-m", "vlm_export", "bench", suite, "--out", tmp_path / "reports",
                             "--workdir", tmp_path], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "reports" / "bench-test.json").read_text())
    assert report["schema"] == "vlm-export-bench/1" and report["limits"]["memory_bandwidth_gbs"] > 0
    assert report["machine"]["physical_cores"] >= 1 and report["machine"]["versions"]["onnxruntime"]
    rows = {r["engine"]: r for r in report["models"][0]["results"]}
    for name in ("torch", "ort:int4", "ort-mlas:int4"):
        row = rows[name]
        assert row["vision_ms"]["n"] == 2 and row["ttft_ms"]["median"] > 0
        assert set(row["decode_tok_s"]) == {"16", "48"} and row["decode_tok_s"]["16"]["min"] <= row["decode_tok_s"]["16"]["median"]
        assert 0 < row["decode_roofline_fraction"]["16"] and row["peak_rss_mb"] > 0 and row["bytes"] > 0
    assert rows["torch"]["decode_ratio_vs_baseline"]["16"] == 1.0
    assert rows["ort:int4/4k"]["decode_tok_s"]["48"]["median"] > 0  # the same artifact with huge pages off
    import onnx

    mlas = onnx.load(str(tmp_path / "engines" / "cpu-mlas" / "tiny" / "int4" / "decoder_inplace.onnx"), load_external_data=False)
    assert "MatMulNBits" in {n.op_type for n in mlas.graph.node}  # --kernels ort
    assert "THP" in report["machine"]["pages"] or "unavailable" in report["machine"]["pages"]
    import torch

    assert ("gpu" in report["limits"]) == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in rows["torch-cuda"]["skipped"]
    if importlib.util.find_spec("llama_cpp") is None:
        assert "vlm-export[bench]" in rows["llama.cpp:F32"]["skipped"]
    else:
        assert rows["llama.cpp:F32"]["vision_ms"] is None and rows["llama.cpp:F32"]["decode_tok_s"]["48"]["median"] > 0
    assert "| ort:int4 |" in result.stdout and (tmp_path / "reports" / "bench-test.png").stat().st_size > 1000


@llama
def test_gguf_export_gives_llama_cpp_the_reference_logits(tmp_path, tiny_model):
    import llama_cpp
    import torch

    from vlm_export.benchmark.gguf_export import write_gguf

    path = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    tokens = [1, 300, 301, 77, 450, 12]
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)])
    with torch.no_grad():
        expected = tiny_model(input_ids=torch.tensor([tokens])).logits
    expected = expected[0].numpy()
    cosine = (got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected)
    assert cosine > 0.9999, cosine
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    llm.close()

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
                             "--workdir", tmp_path], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 2 and "unknown benchmark engine 'no-such:engine'" in result.stderr  # bad names fail first

    spec = json.loads(suite.read_text())
    spec["models"][0]["engines"].pop()
    suite.write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, "-m", "vlm_export", "bench", suite, "--out", tmp_path / "reports",
                             "--workdir", tmp_path], capture_output=True, text=True, timeout=600, check=False)
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
        assert rows["llama.cpp:F32"]["skipped"] == ("the llama.cpp comparison needs the Python module 'llama_cpp', "
                                                    "which is not installed -- fix: pip install 'vlm-export[bench]'")
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


def _speed(value: float) -> dict:
    return {"median": value, "min": value, "max": value, "n": 1}


def _quality_report(rows: list[dict]) -> dict:
    return {"schema": "vlm-export-bench/1", "suite": "q", "settings": {"contexts": [16], "threads": 2, "prefill_tokens": 8},
            "quality": {"tokens": 32, "n_ctx": 16, "peers": {"fp32": "llama.cpp:F32", "int8": "llama.cpp:Q8_0",
                                                              "int4": "llama.cpp:source"}},
            "models": [{"model": "tiny", "results": rows}]}


def test_rows_get_their_quality_class_peer_ratio_and_budget(tmp_path):
    from vlm_export.benchmark.report import frontier_chart, quality_table
    from vlm_export.benchmark.row_quality import QualitySettings, _baselines, _peer_ratios, quality_class

    assert [quality_class(n) for n in ("ort:int4", "ort-mlas:int4/4k", "llama.cpp:source", "llama.cpp:Q4_K_M",
                                       "llama.cpp:Q8_0", "llama.cpp:F32", "ort-genai:int4")] == \
        ["int4", "int4", "int4", "int4", "int8", "fp32", "int4"]
    lossy = {"tokens": 32, "perplexity_reference": 10.0, "perplexity": 12.0, "mean_kl": 0.2, "kl_p99": 1.0,
             "top1_agreement": 0.7}
    close = {**lossy, "perplexity": 10.1, "mean_kl": 0.002, "top1_agreement": 0.97}
    rows = [{"engine": "ort:fp32", "decode_tok_s": {"16": _speed(50)}, "prefill_tok_s": _speed(100)},
            {"engine": "ort:int4", "decode_tok_s": {"16": _speed(150)}, "prefill_tok_s": _speed(300), "quality": lossy},
            {"engine": "ort:int8", "decode_tok_s": {"16": _speed(120)}, "prefill_tok_s": _speed(200), "quality": close},
            {"engine": "llama.cpp:source", "decode_tok_s": {"16": _speed(100)}, "prefill_tok_s": _speed(150), "quality": close,
             "bytes": 100, "gguf_tensor_types": {"Q4_1": 210, "F32": 61}},
            {"engine": "llama.cpp:F32", "decode_tok_s": {"16": _speed(40)}, "prefill_tok_s": _speed(80),
             "quality": {**close, "mean_kl": 0.0, "top1_agreement": 1.0}},
            {"engine": "ort-genai:int4", "decode_tok_s": {"16": _speed(90)}, "prefill_tok_s": _speed(90),
             "quality_skipped": "not measured: onnxruntime-genai's venv is missing"},
            {"engine": "llama.cpp:Q8_0", "skipped": "engine process failed"}]
    results = {"ort:int4": lossy, "ort:int8": close}
    _baselines([r for r in rows if "skipped" not in r], results)
    assert results["ort:fp32"]["perplexity"] == 10.0 and results["ort:fp32"]["mean_kl"] == 0.0  # its own fp32 run
    _peer_ratios([r for r in rows if "skipped" not in r], QualitySettings(tokens=32, n_ctx=16))
    by_name = {r["engine"]: r for r in rows}
    assert by_name["ort:int4"]["peer"] == "llama.cpp:source" and by_name["ort:int4"]["decode_ratio_vs_peer"]["16"] == 1.5
    assert by_name["ort:int4"]["prefill_ratio_vs_peer"] == 2.0 and not by_name["ort:int4"]["budget"]["passed"]
    assert by_name["ort:fp32"]["peer"] == "llama.cpp:F32" and by_name["ort:fp32"]["decode_ratio_vs_peer"]["16"] == 1.25
    assert "peer" not in by_name["ort:int8"]  # its peer (Q8_0) did not run: no ratio is made up
    assert by_name["ort:int8"]["budget"]["passed"] and "budget" not in by_name["llama.cpp:source"]  # budgets: our rows
    report = _quality_report(rows)
    report["models"][0]["decoder_params"] = 200
    text = "\n".join(quality_table(report, report["models"][0]))
    assert "llama.cpp:source: 210 Q4_1, 61 F32 (4.00 bits per decoder parameter)" in text
    assert "| ort:int4 | int4 |" in text and "| 1.50x |" in text and "OVER: mean KL 0.2000 > 0.01" in text
    assert "not measured: onnxruntime-genai's venv is missing" in text and "| llama.cpp:Q8_0 | not measured:" in text
    assert (frontier_chart(report, tmp_path / "f.png")).stat().st_size > 1000


def test_a_bad_quality_block_is_refused(tmp_path):
    from vlm_export.benchmark.suite import load_suite
    from vlm_export.errors import VlmExportError

    suite = {"name": "q", "quality": {"tokens": 8, "colour": "red"}, "models": [{"model": "tiny", "engines": ["ort:int4"]}]}
    (tmp_path / "s.json").write_text(json.dumps(suite))
    with pytest.raises(VlmExportError, match="unknown keys"):
        load_suite(tmp_path / "s.json")
    suite["quality"] = {"tokens": 8, "peers": {"int3": "llama.cpp:Q4_0"}}
    (tmp_path / "s.json").write_text(json.dumps(suite))
    with pytest.raises(VlmExportError, match="invalid quality settings"):
        load_suite(tmp_path / "s.json")
    assert "quality" in load_suite("bench/suites/smol-quality.json")


def test_a_quantized_gguf_dequantizes_to_f32_with_its_metadata(tmp_path, tiny_model):
    import gguf

    from vlm_export.benchmark.gguf_export import dequantize_gguf, write_gguf

    source = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    out = dequantize_gguf(source, tmp_path / "F32.gguf")
    before, after = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    assert after.fields["general.file_type"].contents() == 0
    assert after.fields["tokenizer.ggml.tokens"].contents() == before.fields["tokenizer.ggml.tokens"].contents()
    for a, b in zip(before.tensors, after.tensors):
        assert a.name == b.name and b.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(a.data).reshape(-1), np.asarray(b.data).reshape(-1))


@llama
def test_llama_cpp_quality_of_a_gguf_against_itself_is_lossless(tmp_path, tiny_model):
    from vlm_export.benchmark.gguf_export import write_gguf
    from vlm_export.benchmark.llama_quality import score

    path = write_gguf(tiny_model, tmp_path / "tiny.gguf")
    ids = [int(i) for i in np.random.default_rng(0).integers(300, 512, 64)]
    result = score(path, [path], ids, tokens=16, n_ctx=16, threads=1)
    quality = result["quality"][str(path)]
    assert quality["tokens"] == 16 and quality["mean_kl"] == 0.0 and quality["top1_agreement"] == 1.0
    assert quality["perplexity"] == quality["perplexity_reference"] > 1


def test_rounds_merge_into_one_row():
    """Rounds of one engine: the median of the rounds' medians, min/max/n over all samples, the
    largest peak RSS, the widest load span; a failed round makes the row skipped, naming the round."""
    from vlm_export.benchmark.suite import merge_rounds

    def measured(median, rss, load):
        stat = {"median": median, "min": median - 1, "max": median + 1, "n": 3}
        return {"prefill_tok_s": stat, "decode_tok_s": {"128": stat}, "peak_rss_mb": rss, "load_average_1m": load}

    merged = merge_rounds([measured(10.0, 100, [1.0, 2.0]), measured(30.0, 120, [0.5, 1.5]), measured(20.0, 110, [1.0, 3.0])])
    assert merged["decode_tok_s"]["128"] == {"median": 20.0, "min": 9.0, "max": 31.0, "n": 9, "rounds": [10.0, 30.0, 20.0]}
    assert merged["prefill_tok_s"]["median"] == 20.0 and merged["peak_rss_mb"] == 120
    assert merged["load_average_1m"] == [0.5, 3.0]
    assert merge_rounds([measured(10.0, 1, [0, 0]), {"skipped": "engine process failed"}]) == \
        {"skipped": "round 2 of 2: engine process failed"}
    single = measured(5.0, 1, [0, 0])
    assert merge_rounds([single]) is single

"""Exporters on `tiny`: every graph validated, names as specified, KV cache consistent in both layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.checkpoints import tiny_spec
from vlm_export.errors import VlmExportError
from vlm_export.export.pipeline import export_model
from vlm_export.export.validate import ort_session
from vlm_export.model.load import load_reference
from vlm_export.spec.graph_io import ExportOptions


@pytest.fixture(scope="module")
def spec():
    return tiny_spec("ldpnet")


@pytest.fixture(scope="module")
def reference(spec):
    return load_reference(spec)


@pytest.fixture(scope="module")
def dynamic_graphs(tmp_path_factory, spec):
    out = tmp_path_factory.mktemp("graphs") / "tiny"
    export_model(spec, out, ExportOptions(layout="dynamic"))
    return out


@pytest.fixture(scope="module")
def static_graphs(tmp_path_factory, spec):
    out = tmp_path_factory.mktemp("graphs") / "tiny-static"
    export_model(spec, out, ExportOptions(layout="static", prefill_chunk=16, kv_buffer=64))
    return out


def test_manifest_records_everything(dynamic_graphs):
    manifest = json.loads((dynamic_graphs / "manifest.json").read_text())
    assert {"vision.onnx", "embed.onnx", "decoder.onnx", "tokenizer/tokenizer.model"} <= set(manifest["files"])
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert {"torch", "transformers", "onnx"} <= set(manifest["versions"]) and manifest["opset"] == 17
    decoder = next(g for g in manifest["graphs"] if g["name"] == "decoder")
    names = [t["name"] for t in decoder["inputs"]]
    assert names[:4] == ["inputs_embeds", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert [t["name"] for t in decoder["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    assert decoder["inputs"][3]["shape"] == ["batch", 2, "past_sequence", 16]
    for graph in manifest["graphs"]:
        assert graph["validation"]["passed"]
        assert graph["validation"]["outputs"].get("logits", {"max_abs_diff": 0})["max_abs_diff"] <= 1e-4


def test_vision_graph_stops_at_the_selected_layer(dynamic_graphs, spec):
    import re

    model = onnx.load(str(dynamic_graphs / "vision.onnx"))
    layers = {int(m.group(1)) for n in model.graph.node if (m := re.search(r"/vision_tower/layers\.(\d+)/", n.name))}
    assert layers == set(range(spec.vision.layers_used)) and spec.vision.layers_used == spec.vision.num_layers - 1
    assert not any("post_layernorm" in i.name for i in model.graph.initializer)


@pytest.mark.parametrize("graph", ["vision.onnx", "embed.onnx", "decoder.onnx", "decoder_prefill.onnx", "decoder_decode.onnx"])
def test_polygraphy_lint_is_clean(dynamic_graphs, static_graphs, graph):
    directory = dynamic_graphs if (dynamic_graphs / graph).is_file() else static_graphs
    result = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "check", "lint", str(directory / graph)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _kv_names(num_layers):
    return [f"{p}.{i}.{k}" for i in range(num_layers) for p in ("past_key_values",) for k in ("key", "value")]


def _one_pass(reference, hidden_size: int, seed: int, length: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Random embeddings and the reference's logits for all of them in one pass."""
    embeds = (np.random.default_rng(seed).standard_normal((1, length, hidden_size)) * 0.02).astype(np.float32)
    with torch.no_grad():
        return embeds, reference(inputs_embeds=torch.from_numpy(embeds)).logits.numpy()


def test_dynamic_decoder_step_by_step_equals_one_pass(dynamic_graphs, reference, spec):
    llm = spec.llm
    session = ort_session(dynamic_graphs / "decoder.onnx")
    embeds, full = _one_pass(reference, llm.hidden_size, seed=3)
    past = {n: np.zeros((1, llm.num_kv_heads, 0, llm.head_dim), np.float32) for n in _kv_names(llm.num_layers)}
    steps = [(0, 5), (5, 6), (6, 7), (7, 9)]  # a prefill, then single tokens, then two at once
    for start, end in steps:
        feeds = {"inputs_embeds": embeds[:, start:end], "attention_mask": np.ones((1, end), np.int64),
                 "position_ids": np.arange(start, end, dtype=np.int64)[None], **past}
        logits, *present = session.run(None, feeds)
        np.testing.assert_allclose(logits, full[:, start:end], atol=1e-4)
        past = dict(zip(_kv_names(llm.num_layers), present))


def test_inplace_decoder_in_one_buffer_equals_one_pass(dynamic_graphs, reference, spec, tmp_path):
    """GroupQueryAttention over one buffer: prefill, single tokens, a two-token chunk, all written in place."""
    llm = spec.llm
    out = tmp_path / "inplace"
    manifest = export_model(spec, out, ExportOptions(layout="inplace"), reuse=dynamic_graphs)
    assert [g["file"] for g in manifest["graphs"] if not g.get("reused_from")] == ["decoder_inplace.onnx"]
    session = ort_session(out / "decoder_inplace.onnx")
    embeds, full = _one_pass(reference, llm.hidden_size, seed=5)
    buffers = {n: np.zeros((1, llm.num_kv_heads, 12, llm.head_dim), np.float32) for n in _kv_names(llm.num_layers)}
    for start, end in [(0, 5), (5, 6), (6, 8), (8, 9)]:
        feeds = {"inputs_embeds": embeds[:, start:end], "seqlens_k": np.array([end - 1], np.int32),
                 "total_sequence_length": np.array(end, np.int32), **buffers}
        logits, *present = session.run(None, feeds)
        np.testing.assert_allclose(logits[0, -1], full[0, end - 1], atol=1e-4)  # the step's last row only
        buffers = dict(zip(_kv_names(llm.num_layers), present))


def test_static_chunked_prefill_and_decode_equal_one_pass(static_graphs, reference, spec):
    """Right-aligned chunks (padding at the front), host-written KV slots, 1-token decode."""
    llm, m, chunk = spec.llm, 64, 16
    prefill, decode = ort_session(static_graphs / "decoder_prefill.onnx"), ort_session(static_graphs / "decoder_decode.onnx")
    rng = np.random.default_rng(4)
    length, extra = 21, 3  # 21 prompt tokens -> 2 chunks with 11 pads in front; then 3 decode steps
    embeds = (rng.standard_normal((1, length + extra, llm.hidden_size)) * 0.02).astype(np.float32)
    with torch.no_grad():
        full = reference(inputs_embeds=torch.from_numpy(embeds)).logits.numpy()
    buffers = {n: np.zeros((1, llm.num_kv_heads, m, llm.head_dim), np.float32) for n in _kv_names(llm.num_layers)}
    valid = np.zeros(m, np.int64)
    pad = 2 * chunk - length
    padded = np.concatenate([np.zeros((1, pad, llm.hidden_size), np.float32), embeds[:, :length]], axis=1)
    chunk_valid = np.r_[np.zeros(pad, np.int64), np.ones(length, np.int64)]
    positions = np.clip(np.cumsum(chunk_valid) - 1, 0, None)
    slot = 0

    def run(session, x, keep, pos, slot):
        feeds = {"inputs_embeds": x, "attention_mask": np.r_[valid, keep][None], "position_ids": pos[None], **buffers}
        logits, *present = session.run(None, feeds)
        for name, new in zip(_kv_names(llm.num_layers), present):
            buffers[name][:, :, slot: slot + x.shape[1]] = new
        valid[slot: slot + x.shape[1]] = keep
        return logits

    for c in range(2):
        sl = slice(c * chunk, (c + 1) * chunk)
        logits = run(prefill, padded[:, sl], chunk_valid[sl], positions[sl], slot)
        slot += chunk
    np.testing.assert_allclose(logits[0, -1], full[0, length - 1], atol=1e-4)
    for step in range(extra):
        t = length + step
        logits = run(decode, embeds[:, t: t + 1], np.ones(1, np.int64), np.array([t]), slot)
        slot += 1
        np.testing.assert_allclose(logits[0, -1], full[0, t], atol=1e-4)


def test_non_empty_output_needs_force(dynamic_graphs, spec, tmp_path):
    with pytest.raises(VlmExportError) as finished:
        export_model(spec, dynamic_graphs, ExportOptions())
    assert finished.value.one_line() == (f"{dynamic_graphs} already holds a finished export -- fix: use it as it is "
                                         "(vlm-export run / verify), pass --force to rebuild it, or choose another --out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(VlmExportError, match="output directory .* is not empty -- fix: pass --force"):
        export_model(spec, tmp_path / "other", ExportOptions())


def test_bad_options():
    with pytest.raises(VlmExportError, match="unsupported dtype"):
        ExportOptions(dtype="int3")
    with pytest.raises(VlmExportError, match="prefill chunk"):
        ExportOptions(layout="static", prefill_chunk=2048, kv_buffer=1024)


def test_failed_validation_leaves_nothing(tmp_path, spec, monkeypatch):
    from vlm_export.export import pipeline

    monkeypatch.setattr(pipeline, "validate_graph", lambda *a, **k: {"passed": False, "outputs": {"x": {"max_abs_diff": 1.0}}})
    with pytest.raises(VlmExportError, match="validation against PyTorch failed"):
        export_model(spec, tmp_path / "out", ExportOptions())
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_disk_full_is_a_clear_error(tmp_path, spec, monkeypatch):
    import errno

    from vlm_export.export import pipeline

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "export_graph", full_disk)
    with pytest.raises(VlmExportError, match="disk filled up"):
        export_model(spec, tmp_path / "out", ExportOptions())
    assert not list(tmp_path.iterdir())


def test_a_disk_full_while_a_graph_is_folded_back_is_the_same_clear_error(tmp_path, spec, monkeypatch):
    """The weights written again inline after validation: a full disk there stops the export with the
    same error and leaves nothing."""
    import errno

    from vlm_export.export import pipeline

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "inline_weights", full_disk)
    with pytest.raises(VlmExportError, match="disk filled up"):
        export_model(spec, tmp_path / "out", ExportOptions())
    assert not list(tmp_path.iterdir())


def test_on_graph_is_called_per_exported_graph_with_its_final_digest(tmp_path, spec):
    """A build starts work on a graph as soon as it is exported (cpu: its images through the vision
    graph): the hook gets the record, a folder holding the file, and the digest the manifest keeps."""
    from vlm_export.artifacts import sha256

    seen = []
    manifest = export_model(spec, tmp_path / "out", ExportOptions(),
                            on_graph=lambda record, folder, digest: seen.append((record["file"], sha256(folder / record["file"]), digest)))
    assert [file for file, _, _ in seen] == [g["file"] for g in manifest["graphs"]]
    assert all(now == digest == manifest["files"][file]["sha256"] for file, now, digest in seen)


def test_tokenizer_graph_gives_the_same_ids(dynamic_graphs):
    manifest = json.loads((dynamic_graphs / "manifest.json").read_text())
    record = manifest["tokenizer_graph"]
    assert record["file"] == "tokenizer.onnx" and record["check"]["passed"] and record["check"]["texts"] >= 4


def test_fp16_export_is_validated_against_fp32(tmp_path, spec):
    manifest = export_model(spec, tmp_path / "fp16", ExportOptions(dtype="fp16"))
    decoder = next(g for g in manifest["graphs"] if g["name"] == "decoder")
    assert decoder["inputs"][0]["dtype"] == "float16" and decoder["validation"]["passed"]
    assert 0 < decoder["validation"]["outputs"]["logits"]["max_abs_diff"] < 5e-2


@pytest.mark.parametrize("layout", ["dynamic", "inplace"])
def test_folding_gives_optimize_irs_graphs(spec, reference, layout, tmp_path):
    """fold_and_clean is optimize_ir less one slow rule that never fires here: the same nodes, same names."""
    import onnx_ir as ir
    import onnxscript.optimizer

    from vlm_export.export.onnx_export import _trace_to_onnx, attach_parameters, fold_and_clean
    from vlm_export.export.pipeline import make_wrapper
    from vlm_export.export.validate import InputSampler
    from vlm_export.spec.graph_io import graphs_for, make_inputs

    sampler = InputSampler(reference)
    for graph in graphs_for(spec, ExportOptions(layout=layout)):
        raw = tmp_path / layout / graph.file
        raw.parent.mkdir(exist_ok=True)
        _, parameters = _trace_to_onnx(make_wrapper(reference, graph), graph, make_inputs(graph, graph.cases[0], np.random.default_rng(0), sampler), raw, 17)
        expected, folded = ir.load(raw), ir.load(raw)
        for model in (expected, folded):
            attach_parameters(model, parameters, [t.name for t in graph.inputs])
        onnxscript.optimizer.optimize_ir(expected)
        fold_and_clean(folded)
        nodes = [sorted((n.op_type, n.name, len(n.inputs)) for n in m.graph.all_nodes()) for m in (expected, folded)]
        assert nodes[0] == nodes[1] and sorted(expected.graph.initializers) == sorted(folded.graph.initializers), graph.file


@pytest.mark.parametrize("layout", ["dynamic", "inplace"])
def test_parameters_kept_out_of_torchs_proto_give_the_same_graphs(spec, reference, layout, tmp_path, monkeypatch):
    """Parameters taken from torch's exporter instead of its proto (onnx_export._parameters_kept_out):
    every saved graph is the one torch's own export_params=True path gives, node for node and byte
    for byte in every initializer."""
    import contextlib

    from vlm_export.export import onnx_export
    from vlm_export.export.pipeline import make_wrapper
    from vlm_export.export.validate import InputSampler
    from vlm_export.spec.graph_io import graphs_for, make_inputs

    sampler = InputSampler(reference)
    for graph in graphs_for(spec, ExportOptions(layout=layout)):
        example = make_inputs(graph, graph.cases[0], np.random.default_rng(0), sampler)
        (tmp_path / "kept").mkdir(exist_ok=True)
        (tmp_path / "torch").mkdir(exist_ok=True)
        kept, _ = onnx_export.export_graph(make_wrapper(reference, graph), graph, example, tmp_path / "kept", 17)
        with monkeypatch.context() as patch:
            patch.setattr(onnx_export, "_parameters_kept_out", lambda: contextlib.nullcontext(None))
            baseline, _ = onnx_export.export_graph(make_wrapper(reference, graph), graph, example, tmp_path / "torch", 17)
        for path in (kept, baseline):
            onnx_export.inline_weights(path)
        assert onnx.load(str(kept)) == onnx.load(str(baseline)), graph.file


def test_inline_weights_folds_external_data_back_under_the_limit(tmp_path, monkeypatch):
    """The streamed fold (no whole proto in memory) parses to exactly the ModelProto that onnx.load
    gives with the external data, inline and external initializers mixed, several dtypes."""
    from onnx import TensorProto, helper, numpy_helper

    from vlm_export.export import onnx_export

    weight = np.arange(300, dtype=np.float32).reshape(3, 100)
    tensors = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.arange(2, dtype=np.int64), "shape"),
               numpy_helper.from_array(np.linspace(-1, 1, 4000, dtype=np.float16).reshape(1, 4000), "big"),
               numpy_helper.from_array(np.float32(2.5), "scalar")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "scalar"], ["z"]),
                               helper.make_node("Shape", ["big"], ["s"]), helper.make_node("Add", ["s", "shape"], ["t"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 100]),
                               helper.make_tensor_value_info("t", TensorProto.INT64, [2])], tensors)
    for folder, limit in (("small", onnx_export.TWO_GB), ("large", 16)):
        path = tmp_path / folder / "g.onnx"
        path.parent.mkdir()
        onnx.save_model(helper.make_model(graph, producer_name="vlm-export"), str(path), save_as_external_data=True,
                        location="g.onnx.data", size_threshold=1024)  # the two small ones stay inline
        expected = onnx.load(str(path))
        for tensor in expected.graph.initializer:  # onnx.load sets the location field to DEFAULT; the fold leaves it unset
            tensor.ClearField("data_location")
        assert [t.data_location for t in onnx.load(str(path), load_external_data=False).graph.initializer] == [1, 0, 1, 0]
        monkeypatch.setattr(onnx_export, "TWO_GB", limit)
        onnx_export.inline_weights(path)
        assert sorted(p.name for p in path.parent.iterdir()) == (["g.onnx"] if folder == "small" else ["g.onnx", "g.onnx.data"])
        folded = onnx.load(str(path))
        np.testing.assert_array_equal(numpy_helper.to_array(folded.graph.initializer[0]), weight)
        if folder == "small":
            assert all(t.data_location == TensorProto.DEFAULT and not t.external_data for t in folded.graph.initializer)
            assert folded == expected  # every field, every byte of every tensor
            onnx.checker.check_model(folded, full_check=True)


@pytest.mark.parametrize("layout", ["dynamic", "inplace"])
def test_the_traces_outputs_are_the_references_and_validation_reuses_them(spec, reference, layout, tmp_path):
    """export_graph hands back what the trace computed on the example; validate_graph compares ORT
    with those for the first case (the same draw) and runs the wrapper only for the others (none for
    the vision graph, whose batch-1 case is the example's first image)."""
    from vlm_export.export.onnx_export import export_graph
    from vlm_export.export.pipeline import make_wrapper
    from vlm_export.export.validate import InputSampler, validate_graph
    from vlm_export.spec.graph_io import GraphRole, graphs_for, make_inputs

    sampler = InputSampler(reference)
    for graph in graphs_for(spec, ExportOptions(layout=layout)):
        wrapper = make_wrapper(reference, graph)
        example = make_inputs(graph, graph.cases[0], np.random.default_rng(0), sampler)
        fresh = {k: v.copy() for k, v in example.items()}
        path, traced = export_graph(wrapper, graph, example, tmp_path, 17)
        with torch.no_grad():
            eager = wrapper(*(torch.from_numpy(fresh[t.name]) for t in graph.inputs))
        eager = eager if isinstance(eager, tuple) else (eager,)
        assert len(traced) == len(eager) == len(graph.outputs)
        for a, b in zip(traced, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        calls = []
        hook = wrapper.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        known = validate_graph(wrapper, graph, path, sampler, known=(fresh, traced))
        hook.remove()
        if graph.wrapper == GraphRole.VISION:  # its batch-1 case is the example's first image: no PyTorch run at all
            assert known["passed"] and calls == [], graph.file
            with torch.no_grad():  # what that relies on: each image is mapped on its own
                alone = wrapper(torch.from_numpy(fresh["pixel_values"][:1]))
            torch.testing.assert_close(alone, traced[0][:1], rtol=1e-5, atol=1e-5)
            assert validate_graph(wrapper, graph, path, sampler)["passed"]
            continue
        assert known["passed"] and len(calls) == len(graph.cases) - 1, graph.file
        assert known == validate_graph(wrapper, graph, path, sampler), graph.file  # the same figures as running it again


def test_the_llm_reference_is_loaded_once_for_the_dynamic_and_inplace_exports(spec, tmp_path, monkeypatch):
    """A cpu build from dynamic graphs exports the decoder again in the inplace layout: the second
    export reuses the LLM-only reference the first loaded (pipeline.KEPT), never the tower's."""
    from vlm_export.export import pipeline
    from vlm_export.targets.assemble import export_layout

    loads, original = [], pipeline.load_reference
    monkeypatch.setattr(pipeline, "load_reference", lambda *a, **k: loads.append(k) or original(*a, **k))
    pipeline.KEPT.clear()
    export_model(spec, tmp_path / "dynamic", ExportOptions(layout="dynamic"))
    export_layout(tmp_path / "dynamic", tmp_path / "inplace", layout="inplace")
    assert loads == [{"vision": True, "llm": False}, {"vision": False, "llm": True}]
    assert pipeline.KEPT.model is not None
    monkeypatch.setattr(pipeline, "KEEP_BYTES", 0)  # too large to keep: loaded again, and not held
    pipeline.KEPT.clear()
    export_layout(tmp_path / "dynamic", tmp_path / "inplace-again", layout="inplace")
    assert loads[2:] == [{"vision": False, "llm": True}] and pipeline.KEPT.model is None

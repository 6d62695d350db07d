"""Decoder layouts as objects (spec/layouts/): what each one packs, exports and caches, and that a
new layout is one class plus one registry entry."""

from __future__ import annotations

import numpy as np
import pytest

from tests.checkpoints import tiny_spec
from vlm_export.errors import VlmExportError
from vlm_export.spec.graph_io import ExportOptions, KvUpdate, Layout, graphs_for
from vlm_export.spec.layouts import REGISTRY, graph_layout, layout_of
from vlm_export.spec.layouts.inplace import InPlaceLayout


def _prompts(*lengths, width=4):
    return [np.full((n, width), i + 1, np.float32) for i, n in enumerate(lengths)]


def test_every_registered_layout_writes_its_own_name_and_kv_update_into_its_graphs():
    spec = tiny_spec("ldpnet")
    for name, layout in REGISTRY.items():
        decoders = [g for g in graphs_for(spec, ExportOptions(layout=name)) if g.wrapper == "decoder"]
        assert [g.name for g in decoders] == sorted({layout.prefill_graph, layout.decode_graph}, key=["decoder", "decoder_prefill", "decoder_decode"].index)
        assert {g.attrs["layout"] for g in decoders} == {name}
        assert {g.attrs["kv_update"] for g in decoders} == {layout.kv_update}
        assert all(graph_layout(g) is layout for g in decoders)


def test_dynamic_packs_left_padded_one_call():
    plan = layout_of(Layout.DYNAMIC).pack(_prompts(3, 1), 4, 32, {})
    assert plan.graph == "decoder" and plan.step == 3 and plan.capacity == 7
    assert plan.keep.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert plan.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert plan.embeds[1, :, 0].tolist() == [0, 0, 2] and plan.lengths.tolist() == [3, 1]


def test_inplace_packs_right_padded_one_call():
    plan = layout_of(Layout.INPLACE).pack(_prompts(3, 1), 4, 32, {})
    assert plan.keep.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert plan.embeds[1, :, 0].tolist() == [2, 0, 0]


def test_static_packs_front_padded_whole_chunks_and_checks_its_buffer():
    graphs = {"decoder_prefill": {"attrs": {"sequence": 4}}, "decoder_decode": {"attrs": {"kv_buffer": 16}}}
    static = layout_of(Layout.STATIC)
    plan = static.pack(_prompts(6), 2, 64, graphs)
    assert plan.graph == "decoder_prefill" and plan.step == 4 and plan.embeds.shape[1] == 8 and plan.capacity == 10
    assert plan.keep.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]
    assert static.max_positions(graphs, 64) == 13
    with pytest.raises(VlmExportError, match="static KV buffer"):
        static.pack(_prompts(6), 9, 64, graphs)  # 8 (two chunks) + 9 > 16


def test_unknown_layout_is_refused_with_the_registered_names():
    with pytest.raises(VlmExportError, match=r"unsupported layout 'ring' -- fix: use --layout dynamic \| static \| inplace"):
        ExportOptions(layout="ring")


def test_a_new_layout_is_one_class_and_one_registry_entry(monkeypatch):
    class WideInPlace(InPlaceLayout):  # what a newcomer's one new file would hold
        name = "inplace-wide"
        summary = "inplace, for the test"

    monkeypatch.setitem(REGISTRY, WideInPlace.name, WideInPlace())
    opts = ExportOptions(layout="inplace-wide")
    (decoder,) = [g for g in graphs_for(tiny_spec("ldpnet"), opts) if g.wrapper == "decoder"]
    assert decoder.attrs["layout"] == "inplace-wide" and decoder.attrs["kv_update"] == KvUpdate.IN_PLACE
    assert isinstance(graph_layout(decoder), WideInPlace)
    cache = graph_layout(decoder).new_cache(tiny_spec("ldpnet").llm, 1, np.float32, 8, decoder.to_dict(), np.asarray)
    feeds = cache.feeds(np.ones((1, 3), np.int64), np.arange(3)[None])
    assert feeds["seqlens_k"].tolist() == [2] and int(feeds["total_sequence_length"]) == 3


def test_a_registered_layout_exports_validates_and_generates(monkeypatch, tiny_graphs, tmp_path):
    """The README's example layout, end to end: export (validated against PyTorch case by case), then
    the generation loop on it answers as the dynamic graphs do."""
    from vlm_export.export.pipeline import export_model
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator, Request
    from vlm_export.runtime.sampling import SamplingParams

    class WideInPlace(InPlaceLayout):
        name = "inplace-wide"
        summary = "inplace, with a larger validation capacity"
        cases = ({"batch": 1, "sequence": 12, "kv_capacity": 40, "past": (0,), "new": (12,)},
                 {"batch": 2, "sequence": 1, "kv_capacity": 40, "past": (30, 7), "new": (1, 1)})

    monkeypatch.setitem(REGISTRY, WideInPlace.name, WideInPlace())
    manifest = export_model(tiny_spec("ldpnet"), tmp_path / "wide", ExportOptions(layout="inplace-wide"), reuse=tiny_graphs)
    (decoder,) = [g for g in manifest["graphs"] if g["wrapper"] == "decoder"]
    assert decoder["attrs"]["layout"] == "inplace-wide" and len(decoder["validation"]["cases"]) == 2
    answers = []
    for folder in (tmp_path / "wide", tiny_graphs):
        with Generator(ArtifactSet.open(folder)) as generator:
            assert generator.layout.name == ArtifactSet.open(folder).layout
            answers.append(generator.generate([Request.ask("hello"), Request.ask("a longer question?")],
                                              SamplingParams(max_new_tokens=8)))
    assert [r.token_ids for r in answers[0]] == [r.token_ids for r in answers[1]]


def test_the_cpu_target_builds_on_a_registered_layout(monkeypatch, tiny_graphs, tmp_path):
    """A new layout that runs any batch size is a `--layout` of the cpu target with no edit there."""
    from vlm_export.targets.cpu.profile import Profile, layouts
    from vlm_export.targets.cpu.target import build

    class WideInPlace(InPlaceLayout):
        name = "inplace-wide"
        summary = "inplace, for the test"

    monkeypatch.setitem(REGISTRY, WideInPlace.name, WideInPlace())
    assert "inplace-wide" in layouts() and "static" not in layouts()
    report = build(tiny_graphs, tmp_path / "cpu", Profile(variants=("fp32", "int4"), layout="inplace-wide", kv="fp32", eval_tokens=4))
    assert report["layout"] == "inplace-wide" and report["variants"]["int4"]["accuracy_vs_fp32"]["tokens"] == 4
    manifest = (tmp_path / "cpu" / "int4" / "manifest.json").read_text()
    assert '"layout": "inplace-wide"' in manifest

"""The one build loop: a finished build of the same inputs is reused (re-running a command is not an
error); one of other inputs, or a damaged one, is refused with the fix."""

from pathlib import Path

import pytest

from vlm_export.artifacts import write_manifest
from vlm_export.errors import VlmExportError
from vlm_export.targets.build_loop import build_stages
from vlm_export.targets.recipe import Precision, Recipe

RECIPES = [Recipe("fp32", "baseline", Precision.FP32), Recipe("int4", "4-bit", Precision.INT4, source="fp32")]
GRAPHS = {"files": {"decoder.onnx": {"sha256": "ab", "bytes": 3}}}


def _build(out: Path, option: str = "a", force: bool = False) -> tuple[dict, list[str]]:
    built = []

    def build_stage(recipe: Recipe, staging: Path) -> dict:
        built.append(recipe.name)
        (staging / recipe.name).mkdir()
        (staging / recipe.name / "weights.bin").write_bytes(recipe.name.encode())
        write_manifest(staging / recipe.name, {"kind": "test"})
        return {"option": option}

    report = build_stages(GRAPHS, out, force, RECIPES, {"target": "test"}, build_stage, lambda recipe: (option,),
                          lambda report: "report\n")
    return report, built


def test_the_same_inputs_reuse_the_finished_build(tmp_path):
    first, built = _build(tmp_path / "out")
    assert built == ["fp32", "int4"]
    again, built = _build(tmp_path / "out")
    assert built == [] and again == {**first, "reused": True} and again["variants"]["int4"] == {"option": "a"}
    forced, built = _build(tmp_path / "out", force=True)
    assert built == ["fp32", "int4"] and forced["build_key"] == first["build_key"]


def test_other_inputs_are_refused_without_force(tmp_path):
    first, _ = _build(tmp_path / "out")
    with pytest.raises(VlmExportError) as refused:
        _build(tmp_path / "out", option="b")
    assert refused.value.one_line() == (f"{tmp_path / 'out'} already holds a finished build of other inputs (fp32 and int4: "
                                        "other options or format versions) -- fix: pass --force to rebuild it, or "
                                        "choose another --out")
    rebuilt, built = _build(tmp_path / "out", option="b", force=True)
    assert built == ["fp32", "int4"] and rebuilt["build_key"] != first["build_key"]


def test_a_damaged_finished_build_is_not_reused(tmp_path):
    _build(tmp_path / "out")
    (tmp_path / "out" / "int4" / "weights.bin").write_bytes(b"int5")
    with pytest.raises(VlmExportError) as refused:
        _build(tmp_path / "out")
    assert refused.value.problem.startswith(f"{tmp_path / 'out'} holds a finished build of these inputs, but ")
    assert "int4/weights.bin does not match its manifest checksum" in refused.value.problem
    assert refused.value.fix == "pass --force to rebuild it"


def test_the_refusal_names_what_differs():
    from vlm_export.targets.build_loop import what_differs

    def variant(passes=("vision: dynamic int8",), recipe="r", settings="s"):
        return {"recipe": recipe, "passes": list(passes), "settings": settings}

    inputs = {"graphs": "g", "variants": {"fp32": variant(()), "int4": variant()}}
    assert what_differs(inputs, inputs) == "graphs, options or build recipe"  # nothing in parts: the whole key moved
    assert what_differs({**inputs, "graphs": "h"}, inputs) == "the exported graphs"
    fewer = {"graphs": "g", "variants": {"fp32": variant(())}}
    assert what_differs(fewer, inputs) == "the variants: fp32 there, fp32,int4 asked"
    float_vision = {"graphs": "g", "variants": {"fp32": variant(()), "int4": variant(("decoder: int4",))}}
    assert what_differs(float_vision, inputs) == "int4: without 'decoder: int4'; with 'vision: dynamic int8'"
    other = {"graphs": "g", "variants": {"fp32": variant((), recipe="q"), "int4": variant(settings="t")}}
    assert what_differs(other, inputs) == "fp32: another build recipe; int4: other options or format versions"
    assert what_differs(None, inputs) == "graphs, options or build recipe"  # a report of an earlier version

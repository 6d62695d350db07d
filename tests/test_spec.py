import time

import pytest

from vlm_export.errors import VlmExportError
from vlm_export.model.load import build_on_meta, load_reference
from vlm_export.spec import resolve_spec
from vlm_export.spec.presets import PRESETS


@pytest.mark.parametrize(
    "preset, projector_params, llm_billions",
    [("mobilevlm-1.7b", 18_936_832, 1.36), ("mobilevlm-v2-1.7b", 6_316_032, 1.36), ("mobilevlm-3b", None, 2.70)],
)
def test_published_parameter_counts(preset, projector_params, llm_billions):
    counts = build_on_meta(resolve_spec(preset)).parameter_counts()
    if projector_params:
        assert counts["projector"] == projector_params
    assert round(counts["llm"] / 1e9, 2) == pytest.approx(llm_billions, abs=0.02)
    assert counts["vision_tower"] == 303_507_456  # CLIP ViT-L/14-336


def test_every_preset_resolves():
    for name in PRESETS:
        if name != "smol":
            assert resolve_spec(name).name == name


def test_tiny_builds_fast():
    start = time.perf_counter()
    load_reference(resolve_spec("tiny"))
    assert time.perf_counter() - start < 2.0


def test_unknown_preset_names_presets():
    with pytest.raises(VlmExportError, match="tiny"):
        resolve_spec("mobilevlm-42b")


def test_bad_projector_type():
    with pytest.raises(VlmExportError, match="unknown projector type 'mlp2x'"):
        resolve_spec("tiny").replace(projector_type="mlp2x")


def test_rope_scaling_extends_context():
    spec = resolve_spec("mobilevlm-1.7b", rope_scaling_factor=4.0)
    assert spec.llm.max_context == 8192 and spec.llm.rope_scaling_factor == 4.0

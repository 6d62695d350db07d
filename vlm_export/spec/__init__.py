"""What a model is: typed specs, presets, and resolution of a MODEL argument."""

from vlm_export.spec.model_spec import (
    LLMSpec,
    ModelSpec,
    TemplateSpec,
    TokenizerSpec,
    VisionSpec,
    WeightsSpec,
)
from vlm_export.spec.presets import PRESETS, preset_names
from vlm_export.spec.resolve import resolve_spec

__all__ = [
    "PRESETS",
    "LLMSpec",
    "ModelSpec",
    "TemplateSpec",
    "TokenizerSpec",
    "VisionSpec",
    "WeightsSpec",
    "preset_names",
    "resolve_spec",
]

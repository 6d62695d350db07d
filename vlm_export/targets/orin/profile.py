"""`--target orin` as data: its variants' recipes and its profile (the options `build` takes).
Light on purpose (no ONNX, no PyTorch): the CLI reads it on start to generate its options."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_export.errors import VlmExportError
from vlm_export.quality.eval_set import EVAL_TOKENS_HELP, check_eval_tokens
from vlm_export.spec.graph_io import GraphRole, Layout
from vlm_export.targets.orin.plan import DEVICES
from vlm_export.targets.recipe import Pass, Precision, Recipe, check_variants, option, variants_help

DECODER, VISION = GraphRole.DECODER, GraphRole.VISION
# Pass names (target.py maps each to its code)
FP16_EXPORT = "fp16 export (RMSNorm and softmax kept in fp32 inside)"
SMOOTHQUANT = "SmoothQuant (alpha 0.5) into the RMSNorm weights"
INT8_QDQ = "int8 Q/DQ, symmetric, calibrated"
INT8_QDQ_ATTENTION = "int8 Q/DQ on the attention projections (MLP and lm_head fp16), symmetric, calibrated"
AWQ = "AWQ scales (activation-aware, calibrated) into the RMSNorm weights"
INT4_WEIGHTS = "int4 weight-only (blocked DequantizeLinear-21, block 32, min/max blocks, lm_head float)"
TENSORRT = ("TensorRT",)
# TensorRT builder flags per precision: int4 weight-only dequantizes into fp16 activations
BUILDER_FLAGS = {Precision.FP16: ("fp16",), Precision.INT8: ("int8", "fp16"), Precision.INT4: ("fp16",)}


def _recipe(name: str, graphs: str, precision: Precision, passes: tuple[Pass, ...], why: str | None = None) -> Recipe:
    flags = "+".join(BUILDER_FLAGS[precision])
    return Recipe(name, f"{graphs}, TensorRT flags {flags}", precision, passes, layout=Layout.DYNAMIC,
                  providers=TENSORRT, budget=f"gpu-{name}", over_budget_why=why)


RECIPES = {
    "fp16": _recipe("fp16", "fp16 export", Precision.FP16, (Pass(VISION, FP16_EXPORT), Pass(DECODER, FP16_EXPORT))),
    "int8": _recipe("int8", "vision and decoder attention int8 Q/DQ after SmoothQuant, calibrated; MLP fp16", Precision.INT8,
                    (Pass(VISION, INT8_QDQ), Pass(DECODER, SMOOTHQUANT), Pass(DECODER, INT8_QDQ_ATTENTION))),
    "int4": _recipe("int4", "decoder weights int4 weight-only after AWQ (a GGUF's Q4_1 blocks kept exactly), activations fp16",
                    Precision.INT4, (Pass(DECODER, AWQ), Pass(DECODER, INT4_WEIGHTS))),
}


@dataclass(frozen=True)
class Profile:
    device: str = option("agx-orin-64gb")
    variants: tuple[str, ...] = option(("fp16", "int8", "int4"))
    max_batch: int = 1  # no CLI option: the loop's batch on a Jetson is one conversation
    max_prompt: int = option(512)
    max_context: int = option(1024)
    vision_on_dla: bool = option(False, "--dla")
    calibration: str | None = option(None)  # folder with recipe.json (default: the repository's calibration/)
    eval_tokens: int | None = option(None)  # None: EVAL_TOKENS by the LLM's weights

    def __post_init__(self):
        if self.device not in DEVICES:
            raise VlmExportError(f"unknown Orin device '{self.device}'", f"use one of {', '.join(DEVICES)}")
        check_variants("orin", RECIPES, self.variants)
        check_eval_tokens(self.eval_tokens)
        if self.vision_on_dla and DEVICES[self.device]["dla_cores"] == 0:
            raise VlmExportError(f"{self.device} has no DLA core", "drop --dla or pick a module with DLA")
        if not 0 < self.max_prompt < self.max_context:
            raise VlmExportError("max prompt must be positive and below max context", "adjust --max-prompt / --max-context")


def cli_help() -> dict[str, str]:
    """`build --help` text per Profile field, from this target's own tables and defaults."""
    d = Profile()
    devices = " | ".join(f"{k} ({v['memory_gb']} GB, {v['dla_cores']} DLA)" for k, v in DEVICES.items())
    return {
        "variants": variants_help(RECIPES, d.variants),
        "device": f"Jetson module the plans are sized for: {devices} (default {d.device})",
        "vision_on_dla": f"vision graph on DLA core 0, GPU fallback (default {'on' if d.vision_on_dla else 'off'})",
        "max_prompt": f"longest prompt in tokens the prefill profile takes (default {d.max_prompt})",
        "max_context": f"KV cache length the decode profile takes (default {d.max_context}, at most the model's context)",
        "calibration": "folder (recipe.json, images/, prompts.txt) the int8 variant is calibrated on "
                       "(default: the repository's calibration/)",
        "eval_tokens": EVAL_TOKENS_HELP,
    }

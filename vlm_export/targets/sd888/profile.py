"""`--target sd888` as data: its variants' recipes and its profile (the options `build` takes).
Light on purpose (no ONNX, no PyTorch): the CLI reads it on start to generate its options."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_export.errors import VlmExportError
from vlm_export.quality.eval_set import EVAL_TOKENS_HELP, check_eval_tokens
from vlm_export.runtime.runners.qnn_ep import SOCS
from vlm_export.spec.graph_io import GraphRole, Layout
from vlm_export.targets.recipe import Pass, Precision, Recipe, check_variants, option, variants_help

DECODER, VISION = GraphRole.DECODER, GraphRole.VISION
# Pass names (target.py maps each to its code)
QNN_QDQ = "QDQ u16 activations / 8-bit weights, compiled to a QNN context binary (CPU fallback off)"
XNNPACK_QDQ = "int8 QDQ, u8 activations, per-channel int8 weights (XNNPACK's QLinear form)"
WEIGHT_ONLY = "weight-only MatMulNBits (the cpu target's formats)"
QNN_PROVIDERS = ("QNNExecutionProvider",)
PHONE_CPU = ("XnnpackExecutionProvider", "CPUExecutionProvider")

# Measured on smol at 59d8549 (bench/reports/sd888-smol-recipe1): decoder top-1 0.723, KL 0.219 vs fp32; with per-channel
# Convs, the KV prefix, fused RMSNorms, 16 decode calibration tokens, a 4x margin on MLP ranges and padding rows in
# range, 0.941 / 0.0110 (CPU EP on the QDQ graphs, 256 tokens, 2026-12-02; bench/reports/qnn-decoder-smol.md).
# What the report says if a model still misses the budget:
QNN_WHY = ("16-bit activation ranges are fixed by calibration on calibration/: a token whose activations pass them "
           "(4x margin on the MLP) is clipped; more calibration requests, or 16-bit weights in the blocks that `vlm-export "
           "diff`'s layer localizer names, are the next levers")

RECIPES = {
    "fp32-static": Recipe("fp32-static", "the static layout (batch 1, prefill chunk, KV buffer) in fp32: the QNN "
                          "variant's source and accuracy reference", Precision.FP32, layout=Layout.STATIC, shipped=False),
    "fp32-inplace": Recipe("fp32-inplace", "the inplace layout in fp32: the CPU variants' source and accuracy reference",
                           Precision.FP32, layout=Layout.INPLACE, shipped=False),
    "qnn": Recipe("qnn", "vision and decoder QDQ (u16 activations, 8-bit weights, per output channel in the decoder) "
                  "compiled to QNN context binaries for the "
                  "Hexagon NPU", Precision.INT8, (Pass(VISION, QNN_QDQ), Pass(DECODER, QNN_QDQ)), layout=Layout.STATIC,
                  providers=QNN_PROVIDERS, budget="npu-int8", source="fp32-static", over_budget_why=QNN_WHY),
    "cpu-int8": Recipe("cpu-int8", "XNNPACK/CPU: vision int8 QDQ, decoder 8-bit weights, .ort models", Precision.INT8,
                       (Pass(VISION, XNNPACK_QDQ), Pass(DECODER, WEIGHT_ONLY)), layout=Layout.INPLACE,
                       providers=PHONE_CPU, budget="int8", source="fp32-inplace"),
    "cpu-int4": Recipe("cpu-int4", "XNNPACK/CPU: vision int8 QDQ, decoder 4-bit weights, .ort models", Precision.INT4,
                       (Pass(VISION, XNNPACK_QDQ), Pass(DECODER, WEIGHT_ONLY)), layout=Layout.INPLACE,
                       providers=PHONE_CPU, budget="int4", source="fp32-inplace"),
}
VARIANTS = tuple(name for name, recipe in RECIPES.items() if recipe.shipped)
QNN_GRAPHS = (GraphRole.VISION, GraphRole.DECODER)


@dataclass(frozen=True)
class Profile:
    variants: tuple[str, ...] = option(VARIANTS)
    soc: str = option("SM8350")
    qnn_graphs: tuple[str, ...] = option(tuple(QNN_GRAPHS))  # graphs put on the NPU; the others run on the CPU
    max_context: int = option(1024)  # KV buffer of the static graphs
    prefill_chunk: int = option(128)
    qnn_16bit_weights: tuple[str, ...] = ()  # node-name patterns whose weights stay 16-bit on the HTP (no CLI option)
    calibration: str | None = option(None)
    eval_tokens: int | None = option(None)  # None: EVAL_TOKENS by the LLM's weights

    def __post_init__(self):
        check_variants("sd888", RECIPES, self.variants)
        check_eval_tokens(self.eval_tokens)
        if self.soc not in SOCS:
            raise VlmExportError(f"unknown Snapdragon SoC '{self.soc}'", f"use one of {', '.join(SOCS)}")
        bad = [g for g in self.qnn_graphs if g not in QNN_GRAPHS]
        if bad or not self.qnn_graphs:
            raise VlmExportError(f"--qnn-graphs must name some of {', '.join(QNN_GRAPHS)} (got {', '.join(bad) or 'none'})",
                                 "pass e.g. --qnn-graphs vision")
        if not 0 < self.prefill_chunk <= self.max_context:
            raise VlmExportError("the prefill chunk must be positive and fit the KV buffer", "adjust --prefill-chunk / --max-context")


def cli_help() -> dict[str, str]:
    """`build --help` text per Profile field, from this target's own tables and defaults."""
    d = Profile()
    socs = " | ".join(f"{k} ({v['device']}, HTP v{v['htp_arch']})" for k, v in SOCS.items())
    return {
        "variants": variants_help(RECIPES, d.variants),
        "soc": f"Snapdragon SoC the QNN context binaries are compiled for: {socs} (default {d.soc})",
        "qnn_graphs": f"graphs put on the NPU, subset of {','.join(QNN_GRAPHS)} (default {','.join(d.qnn_graphs)}; "
                      "the others run on the CPU)",
        "max_context": f"KV buffer of the static graphs (default {d.max_context}, at most the model's context)",
        "prefill_chunk": f"prompt tokens per static prefill call (default {d.prefill_chunk})",
        "calibration": "folder (recipe.json, images/, prompts.txt) the QNN and CPU variants are calibrated on "
                       "(default: the repository's calibration/)",
        "eval_tokens": EVAL_TOKENS_HELP,
    }

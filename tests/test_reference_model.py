import numpy as np
import torch
from transformers import CLIPVisionModel

from tests.checkpoints import tiny_spec
from vlm_export.model.load import load_reference
from vlm_export.model.projector import build_projector
from vlm_export.spec.model_spec import IMAGE_TOKEN_INDEX


def test_ldp_shapes_and_key_names():
    v1 = build_projector("ldpnet", 1024, 2048, 24)
    assert "model.mlp.1.weight" in v1.state_dict() and "model.mb_block.2.block.1.fc2.bias" in v1.state_dict()
    v2 = build_projector("ldpnetv2", 1024, 2048, 24)
    assert {"mlp.mlp.0.weight", "mlp.mlp.2.weight", "peg.peg.0.weight", "peg.peg.0.bias"} <= set(v2.state_dict())
    x = torch.randn(2, 576, 1024)
    assert v1(x).shape == (2, 144, 2048) and v2(x).shape == (2, 144, 2048)


def test_vision_tower_matches_hidden_states_minus_two(tiny_model):
    tower = tiny_model.model.vision_tower
    pixels = torch.randn(1, 3, 336, 336)
    full = CLIPVisionModel.forward(tower.vision_tower, pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(tower(pixels), full.hidden_states[-2][:, 1:])


def test_image_splice_and_forward(tiny_model):
    ids = [1, 5, 6, IMAGE_TOKEN_INDEX, 7, 8]
    image = tiny_model.encode_images(torch.randn(1, 3, 336, 336))  # (1, 144, C)
    embeds = tiny_model.splice_image_embeds(ids, image)
    assert embeds.shape == (5 + 144, 64)
    torch.testing.assert_close(embeds[3:147], image[0])
    logits = tiny_model(inputs_embeds=embeds[None]).logits
    assert logits.shape == (1, 149, 512) and torch.isfinite(logits).all()


def test_seeded_weights_are_reproducible():
    a = load_reference(tiny_spec("ldpnet")).lm_head.weight
    b = load_reference(tiny_spec("ldpnet")).lm_head.weight
    assert np.array_equal(a.detach().numpy(), b.detach().numpy())


def test_a_reference_without_its_vision_tower_keeps_the_same_llm_weights(v2_checkpoint):
    from vlm_export.spec import resolve_spec

    for spec in (tiny_spec("ldpnet"), resolve_spec(str(v2_checkpoint))):  # seeded weights, and a checkpoint's
        full, llm_only = load_reference(spec), load_reference(spec, vision=False)
        llm = {k: v for k, v in full.state_dict().items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
        assert llm and all(torch.equal(v, llm_only.state_dict()[k]) for k, v in llm.items())
        assert all(p.is_meta for p in llm_only.model.vision_tower.parameters())
        assert all(p.is_meta for p in llm_only.model.mm_projector.parameters())


def test_each_part_draws_from_its_own_seed():
    """The tower's and projector's seeded weights do not depend on the LLM built before them (the
    vision export builds no LLM; a GGUF's LLM draws nothing)."""
    spec = tiny_spec("ldpnet")
    wider = spec.replace(llm=spec.llm.__class__(**{**spec.llm.__dict__, "num_layers": spec.llm.num_layers + 1}))
    a, b = load_reference(spec), load_reference(wider, llm=False)
    for part in ("vision_tower", "mm_projector"):
        pa, pb = getattr(a.model, part).state_dict(), getattr(b.model, part).state_dict()
        assert pa and all(torch.equal(v, pb[k]) for k, v in pa.items())
    assert all(p.is_meta for p in b.model.layers.parameters())


def test_the_seeded_tower_draws_every_parameter_from_clips_own_init():
    """torch's default init is skipped (CLIP's `_init_weights` overwrites it all): with uninitialised
    memory filled with NaN, none is left in the seeded tower, and a tower built without CLIP's init
    would show them (so the check can fail)."""
    from transformers.modeling_utils import no_init_weights

    from vlm_export.model.mobilevlm import _seeded_tower
    from vlm_export.model.vision_tower import CLIPVisionTower

    spec = tiny_spec("ldpnet")
    torch.use_deterministic_algorithms(True)  # torch.empty fills floats with NaN (torch.utils.deterministic)
    try:
        tower = _seeded_tower(spec, 1)
        with no_init_weights():
            bare = CLIPVisionTower(spec.vision)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.isfinite(p).all() for p in tower.parameters())
    assert any(torch.isnan(p).any() for p in bare.parameters())
    attn = tower.vision_tower.vision_model.encoder.layers[0].self_attn
    in_std = spec.vision.hidden_size ** -0.5 * (2 * spec.vision.num_layers) ** -0.5  # CLIP's in_proj_std
    assert abs(float(attn.q_proj.weight.detach().std()) / in_std - 1) < 0.1 and not attn.q_proj.bias.any()

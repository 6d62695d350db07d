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

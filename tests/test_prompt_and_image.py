import numpy as np
import pytest
from PIL import Image

from vlm_export.errors import VlmExportError
from vlm_export.model.preprocess import PAD_COLOUR, load_image, preprocess_image
from vlm_export.model.prompt import Message, render_prompt, user_turn
from vlm_export.model.tokenizer import load_tokenizer
from vlm_export.spec.model_spec import IMAGE_TOKEN_INDEX, VICUNA_V1, VisionSpec
from vlm_export.spec.presets import BUNDLED_TOKENIZER

OFFICIAL_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT:"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_TOKENIZER)


def test_vicuna_v1_prompt_is_the_official_text(tokenizer):
    assert render_prompt(VICUNA_V1, [user_turn("What is this?", with_image=True)], tokenizer) == OFFICIAL_V1


def test_multi_turn_uses_eos_separator(tokenizer):
    text = render_prompt(VICUNA_V1, [Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "Bye")], tokenizer)
    assert text.endswith("USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:")


def test_image_marker_tokenized_like_official(tokenizer):
    ids = tokenizer.tokenize_prompt(OFFICIAL_V1)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[0] == 1 and ids.count(1) == 1
    before, after = OFFICIAL_V1.split("<image>")
    # official tokenizer_image_token: each chunk tokenized with BOS, BOS stripped from later chunks
    assert ids == tokenizer.encode(before, True) + [IMAGE_TOKEN_INDEX] + tokenizer.encode(after, True)[1:]


def test_reserved_marker_in_prompt_is_refused():
    with pytest.raises(VlmExportError, match="reserved"):
        user_turn("look <image>", with_image=False)


def test_preprocess_pads_with_mean_colour(tmp_path):
    Image.new("RGB", (200, 100), (255, 0, 0)).save(tmp_path / "wide.png")
    pixels = preprocess_image(load_image(tmp_path / "wide.png"), VisionSpec())
    assert pixels.shape == (1, 3, 336, 336) and pixels.dtype == np.float32
    top_row = pixels[0, :, 0, 168]  # the pad band: CLIP-normalised (122, 116, 104)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(top_row, (np.array(PAD_COLOUR) / 255 - mean) / std, atol=2e-2)


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "I;16", "P", "LA"])
def test_odd_image_modes_convert(tmp_path, mode):
    path = tmp_path / ("img.tiff" if mode in ("CMYK", "I;16") else "img.png")
    Image.new(mode, (40, 30)).save(path)
    assert load_image(path).mode == "RGB"


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(VlmExportError, match="not an image"):
        load_image(tmp_path / "x.png")


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(VlmExportError, match="too large"):
        load_image(tmp_path / "big.png")

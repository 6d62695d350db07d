"""Images at the edges: any size from 1x1, any Pillow mode, EXIF orientation, transparency,
16-bit, PIL images through the Python API, and very elongated strips."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.checkpoints import tiny_spec
from tests.cli import vlm
from vlm_export.errors import VlmExportError
from vlm_export.model import preprocess
from vlm_export.model.preprocess import PAD_COLOUR, load_image, model_pixels, preprocess_image, to_rgb
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams
from vlm_export.spec.model_spec import VisionSpec

ORIENTATION = 0x0112
CLIP_MEAN, CLIP_STD = np.array(preprocess.CLIP_MEAN), np.array(preprocess.CLIP_STD)


def normalised(rgb) -> np.ndarray:
    return (np.asarray(rgb) / 255 - CLIP_MEAN) / CLIP_STD


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (5, 1)])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_tiny_images_of_every_shape(size, aspect):
    image = Image.new("RGB", size, (200, 10, 30))
    pixels = preprocess_image(image, VisionSpec(), aspect)
    assert pixels.shape == (1, 3, 336, 336)
    colour, pad = normalised((200, 10, 30)), normalised(PAD_COLOUR)
    if aspect == "square" or size[0] == size[1]:  # a flat colour stays that colour
        np.testing.assert_allclose(pixels[0, :, 168, 168], colour, atol=1e-5)
    else:  # padded: every pixel lies between the colour and the pad colour (bicubic may overshoot a little)
        low, high = np.minimum(colour, pad)[:, None, None] - 0.2, np.maximum(colour, pad)[:, None, None] + 0.2
        assert ((pixels[0] >= low) & (pixels[0] <= high)).all()


def test_cli_run_with_a_1x1_png(tiny_graphs, tmp_path):
    Image.new("RGB", (1, 1), (255, 255, 255)).save(tmp_path / "dot.png")
    result = vlm("run", tiny_graphs, "--image", tmp_path / "dot.png", "--prompt", "What is this?", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "211 prompt tokens, 3 new (max_new_tokens)" in result.stderr  # 144 of them the image's


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA",
                                  "RGBX", "RGBa", "La", "I;16", "I;16B", "I;16L"])
def test_every_pillow_mode_becomes_rgb(mode):
    image = Image.new(mode, (4, 3))
    assert to_rgb(image).mode == "RGB" and to_rgb(image).size == (4, 3)
    assert preprocess_image(image, VisionSpec()).shape == (1, 3, 336, 336)


def test_sixteen_bit_is_scaled_not_saturated():
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        image.putpixel((x, 0), value)
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]  # Pillow's convert("RGB") gives 0, 255, 255


def test_exif_rotated_photo_is_seen_upright(photo, tmp_path):
    upright = Image.open(photo).convert("RGB").crop((0, 0, 400, 260))
    upright.save(tmp_path / "upright.jpg", quality=95)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # stored rotated; tag 6 = "rotate 90 CW to view"
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    sideways.save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    loaded = load_image(tmp_path / "sideways.jpg")
    assert loaded.size == upright.size
    difference = np.abs(np.asarray(loaded, float) - np.asarray(load_image(tmp_path / "upright.jpg"), float)).mean()
    assert difference < 3  # JPEG noise only; seen as stored it would not even have the same shape
    spec = tiny_spec("ldpnet")
    assert np.abs(model_pixels(tmp_path / "sideways.jpg", spec) - model_pixels(tmp_path / "upright.jpg", spec)).mean() < 0.05


def test_exif_orientation_of_a_pil_image_in_the_api(photo):
    upright = Image.open(photo).convert("RGB").crop((0, 0, 300, 200))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    sideways.getexif()[ORIENTATION] = 6
    sideways.info["exif"] = sideways.getexif().tobytes()
    np.testing.assert_array_equal(np.asarray(to_rgb(sideways)), np.asarray(upright))


def test_transparency_keeps_colour_by_default_and_composites_on_request(tmp_path):
    image = Image.new("RGBA", (6, 6), (255, 0, 0, 0))  # fully transparent red
    image.save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 0, 0]  # official convert("RGB")
    assert np.asarray(load_image(tmp_path / "clear.png", alpha="composite"))[0, 0].tolist() == list(PAD_COLOUR)
    spec = tiny_spec("ldpnet").replace(image_alpha="composite")
    np.testing.assert_allclose(model_pixels(tmp_path / "clear.png", spec)[0, :, 168, 168], normalised(PAD_COLOUR), atol=1e-5)
    with pytest.raises(VlmExportError, match="unknown image alpha policy"):
        tiny_spec("ldpnet").replace(image_alpha="white")


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "LA", "RGBA"])
def test_pil_images_through_the_python_api(tiny_graphs, mode):
    image = Image.new("RGB", (40, 30), (250, 20, 20)).convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 40000)
    with Generator(ArtifactSet.open(tiny_graphs)) as generator:
        result = generator.generate([Request.ask("What is this?", image)], SamplingParams(max_new_tokens=3))[0]
    assert (result.prompt_tokens, len(result.token_ids), result.stop_reason) == (211, 3, "max_new_tokens")
    if mode == "P":  # a palette image keeps its palette's colour (it came out black before)
        assert np.asarray(to_rgb(image))[0, 0].tolist() == list(image.getpalette()[3 * image.getpixel((0, 0)):][:3]) != [0, 0, 0]


def test_very_elongated_strip_without_padding():
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1, 400_000, 3), dtype=np.uint8))
    pixels = preprocess_image(strip, VisionSpec(), "square")  # 336 x 134 M pixels if resized whole
    assert pixels.shape == (1, 3, 336, 336) and np.isfinite(pixels).all()


def test_direct_crop_equals_resize_then_crop_for_wide_images(monkeypatch):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 900, 3), dtype=np.uint8))
    monkeypatch.setattr(preprocess, "DIRECT_CROP_PIXELS", 0)  # every unpadded image takes the crop box path
    direct = preprocess_image(image, VisionSpec(), "square")
    monkeypatch.setattr(preprocess, "DIRECT_CROP_PIXELS", 1e12)  # the processor's resize, then its crop
    np.testing.assert_array_equal(direct, preprocess_image(image, VisionSpec(), "square"))


def test_a_strip_too_long_to_pad_is_refused_in_one_line():
    with pytest.raises(VlmExportError, match="too elongated.*-- fix: crop the image closer to a square"):
        preprocess_image(Image.new("RGB", (1, 30_000)), VisionSpec(), "pad")


def test_manifest_names_the_preprocessing_deviations(tiny_graphs):
    record = json.loads((tiny_graphs / "manifest.json").read_text())["preprocessing"]
    assert record["alpha"] == "drop" and record["exif_orientation"] == "applied"
    assert any("16-bit" in d for d in record["deviations_from_official"])


def test_an_empty_pil_image_is_refused_in_one_line():
    with pytest.raises(VlmExportError, match=r"the image is empty \(0x0 pixels\)"):
        to_rgb(Image.new("RGB", (0, 0)))


def test_float_image_with_nan_and_inf_converts_quietly():
    image = Image.fromarray(np.array([[np.nan, 1.0], [2.0, np.inf]], dtype=np.float32), "F")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(to_rgb(image))[:, :, 0].tolist() == [[0, 0], [255, 255]]


def test_palette_with_byte_transparency_converts_quietly(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=b"\x00\x80" + b"\xff" * 254)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [250, 20, 20]


def test_a_directory_given_as_image_is_named_so(tmp_path):
    with pytest.raises(VlmExportError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("size", [336, 224, 30])
def test_clip_pixels_equal_transformers_clip_image_processor(size, photo):
    """`clip_pixels` replays CLIPImageProcessor without importing transformers: bit for bit on a
    photo and on random images of square, elongated, tiny and odd sizes."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import ChannelDimension

    rng = np.random.default_rng(size)
    images = [load_image(photo)] + [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                                     for w, h in [(1, 1), (1, 7), (336, 336), (337, 336), (335, 900), (1000, 3), (500, 333)]]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(preprocess.CLIP_MEAN), image_std=list(preprocess.CLIP_STD))
    for image in images:
        expected = processor(images=np.asarray(image, dtype=np.uint8), return_tensors="np",
                             input_data_format=ChannelDimension.LAST)["pixel_values"].astype(np.float32)
        np.testing.assert_array_equal(preprocess.clip_pixels(image, size), expected, err_msg=str(image.size))


def test_a_question_with_an_image_imports_no_transformers(tiny_graphs, photo):
    import subprocess
    import sys

    code = ("import sys; from vlm_export.runtime.artifact_set import ArtifactSet; "
            "from vlm_export.runtime.generation import Generator, Request; from vlm_export.runtime.sampling import SamplingParams; "
            f"g = Generator(ArtifactSet.open({str(tiny_graphs)!r}), 'ort'); "
            f"g.generate([Request.ask('What is in the image?', {str(photo)!r})], SamplingParams(max_new_tokens=2)); "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split()[-1] == "False", result.stderr[-2000:]

"""Image loading and preprocessing, as MobileVLM does it (`image_aspect_ratio: pad`).

pad to square with the CLIP mean colour (122, 116, 104) -> resize shortest edge to 336 (bicubic)
-> centre crop 336 -> rescale 1/255 -> normalise with CLIP mean/std. Returns numpy, so runtimes
without PyTorch can use it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import VisionSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited over the pad colour, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, PAD_COLOUR + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file safely (Pillow's decompression-bomb guard is an error here)."""
    path = Path(path)
    if not path.is_file():
        raise VlmExportError(f"image {path} does not exist", "pass the path of a JPEG/PNG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VlmExportError(f"image {path} is too large ({exc})", "downscale the image below 89 megapixels") from exc
    except UnidentifiedImageError as exc:
        raise VlmExportError(f"{path} is not an image Pillow can read", "pass a JPEG/PNG/WebP image") from exc
    except OSError as exc:
        raise VlmExportError(f"image {path} is truncated or corrupt ({exc})", "pass an intact image file") from exc


def expand_to_square(image: Image.Image, colour=PAD_COLOUR) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_image(image: Image.Image, vision: VisionSpec, aspect: str = "pad") -> np.ndarray:
    """PIL image -> float32 (1, 3, S, S) pixel values."""
    from transformers import CLIPImageProcessor

    if aspect == "pad":
        image = expand_to_square(image)
    processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return processor(images=image, return_tensors="np")["pixel_values"].astype(np.float32)

"""Image loading and preprocessing, as the official MobileVLM pipeline does it.

    Image.open(path) -> EXIF orientation applied -> .convert("RGB")
    image_aspect_ratio "pad": pad to a square with the CLIP mean colour (122, 116, 104)   (expand2square)
    -> CLIPImageProcessor: resize shortest edge to 336 (bicubic) -> centre crop 336 -> /255 -> CLIP mean/std
       (replayed step for step by `clip_pixels`, bit for bit, without importing transformers)
    any other value ("square", or no key in config.json): the processor alone (no padding)

The official pipeline is `mobilevlm/utils.py: process_images` with images opened by
`Image.open(f).convert("RGB")`. Where this module differs on purpose it says so in
`DEVIATIONS`, which the export manifest records:
- EXIF orientation is honoured (`ImageOps.exif_transpose`): a phone photo stored sideways with an
  orientation tag is seen upright, as every viewer shows it. The official code ignores the tag.
- 16-bit images are scaled to 8 bits (value * 255 / 65535); Pillow's `convert("RGB")`, which the
  official code uses, saturates every value above 255 to white.
- Float images (mode F) are scaled from their minimum..maximum to 0..255 (the official
  conversion clips them to 0..255).
- Without padding, an image so elongated that its resized copy would pass 64 Mpx (e.g. 1 x 600
  pixels and thinner) has only its centre-crop box resized (Pillow's `resize(box=...)`); the
  official code materialises the whole strip. Pixels agree exactly for wide images and to within
  a few 8-bit levels for tall ones (Pillow's own full-height resize rounds differently).
Transparency follows the official conversion by default (`alpha="drop"`: the colour stored under
a transparent pixel is kept); `alpha="composite"` blends over the pad colour instead, a named
option of the spec (`--image-alpha composite`) that the manifest records.

Every array handed to the Hugging Face processor states its channel axis (channels last): the
processor would otherwise guess it from the shape, and guesses wrong for a 1- to 3-pixel-high image.
Returns numpy, so runtimes without PyTorch can use it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_export.errors import VlmExportError
from vlm_export.spec.model_spec import ALPHA_POLICIES, ModelSpec, VisionSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
DEVIATIONS = (
    "EXIF orientation applied (official: ignored)",
    "16-bit images scaled to 8 bits (official: values above 255 saturate to white)",
    "float (mode F) images scaled from their min..max (official: clipped to 0..255)",
    "unpadded images whose resize would pass 64 Mpx: only the centre-crop box is resized",
)
# Larger intermediate images than this are refused: Pillow's own decompression-bomb limit, x4.
MAX_WORK_PIXELS = 4 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Above this many pixels, the resized-but-not-yet-cropped intermediate of a very elongated image
# ("square" aspect: 336 x 336*ratio) is not made: the crop box alone is resized.
DIRECT_CROP_PIXELS = 64 * 2**20


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = array[np.isfinite(array)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        array = np.nan_to_num(array, nan=low, posinf=high, neginf=low)  # NaN reads as the darkest value
        array = (np.clip(array, low, high) - low) / max(high - low, 1e-12) * 255.0
    else:  # 16-bit (I;16*) or 32-bit integer (I), which Pillow uses for 16-bit PNGs
        array = np.clip(array, 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(array).astype(np.uint8), "L")


def to_rgb(image: Image.Image, alpha: str = "drop") -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright.

    alpha: "drop" keeps the colour under transparent pixels (the official `convert("RGB")`);
    "composite" blends transparent pixels over the pad colour.
    Raises VlmExportError for an image Pillow cannot turn into RGB.
    """
    if alpha not in ALPHA_POLICIES:
        raise VlmExportError(f"unknown image alpha policy '{alpha}'", f"use one of {', '.join(ALPHA_POLICIES)}")
    if image.width == 0 or image.height == 0:
        raise VlmExportError(f"the image is empty ({image.width}x{image.height} pixels)", "pass an image of at least 1x1 pixels")
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT or image.mode == "F":
        image = _scaled_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (image.mode == "P" and "transparency" in image.info)
    try:
        if alpha == "composite" and has_alpha:
            rgba = image.convert("LA" if image.mode == "La" else image.mode.upper()).convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, PAD_COLOUR + (255,)), rgba).convert("RGB")
        if image.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to LA / RGBA
            image = image.convert(image.mode.upper())
        with warnings.catch_warnings():  # "transparency expressed in bytes": the alpha is dropped on purpose
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise VlmExportError(f"cannot convert a {image.mode} image to RGB ({exc})", "save the image as an 8-bit RGB PNG or JPEG") from exc


def load_image(path: str | Path, alpha: str = "drop") -> Image.Image:
    """Open an image file safely (Pillow's decompression-bomb guard is an error here) -> RGB, upright."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise VlmExportError(f"image {path} {problem}", "pass the path of a JPEG/PNG image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image, alpha)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VlmExportError(f"image {path} is too large ({exc})", "downscale the image below 89 megapixels") from exc
    except UnidentifiedImageError as exc:
        raise VlmExportError(f"{path} is not an image Pillow can read", "pass a JPEG/PNG/WebP image") from exc
    except OSError as exc:
        raise VlmExportError(f"image {path} is truncated or corrupt ({exc})", "pass an intact image file") from exc


def _check_work_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_WORK_PIXELS:
        raise VlmExportError(f"the image is too elongated: {what} would be {width}x{height} pixels",
                             "crop the image closer to a square before passing it")


def expand_to_square(image: Image.Image, colour=PAD_COLOUR) -> Image.Image:
    """The official expand2square: the image centred on a square of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    _check_work_size(side, side, "padding it to a square")
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resized_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The processor's resize (shortest edge -> size, bicubic) then centre crop (size x size), for
    a very elongated image: Pillow resizes only the box that the crop keeps. Its filter reaches
    the source pixels around the box, so the pixels equal resize-then-crop's."""
    width, height = image.size
    short, long_ = min(width, height), max(width, height)
    resized_long = int(size * long_ / short)  # transformers' get_resize_output_image_size
    offset = int((resized_long - size) / 2)  # transformers' center_crop
    scale = long_ / resized_long
    start, end = offset * scale, (offset + size) * scale
    box = (start, 0, end, height) if width > height else (0, start, width, end)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def preprocess_image(image: Image.Image, vision: VisionSpec, aspect: str = "pad", alpha: str = "drop") -> np.ndarray:
    """PIL image (any mode, any size from 1x1) -> float32 (1, 3, S, S) pixel values, S = vision.image_size.

    aspect: the checkpoint's image_aspect_ratio ("pad" pads to a square first; anything else
    resizes the shortest edge and centre-crops). Raises VlmExportError for an image that cannot
    be converted or is too elongated to process.
    """
    image = to_rgb(image, alpha)
    size = vision.image_size
    if aspect == "pad":
        image = expand_to_square(image)
    elif size * int(size * max(image.size) / min(image.size)) > DIRECT_CROP_PIXELS:
        image = _resized_centre_crop(image, size)
    return clip_pixels(image, size)


def clip_pixels(image: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image -> float32 (1, 3, size, size): what transformers 4.57's `CLIPImageProcessor`
    (shortest edge `size`, crop `size` x `size`, CLIP mean/std) returns for it, step for step
    without importing transformers (~1 s of a `run` with an image): `get_resize_output_image_size`,
    `image_transforms.resize` (Pillow's bicubic on the uint8 pixels), `center_crop`, `rescale`
    (float64 x 1/255, then float32) and `normalize` (float32, channels last), then channels first.
    tests/test_image_edges.py holds it to the processor pixel for pixel."""
    width, height = image.size
    short, long_ = (width, height) if width <= height else (height, width)
    new_long = int(size * long_ / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    pixels = np.array(image.resize((new_width, new_height), Image.Resampling.BICUBIC), dtype=np.uint8)
    top, left = (new_height - size) // 2, (new_width - size) // 2  # the shortest edge is `size`: no padding
    pixels = pixels[top:top + size, left:left + size]
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalized = (scaled - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))[None]


def model_pixels(image: str | Path | Image.Image, spec: ModelSpec) -> np.ndarray:
    """An image file's path or a PIL image -> float32 (1, 3, S, S) pixel values as `spec`'s model
    sees them (its image_aspect_ratio and alpha policy). Raises VlmExportError for a bad image."""
    if isinstance(image, (str, Path)):
        image = load_image(image, spec.image_alpha)
    return preprocess_image(image, spec.vision, spec.image_aspect_ratio, spec.image_alpha)


def preprocessing_record(spec: ModelSpec) -> dict:
    """What the manifest says about image preprocessing: the settings and every deviation from
    the official pipeline."""
    deviations = list(DEVIATIONS) + (["transparent pixels composited over the pad colour (official: colour kept)"]
                                     if spec.image_alpha == "composite" else [])
    return {"image_aspect_ratio": spec.image_aspect_ratio, "alpha": spec.image_alpha, "exif_orientation": "applied",
            "channel_axis": "last (stated, never inferred)", "deviations_from_official": deviations}

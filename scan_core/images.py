"""Image bytes -> tensors: identity by content hash, safe decoding, mode conversion, resizing.

Lakes are messy: any object may be empty, truncated, not an image at all, a decompression bomb, a
16-bit or CMYK or palette image. Everything that cannot become a tensor raises one typed error,
:class:`ImageDecodeError`, whose ``reason`` is a sentence the pipeline records when it
quarantines the object. Only the formats of :data:`ALLOWED_FORMATS` are opened (PIL's other
plugins, EPS among them, are never reached with lake bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from scan_core.config import ImageConfig

#: PIL format names the pipeline decodes (PIL's JPEG opener also takes cameras' MPO files).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageDecodeError(ValueError):
    """The bytes are not an image the pipeline can use; ``reason`` says why in one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the catalog records about a decodable image: format, mode and size as stored."""

    format: str
    mode: str
    width: int
    height: int


def image_id(data: bytes) -> str:
    """The image's identity: the SHA-256 hex digest of its bytes (same bytes, same id)."""
    return hashlib.sha256(data).hexdigest()


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode ``data`` (first frame), enforcing the pixel limit before decoding."""
    if not data:
        raise ImageDecodeError("empty object (0 bytes)")
    with warnings.catch_warnings():
        # the explicit max_pixels check below replaces PIL's global bomb guard and its warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"decompression bomb refused by the decoder ({exc})") from exc
        except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, OSError...
            raise ImageDecodeError(
                "not an image in a supported format "
                f"({', '.join(ALLOWED_FORMATS)}): {type(exc).__name__}"
            ) from exc
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageDecodeError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{max_pixels} (image.max_pixels)"
            )
        try:
            image.seek(0)
            image.load()
        except Exception as exc:
            raise ImageDecodeError(
                f"corrupt or truncated {image.format} image: {type(exc).__name__}: {exc}"
            ) from exc
    return image


def inspect_image(data: bytes, max_pixels: int = ImageConfig().max_pixels) -> ImageInfo:
    """Decode ``data`` once to prove it is usable and return its format, mode and size.

    Raises:
        ImageDecodeError: with the reason the image cannot be used.
    """
    image = _open(data, max_pixels)
    return ImageInfo(
        format=str(image.format), mode=image.mode, width=image.width, height=image.height
    )


def to_8bit_mode(image: Image.Image, channels: int, background: int) -> Image.Image:
    """Convert any PIL mode to ``L`` (1 channel) or ``RGB`` (3 channels).

    16-bit and 32-bit integer greyscale is scaled (not clipped) to 8 bits; float images are
    clipped to [0, 1]; transparency (RGBA, LA, PA, palette with a transparent index) is
    composited over a flat ``background`` grey level; CMYK, YCbCr, LAB and HSV go through RGB.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max(initial=0) <= 65535 else 16843009.0  # 2**16-1 or 2**32-1
        image = Image.fromarray(np.clip(array / scale, 0, 255).round().astype(np.uint8), "L")
    elif mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0
        image = Image.fromarray(array.round().astype(np.uint8), "L")
    elif mode == "P" and "transparency" in image.info or mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        base = "RGB" if image.mode.startswith("RGB") else "L"
        flat = Image.new(
            base, image.size, (background,) * len(base) if base == "RGB" else background
        )
        flat.paste(image.convert(base + "A"), mask=image.getchannel("A"))
        image = flat
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = (
            image.convert("RGB").convert(target)
            if image.mode not in ("L", "RGB")
            else image.convert(target)
        )
    return image


def resize_square(image: Image.Image, size: int, policy: str) -> Image.Image:
    """Resize to ``size x size``: ``crop`` scales the short side then centre-crops, ``squash``
    ignores the aspect ratio, ``pad`` scales the long side and pads with the edge mean."""
    if image.size == (size, size):
        return image
    resample = Image.Resampling.BILINEAR
    if policy == "squash":
        return image.resize((size, size), resample)
    if policy == "crop":
        return ImageOps.fit(image, (size, size), method=resample)
    if policy == "pad":
        fitted = ImageOps.contain(image, (size, size), method=resample)
        edge = np.asarray(fitted).reshape(-1, len(fitted.getbands())).mean(axis=0)
        color = int(edge[0]) if fitted.mode == "L" else tuple(int(c) for c in edge)
        return ImageOps.pad(fitted, (size, size), method=resample, color=color)
    raise ValueError(f"Unknown resize policy '{policy}': choose crop, squash or pad.")


def decode_image(data: bytes, config: ImageConfig) -> torch.Tensor:
    """Decode image bytes into a uint8 tensor ``(channels, size, size)`` following ``config``.

    EXIF orientation is applied; animated images contribute their first frame.

    Raises:
        ImageDecodeError: with the reason the image cannot be used.
    """
    image = _open(data, config.max_pixels)
    with contextlib.suppress(Exception):  # a broken EXIF block is not worth losing the image
        image = ImageOps.exif_transpose(image)
    background = 255 if config.background == "white" else 0
    image = to_8bit_mode(image, config.channels, background)
    image = resize_square(image, config.size, config.resize)
    array = np.array(image, dtype=np.uint8)  # a writable copy
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def decode_images(blobs: list[bytes], config: ImageConfig) -> torch.Tensor:
    """Decode several images into one uint8 batch ``(N, channels, size, size)``.

    Raises:
        ImageDecodeError: for the first blob that cannot be decoded (catalogued lakes hold only
            images that decoded once, so this means the object changed under the pipeline).
    """
    out = torch.empty(len(blobs), config.channels, config.size, config.size, dtype=torch.uint8)
    for i, blob in enumerate(blobs):
        out[i] = decode_image(blob, config)
    return out

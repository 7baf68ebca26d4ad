"""Decoding: every supported format and mode becomes the configured tensor; bad bytes raise one
typed error with a reason."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from scan_core.config import ImageConfig
from scan_core.images import (
    ImageDecodeError,
    decode_image,
    decode_images,
    image_id,
    inspect_image,
    resize_square,
)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(w: int = 17, h: int = 11) -> np.ndarray:
    """An RGB test card (torchvision tests use 17x11 too)."""
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], axis=2).round().astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_decodes_to_the_configured_shape(fmt: str, channels: int) -> None:
    data = encode(Image.fromarray(gradient()), fmt)
    out = decode_image(data, ImageConfig(channels=channels, size=16))
    assert out.dtype == torch.uint8 and out.shape == (channels, 16, 16)
    info = inspect_image(data)
    assert (info.format, info.width, info.height) == (fmt, 17, 11)


def test_lossless_grayscale_round_trip_is_exact() -> None:
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), ImageConfig(channels=1, size=28))
    assert torch.equal(out[0], torch.from_numpy(pixels))


def test_image_id_is_the_sha256_of_the_bytes() -> None:
    assert image_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert image_id(b"abc") != image_id(b"abd")


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    pixels = np.full((8, 8), 257 * 100, dtype=np.uint16)
    pixels[0], pixels[-1] = 0, 65535
    data = encode(Image.fromarray(pixels), "PNG")
    assert inspect_image(data).mode.startswith("I")
    out = decode_image(data, ImageConfig(channels=1, size=8))
    assert out[0, :, 0].tolist() == [0, 100, 100, 100, 100, 100, 100, 255]


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "JPEG")  # pure red
    out = decode_image(data, ImageConfig(channels=3, size=10))
    r, g, b = (int(out[c].float().mean()) for c in range(3))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("background, expected", [("black", 0), ("white", 255)])
def test_transparency_is_composited_over_the_background(background: str, expected: int) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 255, 255, 255))
    cfg = ImageConfig(channels=1, size=8, background=background)  # type: ignore[arg-type]
    out = decode_image(encode(rgba, "PNG"), cfg)
    assert out[0, 0, 0] == 255 and out[0, 7, 7] == expected
    la = decode_image(encode(rgba.convert("LA"), "PNG"), cfg)
    assert la[0, 7, 7] == expected


def test_palette_with_transparency_and_bilevel_modes() -> None:
    palette = Image.fromarray(gradient()).convert("P")
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG"), ImageConfig(channels=3, size=12)).shape == (
        3,
        12,
        12,
    )
    bilevel = Image.new("1", (5, 5), 1)
    assert int(decode_image(encode(bilevel, "PNG"), ImageConfig(size=8)).min()) == 255


def test_one_by_one_image_is_upsampled() -> None:
    out = decode_image(encode(Image.new("L", (1, 1), 77), "PNG"), ImageConfig(size=8))
    assert out.shape == (1, 8, 8) and int(out.min()) == int(out.max()) == 77


@pytest.mark.parametrize("policy", ["crop", "squash", "pad"])
def test_resize_policies_give_squares(policy: str) -> None:
    image = Image.fromarray(gradient(40, 20))
    assert resize_square(image, 16, policy).size == (16, 16)
    with pytest.raises(ValueError, match="resize policy"):
        resize_square(image, 16, "stretch")


def test_crop_keeps_the_centre_and_pad_keeps_everything() -> None:
    pixels = np.zeros((10, 30), dtype=np.uint8)
    pixels[:, :10] = 255  # only the left third is white
    image = Image.fromarray(pixels)
    assert np.asarray(resize_square(image, 10, "crop")).max() == 0
    assert np.asarray(resize_square(image, 10, "pad")).max() == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty object"),
        (b"hello, this is text", "not an image"),
        (b"<html><body>503 Service Unavailable</body></html>", "not an image"),
        (b"PAR1\x00\x00\x00PAR1", "not an image"),
    ],
)
def test_non_images_raise_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_image(data, ImageConfig())
    assert reason in info.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_raise(fmt: str) -> None:
    data = encode(Image.fromarray(gradient(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated|not an image"):
        decode_image(data[: len(data) // 2], ImageConfig())


def test_pixel_limit_refuses_bombs_before_decoding() -> None:
    data = encode(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 50000"):
        decode_image(data, ImageConfig(max_pixels=50_000))
    with pytest.raises(ImageDecodeError, match="exceeds"):
        inspect_image(data, max_pixels=1000)


def test_formats_outside_the_allowlist_are_refused() -> None:
    data = encode(Image.new("RGB", (8, 8)), "PPM")  # PIL decodes PPM, the pipeline does not
    with pytest.raises(ImageDecodeError, match="supported format"):
        decode_image(data, ImageConfig())


def test_decode_images_stacks_a_batch() -> None:
    blobs = [encode(Image.new("L", (9, 9), v), "PNG") for v in (0, 128, 255)]
    batch = decode_images(blobs, ImageConfig(size=8))
    assert batch.shape == (3, 1, 8, 8) and batch[:, 0, 0, 0].tolist() == [0, 128, 255]

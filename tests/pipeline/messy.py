"""Objects of a messy lake, built from Fashion-MNIST images: usable images in unusual formats,
modes, sizes and keys, and objects the pipeline must quarantine, each with the reason it gives
(shared by the bad-input tests and ``bench/robustness.py``)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

#: Size above which the messy-lake runs quarantine an object unread (SCAN_LAKE_MAX_OBJECT_BYTES).
MAX_OBJECT_BYTES = 300_000

HTML_ERROR_PAGE = (
    b"<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head>"
    b"<body><h1>Service Unavailable</h1><p>The server is temporarily unable to service your "
    b"request.</p></body></html>\n"
)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """``image`` saved in ``fmt`` (PIL format name)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of ``width x height`` whose pixel data compresses ~1000:1:
    a few KB on disk that decode to ``width * height`` pixels (a decompression bomb)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(compressor.compress(row * (height % 1000)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def odd_images(images: np.ndarray) -> dict[str, bytes]:
    """Usable images (one per Fashion-MNIST image of ``images``, at least 20): unusual formats,
    modes and sizes, and keys with spaces, non-ASCII characters, deep or hidden prefixes."""
    grey = [Image.fromarray(a, "L") for a in images]
    rgb = [g.convert("RGB") for g in grey]
    sixteen = Image.fromarray(images[0].astype(np.uint16) * 257)  # mode I;16
    rgba = rgb[4].convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((28, 28), 200, np.uint8)))
    palette_transparent = rgb[6].convert("P")
    frames = [grey[9], grey[10]]
    deep = "/".join(f"level-{i}" for i in range(24))
    return {
        "odd/sixteen-bit.png": encode(sixteen, "PNG"),
        "odd/cmyk.jpg": encode(rgb[1].convert("CMYK"), "JPEG", quality=95),
        "odd/palette.png": encode(rgb[2].convert("P"), "PNG"),
        "odd/la.png": encode(grey[3].convert("LA"), "PNG"),
        "odd/rgba.png": encode(rgba, "PNG"),
        "odd/one-pixel.png": encode(Image.new("L", (1, 1), 128), "PNG"),
        "odd/palette-transparent.png": encode(palette_transparent, "PNG", transparency=0),
        "odd/binary.png": encode(grey[7].convert("1"), "PNG"),
        "odd/grey.jpg": encode(grey[8], "JPEG", quality=95),
        "odd/animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "odd/photo.webp": encode(rgb[11], "WEBP", lossless=True),
        "odd/scan.bmp": encode(grey[12], "BMP"),
        "odd/scan.tif": encode(grey[13], "TIFF"),
        "odd/UPPER CASE.PNG": encode(grey[14], "PNG"),
        "odd/no-extension": encode(grey[15], "PNG"),
        "odd/a-png-named.txt": encode(grey[16], "PNG"),
        "my photos/été 2024/chat noir ü.png": encode(grey[17], "PNG"),
        "日本語/画像 1.png": encode(grey[18], "PNG"),
        f"{deep}/deep.png": encode(grey[19], "PNG"),
        ".hidden album/kept.png": encode(grey[20], "PNG"),
    }


def bad_objects(images: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """Objects to quarantine, built from two Fashion-MNIST images: key -> (content, a fragment
    of the quarantine reason the pipeline must record)."""
    jpeg = encode(Image.fromarray(images[0], "L").resize((64, 64)), "JPEG", quality=95)
    png = encode(Image.fromarray(images[1], "L").resize((64, 64)), "PNG")
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    parquet = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2, 3]}), parquet)
    not_an_image = "not an image in a supported format"
    return {
        "bad/empty.png": (b"", "empty object (0 bytes)"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt or truncated JPEG image"),
        "bad/truncated.png": (png[: len(png) // 2], "corrupt or truncated PNG image"),
        "bad/corrupt.jpg": (jpeg[:600] + garbage, "corrupt or truncated JPEG image"),
        "bad/corrupt.png": (png[:33] + garbage, not_an_image),
        "bad/notes.txt": (b"shopping list: milk, eggs\n", not_an_image),
        "bad/table.parquet": (parquet.getvalue(), not_an_image),
        "bad/error-page.jpg": (HTML_ERROR_PAGE, not_an_image),
        "bad/drawing.svg": (b"<svg xmlns='http://www.w3.org/2000/svg' width='8'/>", not_an_image),
        ".DS_Store": (b"\x00\x00\x00\x01Bud1" + garbage[:200], not_an_image),
        "bad/bomb.png": (bomb_png(10_000, 10_000), "exceeds the limit of 50000000"),
        "bad/huge-bomb.png": (bomb_png(20_000, 20_000), "decompression bomb refused"),
        "bad/too-big.png": (
            png + rng.integers(0, 256, MAX_OBJECT_BYTES, dtype=np.uint8).tobytes(),
            "SCAN_LAKE_MAX_OBJECT_BYTES",
        ),
    }

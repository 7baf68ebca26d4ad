"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, and writing it out as a lake.

The package installs the four gzipped IDX files of Zalando's release under
``/usr/share/datasets/fashion-mnist``. :func:`load_fashion_mnist` reads them into NumPy;
:func:`lake_objects` turns images into PNG objects with keys that say nothing about the class, and
:func:`labels_table` builds the sidecar (image key -> label) used only for evaluation.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Name of the labels sidecar at the root of a lake written by :func:`lake_objects`' callers.
LABELS_SIDECAR = "_labels.parquet"
LABELS_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int32())])

_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format), gzipped or not, into an array.

    Raises:
        ValueError: if the bytes are not a well-formed IDX file.
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError("not an IDX file: bad magic number")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"IDX payload has {len(data) - header} bytes, expected {expected}")
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def load_fashion_mnist(
    split: Literal["train", "test", "all"] = "all", root: Path | str = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64.

    ``all`` is the 60,000 training images followed by the 10,000 test images (the 70k set
    deep-clustering papers cluster).

    Raises:
        FileNotFoundError: naming the Debian package to install when the files are missing.
    """
    root = Path(root)
    splits = ("train", "test") if split == "all" else (split,)
    images, labels = [], []
    for name in splits:
        image_file, label_file = (root / f for f in _FILES[name])
        for path in (image_file, label_file):
            if not path.is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {path} is missing: install the Debian package "
                    "dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)."
                )
        images.append(read_idx(image_file.read_bytes()))
        labels.append(read_idx(label_file.read_bytes()).astype(np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"inconsistent Fashion-MNIST files: images {x.shape}, labels {y.shape}")
    return x, y


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 ``(H, W)`` or ``(H, W, 3)`` array as PNG bytes."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"expected a uint8 (H, W) or (H, W, 3) array, got {image.dtype} {image.shape}"
        )
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def lake_key(index: int, per_folder: int = 1000) -> str:
    """The key of image ``index`` in a demo lake: ``images/007/007123.png`` (no class in it)."""
    return f"images/{index // per_folder:03d}/{index:06d}.png"


def lake_objects(images: np.ndarray, start: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, png_bytes)`` for each image, numbered from ``start``."""
    for offset, image in enumerate(images):
        yield lake_key(start + offset), encode_png(image)


def labels_table(keys: list[str], labels: np.ndarray) -> pa.Table:
    """The labels sidecar: one row per image key with its class index."""
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "label": pa.array(np.asarray(labels, dtype=np.int32), pa.int32()),
        },
        schema=LABELS_SCHEMA,
    )

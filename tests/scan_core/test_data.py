"""The IDX reader on hand-made files, Fashion-MNIST from the Debian package, lake objects."""

import gzip
import io

import numpy as np
import pytest
from PIL import Image

from scan_core.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    labels_table,
    lake_key,
    lake_objects,
    load_fashion_mnist,
    read_idx,
)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def test_read_idx_plain_and_gzipped() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(idx_bytes(array)), array)
    assert np.array_equal(read_idx(gzip.compress(idx_bytes(array))), array)
    big_endian = np.array([1, -2, 300], dtype=">i4")
    assert read_idx(idx_bytes(big_endian, 0x0C)).tolist() == [1, -2, 300]


def test_read_idx_rejects_bad_files() -> None:
    with pytest.raises(ValueError, match="magic"):
        read_idx(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="payload"):
        read_idx(idx_bytes(np.zeros((2, 2), np.uint8))[:-1])


def test_missing_files_name_the_debian_package(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", root=str(tmp_path))


def test_fashion_mnist_from_the_debian_package() -> None:
    assert (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), (
        "the test set-up installs dataset-fashion-mnist"
    )
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,) and np.bincount(y).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10


def test_lake_objects_are_pngs_with_neutral_keys() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    objects = list(lake_objects(images, start=999))
    assert [k for k, _ in objects] == [lake_key(999), lake_key(1000), lake_key(1001)]
    assert objects[1][0] == "images/001/001000.png"
    decoded = np.asarray(Image.open(io.BytesIO(objects[2][1])))
    assert np.array_equal(decoded, images[2])
    table = labels_table([k for k, _ in objects], np.array([3, 1, 4]))
    assert table.column("label").to_pylist() == [3, 1, 4]
    with pytest.raises(ValueError, match="labels"):
        labels_table(["a"], np.array([1, 2]))

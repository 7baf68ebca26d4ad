"""Near-duplicate detection (issue 26, point 6): perceptual hashes of decoded Fashion-MNIST images
and their edited copies, pair finding against brute force, the embeddings' second opinion."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from PIL import Image

from bench.duplicates import edited_copy as edited
from scan_core.config import DuplicatesConfig, ImageConfig
from scan_core.data import encode_png, load_fashion_mnist
from scan_core.duplicates import (
    Fingerprints,
    binary_index,
    fingerprints,
    hamming_distances,
    hash_pairs,
    near_duplicates,
    perceptual_hashes,
)
from scan_core.images import decode_images

EDITS = ("jpeg_q70", "resize_0.5x", "resize_2x", "crop_5pct", "brighten_1.3")


@pytest.fixture(scope="module")
def fashion_test() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's test split (the benchmark calibrates on other lakes)."""
    return load_fashion_mnist("test")


def decoded(objects: list[bytes]) -> np.ndarray:
    """The objects decoded as the catalog step decodes them (28x28 greyscale)."""
    return decode_images(objects, ImageConfig()).numpy()


@pytest.fixture(scope="module")
def originals(fashion_test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return fashion_test[0][:80]


@pytest.fixture(scope="module")
def original_prints(originals: np.ndarray) -> Fingerprints:
    return fingerprints(decoded([encode_png(a) for a in originals]))


@pytest.mark.parametrize("edit", EDITS)
def test_the_hash_of_an_edited_copy_stays_near_its_original(
    edit: str, originals: np.ndarray, original_prints: Fingerprints
) -> None:
    rng = np.random.default_rng(0)
    copies = fingerprints(decoded([edited(a, edit, rng) for a in originals]))
    to_original = hamming_distances(copies.hashes, original_prints.hashes)
    to_others = hamming_distances(copies.hashes[:, None], original_prints.hashes[None])
    others = to_others[~np.eye(len(originals), dtype=bool)]
    assert np.median(to_original) <= 4  # of 64 bits
    assert np.median(others) >= 20
    # each copy is nearer its own original than almost every other image
    beaten = (to_others < to_original[:, None]).sum(axis=1)
    assert np.mean(beaten == 0) >= 0.9


def test_brightness_does_not_change_the_hash(originals: np.ndarray) -> None:
    darker = (originals.astype(np.float32) * 0.6).round().astype(np.uint8)
    lifted = np.clip(originals.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    base = perceptual_hashes(originals)
    assert np.median(hamming_distances(perceptual_hashes(darker), base)) == 0
    assert np.max(hamming_distances(perceptual_hashes(darker), base)) <= 4
    assert np.median(hamming_distances(perceptual_hashes(lifted), base)) <= 2


@pytest.mark.parametrize(
    ("edit", "share"),
    [("jpeg_q70", 0.7), ("resize_2x", 0.9), ("crop_5pct", 0.5), ("brighten_1.3", 0.7)],
)
def test_most_edited_copies_are_found_with_the_default_thresholds(
    edit: str, share: float, originals: np.ndarray
) -> None:
    """Copies found (at least ``share`` of them) and few other pairs; 0.5x copies lose too much
    detail for the pixel check and are mostly missed (bench/results/duplicates.md)."""
    rng = np.random.default_rng(1)
    objects = [encode_png(a) for a in originals] + [edited(a, edit, rng) for a in originals]
    config = DuplicatesConfig()
    found = near_duplicates(
        fingerprints(decoded(objects)), config.max_hamming, config.min_pixel_similarity
    )
    pairs = set(zip(found.first.tolist(), found.second.tolist(), strict=True))
    n = len(originals)
    planted = {(i, n + i) for i in range(n)}
    assert len(pairs & planted) >= share * n
    assert len(pairs - planted) <= 0.05 * n


def test_distinct_images_of_one_class_are_not_pairs(
    fashion_test: tuple[np.ndarray, np.ndarray],
) -> None:
    """300 distinct images of each class: SimCLR cosine >= 0.98 paired most of them; the pixel
    rule flags fewer than 1% of them."""
    images, labels = fashion_test
    config = DuplicatesConfig()
    flagged = total = 0
    for cls in range(10):
        members = images[labels == cls][:300]
        found = near_duplicates(
            fingerprints(decoded([encode_png(a) for a in members])),
            config.max_hamming,
            config.min_pixel_similarity,
        )
        flagged += len(set(found.first.tolist()) | set(found.second.tolist()))
        total += len(members)
    assert flagged < 0.01 * total


def test_identical_pictures_hash_alike_whatever_their_size_or_channels(
    originals: np.ndarray,
) -> None:
    grey = originals[:10]
    rgb = np.repeat(grey[:, None], 3, axis=1)
    big = np.stack([np.asarray(Image.fromarray(a).resize((112, 112))) for a in grey])
    base = perceptual_hashes(grey)
    assert (perceptual_hashes(rgb) == base).all()
    assert np.median(hamming_distances(perceptual_hashes(big), base)) <= 2


def test_hash_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    hashes = rng.integers(0, 256, size=(300, 8), dtype=np.uint8)
    # plant close relatives: flip a few bits of some rows into others
    for i in range(0, 60, 2):
        flip = np.zeros(64, dtype=bool)
        flip[rng.choice(64, size=int(rng.integers(0, 6)), replace=False)] = True
        hashes[i + 1] = hashes[i] ^ np.packbits(flip)
    full = hamming_distances(hashes[:, None], hashes[None])
    # radii up to 7 use multi-index hashing (8-bit substrings or wider), larger ones the flat
    # index: both must find exactly the brute-force pairs
    assert isinstance(binary_index(64, 4), faiss.IndexBinaryMultiHash)
    assert isinstance(binary_index(64, 8), faiss.IndexBinaryFlat)
    for radius in (0, 1, 3, 4, 5, 7, 8, 20):
        pairs = hash_pairs(hashes, radius)
        expected = sorted(
            (i, j) for i in range(300) for j in range(i + 1, 300) if full[i, j] <= radius
        )
        got = list(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True))
        assert got == expected
        assert (pairs.hamming == full[pairs.first, pairs.second]).all()
    assert len(hash_pairs(hashes, 5)) >= 30


def test_the_embeddings_veto_pairs_they_see_as_different(originals: np.ndarray) -> None:
    objects = [encode_png(a) for a in originals[:4]] * 2  # four images, each twice
    prints = fingerprints(decoded(objects))
    embeddings = np.eye(8, dtype=np.float32)
    embeddings[4:6] = embeddings[0:2]  # the model agrees on the first two copies only
    vetted = near_duplicates(prints, 4, 0.985, embeddings, min_cosine=0.8)
    alone = near_duplicates(prints, 4, 0.985)
    assert {(0, 4), (1, 5), (2, 6), (3, 7)} <= set(
        zip(alone.first.tolist(), alone.second.tolist(), strict=True)
    )
    assert set(zip(vetted.first.tolist(), vetted.second.tolist(), strict=True)) == {
        (0, 4),
        (1, 5),
    }
    assert np.isnan(alone.cosine).all() and (vetted.cosine >= 0.8).all()
    assert (vetted.hamming == 0).all() and (vetted.pixel_similarity > 0.999).all()


def test_bad_inputs_are_refused(originals: np.ndarray) -> None:
    prints = fingerprints(originals[:3])
    with pytest.raises(ValueError, match="uint8"):
        fingerprints(originals[:3].astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        fingerprints(originals[:3, None, None])
    with pytest.raises(ValueError, match="max_hamming"):
        hash_pairs(prints.hashes, 65)
    with pytest.raises(ValueError, match="one embedding per image"):
        near_duplicates(prints, 4, 0.9, np.ones((2, 4), dtype=np.float32))
    bad = np.ones((3, 4), dtype=np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        near_duplicates(prints, 4, 0.9, bad)
    assert len(near_duplicates(fingerprints(originals[:1]), 4, 0.9)) == 0


def test_blank_images_have_finite_fingerprints_and_pair_with_nothing(
    originals: np.ndarray,
) -> None:
    blank = np.zeros((2, 28, 28), dtype=np.uint8)
    blank[1] = 200  # two flat images of different grey: nothing to compare
    prints = fingerprints(np.concatenate([blank, originals[:5]]))
    assert np.isfinite(prints.views.astype(np.float32)).all()
    assert len(near_duplicates(prints, 4, 0.985)) == 0

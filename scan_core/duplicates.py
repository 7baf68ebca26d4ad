"""Near-duplicate detection on the decoded pixels, with the embeddings as a second opinion.

A near-duplicate is the *same picture* stored twice after an edit that keeps it recognisable:
re-encoded, resized, slightly cropped, brightened. Embeddings trained to ignore crops and colour
(SimCLR) cannot tell such a copy from another picture of the same kind of object, so the decision
rests on the pixels:

1. :func:`fingerprints` turns each image into a *canonical view*: greyscale, centred on the
   centroid of its pixels' deviation from the background (the border's median) and scaled by their
   spread, resampled to ``dct_size x dct_size`` and brought to mean 0 and standard deviation 1. A
   resize leaves the view unchanged, a small crop moves the centroid with the picture, brightening
   is undone by the normalisation (up to clipping). The view gives a DCT perceptual hash (pHash):
   one bit per coefficient of its top-left ``hash_size x hash_size`` DCT-II block, set when the
   coefficient is above the block's median.
2. :func:`hash_pairs` finds every pair of images whose hashes differ in at most ``max_hamming``
   bits with a faiss binary index (range search in compiled code; nothing quadratic in Python).
3. :func:`near_duplicates` keeps a hash pair when the two canonical views correlate at least
   ``min_pixel_similarity`` and, where embeddings are given, their cosine similarity is at least
   ``min_cosine`` (a loose second opinion: a copy must also look alike to the model).

Known limit: the moments follow every pixel that differs from the background, so a bright mark
added far from the picture (a dot in a corner) shifts the view and can hide a copy.

Everything here is pure numpy/torch/faiss; the duplicates stage (``tasks/duplicates.py``) loads the
pixels and embeddings and writes the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import faiss
import numpy as np
import torch
import torch.nn.functional as F

#: Most images hashed per batch, and pairs compared per batch.
HASH_BATCH = 4096
#: Float32 values of one hashing batch at most (256 MiB): large images go a few at a time.
BATCH_VALUES = 1 << 26

#: Radius of gyration of the pixel weights in the canonical view, in half-widths of the view.
CANONICAL_SPREAD = 0.5


@cache
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``(n, n)`` float32: ``dct_matrix(n) @ x`` transforms ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


def _check_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(images)
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3) or min(tensor.shape[2:]) < 2:
        raise ValueError(
            "expected images (N, H, W) or (N, C, H, W) with 1 or 3 channels and sides of at "
            f"least 2, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {tensor.dtype}")
    return tensor


def _canonical(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Moment-normalised greyscale views ``(n, size, size)`` of a uint8 batch ``(n, C, H, W)``.

    The background is the median of the border pixels; the weight of a pixel is its absolute
    difference from it. The view is centred on the weighted centroid and scaled so that the
    weighted spread (radius of gyration) is a fixed fraction of the view, then brought to mean 0
    and standard deviation 1. Shifts and small crops that keep the object move the centroid with
    it, resizing leaves the moments unchanged, and brightening scales the weights only.
    """
    x = batch.float().mean(dim=1)
    n, h, w = x.shape
    ring = torch.cat([x[:, 0, :], x[:, -1, :], x[:, :, 0], x[:, :, -1]], dim=1)
    x = x - ring.median(dim=1).values[:, None, None]
    weight = x.abs()
    total = weight.sum(dim=(1, 2)).clamp_min(1e-6)
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    row_mass, col_mass = weight.sum(dim=2), weight.sum(dim=1)
    cy = (row_mass * ys).sum(dim=1) / total
    cx = (col_mass * xs).sum(dim=1) / total
    var = (row_mass * (ys - cy[:, None]) ** 2).sum(dim=1) / total
    var = var + (col_mass * (xs - cx[:, None]) ** 2).sum(dim=1) / total
    scale = var.sqrt().clamp_min(1e-3) / CANONICAL_SPREAD
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    # antialias first when the source is much larger than the view
    if min(h, w) > 2 * size:
        x = F.interpolate(x[:, None], size=(2 * size, 2 * size), mode="bilinear", antialias=True)[
            :, 0
        ]
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=True)
    view = F.grid_sample(x[:, None], grid, mode="bilinear", align_corners=True)[:, 0]
    flat = view.reshape(n, -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    flat = flat / flat.std(dim=1, keepdim=True).clamp_min(1e-6)
    return flat.reshape(n, size, size)


@dataclass(frozen=True)
class Fingerprints:
    """Per-image fingerprints: packed perceptual ``hashes`` ``(N, bytes)`` uint8 and unit-norm
    canonical ``views`` ``(N, size * size)`` float16 for the pixel check."""

    hashes: np.ndarray
    views: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)


def fingerprints(
    images: np.ndarray | torch.Tensor, hash_size: int = 8, dct_size: int = 32
) -> Fingerprints:
    """Perceptual hashes and canonical views of uint8 images.

    Each image becomes a moment-normalised, brightness-normalised greyscale view of ``dct_size x
    dct_size`` pixels. The hash is a DCT pHash of that view: one bit per coefficient of the
    top-left ``hash_size x hash_size`` DCT-II block, the constant term excluded (always 0), set when
    the coefficient is above the block's median.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, C, H, W)`` with 1 or 3 channels (RGB is averaged to
            grey).
        hash_size: The hash has ``hash_size ** 2`` bits (a multiple of 8).
        dct_size: Side of the canonical view.

    Returns:
        The fingerprints, packed hashes in faiss's binary vector layout.

    Raises:
        ValueError: for images of another shape or type, or sizes that make no hash.
    """
    if hash_size < 2 or (hash_size * hash_size) % 8 or dct_size < hash_size:
        raise ValueError(
            f"hash_size {hash_size} must be at least 2 with hash_size**2 a multiple of 8, and "
            f"dct_size {dct_size} at least hash_size"
        )
    tensor = _check_images(images)
    hashes = np.empty((len(tensor), hash_size * hash_size // 8), dtype=np.uint8)
    views = np.empty((len(tensor), dct_size * dct_size), dtype=np.float16)
    dct = torch.from_numpy(dct_matrix(dct_size))
    per_image = int(np.prod(tensor.shape[1:]))
    batch = max(1, min(HASH_BATCH, BATCH_VALUES // per_image))
    for start in range(0, len(tensor), batch):
        view = _canonical(tensor[start : start + batch], dct_size)
        coeffs = dct @ view @ dct.T
        low = coeffs[:, :hash_size, :hash_size].reshape(len(view), -1)[:, 1:]
        median = low.median(dim=1, keepdim=True).values
        bits = torch.cat([torch.zeros(len(low), 1, dtype=torch.bool), low > median], dim=1)
        hashes[start : start + len(bits)] = np.packbits(bits.numpy(), axis=1)
        flat = view.reshape(len(view), -1)
        views[start : start + len(view)] = (
            flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)
        ).numpy()
    return Fingerprints(hashes, views)


def perceptual_hashes(
    images: np.ndarray | torch.Tensor, hash_size: int = 8, dct_size: int = 32
) -> np.ndarray:
    """The packed perceptual hashes of :func:`fingerprints` alone, uint8 ``(N, bytes)``.

    Raises:
        ValueError: as :func:`fingerprints`.
    """
    return fingerprints(images, hash_size, dct_size).hashes


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distances between packed hashes ``a`` and ``b`` (broadcasting rows)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


@dataclass(frozen=True)
class HashPairs:
    """Pairs ``(first[i], second[i])`` of row indices, ``first < second``, with their Hamming
    distances, sorted by (first, second)."""

    first: np.ndarray
    second: np.ndarray
    hamming: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def _empty_pairs() -> HashPairs:
    empty = np.empty(0, dtype=np.int64)
    return HashPairs(empty, empty.copy(), np.empty(0, dtype=np.int32))


def binary_index(bits: int, max_hamming: int) -> faiss.IndexBinary:
    """An index whose range search finds every code within ``max_hamming`` bits.

    Multi-index hashing (``IndexBinaryMultiHash``) with ``max_hamming + 1`` disjoint substrings
    of the code: two codes that differ in at most ``max_hamming`` bits agree exactly on at least
    one substring (pigeonhole), so looking up each substring's bucket finds every such pair, and
    only codes that share a bucket are compared: close to linear in N, where comparing every
    pair (``IndexBinaryFlat``) is quadratic. Substrings shorter than 8 bits make buckets too
    crowded to help; then the flat index is used.
    """
    substrings = max_hamming + 1
    width = bits // substrings
    if width < 8:
        return faiss.IndexBinaryFlat(bits)
    return faiss.IndexBinaryMultiHash(bits, substrings, min(width, 32))


def hash_pairs(hashes: np.ndarray, max_hamming: int) -> HashPairs:
    """Every unordered pair of rows whose hashes differ in at most ``max_hamming`` bits.

    A faiss range search finds the pairs (:func:`binary_index`: multi-index hashing, exact and
    close to linear in N for small radii); Python only touches the pairs found.

    Args:
        hashes: uint8 ``(N, bytes)`` packed hashes (:func:`perceptual_hashes`).
        max_hamming: Largest Hamming distance of a pair (inclusive), 0 to the hash's bit count.

    Raises:
        ValueError: for hashes that are not a uint8 matrix, or a negative ``max_hamming``.
    """
    if hashes.dtype != np.uint8 or hashes.ndim != 2 or hashes.shape[1] < 1:
        raise ValueError(f"expected uint8 hashes (N, bytes), got {hashes.dtype} {hashes.shape}")
    if not 0 <= max_hamming <= 8 * hashes.shape[1]:
        raise ValueError(f"max_hamming {max_hamming} is outside 0..{8 * hashes.shape[1]}")
    if len(hashes) < 2:
        return _empty_pairs()
    codes = np.ascontiguousarray(hashes)
    index = binary_index(8 * codes.shape[1], max_hamming)
    index.add(codes)
    # faiss keeps pairs with distance < radius
    lims, distances, found = index.range_search(codes, max_hamming + 1)
    rows = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims).astype(np.int64))
    found = found.astype(np.int64)
    keep = rows < found
    first, second, hamming = rows[keep], found[keep], distances[keep].astype(np.int32)
    order = np.lexsort((second, first))
    return HashPairs(first[order], second[order], hamming[order])


@dataclass(frozen=True)
class NearDuplicates:
    """Near-duplicate pairs: row indices (``first < second``), Hamming distances of the hashes,
    correlation of the canonical views, and cosine similarity of the embeddings (NaN where no
    embeddings were given)."""

    first: np.ndarray
    second: np.ndarray
    hamming: np.ndarray
    pixel_similarity: np.ndarray
    cosine: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def pair_cosines(vectors: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of ``vectors`` of each pair ``(first[i], second[i])``."""
    out = np.empty(len(first), dtype=np.float32)
    for start in range(0, len(first), HASH_BATCH):
        a = vectors[first[start : start + HASH_BATCH]].astype(np.float32)
        b = vectors[second[start : start + HASH_BATCH]].astype(np.float32)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        out[start : start + len(a)] = (a * b).sum(axis=1) / np.clip(norms, 1e-12, None)
    return out


def near_duplicates(
    prints: Fingerprints,
    max_hamming: int,
    min_pixel_similarity: float,
    embeddings: np.ndarray | None = None,
    min_cosine: float = -1.0,
) -> NearDuplicates:
    """Near-duplicate pairs: hashes within ``max_hamming`` bits, canonical views correlated at
    least ``min_pixel_similarity``, and, where ``embeddings`` are given, embeddings with a cosine
    similarity of at least ``min_cosine``.

    Args:
        prints: Fingerprints of the images (:func:`fingerprints`).
        max_hamming: Largest Hamming distance of a pair (inclusive).
        min_pixel_similarity: Smallest correlation of the two canonical views.
        embeddings: Optional ``(N, d)`` embeddings of the same images, same order.
        min_cosine: Smallest cosine similarity of a pair's embeddings (ignored without them).

    Raises:
        ValueError: for malformed hashes, or embeddings that are not one finite row per image.
    """
    if embeddings is not None:
        if embeddings.ndim != 2 or len(embeddings) != len(prints):
            raise ValueError(
                f"expected one embedding per image ({len(prints)}, d), got {embeddings.shape}"
            )
        if not np.isfinite(embeddings).all():
            raise ValueError("the embeddings hold NaN or infinite values")
    pairs = hash_pairs(prints.hashes, max_hamming)
    pixel = pair_cosines(prints.views, pairs.first, pairs.second)
    keep = pixel >= min_pixel_similarity
    first, second, hamming, pixel = (
        pairs.first[keep],
        pairs.second[keep],
        pairs.hamming[keep],
        pixel[keep],
    )
    if embeddings is None:
        cosine = np.full(len(first), np.nan, dtype=np.float32)
    else:
        cosine = pair_cosines(embeddings, first, second)
        keep = cosine >= min_cosine
        first, second, hamming = first[keep], second[keep], hamming[keep]
        pixel, cosine = pixel[keep], cosine[keep]
    return NearDuplicates(first, second, hamming, pixel, cosine)

"""Nearest-neighbour mining (SCAN step 2) behind a small faiss interface.

Features are L2-normalised, so inner product = cosine similarity. Results keep faiss's names:
``D`` (similarities, descending) and ``I`` (indices), both ``(N, k)``, with each image itself
removed from its own list.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class NeighborResult:
    """Mined neighbours: similarities ``D`` and indices ``I`` ``(N, k)``, index used, recall@k.

    ``recall`` is measured against exact search on a sample of queries for approximate indexes,
    and is 1.0 for the exact flat index.
    """

    D: np.ndarray
    I: np.ndarray  # noqa: E741 (faiss's name)
    index_kind: IndexKind
    recall: float
    seconds: float
    nprobe: int = 0


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees a GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0)


def build_index(features: np.ndarray, kind: IndexKind, *, seed: int = 0) -> faiss.Index:
    """Build and fill an inner-product index over ``features (N, d)`` float32.

    ``flat``: exact IndexFlatIP. ``ivf``: IVF with ``nlist = 4 sqrt(N)`` (faiss wiki guideline),
    trained on 64 points a list, ``nprobe = 16`` (raised by :func:`mine_neighbors` until its
    recall target is met). ``hnsw``: HNSW32, efSearch 128. Moves to the GPU when faiss-gpu has one.
    """
    n, d = features.shape
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # 64 training points a list and 10 k-means iterations: training on every point of a
        # million-image lake (256 a list, 25 iterations) took longer than the search itself
        index.cp.niter = 10
        rng = np.random.default_rng(seed)
        sample = features[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = min(16, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"Unknown index kind '{kind}': choose flat, ivf or hnsw.")
    if gpu_available() and kind != "hnsw":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(features)
    return index


def search(
    index: faiss.Index, queries: np.ndarray, k: int, batch_size: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` in query batches (large enough that faiss uses BLAS)."""
    Ds, Is = [], []
    for start in range(0, queries.shape[0], batch_size):
        D, I = index.search(queries[start : start + batch_size], k)  # noqa: E741
        Ds.append(D)
        Is.append(I)
    return np.concatenate(Ds), np.concatenate(Is)


def drop_self(
    D: np.ndarray,
    I: np.ndarray,  # noqa: E741
    query_ids: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its row (wherever ties put it) and keep ``k`` columns."""
    is_self = query_ids[:, None] == I
    # a query missing from its own results (ties, approximate search) loses its last column
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), I.shape[1] - 1)
    keep = np.ones_like(I, dtype=bool)
    keep[np.arange(len(I)), drop] = False
    D2 = D[keep].reshape(len(I), -1)[:, :k]
    I2 = I[keep].reshape(len(I), -1)[:, :k]
    return D2, I2


def knn_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Recall@k: the mean fraction of each row's exact neighbours that approximate search found."""
    if approx.shape != exact.shape:
        raise ValueError(f"shape mismatch: {approx.shape} vs {exact.shape}")
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size if exact.size else 1.0


def mine_neighbors(
    features: np.ndarray,
    k: int = 20,
    *,
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto",
    exact_below: int = 200_000,
    recall_sample: int = 1000,
    min_recall: float = 0.95,
    seed: int = 0,
) -> NeighborResult:
    """The ``k`` nearest neighbours of every row of ``features`` by cosine similarity.

    Searches ``k + 1`` and drops the image itself. ``index="auto"`` is exact below
    ``exact_below`` images and IVF above it; an approximate index reports its recall@k against
    exact search on ``recall_sample`` random queries, and an IVF index probes twice as many
    lists until that recall reaches ``min_recall`` (before the full search).
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {features.shape}")
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and the number of images - 1 ({n - 1}), got {k}")
    kind: IndexKind = ("flat" if n < exact_below else "ivf") if index == "auto" else index
    start = time.perf_counter()
    idx = build_index(features, kind, seed=seed)
    recall, nprobe = 1.0, 0
    if kind != "flat":
        rng = np.random.default_rng(seed)
        sample = rng.choice(n, size=min(n, recall_sample), replace=False)
        # brute force against every image, without copying them into an index
        De, Ie = faiss.knn(features[sample], features, k + 1, faiss.METRIC_INNER_PRODUCT)
        _, exact_I = drop_self(De, Ie, sample, k)
        recall, nprobe = _tune_recall(idx, features[sample], sample, exact_I, k, min_recall)
    D, I = search(idx, features, k + 1)  # noqa: E741
    D, I = drop_self(D, I, np.arange(n), k)  # noqa: E741
    seconds = time.perf_counter() - start
    logger.info(
        "mined %d-NN of %d images with %s in %.1fs (recall@k %.3f, nprobe %d)",
        k,
        n,
        kind,
        seconds,
        recall,
        nprobe,
    )
    return NeighborResult(D=D, I=I, index_kind=kind, recall=recall, seconds=seconds, nprobe=nprobe)


def _ivf(index: faiss.Index) -> Any:
    """The IVF part of ``index`` whose ``nprobe`` can be set (CPU or GPU), else None."""
    try:
        found: Any = faiss.try_extract_index_ivf(index)
    except (AttributeError, RuntimeError, TypeError):
        found = None
    if found is None and hasattr(index, "nprobe") and hasattr(index, "nlist"):
        found = index  # a GPU IVF index
    return found


def _tune_recall(
    index: faiss.Index,
    queries: np.ndarray,
    query_ids: np.ndarray,
    exact_I: np.ndarray,
    k: int,
    min_recall: float,
) -> tuple[float, int]:
    """Double an IVF index's ``nprobe`` until recall@k on the sample queries reaches
    ``min_recall`` (or every list is probed); return ``(recall, nprobe)``. Other approximate
    indexes are measured as they are (``nprobe`` 0)."""
    ivf = _ivf(index)
    while True:
        D, I = search(index, queries, k + 1)  # noqa: E741
        _, I = drop_self(D, I, query_ids, k)  # noqa: E741
        recall = knn_recall(I, exact_I)
        if ivf is None or recall >= min_recall or ivf.nprobe >= ivf.nlist:
            return recall, 0 if ivf is None else int(ivf.nprobe)
        ivf.nprobe = min(2 * ivf.nprobe, ivf.nlist)
        if hasattr(index, "nprobe"):
            index.nprobe = ivf.nprobe


def neighbor_purity(I: np.ndarray, labels: np.ndarray) -> float:  # noqa: E741
    """Fraction of mined neighbours that share their anchor's label (predicts SCAN's accuracy)."""
    labels = np.asarray(labels)
    return float((labels[I] == labels[:, None]).mean()) if I.size else float("nan")

"""Label-free comparison of two partitions of the same images: the guard that keeps a run from
returning clusters worse than K-means on its own pretext embeddings without saying so.

Both partitions are scored on the mined kNN graph of the pretext embeddings (SCAN's prior: an
image and its nearest neighbours should share a cluster) with the directed modularity of Leicht
& Newman (Phys. Rev. Lett. 100, 118703, 2008):

    ``Q = (1/m) sum_ij A_ij [c_i = c_j] - sum_c (out_c / m) (in_c / m)``

where ``A`` holds one edge from every image to each of its ``K`` neighbours (``m`` edges),
``out_c`` counts the edges leaving cluster ``c`` and ``in_c`` those entering it. The first term
is the neighbour agreement SCAN's consistency loss maximises; the second is the agreement a
partition with the same cluster sizes would reach by chance, so merging clusters (which raises
agreement) is not rewarded, and a collapsed partition scores 0. :func:`compare_partitions` keeps
the partition with the higher score, preferring the trained model unless K-means beats it by
more than ``margin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check(predictions: np.ndarray, neighbors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(predictions, dtype=np.int64)
    nbr = np.asarray(neighbors, dtype=np.int64)
    if pred.ndim != 1 or nbr.ndim != 2 or nbr.shape[0] != pred.shape[0]:
        raise ValueError(
            f"predictions (N,) and neighbors (N, K) must describe the same images, got "
            f"{pred.shape} and {nbr.shape}"
        )
    if pred.size and pred.min() < 0:
        raise ValueError("predictions must be cluster ids >= 0")
    if nbr.size and (nbr.min() < 0 or nbr.max() >= pred.shape[0]):
        raise ValueError("neighbors must index the images of predictions")
    return pred, nbr


def neighbour_agreement(predictions: np.ndarray, neighbors: np.ndarray) -> float:
    """Fraction of (image, mined neighbour) pairs in the same cluster."""
    pred, nbr = _check(predictions, neighbors)
    if nbr.size == 0:
        return float("nan")
    return float((pred[nbr] == pred[:, None]).mean())


def knn_modularity(predictions: np.ndarray, neighbors: np.ndarray) -> float:
    """Directed modularity of a partition on the kNN graph (module docstring).

    Args:
        predictions: ``(N,)`` cluster id of every image.
        neighbors: ``(N, K)`` indices of every image's mined neighbours.

    Returns:
        ``Q`` in ``[-1, 1]``: 0 for a single cluster or a random partition, higher when
        neighbours share clusters more often than cluster sizes alone explain.
    """
    pred, nbr = _check(predictions, neighbors)
    if nbr.size == 0:
        return float("nan")
    agreement = float((pred[nbr] == pred[:, None]).mean())
    count = int(pred.max()) + 1
    p_out = np.bincount(pred, minlength=count) / pred.shape[0]
    p_in = np.bincount(pred[nbr].ravel(), minlength=count) / nbr.size
    return agreement - float((p_out * p_in).sum())


def size_balance(predictions: np.ndarray, num_clusters: int) -> float:
    """Entropy of the cluster sizes over ``log num_clusters``: 1 for equal sizes, 0 for one
    cluster."""
    sizes = np.bincount(np.asarray(predictions, dtype=np.int64), minlength=num_clusters)
    p = sizes[sizes > 0] / max(sizes.sum(), 1)
    return float(-(p * np.log(p)).sum() / np.log(num_clusters)) if num_clusters > 1 else 1.0


@dataclass(frozen=True)
class PartitionScores:
    """Label-free scores of one partition on the kNN graph."""

    modularity: float
    agreement: float
    balance: float
    clusters_used: int

    def as_dict(self) -> dict[str, float]:
        """The scores as a flat dict (for logs and summaries)."""
        return {
            "modularity": self.modularity,
            "agreement": self.agreement,
            "balance": self.balance,
            "clusters_used": float(self.clusters_used),
        }


def score_partition(
    predictions: np.ndarray, neighbors: np.ndarray, num_clusters: int
) -> PartitionScores:
    """:func:`knn_modularity`, :func:`neighbour_agreement` and :func:`size_balance` of a
    partition, and how many of its ``num_clusters`` clusters hold an image."""
    pred = np.asarray(predictions, dtype=np.int64)
    return PartitionScores(
        modularity=knn_modularity(pred, neighbors),
        agreement=neighbour_agreement(pred, neighbors),
        balance=size_balance(pred, num_clusters),
        clusters_used=int(np.unique(pred).size),
    )


@dataclass(frozen=True)
class GuardDecision:
    """Which partition the guard kept (``model`` or ``kmeans``), both scores and why."""

    kept: str
    model: PartitionScores
    kmeans: PartitionScores
    margin: float
    reason: str


def compare_partitions(
    model_predictions: np.ndarray,
    kmeans_predictions: np.ndarray,
    neighbors: np.ndarray,
    num_clusters: int,
    margin: float = 0.0,
) -> GuardDecision:
    """Keep the trained model's partition unless K-means scores a higher kNN modularity by more
    than ``margin``.

    Args:
        model_predictions: ``(N,)`` argmax clusters of the trained model.
        kmeans_predictions: ``(N,)`` K-means clusters of the same images' pretext embeddings.
        neighbors: ``(N, K)`` mined neighbours of those images.
        num_clusters: Clusters asked for.
        margin: How much higher K-means' modularity must be to replace the model (>= 0).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    model = score_partition(model_predictions, neighbors, num_clusters)
    km = score_partition(kmeans_predictions, neighbors, num_clusters)
    diff = km.modularity - model.modularity
    if diff > margin:
        kept = "kmeans"
        reason = (
            f"K-means on the pretext embeddings scores a higher kNN modularity "
            f"({km.modularity:.4f} vs {model.modularity:.4f} for the trained model): its "
            "clusters are kept"
        )
    else:
        kept = "model"
        reason = (
            f"the trained model's clusters score a kNN modularity of {model.modularity:.4f} "
            f"against {km.modularity:.4f} for K-means on the pretext embeddings: they are kept"
        )
    return GuardDecision(kept=kept, model=model, kmeans=km, margin=margin, reason=reason)

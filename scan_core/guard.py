"""Label-free comparison of two partitions of the same images: the guard that keeps a run from
returning clusters worse than K-means on its own pretext embeddings without saying so.

A partition is scored by how well it agrees with two neighbour graphs of the images, each with
the directed modularity of Leicht & Newman (Phys. Rev. Lett. 100, 118703, 2008):

    ``Q = (1/m) sum_ij A_ij [c_i = c_j] - sum_c (out_c / m) (in_c / m)``

where ``A`` holds one edge from every image to each of its ``K`` neighbours (``m`` edges),
``out_c`` counts the edges leaving cluster ``c`` and ``in_c`` those entering it. The first term
is the neighbour agreement SCAN's consistency loss maximises; the second is the agreement a
partition with the same cluster sizes would reach by chance, so merging clusters (which raises
agreement) is not rewarded, and a collapsed partition scores 0.

The two graphs are the mined kNN graph of the pretext embeddings and a kNN graph of the raw pixels
(:func:`pixel_neighbors`). The embedding graph alone is not a fair referee: K-means' clusters are
cells of that same embedding space, and its neighbours score them well however poor the embedding is
(on a small lake, K-means scored the higher embedding-graph modularity with a far lower ACC than the
SCAN model, which scored much higher on the pixel graph; README, Benchmarks). The pixel graph is a
view neither candidate was fitted to. The score is the mean of the two modularities
(:func:`score_partition`); :func:`compare_partitions` keeps the trained model unless K-means scores
higher by more than ``margin``.
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
    """Label-free scores of one partition: the mean modularity over the neighbour graphs (the
    criterion), the modularity and agreement on each graph, the size balance."""

    modularity: float
    graphs: dict[str, float]
    agreement: float
    balance: float
    clusters_used: int

    def as_dict(self) -> dict[str, float]:
        """The scores as a flat dict (for logs and summaries)."""
        return {
            "modularity": self.modularity,
            **{f"modularity_{name}": value for name, value in self.graphs.items()},
            "agreement": self.agreement,
            "balance": self.balance,
            "clusters_used": float(self.clusters_used),
        }


def score_partition(
    predictions: np.ndarray, graphs: dict[str, np.ndarray], num_clusters: int
) -> PartitionScores:
    """The mean :func:`knn_modularity` of a partition over the neighbour ``graphs`` (name ->
    ``(N, K)`` neighbour indices), its modularity on each, its :func:`neighbour_agreement` on the
    first graph, :func:`size_balance`, and how many of ``num_clusters`` clusters hold an image."""
    if not graphs:
        raise ValueError("score_partition needs at least one neighbour graph")
    pred = np.asarray(predictions, dtype=np.int64)
    per_graph = {name: knn_modularity(pred, nbr) for name, nbr in graphs.items()}
    return PartitionScores(
        modularity=float(np.mean(list(per_graph.values()))),
        graphs=per_graph,
        agreement=neighbour_agreement(pred, next(iter(graphs.values()))),
        balance=size_balance(pred, num_clusters),
        clusters_used=int(np.unique(pred).size),
    )


PIXEL_CHUNK = 65_536


def pixel_neighbors(
    pixels: np.ndarray,
    k: int,
    *,
    components: int = 50,
    sample: int = 20_000,
    seed: int = 0,
) -> np.ndarray:
    """The ``k`` nearest neighbours of every image by the correlation of its raw pixels.

    Each image ``(N, ...)`` is flattened, centred and scaled to unit norm (so brightness and
    contrast do not matter), projected on the top ``components`` principal axes of a random
    ``sample`` of images, and searched by cosine similarity (exact below 200,000 images, IVF
    above, :func:`scan_core.neighbors.mine_neighbors`).

    Returns:
        ``(N, k)`` neighbour indices.
    """
    from scan_core.neighbors import mine_neighbors

    n = pixels.shape[0]
    flat = np.asarray(pixels).reshape(n, -1)

    def normalised(rows: slice | np.ndarray) -> np.ndarray:
        x = flat[rows].astype(np.float32)
        x -= x.mean(axis=1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-6)
        return x

    rng = np.random.default_rng(seed)
    sampled = normalised(rng.choice(n, size=min(n, sample), replace=False))
    mean = sampled.mean(axis=0)
    _, _, vt = np.linalg.svd(sampled - mean, full_matrices=False)
    axes = vt[: min(components, vt.shape[0])].T
    # projected a chunk at a time: float copies of one chunk, never of every image's pixels
    projected = np.empty((n, axes.shape[1]), dtype=np.float32)
    for start in range(0, n, PIXEL_CHUNK):
        chunk = slice(start, min(start + PIXEL_CHUNK, n))
        projected[chunk] = (normalised(chunk) - mean) @ axes
    return mine_neighbors(projected, k, seed=seed).I


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
    graphs: dict[str, np.ndarray],
    num_clusters: int,
    margin: float = 0.0,
) -> GuardDecision:
    """Keep the trained model's partition unless K-means scores a higher mean modularity over
    the neighbour ``graphs`` by more than ``margin``.

    Args:
        model_predictions: ``(N,)`` argmax clusters of the trained model.
        kmeans_predictions: ``(N,)`` K-means clusters of the same images' pretext embeddings.
        graphs: Neighbour graphs of those images, name -> ``(N, K)`` indices (the pipeline
            passes ``embedding`` and ``pixels``).
        num_clusters: Clusters asked for.
        margin: How much higher K-means' score must be to replace the model (>= 0).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    model = score_partition(model_predictions, graphs, num_clusters)
    km = score_partition(kmeans_predictions, graphs, num_clusters)
    names = " and ".join(graphs)
    if km.modularity - model.modularity > margin:
        kept = "kmeans"
        reason = (
            f"K-means on the pretext embeddings scores a higher kNN modularity on the {names} "
            f"graphs ({km.modularity:.4f} vs {model.modularity:.4f} for the trained model): "
            "its clusters are kept"
        )
    else:
        kept = "model"
        reason = (
            f"the trained model's clusters score a kNN modularity of {model.modularity:.4f} on "
            f"the {names} graphs against {km.modularity:.4f} for K-means on the pretext "
            "embeddings: they are kept"
        )
    return GuardDecision(kept=kept, model=model, kmeans=km, margin=margin, reason=reason)

"""Clustering quality metrics (SCAN step 5) and the K-means baseline.

Conventions shared by every function here:

* ``labels`` are ground-truth class ids ``(N,)`` in ``0 .. num_classes - 1``; ``-1`` means
  "unknown label" and every metric simply ignores those samples (so a partly labelled lake can
  be scored on its labelled part). A ``ValueError`` is raised when no labelled sample remains.
* ``predictions`` are cluster ids ``(N,)`` in ``0 .. num_clusters - 1``.
* ``probabilities`` are cluster probabilities (or any scores) ``(N, num_clusters)``.

The matched accuracy follows the SCAN paper (Van Gansbeke et al., ECCV 2020, §4.1) and IIC (Ji et
al., ICCV 2019, §4): the one-to-one cluster -> class mapping that maximises agreement, found with
the Hungarian algorithm (Kuhn 1955) on the contingency matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = -1


def _as_ids(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array; raises when it is not 1-D or not integer ids."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _labelled(labels: np.ndarray, predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``labels`` and ``predictions`` and keep only the samples with a known label."""
    labels = _as_ids(labels, "labels")
    predictions = _as_ids(predictions, "predictions")
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels and predictions must have the same length, got {labels.shape[0]} labels "
            f"and {predictions.shape[0]} predictions"
        )
    if labels.size and labels.min() < UNKNOWN_LABEL:
        raise ValueError(f"labels must be class ids >= 0 or -1 (unknown), got {int(labels.min())}")
    if predictions.size and predictions.min() < 0:
        raise ValueError(f"predictions must be cluster ids >= 0, got {int(predictions.min())}")
    known = labels != UNKNOWN_LABEL
    if not known.any():
        raise ValueError(
            "No labelled sample to evaluate: every label is -1 (unknown) or the arrays are empty."
        )
    return labels[known], predictions[known]


def _resolve_count(ids: np.ndarray, given: int | None, name: str) -> int:
    """``given`` (validated to cover every id) or ``max(ids) + 1``."""
    needed = int(ids.max()) + 1 if ids.size else 0
    if given is None:
        return needed
    if given < needed:
        raise ValueError(f"{name}={given} is too small: the ids go up to {needed - 1}")
    return given


def _contingency(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, num_clusters: int
) -> np.ndarray:
    """Counts ``(num_classes, num_clusters)`` of (class, cluster) pairs (labelled samples only)."""
    flat = labels * num_clusters + predictions
    counts = np.bincount(flat, minlength=num_classes * num_clusters)
    return counts.reshape(num_classes, num_clusters)


def hungarian_match(
    labels: np.ndarray,
    predictions: np.ndarray,
    num_clusters: int | None = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """The one-to-one cluster -> class mapping with the most agreeing samples.

    Solves the assignment problem on the contingency matrix with
    ``scipy.optimize.linear_sum_assignment`` (maximising), as the SCAN and IIC evaluations do.
    With more clusters than classes each class receives one cluster and the other clusters stay
    unmatched; with fewer, some classes receive none. Samples labelled ``-1`` are ignored.

    Args:
        labels: Class ids ``(N,)``, ``-1`` for unknown.
        predictions: Cluster ids ``(N,)``.
        num_clusters: Number of clusters (default ``max(predictions) + 1``).
        num_classes: Number of classes (default ``max(labels) + 1``).

    Returns:
        ``mapping (num_clusters,)`` int64: ``mapping[cluster]`` is the cluster's class, ``-1``
        when the cluster is unmatched.
    """
    labels, predictions = _labelled(labels, predictions)
    num_clusters = _resolve_count(predictions, num_clusters, "num_clusters")
    num_classes = _resolve_count(labels, num_classes, "num_classes")
    counts = _contingency(labels, predictions, num_classes, num_clusters)
    clusters, classes = linear_sum_assignment(counts.T, maximize=True)
    mapping = np.full(num_clusters, UNKNOWN_LABEL, dtype=np.int64)
    mapping[clusters] = classes
    return mapping


def hungarian_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Clustering accuracy ACC (SCAN §4.1, IIC §4): accuracy under the best one-to-one mapping.

    ``ACC = max_m 1/N sum_i [labels_i == m(predictions_i)]`` over one-to-one maps ``m`` from
    clusters to classes (see :func:`hungarian_match`). Samples labelled ``-1`` are ignored.
    """
    mapping = hungarian_match(labels, predictions)
    labels, predictions = _labelled(labels, predictions)
    return float(np.mean(mapping[predictions] == labels))


def many_to_one_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Accuracy when every cluster is mapped to its majority class (overclustering, IIC §4).

    Several clusters may share a class, so this is never below :func:`hungarian_accuracy` and
    reaches 1.0 trivially with one cluster per sample; report it only alongside the number of
    clusters. Samples labelled ``-1`` are ignored.
    """
    labels, predictions = _labelled(labels, predictions)
    counts = _contingency(labels, predictions, int(labels.max()) + 1, int(predictions.max()) + 1)
    return float(counts.max(axis=0).sum() / labels.size)


def nmi(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Normalised mutual information (arithmetic normalisation, sklearn's default).

    Samples labelled ``-1`` are ignored.
    """
    labels, predictions = _labelled(labels, predictions)
    return float(normalized_mutual_info_score(labels, predictions))


def ari(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985). Samples labelled ``-1`` are ignored."""
    labels, predictions = _labelled(labels, predictions)
    return float(adjusted_rand_score(labels, predictions))


def _as_probabilities(probabilities: np.ndarray, n: int) -> np.ndarray:
    """Validate cluster probabilities ``(n, C)``."""
    probs = np.asarray(probabilities)
    if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] < 1:
        raise ValueError(
            f"probabilities must have shape (N, num_clusters) with N = {n} samples, "
            f"got {probs.shape}"
        )
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or infinite values")
    return probs


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int = 5) -> float:
    """Top-k clustering accuracy as reported by SCAN (top-5, Table 4 and the official code).

    Clusters are mapped to classes by the Hungarian match of the argmax predictions
    (:func:`hungarian_match`); a sample is correct when its true class is the class of one of its
    ``k`` most probable clusters. Unmatched clusters count as wrong. With ``k >= num_clusters``
    every cluster is considered, giving 1.0 whenever there are at least as many clusters as
    classes. Samples labelled ``-1`` are ignored.

    Args:
        labels: Class ids ``(N,)``, ``-1`` for unknown.
        probabilities: Cluster probabilities or scores ``(N, num_clusters)``.
        k: How many of the most probable clusters count.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = _as_ids(labels, "labels")
    probs = _as_probabilities(probabilities, labels.shape[0])
    num_clusters = probs.shape[1]
    predictions = probs.argmax(axis=1)
    mapping = hungarian_match(labels, predictions, num_clusters=num_clusters)
    known = labels != UNKNOWN_LABEL
    labels, probs = labels[known], probs[known]
    if k >= num_clusters:
        top = np.broadcast_to(np.arange(num_clusters), (labels.size, num_clusters))
    else:
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float(np.mean((mapping[top] == labels[:, None]).any(axis=1)))


def matched_cluster_order(mapping: np.ndarray) -> np.ndarray:
    """Cluster ids ordered for display: matched clusters by their class, then unmatched ones.

    Args:
        mapping: ``(num_clusters,)`` cluster -> class, ``-1`` unmatched (:func:`hungarian_match`).

    Returns:
        A permutation of ``0 .. num_clusters - 1``.
    """
    mapping = _as_ids(mapping, "mapping")
    matched = np.flatnonzero(mapping >= 0)
    matched = matched[np.argsort(mapping[matched], kind="stable")]
    return np.concatenate([matched, np.flatnonzero(mapping < 0)]).astype(np.int64)


def confusion_matrix(
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int | None = None,
    num_clusters: int | None = None,
    *,
    match: bool = False,
) -> np.ndarray:
    """Counts of (class, cluster) pairs, shape ``(num_classes, num_clusters)``.

    With ``match=True`` the cluster columns are reordered by the Hungarian match
    (:func:`matched_cluster_order`): column ``j`` holds the cluster matched to the ``j``-th matched
    class, unmatched clusters come last. With at least as many clusters as classes the diagonal
    then holds exactly the matched pairs. Samples labelled ``-1`` are ignored.

    Args:
        labels: Class ids ``(N,)``, ``-1`` for unknown.
        predictions: Cluster ids ``(N,)``.
        num_classes: Number of rows (default ``max(labels) + 1``).
        num_clusters: Number of columns (default ``max(predictions) + 1``).
        match: Reorder columns by the Hungarian match.
    """
    labels, predictions = _labelled(labels, predictions)
    num_classes = _resolve_count(labels, num_classes, "num_classes")
    num_clusters = _resolve_count(predictions, num_clusters, "num_clusters")
    counts = _contingency(labels, predictions, num_classes, num_clusters)
    if match:
        mapping = hungarian_match(labels, predictions, num_clusters, num_classes)
        counts = counts[:, matched_cluster_order(mapping)]
    return counts


def cluster_sizes(predictions: np.ndarray, num_clusters: int) -> np.ndarray:
    """Number of samples in each cluster ``(num_clusters,)`` int64, empty clusters included."""
    predictions = _as_ids(predictions, "predictions")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if predictions.size and (predictions.min() < 0 or predictions.max() >= num_clusters):
        raise ValueError(
            f"predictions must be cluster ids in [0, {num_clusters - 1}], got values in "
            f"[{int(predictions.min())}, {int(predictions.max())}]"
        )
    return np.bincount(predictions, minlength=num_clusters).astype(np.int64)


@dataclass(frozen=True)
class ClusteringMetrics:
    """Quality of one clustering against ground truth (SCAN §4.1 metrics).

    Attributes:
        acc: Hungarian-matched accuracy.
        nmi: Normalised mutual information.
        ari: Adjusted Rand index.
        top5: Top-5 matched accuracy, ``None`` when no probabilities were given.
        many_to_one_acc: Accuracy with each cluster mapped to its majority class.
        num_samples: Labelled samples the metrics were computed on (``-1`` labels excluded).
        num_clusters: Number of clusters.
        num_classes: Number of classes.
    """

    acc: float
    nmi: float
    ari: float
    top5: float | None
    many_to_one_acc: float
    num_samples: int
    num_clusters: int
    num_classes: int

    def as_dict(self) -> dict[str, float]:
        """Every metric as a float (e.g. for ``mlflow.log_metrics``); ``top5`` only when known."""
        out = {
            "acc": self.acc,
            "nmi": self.nmi,
            "ari": self.ari,
            "many_to_one_acc": self.many_to_one_acc,
            "num_samples": float(self.num_samples),
            "num_clusters": float(self.num_clusters),
            "num_classes": float(self.num_classes),
        }
        if self.top5 is not None:
            out["top5"] = self.top5
        return out


def evaluate_clustering(
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray | None = None,
    *,
    num_clusters: int | None = None,
    num_classes: int | None = None,
) -> ClusteringMetrics:
    """All metrics of one clustering. Samples labelled ``-1`` are ignored.

    Args:
        labels: Class ids ``(N,)``, ``-1`` for unknown.
        predictions: Cluster ids ``(N,)``.
        probabilities: Optional cluster probabilities ``(N, C)`` for the top-5 accuracy.
        num_clusters: Number of clusters (default: the probabilities' width, else
            ``max(predictions) + 1``); empty clusters count.
        num_classes: Number of classes (default ``max(labels) + 1`` over labelled samples).
    """
    known_labels, known_predictions = _labelled(labels, predictions)
    all_predictions = _as_ids(predictions, "predictions")
    top5 = None
    if probabilities is not None:
        probs = _as_probabilities(probabilities, all_predictions.shape[0])
        num_clusters = probs.shape[1] if num_clusters is None else num_clusters
        if num_clusters != probs.shape[1]:
            raise ValueError(
                f"num_clusters={num_clusters} disagrees with the probabilities' "
                f"{probs.shape[1]} columns"
            )
        top5 = top_k_accuracy(labels, probs, k=5)
    num_clusters = _resolve_count(all_predictions, num_clusters, "num_clusters")
    num_classes = _resolve_count(known_labels, num_classes, "num_classes")
    return ClusteringMetrics(
        acc=hungarian_accuracy(known_labels, known_predictions),
        nmi=nmi(known_labels, known_predictions),
        ari=ari(known_labels, known_predictions),
        top5=top5,
        many_to_one_acc=many_to_one_accuracy(known_labels, known_predictions),
        num_samples=int(known_labels.size),
        num_clusters=num_clusters,
        num_classes=num_classes,
    )


def kmeans(
    features: np.ndarray,
    num_clusters: int,
    *,
    n_init: int = 3,
    seed: int = 0,
    max_iter: int = 300,
) -> np.ndarray:
    """K-means cluster ids of ``features (N, d)`` (sklearn ``KMeans``, k-means++ init).

    The paper's "pretext + K-means" baseline (SCAN Table 1/3) when run on pretext embeddings, and
    the raw-pixel baseline on flattened images.

    Args:
        features: ``(N, d)`` features, cast to float32.
        num_clusters: Number of clusters, between 2 and N.
        n_init: Number of k-means++ restarts (the best inertia is kept).
        seed: Random state for reproducible clusterings.
        max_iter: Maximum Lloyd iterations per restart.

    Returns:
        Cluster ids ``(N,)`` int64.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty 2-D array (N, d), got shape {x.shape}")
    n = x.shape[0]
    if not 2 <= num_clusters <= n:
        raise ValueError(
            f"num_clusters must be between 2 and the number of samples ({n}), got {num_clusters}"
        )
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    model = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed, max_iter=max_iter)
    predictions = model.fit_predict(x).astype(np.int64)
    logger.info(
        "k-means: %d samples into %d clusters, inertia %.4g", n, num_clusters, model.inertia_
    )
    return predictions

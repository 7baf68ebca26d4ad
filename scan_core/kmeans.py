"""K-means on pretext embeddings as a clustering model (the SCAN paper's "pretext + K-means"
baseline, Van Gansbeke et al. 2020, Table 1; Han et al. 2020 compare against it too).

:func:`fit_kmeans` clusters the embeddings (sklearn ``KMeans``, k-means++ restarts).
:func:`build_kmeans_model` turns the centroids into a :class:`~scan_core.models.ClusteringModel`
that embeds an image like the pretext stage did and scores it against every centroid, so the
pipeline's assign, evaluate and model registry treat K-means like any other method. The head is
one linear layer: for an embedding ``z`` and centroid ``c``,

    ``-|z - c|^2 / T = (2 c . z - |c|^2) / T - |z|^2 / T``

and the last term is the same for every cluster, so ``softmax(W z + b)`` with ``W = 2 C / T``
and ``b = -|c|^2 / T`` is ``softmax(-|z - c|^2 / T)``: its argmax is the nearest centroid for
any temperature ``T``, which only sets how peaked the probabilities (confidences) are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from scan_core.config import KMeansConfig
from scan_core.models import Backbone, ClusteringModel
from scan_core.twostage import EmbeddingBackbone

logger = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    """Centroids ``(k, D)`` float32, the cluster id of every sample ``(N,)`` and the inertia
    (sum of squared distances to the nearest centroid)."""

    centroids: np.ndarray
    predictions: np.ndarray
    inertia: float


def fit_kmeans(features: np.ndarray, num_clusters: int, config: KMeansConfig) -> KMeansResult:
    """K-means of ``features (N, D)`` into ``num_clusters`` clusters.

    Same estimator and settings as :func:`scan_core.evaluation.kmeans` with the default
    ``KMeansConfig`` (3 k-means++ restarts, seed 0), so it reproduces that baseline.

    Raises:
        ValueError: not a finite ``(N, D)`` array, or ``num_clusters`` outside ``2 .. N``.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty 2-D array (N, d), got shape {x.shape}")
    if not 2 <= num_clusters <= x.shape[0]:
        raise ValueError(
            f"num_clusters must be between 2 and the number of samples ({x.shape[0]}), "
            f"got {num_clusters}"
        )
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    model = KMeans(
        n_clusters=num_clusters,
        n_init=config.n_init,
        random_state=config.seed,
        max_iter=config.max_iter,
    )
    predictions = model.fit_predict(x).astype(np.int64)
    logger.info(
        "k-means: %d samples, %d clusters, inertia %.4g", len(x), num_clusters, model.inertia_
    )
    return KMeansResult(
        centroids=model.cluster_centers_.astype(np.float32),
        predictions=predictions,
        inertia=float(model.inertia_),
    )


def nearest_centroid_layer(centroids: np.ndarray, temperature: float = 0.1) -> nn.Linear:
    """A linear layer whose softmax is ``softmax(-|z - c|^2 / temperature)`` over the centroids.

    Shapes:
        centroids ``(k, D)``; the layer maps ``(B, D)`` -> ``(B, k)``.
    """
    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
    if c.ndim != 2 or c.shape[0] < 2:
        raise ValueError(f"centroids must be (k >= 2, D), got shape {tuple(c.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    layer = nn.Linear(c.shape[1], c.shape[0])
    with torch.no_grad():
        layer.weight.copy_(2 * c / temperature)
        layer.bias.copy_(-(c * c).sum(dim=1) / temperature)
    return layer


def build_kmeans_model(
    backbone: Backbone,
    centroids: np.ndarray,
    temperature: float = 0.1,
    embedding_head: nn.Module | None = None,
) -> ClusteringModel:
    """A one-head clustering model: the pretext embedding (``backbone``, then ``embedding_head``
    when given, L2-normalised, as :func:`scan_core.inference.compute_embeddings` computes it)
    scored against ``centroids (k, D)`` by :func:`nearest_centroid_layer`.

    ``backbone`` and ``embedding_head`` are used as they are (not copied).
    """
    net = EmbeddingBackbone(
        backbone, embedding_head if embedding_head is not None else nn.Identity()
    )
    layer = nearest_centroid_layer(centroids, temperature)
    if layer.in_features != net.out_dim:
        raise ValueError(
            f"centroids have {layer.in_features} dimensions, the embedding {net.out_dim}"
        )
    model = ClusteringModel(net, layer.out_features, 1)
    model.cluster_heads.heads[0] = layer
    return model.eval()

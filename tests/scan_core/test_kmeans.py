"""K-means as a clustering model: centroids, the nearest-centroid layer against a naive softmax,
and a model that reproduces the K-means clustering of its own embeddings."""

import numpy as np
import pytest
import torch

from scan_core.config import KMeansConfig
from scan_core.evaluation import kmeans
from scan_core.inference import compute_embeddings, predict_probabilities
from scan_core.kmeans import build_kmeans_model, fit_kmeans, nearest_centroid_layer
from scan_core.models import EmbeddingHead, PretextModel, SmallCNNBackbone
from tests.scan_core.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    labels = np.repeat(np.arange(3), 20)
    return (centres[labels] + rng.normal(size=(60, 3))).astype(np.float32), labels


def test_fit_kmeans_matches_the_baseline_and_its_centroids_are_cluster_means() -> None:
    x, _ = blobs()
    result = fit_kmeans(x, 3, KMeansConfig())
    assert result.centroids.shape == (3, 3) and result.centroids.dtype == np.float32
    np.testing.assert_array_equal(result.predictions, kmeans(x, 3))  # same defaults
    for c in range(3):
        np.testing.assert_allclose(
            result.centroids[c], x[result.predictions == c].mean(0), atol=1e-5
        )
    d2 = ((x[:, None] - result.centroids[None]) ** 2).sum(-1)
    assert result.inertia == pytest.approx(float(d2.min(1).sum()), rel=1e-4)
    with pytest.raises(ValueError, match="num_clusters"):
        fit_kmeans(x, 61, KMeansConfig())
    with pytest.raises(ValueError, match="NaN"):
        fit_kmeans(np.full((4, 2), np.nan), 2, KMeansConfig())


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_nearest_centroid_layer_is_a_softmax_over_negative_squared_distances(
    temperature: float,
) -> None:
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(4, 5)).astype(np.float32)
    z = rng.normal(size=(7, 5)).astype(np.float32)
    layer = nearest_centroid_layer(centroids, temperature)
    with torch.no_grad():
        probs = torch.softmax(layer(torch.as_tensor(z)), dim=1).numpy()
    logits = -((z[:, None] - centroids[None]) ** 2).sum(-1) / temperature
    naive = np.exp(logits - logits.max(1, keepdims=True))
    naive /= naive.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, naive, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        nearest_centroid_layer(centroids, 0.0)
    with pytest.raises(ValueError, match="centroids"):
        nearest_centroid_layer(centroids[:1])


@pytest.mark.parametrize("with_head", [True, False])
def test_kmeans_model_assigns_every_image_to_its_embedding_cluster(with_head: bool) -> None:
    torch.manual_seed(0)
    images, _ = synthetic(n_per_class=8)
    backbone = SmallCNNBackbone(1, 4)
    head = EmbeddingHead(backbone.out_dim, 6) if with_head else torch.nn.Identity()
    pretext = PretextModel(backbone, head).eval()
    vectors = compute_embeddings(pretext, images, device="cpu", use_head=with_head)
    result = fit_kmeans(vectors, 3, KMeansConfig())
    model = build_kmeans_model(backbone, result.centroids, 0.1, head if with_head else None)
    probs = predict_probabilities(model, images, device="cpu")
    assert probs.shape == (24, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), result.predictions)
    with pytest.raises(ValueError, match="dimensions"):
        build_kmeans_model(SmallCNNBackbone(1, 4), np.zeros((3, 5), np.float32))

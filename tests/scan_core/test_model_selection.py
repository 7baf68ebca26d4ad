"""Choosing k without labels: feature heads, the kNN-graph spectrum and the choice on blobs."""

import numpy as np
import pytest
import torch

from scan_core.config import ClusterCountConfig
from scan_core.evaluation import hungarian_accuracy
from scan_core.model_selection import (
    choose_num_clusters,
    knn_laplacian_eigenvalues,
    pick_num_clusters,
    score_cluster_counts,
    train_feature_heads,
)
from scan_core.neighbors import mine_neighbors


def blobs(k: int = 4, per: int = 60, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4
    x = np.concatenate([c + rng.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(k), per)


def test_laplacian_spectrum_counts_connected_components() -> None:
    # three disjoint 4-cliques: eigenvalue 0 three times, then 4/3 (the clique's 1 + 1/(n-1))
    groups = [np.arange(4 * g, 4 * g + 4) for g in range(3)]
    neighbors = np.array([[j for j in grp if j != i] for grp in groups for i in grp])
    values = knn_laplacian_eigenvalues(neighbors, 5)
    assert values[:3] == pytest.approx([0, 0, 0], abs=1e-8)
    assert values[3:] == pytest.approx([4 / 3, 4 / 3], abs=1e-8)
    with pytest.raises(ValueError, match="count"):
        knn_laplacian_eigenvalues(neighbors, 11)


def test_feature_heads_learn_blobs() -> None:
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    x, y = blobs(k=3, per=40)
    neighbors = mine_neighbors(x, 5).I
    heads = train_feature_heads(
        x, neighbors, 3, np.arange(len(x)), num_heads=2, epochs=20, batch_size=40, lr=1e-2
    )
    probs = heads.probabilities(x)
    assert probs.shape == (2, 120, 3) and np.allclose(probs.sum(axis=2), 1, atol=1e-5)
    assert all(hungarian_accuracy(y, p.argmax(1)) == 1.0 for p in probs)
    with pytest.raises(ValueError, match="num_clusters"):
        train_feature_heads(x, neighbors, 1, np.arange(10))


@pytest.fixture(scope="module")
def blob_scores() -> tuple[list[int], dict[str, list[float]], dict[int, np.ndarray], np.ndarray]:
    torch.set_num_threads(1)
    x, y = blobs(k=4)
    neighbors = mine_neighbors(x, 8).I
    cfg = ClusterCountConfig(k_min=2, k_max=7, num_heads=3, epochs=30, batch_size=48, lr=3e-2)
    return (*score_cluster_counts(x, neighbors, cfg), y)


@pytest.mark.parametrize("criterion", ["stability", "scan_loss", "assignment_entropy", "eigengap"])
def test_criteria_find_the_four_blobs(
    blob_scores: tuple[list[int], dict[str, list[float]], dict[int, np.ndarray], np.ndarray],
    criterion: str,
) -> None:
    ks, criteria, predictions, y = blob_scores
    assert ks == [2, 3, 4, 5, 6, 7] and all(len(v) == 6 for v in criteria.values())
    chosen, explanation = pick_num_clusters(ks, criteria, ClusterCountConfig(criterion=criterion))
    assert chosen == 4, criteria
    assert explanation.startswith("k=4 has the")
    assert hungarian_accuracy(y, predictions[4]) == 1.0


def test_stable_k_takes_the_largest_stable_k() -> None:
    ks = [2, 3, 4, 5]
    criteria = {"stability": [0.9, 0.95, 0.85, 0.5]}
    cfg = ClusterCountConfig(criterion="stable_k", stability_threshold=0.8)
    chosen, explanation = pick_num_clusters(ks, criteria, cfg)
    assert chosen == 4 and "largest k" in explanation
    chosen, explanation = pick_num_clusters(
        ks, criteria, ClusterCountConfig(criterion="stable_k", stability_threshold=0.99)
    )
    assert chosen == 3 and "no k" in explanation


def test_choose_num_clusters_end_to_end() -> None:
    torch.set_num_threads(1)
    x, y = blobs(k=3, per=30)
    neighbors = mine_neighbors(x, 5).I
    cfg = ClusterCountConfig(
        k_min=2, k_max=4, criterion="stability", num_heads=2, epochs=10, batch_size=30, lr=1e-2
    )
    result = choose_num_clusters(x, neighbors, cfg)
    assert result.ks == [2, 3, 4] and result.criterion == "stability" and result.chosen_k == 3
    assert set(result.criteria) >= {"scan_loss", "stability", "eigengap"}
    assert result.explanation.startswith("k=3") and result.predictions[3].shape == (90,)


def test_cluster_count_config_validates() -> None:
    with pytest.raises(ValueError, match="k_max"):
        ClusterCountConfig(k_min=8, k_max=5)
    with pytest.raises(ValueError, match="k_max"):
        choose_num_clusters(
            *blobs(k=2, per=3)[:1],
            np.zeros((6, 2), dtype=int),
            ClusterCountConfig(k_min=2, k_max=6),
        )

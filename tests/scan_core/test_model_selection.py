"""Choosing k without labels: feature heads, the kNN-graph spectrum and the choice on blobs."""

import numpy as np
import pytest

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

pytestmark = pytest.mark.usefixtures("one_thread")


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
    x, y = blobs(k=3, per=40)
    neighbors = mine_neighbors(x, 5).I
    heads = train_feature_heads(
        x, neighbors, 3, np.arange(len(x)), num_heads=2, epochs=20, batch_size=40, lr=3e-2
    )
    probs = heads.probabilities(x)
    assert probs.shape == (2, 120, 3) and np.allclose(probs.sum(axis=2), 1, atol=1e-5)
    assert all(hungarian_accuracy(y, p.argmax(1)) == 1.0 for p in probs)
    with pytest.raises(ValueError, match="num_clusters"):
        train_feature_heads(x, neighbors, 1, np.arange(10))


@pytest.fixture(scope="module")
def blob_scores() -> tuple[list[int], dict[str, list[float]], dict[int, np.ndarray], np.ndarray]:
    x, y = blobs(k=4)
    neighbors = mine_neighbors(x, 8).I
    cfg = ClusterCountConfig(k_min=2, k_max=7, num_heads=3, epochs=40, batch_size=48, lr=5e-2)
    return (*score_cluster_counts(x, neighbors, cfg), y)


@pytest.mark.parametrize("criterion", ["stability_1se", "stability", "scan_loss", "eigengap"])
def test_criteria_find_the_four_blobs(
    blob_scores: tuple[list[int], dict[str, list[float]], dict[int, np.ndarray], np.ndarray],
    criterion: str,
) -> None:
    ks, criteria, predictions, y = blob_scores
    assert ks == [2, 3, 4, 5, 6, 7] and all(len(v) == 6 for v in criteria.values())
    chosen, explanation = pick_num_clusters(ks, criteria, ClusterCountConfig(criterion=criterion))
    assert chosen == 4, criteria
    assert explanation.startswith("k=4 ")
    assert hungarian_accuracy(y, predictions[4]) == 1.0


def test_stability_one_standard_error_rule() -> None:
    ks = [2, 3, 4, 5, 6]
    criteria = {
        "stability": [0.3, 0.62, 0.7, 0.55, 0.66],
        "stability_se": [0.1, 0.1, 0.05, 0.1, 0.1],
    }
    cfg = ClusterCountConfig(criterion="stability_1se")
    chosen, explanation = pick_num_clusters(ks, criteria, cfg)
    # the most stable k=4 (0.70 +- 0.05): k=3 (0.62) is below 0.65, so k=4 is the smallest
    assert chosen == 4 and "most stable k=4" in explanation
    criteria["stability_se"][2] = 0.1  # a noisier estimate at k=4 admits k=3 (0.62 >= 0.60)
    assert pick_num_clusters(ks, criteria, cfg)[0] == 3
    assert pick_num_clusters(ks, criteria, ClusterCountConfig(criterion="stability"))[0] == 4


def test_choose_num_clusters_end_to_end() -> None:
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

"""The guard's label-free scores against naive computations, and its decision rule."""

import itertools

import numpy as np
import pytest

from scan_core.guard import (
    compare_partitions,
    knn_modularity,
    neighbour_agreement,
    pixel_neighbors,
    score_partition,
    size_balance,
)


def naive_modularity(pred: np.ndarray, nbr: np.ndarray) -> float:
    """Leicht-Newman directed modularity from the adjacency matrix, term by term."""
    n = len(pred)
    A = np.zeros((n, n))
    for i, row in enumerate(nbr):
        for j in row:
            A[i, j] += 1
    m = A.sum()
    out_deg, in_deg = A.sum(axis=1), A.sum(axis=0)
    total = 0.0
    for i, j in itertools.product(range(n), range(n)):
        if pred[i] == pred[j]:
            total += A[i, j] - out_deg[i] * in_deg[j] / m
    return total / m


def test_modularity_equals_the_naive_definition() -> None:
    rng = np.random.default_rng(0)
    nbr = np.array(
        [rng.choice([j for j in range(12) if j != i], 3, replace=False) for i in range(12)]
    )
    pred = rng.integers(0, 3, 12)
    assert knn_modularity(pred, nbr) == pytest.approx(naive_modularity(pred, nbr))


def test_true_groups_beat_merged_and_random_partitions() -> None:
    # two groups of 6 whose neighbours are all inside their group
    nbr = np.array([[j for j in range(6) if j != i][:3] for i in range(6)])
    nbr = np.vstack([nbr, nbr + 6])
    truth = np.repeat([0, 1], 6)
    assert knn_modularity(truth, nbr) == pytest.approx(0.5)
    assert knn_modularity(np.zeros(12, dtype=int), nbr) == pytest.approx(0.0)  # collapsed
    assert neighbour_agreement(np.zeros(12, dtype=int), nbr) == 1.0  # agreement alone rewards it
    mixed = np.tile([0, 1], 6)
    assert knn_modularity(mixed, nbr) < knn_modularity(truth, nbr)


def test_balance_and_scores() -> None:
    assert size_balance(np.array([0, 1, 0, 1]), 2) == pytest.approx(1.0)
    assert size_balance(np.array([0, 0, 0, 0]), 2) == pytest.approx(0.0)
    graph = np.array([[1], [0], [3], [2]])
    scores = score_partition(np.array([0, 0, 1, 1]), {"a": graph, "b": graph}, 3)
    assert scores.clusters_used == 2 and scores.agreement == 1.0
    assert scores.graphs == {"a": scores.modularity, "b": scores.modularity}
    assert set(scores.as_dict()) == {
        "modularity",
        "modularity_a",
        "modularity_b",
        "agreement",
        "balance",
        "clusters_used",
    }
    with pytest.raises(ValueError, match="at least one"):
        score_partition(np.array([0, 1]), {}, 2)


def test_score_is_the_mean_over_the_graphs() -> None:
    rng = np.random.default_rng(1)
    a = np.array(
        [rng.choice([j for j in range(10) if j != i], 3, replace=False) for i in range(10)]
    )
    b = np.array(
        [rng.choice([j for j in range(10) if j != i], 3, replace=False) for i in range(10)]
    )
    pred = rng.integers(0, 2, 10)
    scores = score_partition(pred, {"a": a, "b": b}, 2)
    assert scores.modularity == pytest.approx(
        (knn_modularity(pred, a) + knn_modularity(pred, b)) / 2
    )


def test_pixel_neighbours_ignore_brightness_and_find_the_same_shape() -> None:
    rng = np.random.default_rng(0)
    shapes = rng.random((4, 8, 8))
    images = np.concatenate([shapes * f + o for f, o in ((1.0, 0.0), (0.5, 0.2), (0.8, 0.1))])
    images = (images * 200).astype(np.uint8)  # 12 images: 4 shapes, 3 brightness/contrast each
    nbr = pixel_neighbors(images, 2, components=6)
    assert nbr.shape == (12, 2)
    assert all(set(nbr[i] % 4) == {i % 4} for i in range(12))


def test_compare_keeps_the_model_unless_kmeans_is_better_by_the_margin() -> None:
    nbr = np.array([[j for j in range(6) if j != i][:3] for i in range(6)])
    nbr = np.vstack([nbr, nbr + 6])
    truth, mixed = np.repeat([0, 1], 6), np.tile([0, 1], 6)
    graphs = {"embedding": nbr, "pixels": nbr}
    assert compare_partitions(truth, mixed, graphs, 2).kept == "model"
    lost = compare_partitions(mixed, truth, graphs, 2)
    assert lost.kept == "kmeans" and "K-means" in lost.reason
    gap = lost.kmeans.modularity - lost.model.modularity
    assert compare_partitions(mixed, truth, graphs, 2, margin=gap + 0.01).kept == "model"
    assert compare_partitions(truth, truth, graphs, 2).kept == "model"  # ties keep the model
    with pytest.raises(ValueError, match="margin"):
        compare_partitions(truth, truth, graphs, 2, margin=-1)
    with pytest.raises(ValueError, match="same images"):
        knn_modularity(truth[:5], nbr)

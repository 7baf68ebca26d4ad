"""The guard's label-free scores against naive computations, and its decision rule."""

import itertools

import numpy as np
import pytest

from scan_core.guard import (
    compare_partitions,
    knn_modularity,
    neighbour_agreement,
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
    scores = score_partition(np.array([0, 0, 1, 1]), np.array([[1], [0], [3], [2]]), 3)
    assert scores.clusters_used == 2 and scores.agreement == 1.0
    assert set(scores.as_dict()) == {"modularity", "agreement", "balance", "clusters_used"}


def test_compare_keeps_the_model_unless_kmeans_is_better_by_the_margin() -> None:
    nbr = np.array([[j for j in range(6) if j != i][:3] for i in range(6)])
    nbr = np.vstack([nbr, nbr + 6])
    truth, mixed = np.repeat([0, 1], 6), np.tile([0, 1], 6)
    assert compare_partitions(truth, mixed, nbr, 2).kept == "model"
    lost = compare_partitions(mixed, truth, nbr, 2)
    assert lost.kept == "kmeans" and "K-means" in lost.reason
    gap = lost.kmeans.modularity - lost.model.modularity
    assert compare_partitions(mixed, truth, nbr, 2, margin=gap + 0.01).kept == "model"
    assert compare_partitions(truth, truth, nbr, 2).kept == "model"  # ties keep the model
    with pytest.raises(ValueError, match="margin"):
        compare_partitions(truth, truth, nbr, 2, margin=-1)
    with pytest.raises(ValueError, match="same images"):
        knn_modularity(truth[:5], nbr)

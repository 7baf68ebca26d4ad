"""Clustering metrics against brute force, naive loops and exact hand values."""

import itertools

import numpy as np
import pytest

from scan_core.evaluation import (
    ClusteringMetrics,
    ari,
    cluster_sizes,
    confusion_matrix,
    evaluate_clustering,
    hungarian_accuracy,
    hungarian_match,
    kmeans,
    many_to_one_accuracy,
    matched_cluster_order,
    nmi,
    top_k_accuracy,
)


def brute_force_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Max agreement over every one-to-one map between clusters and classes."""
    n_classes, n_clusters = int(labels.max()) + 1, int(predictions.max()) + 1
    pairs = list(zip(labels.tolist(), predictions.tolist(), strict=True))
    best = 0
    if n_clusters <= n_classes:  # each cluster gets a distinct class
        for classes in itertools.permutations(range(n_classes), n_clusters):
            best = max(best, sum(classes[p] == t for t, p in pairs))
    else:  # each class gets a distinct cluster
        for clusters in itertools.permutations(range(n_clusters), n_classes):
            best = max(best, sum(clusters[t] == p for t, p in pairs))
    return best / len(labels)


@pytest.mark.parametrize(
    ("n_classes", "n_clusters", "seed"),
    [(3, 3, 0), (4, 4, 1), (5, 5, 2), (3, 5, 3), (5, 3, 4), (2, 6, 5), (4, 2, 6)],
)
def test_hungarian_accuracy_matches_brute_force(n_classes: int, n_clusters: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=40)
    # a random class -> cluster relabelling plus 40% noise, so the best mapping is not trivial
    relabel = rng.integers(0, n_clusters, size=n_classes)
    noise = rng.integers(0, n_clusters, size=40)
    predictions = np.where(rng.random(40) < 0.6, relabel[labels], noise)
    labels[:n_classes], predictions[:n_clusters] = np.arange(n_classes), np.arange(n_clusters)
    expected = brute_force_accuracy(labels, predictions)
    assert hungarian_accuracy(labels, predictions) == pytest.approx(expected)


def test_perfect_clustering_with_permuted_ids() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    predictions = np.array([2, 2, 0, 0, 1, 1, 1])
    assert hungarian_accuracy(labels, predictions) == 1.0
    np.testing.assert_array_equal(hungarian_match(labels, predictions), [1, 2, 0])
    assert nmi(labels, predictions) == pytest.approx(1.0)
    assert ari(labels, predictions) == pytest.approx(1.0)


def test_hungarian_known_confusion() -> None:
    # contingency (classes x clusters): [[3, 1], [2, 4]] -> match 0->0, 1->1: 7 of 10 agree
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    predictions = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(confusion_matrix(labels, predictions), [[3, 1], [2, 4]])
    assert hungarian_accuracy(labels, predictions) == pytest.approx(0.7)
    # many-to-one maps both clusters to their majorities (0 -> class 0, 1 -> class 1): same here
    assert many_to_one_accuracy(labels, predictions) == pytest.approx(0.7)


def test_hungarian_match_unequal_counts() -> None:
    # 3 clusters, 2 classes: cluster 1 is left unmatched
    labels = np.array([0, 0, 0, 1, 1, 1])
    predictions = np.array([2, 2, 1, 0, 0, 0])
    np.testing.assert_array_equal(hungarian_match(labels, predictions), [1, -1, 0])
    # declared extra clusters / classes that never occur stay unmatched / unused
    np.testing.assert_array_equal(
        hungarian_match(labels, predictions, num_clusters=4, num_classes=2), [1, -1, 0, -1]
    )
    # 2 clusters, 3 classes: class 2 receives no cluster
    labels = np.array([0, 0, 1, 1, 2])
    predictions = np.array([1, 1, 0, 0, 0])
    np.testing.assert_array_equal(hungarian_match(labels, predictions), [1, 0])
    assert hungarian_accuracy(labels, predictions) == pytest.approx(0.8)


def naive_many_to_one(labels: np.ndarray, predictions: np.ndarray) -> float:
    correct = 0
    for c in set(predictions.tolist()):
        members = labels[predictions == c]
        correct += max((members == k).sum() for k in set(members.tolist()))
    return correct / len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_to_one_matches_naive_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=60)
    predictions = rng.integers(0, 9, size=60)
    got = many_to_one_accuracy(labels, predictions)
    assert got == pytest.approx(naive_many_to_one(labels, predictions))
    assert got >= hungarian_accuracy(labels, predictions)


def test_overclustering_many_to_one_is_perfect_when_clusters_split_classes() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    predictions = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert many_to_one_accuracy(labels, predictions) == 1.0
    assert hungarian_accuracy(labels, predictions) == 0.5


def test_top_k_hand_example() -> None:
    # argmax predictions [0, 1, 2, 2] against labels [1, 2, 0, 0]: match 0->1, 1->2, 2->0
    labels = np.array([1, 2, 0, 0])
    probabilities = np.array(
        [
            [0.6, 0.3, 0.1],  # top-2 clusters {0, 1} -> classes {1, 2}: label 1 in it
            [0.2, 0.5, 0.3],  # {1, 2} -> {2, 0}: label 2 in it
            [0.1, 0.3, 0.6],  # {2, 1} -> {0, 2}: label 0 in it
            [0.35, 0.25, 0.4],  # {2, 0} -> {0, 1}: label 0 in it
        ]
    )
    assert top_k_accuracy(labels, probabilities, k=1) == 1.0
    # relabel the last sample as class 2 (matching unchanged): its top-1 cluster 2 -> class 0
    # misses, and so do its top-2 clusters {2, 0} -> classes {0, 1}; only k=3 reaches cluster 1
    labels = np.array([1, 2, 0, 2])
    assert top_k_accuracy(labels, probabilities, k=1) == pytest.approx(0.75)
    assert top_k_accuracy(labels, probabilities, k=2) == pytest.approx(0.75)
    assert top_k_accuracy(labels, probabilities, k=3) == 1.0
    assert top_k_accuracy(labels, probabilities, k=5) == 1.0


def test_top_k_fewer_clusters_than_classes_counts_unmatched_classes_wrong() -> None:
    labels = np.array([0, 1, 2])
    probabilities = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.4]])
    assert top_k_accuracy(labels, probabilities, k=5) == pytest.approx(2 / 3)


def test_unknown_labels_are_ignored() -> None:
    labels = np.array([0, 0, 1, 1, -1, -1, -1])
    predictions = np.array([1, 1, 0, 0, 0, 1, 0])
    assert hungarian_accuracy(labels, predictions) == 1.0
    assert many_to_one_accuracy(labels, predictions) == 1.0
    assert nmi(labels, predictions) == pytest.approx(1.0)
    assert ari(labels, predictions) == pytest.approx(1.0)
    np.testing.assert_array_equal(confusion_matrix(labels, predictions), [[0, 2], [2, 0]])
    probabilities = np.eye(2)[predictions]
    assert top_k_accuracy(labels, probabilities, k=1) == 1.0
    metrics = evaluate_clustering(labels, predictions, probabilities)
    assert metrics.num_samples == 4
    assert metrics.acc == 1.0


def test_confusion_matrix_match_puts_matched_pairs_on_diagonal() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    predictions = np.array([2, 2, 3, 3, 0, 1, 1, 0])
    raw = confusion_matrix(labels, predictions, num_classes=3, num_clusters=4)
    np.testing.assert_array_equal(raw, [[1, 0, 2, 0], [1, 0, 0, 2], [0, 2, 0, 0]])
    mapping = hungarian_match(labels, predictions)
    np.testing.assert_array_equal(mapping, [-1, 2, 0, 1])
    np.testing.assert_array_equal(matched_cluster_order(mapping), [2, 3, 1, 0])
    matched = confusion_matrix(labels, predictions, match=True)
    np.testing.assert_array_equal(matched, [[2, 0, 0, 1], [0, 2, 0, 1], [0, 0, 2, 0]])
    assert np.trace(matched) == 6


def test_evaluate_clustering_bundles_the_metrics() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([1, 1, 0, 0, 2, 0])
    probabilities = np.full((6, 4), 0.1)
    probabilities[np.arange(6), predictions] = 0.7
    metrics = evaluate_clustering(labels, predictions, probabilities)
    assert metrics == ClusteringMetrics(
        acc=pytest.approx(5 / 6),
        nmi=pytest.approx(nmi(labels, predictions)),
        ari=pytest.approx(ari(labels, predictions)),
        top5=1.0,
        many_to_one_acc=pytest.approx(5 / 6),
        num_samples=6,
        num_clusters=4,  # from the probabilities' width, cluster 3 is empty
        num_classes=3,
    )
    assert set(metrics.as_dict()) == {
        "acc",
        "nmi",
        "ari",
        "top5",
        "many_to_one_acc",
        "num_samples",
        "num_clusters",
        "num_classes",
    }
    no_probs = evaluate_clustering(labels, predictions)
    assert no_probs.top5 is None
    assert no_probs.num_clusters == 3
    assert "top5" not in no_probs.as_dict()
    assert no_probs.as_dict()["acc"] == pytest.approx(5 / 6)


def test_cluster_sizes() -> None:
    np.testing.assert_array_equal(cluster_sizes(np.array([0, 2, 2, 3]), 5), [1, 0, 2, 1, 0])
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_sizes(np.array([0, 5]), 5)


def test_kmeans_recovers_separated_blobs() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.repeat(np.arange(3), 30)
    features = (centers[labels] + rng.normal(scale=0.5, size=(90, 2))).astype(np.float32)
    predictions = kmeans(features, 3, seed=0)
    assert predictions.dtype == np.int64
    assert predictions.shape == (90,)
    assert hungarian_accuracy(labels, predictions) == 1.0
    np.testing.assert_array_equal(predictions, kmeans(features, 3, seed=0))


def test_validation_errors() -> None:
    labels, predictions = np.array([0, 1, 1]), np.array([0, 1, 0])
    with pytest.raises(ValueError, match="same length"):
        hungarian_accuracy(labels, predictions[:2])
    with pytest.raises(ValueError, match="No labelled sample"):
        hungarian_accuracy(np.array([-1, -1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="No labelled sample"):
        nmi(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="1-D"):
        ari(labels[None], predictions[None])
    with pytest.raises(ValueError, match="integer"):
        many_to_one_accuracy(labels, predictions.astype(float))
    with pytest.raises(ValueError, match="-1"):
        hungarian_accuracy(np.array([0, -2]), predictions[:2])
    with pytest.raises(ValueError, match=">= 0"):
        hungarian_accuracy(labels, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="too small"):
        hungarian_match(labels, predictions, num_clusters=1)
    with pytest.raises(ValueError, match="shape"):
        top_k_accuracy(labels, np.ones((2, 3)))
    with pytest.raises(ValueError, match="k must be"):
        top_k_accuracy(labels, np.ones((3, 3)), k=0)
    with pytest.raises(ValueError, match="disagrees"):
        evaluate_clustering(labels, predictions, np.ones((3, 2)), num_clusters=3)
    with pytest.raises(ValueError, match="between 2"):
        kmeans(np.zeros((5, 2), dtype=np.float32), 6)
    with pytest.raises(ValueError, match="between 2"):
        kmeans(np.zeros((5, 2), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(np.zeros(5, dtype=np.float32), 2)

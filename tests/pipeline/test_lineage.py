"""Stable cluster ids: Hungarian matching, fresh ids, churn and per-cluster growth, on exact
hand-computed cases (tasks/lineage.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tasks.lineage import churn, cluster_growth, first_ids, match_clusters


def test_a_permutation_is_undone() -> None:
    old = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    perm = np.array([2, 0, 1])  # old id k became output perm[k]
    new = perm[old]
    match = match_clusters(old, new, 3, [0, 1, 2])
    assert match.ids.tolist() == [1, 2, 0]  # output 0 holds old 1, output 1 old 2, output 2 old 0
    assert match.ids[new].tolist() == old.tolist()
    assert match.overlap.tolist() == [2, 4, 3]
    assert match.born == () and match.vanished == ()
    assert match.next_id == 3
    assert churn(old, match.ids[new]) == 0.0


def test_matching_maximises_total_overlap_not_greedy() -> None:
    # contingency (new x old): [[5, 4], [4, 0]]: greedy takes (0,0)=5 then (1,1)=0 -> total 5;
    # Hungarian takes (0,1)=4 + (1,0)=4 = 8
    old = np.array([0] * 5 + [1] * 4 + [0] * 4)
    new = np.array([0] * 5 + [0] * 4 + [1] * 4)
    match = match_clusters(old, new, 2, [0, 1])
    assert match.ids.tolist() == [1, 0]
    assert match.overlap.tolist() == [4, 4]
    relabelled = match.ids[new]
    assert churn(old, relabelled) == pytest.approx(5 / 13)


def test_hungarian_agrees_with_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        old = rng.integers(0, 4, 60)
        new = rng.integers(0, 4, 60)
        match = match_clusters(old, new, 4, range(4))
        best = max(
            sum(int(((new == r) & (old == p[r])).sum()) for r in range(4))
            for p in itertools.permutations(range(4))
        )
        assert int(match.overlap.sum()) == best


def test_unmatched_new_cluster_is_born_with_a_fresh_id_and_old_one_vanishes() -> None:
    # old ids 0, 1, 5 (2..4 vanished earlier); the new output 2 shares no image with old 5
    old = np.array([0, 0, 1, 1])
    new = np.array([1, 1, 0, 0])
    match = match_clusters(old, new, 3, [0, 1, 5])
    assert match.ids.tolist() == [1, 0, 6]
    assert match.born == (6,)
    assert match.vanished == (5,)
    assert match.next_id == 7
    assert match.sorted_ids.tolist() == [0, 1, 6]
    assert match.order.tolist() == [1, 0, 2]


def test_next_id_is_a_high_water_mark() -> None:
    match = match_clusters(np.array([0]), np.array([0]), 2, [0, 1], next_id=9)
    assert match.ids.tolist() == [0, 9]
    assert match.vanished == (1,)
    assert match.next_id == 10


def test_more_and_fewer_clusters_than_before() -> None:
    old = np.array([0, 0, 1, 1, 2, 2])
    more = match_clusters(old, np.array([3, 3, 0, 0, 1, 1]), 4, [0, 1, 2])
    assert more.ids.tolist() == [1, 2, 3, 0]  # output 2 had no shared image: fresh id 3
    assert more.born == (3,)
    fewer = match_clusters(old, np.array([1, 1, 0, 0, 0, 0]), 2, [0, 1, 2])
    assert fewer.ids.tolist() == [1, 0]  # output 0 holds old 1 and 2 equally: first wins
    assert fewer.vanished == (2,)


def test_first_run_and_no_shared_images() -> None:
    first = first_ids(3)
    assert first.ids.tolist() == [0, 1, 2] and first.next_id == 3
    none = match_clusters(np.array([], dtype=int), np.array([], dtype=int), 2, [0, 1])
    assert none.ids.tolist() == [2, 3]
    assert none.born == (2, 3) and none.vanished == (0, 1)
    assert churn(np.array([]), np.array([])) == 0.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="equal length"):
        match_clusters(np.array([0, 1]), np.array([0]), 2, [0, 1])
    with pytest.raises(ValueError, match="lie in 0 .. 1"):
        match_clusters(np.array([0]), np.array([2]), 2, [0, 1])
    with pytest.raises(ValueError, match="one of previous_ids"):
        match_clusters(np.array([3]), np.array([0]), 2, [0, 1])


def test_cluster_growth_rows() -> None:
    previous = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2}
    current = {"a": 0, "b": 1, "c": 1, "f": 0, "g": 3}  # d, e removed; f, g new; b moved 0 -> 1
    rows = cluster_growth(previous, current, ids=[0, 1, 3], previous_ids=[0, 1, 2])
    by_id = {r["cluster"]: r for r in rows}
    assert [r["cluster"] for r in rows] == [0, 1, 2, 3]
    assert by_id[0] == {
        "cluster": 0,
        "status": "kept",
        "previous_size": 2,
        "size": 2,
        "growth": 0,
        "stayed": 1,
        "moved_in": 0,
        "moved_out": 1,
        "new_images": 1,
        "removed_images": 0,
    }
    assert by_id[1]["stayed"] == 1 and by_id[1]["moved_in"] == 1
    assert by_id[1]["removed_images"] == 1 and by_id[1]["growth"] == 0
    assert by_id[2]["status"] == "vanished" and by_id[2]["size"] == 0
    assert by_id[2]["removed_images"] == 1 and by_id[2]["growth"] == -1
    assert by_id[3]["status"] == "born" and by_id[3]["new_images"] == 1
    shared = [i for i in previous if i in current]
    assert churn(
        np.array([previous[i] for i in shared]), np.array([current[i] for i in shared])
    ) == pytest.approx(1 / 3)

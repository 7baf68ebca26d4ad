"""Stable cluster ids across runs of a growing lake (docs/architecture.md, 'Growing lakes'): pure
functions.

A new run's clusters are matched to the previous run's on the images both runs share: Hungarian
matching (``scipy.optimize.linear_sum_assignment``) maximises the total overlap of the
``(new cluster, old id)`` contingency table, so cluster 3 today is the cluster that holds most of
yesterday's cluster 3. A new cluster whose match shares no image with it is *born* and gets a
fresh id (one never used on this lake); an old id that no new cluster takes has *vanished*.
Churn is the share of previously seen images whose (relabelled) cluster changed.

Everything here takes arrays and returns arrays or rows; reading and writing tables is the assign
stage's job (:mod:`tasks.assign`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class ClusterMatch:
    """Stable ids of a new run's clusters.

    Attributes:
        ids: ``(C,)`` stable id of each new cluster (index = the model's output index).
        overlap: ``(C,)`` shared images of each new cluster that its id held in the previous run
            (0 for a born cluster).
        born: Stable ids given to new clusters without an old counterpart, ascending.
        vanished: Previous ids that no new cluster took, ascending.
        next_id: The first id never used on this lake (fresh ids continue from it).
    """

    ids: np.ndarray
    overlap: np.ndarray
    born: tuple[int, ...]
    vanished: tuple[int, ...]
    next_id: int

    @property
    def order(self) -> np.ndarray:
        """Output indices sorted by stable id: ``probabilities[:, order]`` is in id order."""
        return np.argsort(self.ids, kind="stable")

    @property
    def sorted_ids(self) -> np.ndarray:
        """The stable ids in ascending order (the column order after :attr:`order`)."""
        return self.ids[self.order]


def first_ids(num_clusters: int) -> ClusterMatch:
    """The ids of a lake's first run: cluster ``c`` is id ``c``."""
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    return ClusterMatch(
        ids=np.arange(num_clusters, dtype=np.int64),
        overlap=np.zeros(num_clusters, dtype=np.int64),
        born=(),
        vanished=(),
        next_id=num_clusters,
    )


def match_clusters(
    previous: np.ndarray,
    current: np.ndarray,
    num_clusters: int,
    previous_ids: Sequence[int],
    next_id: int | None = None,
) -> ClusterMatch:
    """Give each new cluster the id of the old cluster it overlaps most (Hungarian matching).

    Args:
        previous: ``(S,)`` stable id of every shared image in the previous run.
        current: ``(S,)`` new cluster (model output index ``0 .. num_clusters - 1``) of the same
            images.
        num_clusters: Clusters of the new run (may differ from the previous run's).
        previous_ids: Every id of the previous run, empty clusters included.
        next_id: First id never used on this lake; default ``max(previous_ids) + 1``.

    Returns:
        The match; with no shared image every cluster is born.

    Raises:
        ValueError: mismatched lengths, a cluster outside ``0 .. num_clusters - 1``, or a
            previous id outside ``previous_ids``.
    """
    previous = np.asarray(previous, dtype=np.int64)
    current = np.asarray(current, dtype=np.int64)
    if previous.shape != current.shape or previous.ndim != 1:
        raise ValueError(
            f"previous and current must be 1-D of equal length, got {previous.shape} and "
            f"{current.shape}"
        )
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if current.size and (current.min() < 0 or current.max() >= num_clusters):
        raise ValueError(f"current clusters must lie in 0 .. {num_clusters - 1}")
    old_ids = np.array(sorted(set(int(i) for i in previous_ids)), dtype=np.int64)
    if old_ids.size and old_ids.min() < 0:
        raise ValueError("previous ids must be non-negative")
    position = np.searchsorted(old_ids, previous)
    if previous.size and (
        position.max() >= old_ids.size or not np.array_equal(old_ids[position], previous)
    ):
        raise ValueError("every previous cluster must be one of previous_ids")
    fresh = int(old_ids.max()) + 1 if old_ids.size else 0
    fresh = max(fresh, next_id if next_id is not None else 0)

    contingency = np.zeros((num_clusters, old_ids.size), dtype=np.int64)
    np.add.at(contingency, (current, position), 1)
    ids = np.full(num_clusters, -1, dtype=np.int64)
    overlap = np.zeros(num_clusters, dtype=np.int64)
    if old_ids.size:
        rows, cols = linear_sum_assignment(contingency, maximize=True)
        for r, c in zip(rows, cols, strict=True):
            if contingency[r, c] > 0:
                ids[r] = old_ids[c]
                overlap[r] = contingency[r, c]
    born = []
    for r in range(num_clusters):
        if ids[r] < 0:
            ids[r] = fresh
            born.append(fresh)
            fresh += 1
    vanished = sorted(set(old_ids.tolist()) - set(ids.tolist()))
    return ClusterMatch(
        ids=ids, overlap=overlap, born=tuple(born), vanished=tuple(vanished), next_id=fresh
    )


def churn(previous: np.ndarray, current: np.ndarray) -> float:
    """Share of shared images whose stable id changed (0.0 when no image is shared).

    Args:
        previous: ``(S,)`` stable ids of the shared images in the previous run.
        current: ``(S,)`` their stable ids now (after relabelling).
    """
    previous, current = np.asarray(previous), np.asarray(current)
    if previous.shape != current.shape:
        raise ValueError(f"shapes differ: {previous.shape} vs {current.shape}")
    if previous.size == 0:
        return 0.0
    return float((previous != current).mean())


def cluster_growth(
    previous_all: dict[str, int],
    current_all: dict[str, int],
    ids: Sequence[int],
    previous_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Per-cluster growth between two runs, one row per id of either run (ascending id).

    Args:
        previous_all: image id -> stable id, every image of the previous run.
        current_all: image id -> stable id (relabelled), every image of this run.
        ids: Every stable id of this run (empty clusters included).
        previous_ids: Every stable id of the previous run.

    Returns:
        Rows with ``cluster``, ``status`` (``kept``, ``born`` or ``vanished``),
        ``previous_size``, ``size``, ``growth`` (size - previous_size), ``stayed`` (shared
        images in the cluster both times), ``moved_in`` / ``moved_out`` (shared images that
        changed cluster into / out of it), ``new_images`` (images the previous run did not have)
        and ``removed_images`` (images of the previous run no longer in the lake).
    """
    now, before = set(int(i) for i in ids), set(int(i) for i in previous_ids)
    everything = sorted(now | before)
    row: dict[int, dict[str, Any]] = {
        c: {
            "cluster": c,
            "status": "kept" if c in now and c in before else ("born" if c in now else "vanished"),
            "previous_size": 0,
            "size": 0,
            "growth": 0,
            "stayed": 0,
            "moved_in": 0,
            "moved_out": 0,
            "new_images": 0,
            "removed_images": 0,
        }
        for c in everything
    }
    for image, c in previous_all.items():
        r = row[int(c)]
        r["previous_size"] += 1
        if image not in current_all:
            r["removed_images"] += 1
    for image, c in current_all.items():
        r = row[int(c)]
        r["size"] += 1
        old = previous_all.get(image)
        if old is None:
            r["new_images"] += 1
        elif int(old) == int(c):
            r["stayed"] += 1
        else:
            r["moved_in"] += 1
            row[int(old)]["moved_out"] += 1
    for r in row.values():
        r["growth"] = r["size"] - r["previous_size"]
    return [row[c] for c in everything]

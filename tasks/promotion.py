"""Promotion: the registered model of a run becomes ``champion`` only after evaluation, and only
when the run passes the gate (:class:`scan_core.config.PromotionConfig`).

The gate (:func:`decide`, pure) refuses a run with an empty cluster (more than
``promotion.allowed_empty_clusters``), a collapsed one (cluster sizes whose balance, the effective
number of clusters over the number of clusters, is below ``promotion.min_balance``) or whose answer
scores below K-means on the guard's label-free criterion (the flow's ``guard``, where the run has
one; the guard keeps the better partition, so this refuses only a model kept within the guard's
``margin``). A run whose guard kept K-means' partition registers K-means' nearest-centroid model,
which is promoted like any other. :func:`promote` records the decision and its reason in the model
version's tags either way (``promoted``, ``promotion.reason``), with what a reviewer of the version
needs (lake fingerprint, runs, metrics, cluster ids, the partition kept), and moves the alias only
when the gate passed.

The flow decides only for a model version its own assign stage made: a run whose assign stage
came from the cache (an unchanged rerun, or a run that lost the stage commit to a concurrent run,
:meth:`tasks.stage.StageRun.finish`) leaves the alias and the tags as the run that made the
version set them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from scan_core.config import PromotionConfig
from tasks import tracking
from tasks.tracking import TrackingRef

logger = logging.getLogger(__name__)

ALIAS = "champion"


class Guard(BaseModel):
    """The flow's label-free comparison of the trained model's partition with K-means'."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kept: Literal["model", "kmeans"]
    criterion: str
    model_score: float
    kmeans_score: float
    reason: str


class Decision(BaseModel):
    """The gate's answer for one run."""

    model_config = ConfigDict(frozen=True)

    promote: bool
    reason: str
    balance: float
    empty_clusters: int
    partition: Literal["model", "kmeans"]


def balance(sizes: Sequence[int]) -> float:
    """Effective number of clusters ``exp(H)`` of the size distribution over the number of
    clusters: 1 for equal sizes, ``m / k`` for ``m`` equal clusters of ``k`` (0 with no image)."""
    total = float(sum(sizes))
    if not sizes or total <= 0:
        return 0.0
    entropy = -sum(s / total * math.log(s / total) for s in sizes if s > 0)
    return math.exp(entropy) / len(sizes)


def decide(
    sizes: Sequence[int],
    guard: dict[str, Any] | None,
    config: PromotionConfig,
    cluster_ids: Sequence[int] | None = None,
) -> Decision:
    """Whether a run with these cluster sizes (and guard) passes the promotion gate (pure).

    Args:
        sizes: Images per cluster (the evaluate stage's ``cluster_sizes``).
        guard: The flow's comparison with K-means, or None where the run has none: ``kept``
            (``model`` or ``kmeans``), ``criterion``, ``model_score``, ``kmeans_score``,
            ``reason``.
        config: The gate's settings.
        cluster_ids: The stable id of each size (for the reason; default the positions).

    Raises:
        ValueError: a guard without those keys.
    """
    try:
        checked = None if guard is None else Guard.model_validate(guard)
    except ValidationError as exc:
        raise ValueError(f"the guard result is not a K-means comparison: {exc}") from exc
    ids = list(cluster_ids) if cluster_ids is not None else list(range(len(sizes)))
    empty = [c for c, s in zip(ids, sizes, strict=True) if s == 0]
    score = balance(sizes)
    partition: Literal["model", "kmeans"] = checked.kept if checked is not None else "model"
    refusals = []
    if len(empty) > config.allowed_empty_clusters:
        refusals.append(
            f"{len(empty)} empty cluster(s) ({', '.join(map(str, empty))}; "
            f"promotion.allowed_empty_clusters is {config.allowed_empty_clusters})"
        )
    if score < config.min_balance:
        refusals.append(
            f"collapsed clusters: balance {score:.2f} (effective clusters "
            f"{score * len(sizes):.1f} of {len(sizes)}) is below promotion.min_balance "
            f"{config.min_balance:.2f}"
        )
    if (
        checked is not None
        and checked.kept == "model"
        and (checked.model_score < checked.kmeans_score)
    ):
        refusals.append(
            f"the model's partition scores below K-means' ({checked.criterion}: model "
            f"{checked.model_score:.4g} vs K-means {checked.kmeans_score:.4g}; {checked.reason})"
        )
    if refusals:
        return Decision(
            promote=False,
            reason="not promoted: " + "; ".join(refusals),
            balance=score,
            empty_clusters=len(empty),
            partition=partition,
        )
    passed = (
        f"{len(empty) or 'no'} empty cluster(s), balance {score:.2f} >= {config.min_balance:.2f}"
    )
    if checked is not None:
        kept = "the model's partition" if checked.kept == "model" else "K-means' partition"
        passed += (
            f", {kept} kept, at least as good as the other ({checked.criterion}: model "
            f"{checked.model_score:.4g} vs K-means {checked.kmeans_score:.4g})"
        )
    return Decision(
        promote=True,
        reason=f"promoted: {passed}",
        balance=score,
        empty_clusters=len(empty),
        partition=partition,
    )


def version_tags(
    decision: Decision,
    guard: dict[str, Any] | None,
    metrics: dict[str, float],
    record: dict[str, Any],
) -> dict[str, str]:
    """The model version's tags: the decision, the guard, the metrics (``metric.<name>``) and
    ``record`` (lake, fingerprint, runs, cluster ids and sizes, ...; lists as JSON)."""
    tags = {
        "promoted": str(decision.promote).lower(),
        "promotion.reason": decision.reason,
        "promotion.balance": f"{decision.balance:.4f}",
        "partition": decision.partition,
    }
    if guard is not None:
        tags.update({f"guard.{k}": str(v) for k, v in guard.items()})
    tags.update({f"metric.{k}": f"{float(v):.6g}" for k, v in sorted(metrics.items())})
    tags.update({k: v if isinstance(v, str) else tracking.dumps(v) for k, v in record.items()})
    return tags


def promote(
    ref: TrackingRef,
    registered_name: str,
    version: str,
    decision: Decision,
    tags: dict[str, str],
) -> None:
    """Tag model ``version`` with the decision (``tags``, :func:`version_tags`) and point the
    ``champion`` alias at it when the gate passed."""
    tracking.set_version_tags(ref, registered_name, version, tags)
    if decision.promote:
        tracking.set_model_alias(ref, registered_name, version, ALIAS)
    logger.info("model %s version %s: %s", registered_name, version, decision.reason)

"""The promotion gate (pure) and its guard dicts; the registry side is tested on a real run in
``test_run_outputs.py``."""

from __future__ import annotations

import math

import pytest

from scan_core.config import PromotionConfig
from tasks.promotion import balance, decide, version_tags

GATE = PromotionConfig()


def guard(kept: str) -> dict[str, object]:
    return {
        "kept": kept,
        "criterion": "heldout_consistency",
        "model_score": 0.61,
        "kmeans_score": 0.55 if kept == "model" else 0.70,
        "reason": f"the {kept} partition scored higher",
    }


def test_balance_is_the_effective_share_of_clusters() -> None:
    assert balance([10, 10, 10, 10]) == pytest.approx(1.0)
    assert balance([10, 10, 0, 0]) == pytest.approx(0.5)  # two of four clusters used equally
    assert balance([100, 0, 0]) == pytest.approx(1 / 3)
    assert balance([]) == 0.0 and balance([0, 0]) == 0.0
    sizes = [40] + [60 / 9] * 9
    entropy = -sum(s / 100 * math.log(s / 100) for s in sizes)
    assert balance(sizes) == pytest.approx(math.exp(entropy) / 10)  # 0.73: passes


def test_balanced_run_without_guard_is_promoted() -> None:
    decision = decide([30, 25, 45], None, GATE, [0, 1, 2])
    assert decision.promote and decision.partition == "model"
    assert decision.reason.startswith("promoted: no empty cluster(s), balance 0.9")


def test_empty_and_collapsed_clusters_are_refused_with_their_reasons() -> None:
    empty = decide([50, 0, 50], None, GATE, [3, 7, 9])
    assert not empty.promote and empty.empty_clusters == 1
    assert "1 empty cluster(s) (7; promotion.allowed_empty_clusters is 0)" in empty.reason
    assert decide([50, 0, 50], None, PromotionConfig(allowed_empty_clusters=1)).promote
    collapsed = decide([97, 1, 1, 1], None, GATE)
    assert not collapsed.promote
    assert "collapsed clusters: balance 0.30" in collapsed.reason
    assert "below promotion.min_balance 0.50" in collapsed.reason
    lenient = decide([97, 1, 1, 1], None, PromotionConfig(min_balance=0.2))
    assert lenient.promote


def test_the_kept_partition_must_score_at_least_as_well_as_kmeans() -> None:
    kmeans_kept = decide([30, 30, 40], guard("kmeans"), GATE)
    assert kmeans_kept.promote and kmeans_kept.partition == "kmeans"
    assert "K-means' partition kept" in kmeans_kept.reason
    won = decide([30, 30, 40], guard("model"), GATE)
    assert won.promote and won.partition == "model"
    assert "model 0.61 vs K-means 0.55" in won.reason
    # a model kept within the guard's margin although K-means scored higher
    within_margin = decide([30, 30, 40], {**guard("model"), "kmeans_score": 0.62}, GATE)
    assert not within_margin.promote
    assert "the model's partition scores below K-means' (heldout_consistency: model 0.61" in (
        within_margin.reason
    )


def test_a_guard_that_is_not_a_comparison_is_refused() -> None:
    with pytest.raises(ValueError, match="not a K-means comparison"):
        decide([30, 30, 40], {"kept": "both"}, GATE)


def test_version_tags_carry_decision_guard_metrics_and_record() -> None:
    decision = decide([30, 30, 40], guard("model"), GATE)
    tags = version_tags(
        decision,
        guard("model"),
        {"acc": 0.5, "mean_confidence": 0.875},
        {"lake_fingerprint": "abc", "cluster_ids": [0, 1, 2]},
    )
    assert tags["promoted"] == "true" and tags["partition"] == "model"
    assert tags["guard.kept"] == "model" and tags["guard.model_score"] == "0.61"
    assert tags["metric.acc"] == "0.5" and tags["metric.mean_confidence"] == "0.875"
    assert tags["lake_fingerprint"] == "abc" and tags["cluster_ids"] == "[0,1,2]"

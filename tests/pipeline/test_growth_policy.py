"""Growing-lake decisions as pure functions: the pretext reuse policy, warm or cold start, the
warm settings, duplicate pairs and the cluster reordering of a model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from scan_core.config import GrowthConfig, ScanConfig, SelfLabelConfig
from scan_core.duplicates import NearDuplicates
from scan_core.models import ClusteringModel, build_backbone
from tasks.checkpoints import reorder_clusters
from tasks.duplicates import exact_duplicate_pairs, first_uris, near_duplicate_pairs
from tasks.history import (
    GrowthPlan,
    RunRecord,
    RunSignature,
    decide_growth,
    warm_scan_config,
    warm_selflabel_config,
)
from tasks.pretext import BackboneCandidate, choose_backbone
from tasks.stage import StageOutput

# -- pretext policy ---------------------------------------------------------------------------


def test_backbone_reused_while_growth_is_within_the_fraction() -> None:
    old = BackboneCandidate(key="b" * 64, kept=1000, new=120)
    plan = choose_backbone("own", False, [old], retrain_after=0.5)
    assert plan.key == "b" * 64 and plan.reused
    assert plan.growth == pytest.approx(0.12)
    assert plan.reason.startswith("lake grew 12% (120 new images on 1000 trained)")
    assert "12% <= 50%, reusing it" in plan.reason


def test_backbone_retrained_past_the_fraction_or_on_request() -> None:
    old = BackboneCandidate(key="b" * 64, kept=1000, new=600)
    plan = choose_backbone("own", False, [old], retrain_after=0.5)
    assert plan.key == "own" and not plan.reused
    assert "60% > 50%, retraining" in plan.reason
    near = BackboneCandidate(key="b" * 64, kept=1000, new=10)
    forced = choose_backbone("own", False, [near], retrain_after=0.5, retrain=True)
    assert forced.key == "own" and forced.reason == "retrain requested (--retrain-pretext)"
    never = choose_backbone("own", False, [near], retrain_after=0.0)
    assert never.key == "own"


def test_exact_backbone_wins_and_the_largest_overlap_is_chosen() -> None:
    small = BackboneCandidate(key="s" * 64, kept=500, new=100)
    large = BackboneCandidate(key="l" * 64, kept=550, new=50)
    assert choose_backbone("own", True, [small, large], 0.5).key == "own"
    assert choose_backbone("own", False, [small, large], 0.5).key == "l" * 64
    gone = BackboneCandidate(key="g" * 64, kept=0, new=600)
    plan = choose_backbone("own", False, [gone], 0.5)
    assert plan.key == "own" and plan.reason.startswith("no earlier backbone")


# -- warm or cold -----------------------------------------------------------------------------


def _key(name: str) -> str:
    """A stage key (SHA-256 hex) standing for ``name``."""
    return hashlib.sha256(name.encode()).hexdigest()


def _output(stage: str, name: str) -> StageOutput:
    key = _key(name)
    return StageOutput(stage=stage, key=key, uri=f"/w/{stage}/{key}", rel_dir=f"{stage}/{key}")


def _signature(**changes: object) -> RunSignature:
    base = {
        "images_key": "images-1",
        "pretext_key": "pre-1",
        "num_clusters": 10,
        "scan_fingerprint": "scan-1",
        "selflabel_fingerprint": "sl-1",
    }
    return RunSignature.model_validate({**base, **changes})


def _record(plan: GrowthPlan) -> RunRecord:
    return RunRecord(
        lake="/lake",
        signature=_signature(),
        plan=plan,
        assign=_output("assign", "a-1"),
        flow_run_id="flow-1",
        mlflow_run_id="run-1",
        finished_at="2026-11-23T00:00:00+00:00",
    )


def test_first_run_is_cold_and_a_grown_lake_is_warm() -> None:
    growth = GrowthConfig()
    first = decide_growth(None, _signature(), growth)
    assert first.start == "cold" and first.warm_from is None and first.relabel_from is None
    previous = _record(first)
    grown = decide_growth(previous, _signature(images_key="images-2"), growth)
    assert grown.start == "warm"
    assert grown.warm_from is not None and grown.warm_from.key == _key("a-1")
    assert grown.relabel_from is not None and grown.relabel_from.key == _key("a-1")
    assert grown.previous_flow_run_id == "flow-1"


def test_a_repeat_keeps_the_previous_plan_so_keys_do_not_change() -> None:
    warm = GrowthPlan(
        start="warm", reason="r", warm_from=_output("assign", "a-0"), relabel_from=None
    )
    assert decide_growth(_record(warm), _signature(), GrowthConfig()) == warm


@pytest.mark.parametrize(
    ("change", "growth", "reason"),
    [
        ({"pretext_key": "pre-2"}, GrowthConfig(), "the backbone changed"),
        ({"num_clusters": 12}, GrowthConfig(), "the number of clusters changed (10 -> 12)"),
        ({"scan_fingerprint": "scan-2"}, GrowthConfig(), "SCAN or self-labeling settings"),
        ({"images_key": "images-2"}, GrowthConfig(warm_start=False), "warm_start is off"),
    ],
)
def test_cold_start_when_the_previous_model_does_not_fit(
    change: dict[str, object], growth: GrowthConfig, reason: str
) -> None:
    previous = _record(GrowthPlan(start="cold", reason="first"))
    plan = decide_growth(previous, _signature(**{"images_key": "images-2", **change}), growth)
    assert plan.start == "cold" and plan.warm_from is None
    assert reason in plan.reason
    assert plan.relabel_from is not None  # ids are still matched to the previous run


def test_warm_settings() -> None:
    growth = GrowthConfig(warm_scan_epochs=5, warm_selflabel_epochs=2, warm_lr_scale=0.25)
    scan = warm_scan_config(
        ScanConfig(epochs=50, num_heads=10, head_warmup_epochs=20, lr=2e-4), growth
    )
    assert (scan.epochs, scan.num_heads, scan.head_warmup_epochs) == (5, 1, 0)
    assert scan.lr == pytest.approx(5e-5)
    assert warm_selflabel_config(SelfLabelConfig(lr=1e-4), growth).lr == pytest.approx(2.5e-5)
    with pytest.raises(ValidationError):
        GrowthConfig(warm_lr_scale=0)
    assert warm_scan_config(ScanConfig(epochs=3), growth).epochs == 3
    assert warm_scan_config(ScanConfig(epochs=0, head_warmup_epochs=5), growth).epochs == 1
    assert warm_selflabel_config(SelfLabelConfig(epochs=100), growth).epochs == 2
    assert warm_selflabel_config(SelfLabelConfig(epochs=1), growth).epochs == 1


# -- duplicates -------------------------------------------------------------------------------


def test_exact_duplicates_pair_the_first_uri_with_the_others() -> None:
    groups = first_uris(["x", "y", "x", "x"], ["s3://l/c", "s3://l/y", "s3://l/a", "s3://l/b"])
    assert groups["x"] == ["s3://l/a", "s3://l/b", "s3://l/c"]
    rows = exact_duplicate_pairs(groups)
    assert [(r["uri"], r["duplicate_uri"]) for r in rows] == [
        ("s3://l/a", "s3://l/b"),
        ("s3://l/a", "s3://l/c"),
    ]
    assert {r["kind"] for r in rows} == {"exact"} and {r["image_id"] for r in rows} == {"x"}


def test_near_duplicate_rows_order_each_pair_by_image_id() -> None:
    groups = {"a": ["u/a"], "b": ["u/b", "u/b2"], "c": ["u/c"]}
    found = NearDuplicates(
        first=np.array([0, 0]),
        second=np.array([1, 2]),
        hamming=np.array([2, 0], dtype=np.int32),
        pixel_similarity=np.array([0.99, 0.995], dtype=np.float32),
        cosine=np.array([0.9, np.nan], dtype=np.float32),
    )
    rows = near_duplicate_pairs(["c", "a", "b"], found, groups)
    assert [(r["image_id"], r["duplicate_id"], r["uri"], r["duplicate_uri"]) for r in rows] == [
        ("a", "c", "u/a", "u/c"),
        ("b", "c", "u/b", "u/c"),
    ]
    assert [r["hamming"] for r in rows] == [2, 0]
    assert rows[0]["similarity"] == pytest.approx(0.99) and rows[0]["cosine"] == pytest.approx(0.9)
    assert rows[1]["cosine"] is None and {r["kind"] for r in rows} == {"near"}


# -- reordering a model's clusters ------------------------------------------------------------


def test_reorder_clusters_permutes_the_outputs() -> None:
    torch.manual_seed(0)
    model = ClusteringModel(build_backbone("small_cnn", 1), 4, 1).eval()
    x = torch.rand(3, 1, 28, 28)
    before = model(x)[0].detach()
    order = np.array([2, 0, 3, 1])
    reorder_clusters(model, order)
    after = model(x)[0].detach()
    torch.testing.assert_close(after, before[:, order])
    with pytest.raises(ValueError, match="permutation"):
        reorder_clusters(model, np.array([0, 0, 1, 2]))

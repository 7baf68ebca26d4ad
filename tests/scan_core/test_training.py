"""The training loops on tiny synthetic images: they run, learn, report and fail clearly."""

import numpy as np
import pytest
import torch

from scan_core.clustering import (
    backbone_features,
    feature_head_losses,
    heldout_scan_losses,
    split_validation,
    train_scan,
)
from scan_core.config import PretextConfig, ScanConfig, SelfLabelConfig, resolve_precision
from scan_core.inference import compute_embeddings, predict_probabilities
from scan_core.models import ClusteringModel, SmallCNNBackbone
from scan_core.pretext import rotate_batch, train_pretext
from scan_core.selflabel import NoConfidentSamplesError, train_selflabel
from scan_core.training import EpochLog, autocast, cosine_lr, iterate_batches
from scan_core.transforms import IdentityTransform
from tests.scan_core.synthetic import synthetic


def same_class_neighbors(labels: np.ndarray, k: int) -> np.ndarray:
    out = []
    for i, y in enumerate(labels):
        same = [j for j in np.flatnonzero(labels == y) if j != i]
        out.append(same[:k])
    return np.array(out)


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    from itertools import permutations

    return max(float(np.mean(np.array(p)[pred] == y)) for p in permutations(range(3)))


def test_schedule_and_batches() -> None:
    assert cosine_lr(1.0, 0, 10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 10, 10) == pytest.approx(1e-3)
    batches = list(iterate_batches(10, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4]  # the partial batch is dropped
    assert [len(b) for b in iterate_batches(3, 8, None)] == [3]  # unless it is the only one
    assert list(iterate_batches(1, 8, None)) == []  # never a batch of one (BatchNorm)


def test_rotate_batch() -> None:
    x = torch.arange(8.0).view(2, 1, 2, 2)
    rotated, labels = rotate_batch(x)
    assert rotated.shape == (8, 1, 2, 2) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rotated[2], torch.rot90(x[0], 1, dims=(1, 2)))


@pytest.mark.parametrize("method", ["simclr", "rotnet"])
def test_pretext_trains_reports_and_is_seeded(method: str) -> None:
    x, _ = synthetic(8)
    logs: list[EpochLog] = []
    cfg = PretextConfig(method=method, epochs=2, batch_size=12, lr=0.1, seed=1)
    result = train_pretext(x, cfg, progress=logs.append)
    assert [log.epoch for log in logs] == [1, 2] and all(log.stage == "pretext" for log in logs)
    assert all(np.isfinite(log.metrics["loss"]) for log in logs)
    again = train_pretext(x, cfg)
    e1, e2 = compute_embeddings(result.model, x), compute_embeddings(again.model, x)
    assert np.allclose(e1, e2, atol=1e-5)
    assert np.allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    assert e1.shape == (24, 128 if method == "simclr" else 64)


def test_pretext_with_lower_resolution_views() -> None:
    x, _ = synthetic(8)
    cfg = PretextConfig(epochs=1, batch_size=12, lr=0.1, view_scale=0.5)
    result = train_pretext(x, cfg)
    # trained on 8x8 views, embedded at the images' own 16x16
    assert np.isfinite(result.history[0].metrics["loss"])
    assert compute_embeddings(result.model, x).shape == (24, 128)
    with pytest.raises(ValueError, match="view_scale"):
        PretextConfig(view_scale=0)


def test_pretext_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        train_pretext(torch.zeros(4, 1, 8, 8), PretextConfig(epochs=1))
    with pytest.raises(ValueError, match="at least 2"):
        train_pretext(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), PretextConfig(epochs=1))


def test_scan_learns_easy_clusters_and_selflabel_keeps_them() -> None:
    x, y = synthetic(24)
    neighbors = same_class_neighbors(y, 5)
    backbone = SmallCNNBackbone(1, width=8)
    probe_calls: list[int] = []

    def probe(val_idx: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        probe_calls.append(len(val_idx))
        return {"probe": 1.0}

    cfg = ScanConfig(
        num_clusters=3,
        num_heads=3,
        epochs=25,
        batch_size=32,
        lr=3e-3,
        augment="weak",
        entropy_weight=2.0,
        seed=0,
    )
    logs: list[EpochLog] = []
    result = train_scan(x, neighbors, backbone, cfg, progress=logs.append, probe=probe)
    assert len(logs) == 25 and logs[-1].metrics["probe"] == 1.0
    assert len(probe_calls) == 25 * 3  # every head, every epoch
    assert {f"head_{h}_probe" for h in range(3)} <= set(logs[-1].metrics)
    assert result.best_head == int(np.argmin(result.head_losses))
    assert len(result.model.cluster_heads.heads) == 1
    probs = predict_probabilities(result.model, x)
    assert probs.shape == (72, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert accuracy(y, probs.argmax(1)) >= 0.9
    # the backbone passed in is never modified
    assert all(p.grad is None for p in backbone.parameters())

    sl = train_selflabel(
        x,
        result.model,
        SelfLabelConfig(threshold=0.5, epochs=3, batch_size=36, lr=1e-3, patience=3),
    )
    assert sl.confident_counts[0] > 0 and len(sl.history) >= 1
    assert accuracy(y, predict_probabilities(sl.model, x).argmax(1)) >= 0.9


def test_scan_frozen_backbone_only_trains_heads() -> None:
    x, y = synthetic(6)
    backbone = SmallCNNBackbone(1, width=4)
    cfg = ScanConfig(num_clusters=3, epochs=1, batch_size=8, update_backbone=False, augment="weak")
    result = train_scan(x, same_class_neighbors(y, 2), backbone, cfg)
    for before, after in zip(
        backbone.parameters(), result.model.backbone.parameters(), strict=True
    ):
        assert torch.equal(before, after)


def test_scan_validation() -> None:
    x, y = synthetic(2)
    with pytest.raises(ValueError, match="neighbors"):
        train_scan(x, np.zeros((3, 2), dtype=int), SmallCNNBackbone(1, 4), ScanConfig(epochs=1))
    with pytest.raises(ValueError, match="clusters"):
        train_scan(
            x,
            same_class_neighbors(y, 1),
            SmallCNNBackbone(1, 4),
            ScanConfig(num_clusters=10, epochs=1),
        )


def test_split_validation_is_disjoint() -> None:
    train, val = split_validation(20, 0.25, torch.Generator().manual_seed(0))
    assert len(val) == 5 and len(set(train) | set(val)) == 20 and not set(train) & set(val)


def test_selflabel_fails_clearly_when_nothing_is_confident() -> None:
    x, _ = synthetic(4)
    model = ClusteringModel(SmallCNNBackbone(1, 4), num_clusters=3)
    torch.nn.init.zeros_(model.cluster_heads.heads[0].weight)  # uniform predictions
    with pytest.raises(NoConfidentSamplesError, match="only 0 of .* images are predicted"):
        train_selflabel(x, model, SelfLabelConfig(threshold=0.99, epochs=1))


def test_selflabel_needs_the_minimum_confident_fraction() -> None:
    x, _ = synthetic(4)
    model = ClusteringModel(SmallCNNBackbone(1, 4), num_clusters=3)
    torch.nn.init.zeros_(model.cluster_heads.heads[0].weight)
    torch.nn.init.zeros_(model.cluster_heads.heads[0].bias)  # every image: 1/3 per cluster
    every = SelfLabelConfig(threshold=0.3, epochs=1, batch_size=6, min_confident_fraction=1.0)
    assert train_selflabel(x, model, every).confident_counts[0] == len(x)
    with pytest.raises(NoConfidentSamplesError, match="min_confident_fraction = 0.0"):
        train_selflabel(x, model, SelfLabelConfig(threshold=0.34, min_confident_fraction=0.0))


def test_spice_trains_on_reliable_labels_of_the_neighbours() -> None:
    x, y = synthetic(12)
    backbone = SmallCNNBackbone(1, width=8)
    cfg = ScanConfig(num_clusters=3, epochs=3, batch_size=12, lr=1e-3, augment="weak")
    neighbors = same_class_neighbors(y, 3)
    model = train_scan(x, neighbors, backbone, cfg).model
    # nothing is confident above 0.999, so every label comes from neighbour agreement
    sl = train_selflabel(
        x,
        model,
        SelfLabelConfig(method="spice", threshold=0.999, epochs=1, batch_size=12, patience=1),
        neighbors=neighbors,
    )
    assert len(sl.history) == 1 and sl.history[0].metrics["loss"] > 0
    with pytest.raises(ValueError, match="needs the mined neighbours"):
        train_selflabel(x, model, SelfLabelConfig(method="spice", epochs=1))


def test_head_warmup_alone_clusters_and_leaves_the_backbone_untouched() -> None:
    x, y = synthetic(24)
    backbone = SmallCNNBackbone(1, width=8)
    # a pretext backbone has BatchNorm statistics of its data: give the random one those too
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        backbone(IdentityTransform()(x))
    backbone.eval()
    logs: list[EpochLog] = []
    cfg = ScanConfig(
        num_clusters=3,
        epochs=0,
        head_warmup_epochs=40,
        head_warmup_lr=0.05,
        batch_size=32,
        entropy_weight=2.0,
    )
    result = train_scan(x, same_class_neighbors(y, 5), backbone, cfg, progress=logs.append)
    assert [log.stage for log in logs] == ["scan_warmup"] * 40
    assert logs[-1].metrics["loss"] < logs[0].metrics["loss"]
    for before, after in zip(
        backbone.parameters(), result.model.backbone.parameters(), strict=True
    ):
        assert torch.equal(before, after)  # epochs=0: only the heads were trained
    assert accuracy(y, predict_probabilities(result.model, x).argmax(1)) >= 0.9


def test_heldout_scan_losses_match_a_naive_computation_in_any_chunk_size() -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.softmax(torch.randn(3, 30, 4, generator=g), dim=2)  # (H, M, C)
    anchors = np.array([0, 5, 7, 11, 29])
    index = torch.randint(30, (5, 6), generator=g)  # each anchor's 6 neighbours in the pool
    p, a = pool.numpy().astype(np.float64), pool[:, anchors]
    for h in range(3):
        pairs = [
            -np.log(p[h, i] @ p[h, j])
            for i, row in zip(anchors, index.numpy(), strict=True)
            for j in row
        ]
        mean = p[h, anchors].mean(axis=0)
        expected = np.mean(pairs) + 2.0 * (mean * np.log(mean)).sum()
        for chunk in (1, 2, 4096):
            got = heldout_scan_losses(a, pool, index, 2.0, chunk=chunk)[h]
            assert got == pytest.approx(expected, rel=1e-5)


def test_feature_head_losses_score_every_head_on_the_held_out_anchors() -> None:
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    neighbors = torch.randint(40, (40, 3), generator=torch.Generator().manual_seed(2))
    model = ClusteringModel(SmallCNNBackbone(1, width=2), num_clusters=4, num_heads=3)
    heads = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    model.cluster_heads.heads = torch.nn.ModuleList(heads)
    val = np.array([1, 3, 30])
    losses = feature_head_losses(model.cluster_heads, features, neighbors, val)
    for h, head in enumerate(heads):
        probs = torch.softmax(head(features), dim=1)[None].detach()
        alone = heldout_scan_losses(probs[:, val], probs, neighbors[val], 1.0)
        assert losses[h] == pytest.approx(alone[0])


def test_warmup_restarts_keep_the_heads_with_the_lowest_heldout_loss() -> None:
    x, y = synthetic(16)
    backbone = SmallCNNBackbone(1, width=4)
    logs: list[EpochLog] = []
    cfg = ScanConfig(
        num_clusters=3, num_heads=2, warmup_heads=5, head_warmup_epochs=3, epochs=1, batch_size=16
    )
    result = train_scan(x, same_class_neighbors(y, 3), backbone, cfg, progress=logs.append)
    assert len(result.warmup_losses) == 5  # five random starts were scored
    assert [log.stage for log in logs] == ["scan_warmup"] * 3 + ["scan"]
    assert len(result.head_losses) == 2  # the two best went on to the full-network epoch
    assert len(result.model.cluster_heads.heads) == 1

    # without full-network epochs the kept head is the warm-up head of the lowest loss, unchanged
    cfg = cfg.model_copy(update={"num_heads": 1, "epochs": 0})
    result = train_scan(x, same_class_neighbors(y, 3), backbone, cfg)
    features = backbone_features(result.model.backbone, x, "cpu")
    neighbors = torch.as_tensor(same_class_neighbors(y, 3))
    kept = feature_head_losses(result.model.cluster_heads, features, neighbors, result.val_indices)
    assert kept[0] == pytest.approx(min(result.warmup_losses), rel=1e-5)
    assert sorted(result.warmup_losses)[1] > min(result.warmup_losses)  # a real choice


def test_keep_heads_keeps_the_named_heads_in_order() -> None:
    model = ClusteringModel(SmallCNNBackbone(1, width=2), num_clusters=3, num_heads=4)
    features = torch.randn(5, model.backbone.out_dim)
    before = model.cluster_heads(features)
    model.keep_heads([3, 1])
    assert torch.equal(model.cluster_heads(features), before[[3, 1]])
    with pytest.raises(ValueError, match="at least one"):
        model.keep_heads([])
    with pytest.raises(ValueError, match="out of range"):
        model.keep_heads([2])


def test_scan_config_needs_some_training() -> None:
    with pytest.raises(ValueError, match="cannot both be 0"):
        ScanConfig(epochs=0)


def test_precision_resolution_and_autocast() -> None:
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if native else None)
    layer = torch.nn.Linear(4, 2)
    with autocast("cpu", torch.bfloat16):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with autocast("cpu", None):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretext_runs_in_both_precisions(precision: str) -> None:
    x, _ = synthetic(4)
    cfg = PretextConfig(epochs=1, batch_size=12, precision=precision)  # type: ignore[arg-type]
    result = train_pretext(x, cfg)
    assert np.isfinite(result.history[0].metrics["loss"])
    assert all(p.dtype == torch.float32 for p in result.model.parameters())

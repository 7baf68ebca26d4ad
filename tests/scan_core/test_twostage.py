"""Norm-FC heads and the two-stage class-assignment loop on tiny synthetic images."""

import numpy as np
import pytest
import torch

from scan_core.config import TwoStageConfig
from scan_core.evaluation import evaluate_clustering, hungarian_accuracy, many_to_one_accuracy
from scan_core.inference import predict_probabilities
from scan_core.models import (
    ClusterHeads,
    ClusteringModel,
    EmbeddingHead,
    NormFCHead,
    SimCLRProjectionHead,
    SmallCNNBackbone,
)
from scan_core.training import EpochLog
from scan_core.twostage import EmbeddingBackbone, build_assignment_model, train_twostage
from tests.scan_core.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def test_norm_fc_head_shapes_and_normalisation() -> None:
    torch.manual_seed(0)
    head = NormFCHead(in_dim=6, num_clusters=4, num_heads=3, temperature=0.1, norm_axis="cluster")
    assert isinstance(head, ClusterHeads) and head.num_clusters == 4
    assert all(not hasattr(h, "bias") for h in head.heads)
    x = torch.randn(5, 6)
    logits = head(x)
    assert logits.shape == (3, 5, 4)
    # logits are cosines / tau: bounded by 1/tau and invariant to the scale of inputs and weights
    assert logits.abs().max() <= 10.0 + 1e-5
    assert torch.allclose(head(3.0 * x), logits, atol=1e-5)
    first = head.heads[0]
    with torch.no_grad():
        first.weight.mul_(7.0)
    assert torch.allclose(head(x)[0], logits[0], atol=1e-5)
    # an input along a cluster's weight vector scores exactly 1 / tau for that cluster
    w = first.weight.detach()[2]
    assert head(w.unsqueeze(0))[0, 0, 2].item() == pytest.approx(10.0, rel=1e-5)
    # the same cosine with tau = 1 is 10 times smaller
    cosine = NormFCHead(6, 4, 1, temperature=1.0, norm_axis="cluster")(x)
    assert cosine.abs().max().item() <= 1.0 + 1e-6


def test_norm_fc_head_official_feature_axis() -> None:
    torch.manual_seed(0)
    head = NormFCHead(in_dim=6, num_clusters=4, num_heads=2)  # official: norm_axis="feature"
    layer = head.heads[0]
    assert layer.norm_axis == "feature" and layer.temperature == 0.1
    # the input e_j reads column j of the normalised weight: its logits * tau have unit norm
    with torch.no_grad():
        out = head(torch.eye(6))[0] * 0.1  # (6 inputs, 4 clusters)
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-6)
    expected = layer.weight / layer.weight.norm(dim=0, keepdim=True)
    assert torch.allclose(out, expected.T.detach(), atol=1e-6)
    # a cluster vector's norm is sqrt(in_dim / C) on average: sharper than cosines
    assert expected.pow(2).sum().item() == pytest.approx(6.0, rel=1e-6)


def test_norm_fc_head_validates() -> None:
    with pytest.raises(ValueError, match="temperature"):
        NormFCHead(4, 3, 1, temperature=0.0)
    with pytest.raises(ValueError, match="num_clusters"):
        NormFCHead(4, 1, 1)
    with pytest.raises(ValueError, match="num_heads"):
        NormFCHead(4, 3, 0)
    with pytest.raises(ValueError, match="norm_axis"):
        NormFCHead(4, 3, 1, norm_axis="row")  # type: ignore[arg-type]


def test_embedding_head_and_backbone_are_unit_norm() -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(8, 5)
    out = head(torch.randn(4, 8))
    assert out.shape == (4, 5) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-6)
    backbone = SmallCNNBackbone(1, width=2)
    net = EmbeddingBackbone(backbone, SimCLRProjectionHead(backbone.out_dim, 7)).eval()
    emb = net(torch.randn(3, 1, 16, 16))
    assert net.out_dim == 7 and emb.shape == (3, 7)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    with pytest.raises(ValueError, match="in_dim"):
        EmbeddingHead(0, 5)


def test_assignment_models() -> None:
    backbone = SmallCNNBackbone(1, width=2)
    cfg = TwoStageConfig(num_clusters=3, num_heads=2, feature_dim=6)
    two = build_assignment_model(backbone, cfg)
    assert isinstance(two, ClusteringModel) and isinstance(two.cluster_heads, NormFCHead)
    assert two.backbone.out_dim == 6
    assert not any(p.requires_grad for p in two.cluster_heads.parameters())  # official: frozen
    assert two(torch.randn(4, 1, 16, 16)).shape == (2, 4, 3)
    two.keep_head(1)
    assert two(torch.randn(4, 1, 16, 16)).shape == (1, 4, 3)
    assert two.backbone.backbone is not backbone  # a copy


def test_config_validates_overclustering() -> None:
    with pytest.raises(ValueError, match="overcluster"):
        TwoStageConfig(num_clusters=10, overcluster=10)
    assert TwoStageConfig(num_clusters=10, overcluster=20).overcluster == 20


def test_twostage_learns_easy_clusters() -> None:
    x, y = synthetic(24)
    torch.manual_seed(0)
    backbone = SmallCNNBackbone(1, width=8)
    k = int(y.max()) + 1
    epochs = 15
    cfg = TwoStageConfig(
        num_clusters=k,
        num_heads=5,
        epochs=epochs,
        batch_size=32,
        optimizer="adam",
        lr=1e-2,
        crop_scale_min=0.8,
        color_jitter=0.0,
        seed=0,
    )
    logs: list[EpochLog] = []
    calls: list[int] = []

    def probe(val_idx: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        calls.append(len(val_idx))
        return {"probe": 1.0}

    result = train_twostage(
        x,
        backbone,
        cfg,
        progress=logs.append,
        probe=probe,  # type: ignore[arg-type]
    )
    assert len(logs) == epochs and logs[0].stage == "twostage"
    assert len(calls) == epochs * cfg.num_heads  # every head, every epoch
    assert logs[-1].metrics["probe"] == 1.0 and "head_0_min_share" in logs[-1].metrics
    assert all(np.isfinite(log.metrics["loss"]) for log in logs)
    assert logs[-1].metrics["iic"] < logs[0].metrics["iic"]  # mutual information grows
    assert logs[-1].metrics["cp"] > 0
    assert result.best_head == int(np.argmin(result.head_losses))
    assert len(result.head_losses) == cfg.num_heads
    assert len(result.model.cluster_heads.heads) == 1
    # held-out mutual information grows; two-stage's sharp Norm-FC heads get close to log k
    assert logs[-1].metrics["val_loss"] < logs[0].metrics["val_loss"]
    assert -result.head_losses[result.best_head] > 0.8 * np.log(k)
    probs = predict_probabilities(result.model, x)
    assert probs.shape == (len(y), k) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert hungarian_accuracy(y, probs.argmax(1)) >= 0.9
    assert all(p.grad is None for p in backbone.parameters())


def test_twostage_refines_a_given_embedding_head_and_overclusters() -> None:
    x, y = synthetic(12)
    backbone = SmallCNNBackbone(1, width=4)
    head = SimCLRProjectionHead(backbone.out_dim, 8)
    before = [p.clone() for p in head.parameters()]
    cfg = TwoStageConfig(
        num_clusters=6, num_heads=2, epochs=2, batch_size=16, optimizer="adam", lr=1e-3
    )
    result = train_twostage(x, backbone, cfg, embedding_head=head)
    assert isinstance(result.model.backbone, EmbeddingBackbone)
    assert isinstance(result.model.backbone.head, SimCLRProjectionHead)
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))
    pred = predict_probabilities(result.model, x).argmax(1)
    # overclustering (6 clusters for 3 classes) is scored with many-to-one matching
    assert many_to_one_accuracy(y, pred) >= hungarian_accuracy(y, pred)


def test_twostage_validates() -> None:
    x, _ = synthetic(2)
    with pytest.raises(ValueError, match="uint8"):
        train_twostage(x.float(), SmallCNNBackbone(1, 2), TwoStageConfig(epochs=1))
    with pytest.raises(ValueError, match="clusters"):
        train_twostage(x, SmallCNNBackbone(1, 2), TwoStageConfig(num_clusters=10, epochs=1))


def test_overclustering_k20_is_scored_many_to_one() -> None:
    # 10 classes, each split evenly into 2 of 20 clusters: many-to-one matching is perfect,
    # Hungarian (one cluster per class) gets half of every class
    labels = np.repeat(np.arange(10), 6)
    clusters = labels * 2 + np.tile([0, 0, 0, 1, 1, 1], 10)
    metrics = evaluate_clustering(labels, clusters, num_clusters=20)
    assert metrics.num_clusters == 20 and metrics.num_classes == 10
    assert metrics.many_to_one_acc == 1.0 and metrics.acc == pytest.approx(0.5)

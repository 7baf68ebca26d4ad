"""BYOL pretext: the loss, the target's moving average and its schedule, and the training loop."""

import math

import pytest
import torch

from scan_core.byol import byol_loss, target_momentum, train_byol, update_target
from scan_core.config import BYOLConfig, PipelineConfig
from scan_core.inference import compute_embeddings
from scan_core.methods import pretext_method
from scan_core.neighbors import mine_neighbors, neighbor_purity
from scan_core.training import EpochLog
from tests.scan_core.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_is_two_minus_twice_the_cosine() -> None:
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[3.0, 0.0], [2.0, 0.0]], requires_grad=True)
    loss = byol_loss(p, z)
    assert float(loss.detach()) == pytest.approx(((2 - 2 * 1) + (2 - 2 * 0)) / 2)
    loss.backward()
    assert z.grad is None  # the target carries no gradient
    assert p.grad is not None


def test_target_momentum_rises_from_the_base_to_one() -> None:
    assert target_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert target_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert target_momentum(0.99, 100, 100) == pytest.approx(1.0)
    values = [target_momentum(0.9, s, 10) for s in range(11)]
    assert values == sorted(values)


def test_update_target_is_an_exponential_moving_average() -> None:
    online, target = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
        online.running_mean.fill_(5.0)
    update_target(target, online, 0.75)
    assert target.weight.tolist() == pytest.approx([0.25, 0.25])
    assert target.running_mean.tolist() == [5.0, 5.0]  # buffers are copied


def test_byol_learns_an_embedding_with_pure_neighbours() -> None:
    images, labels = synthetic(n_per_class=24, size=16)
    config = BYOLConfig(
        epochs=6, batch_size=24, lr=0.05, hidden_dim=32, feature_dim=16, device="cpu", seed=1
    )
    logs: list[EpochLog] = []
    result = train_byol(images, config, progress=logs.append)
    assert [log.epoch for log in logs] == list(range(1, 7))
    assert all(math.isfinite(log.metrics["loss"]) for log in logs)
    assert 0.99 <= logs[-1].metrics["tau"] <= 1.0
    model = result.model
    assert not model.embeds_with_head and model.embedding_head is None
    features = compute_embeddings(model, images, device="cpu")
    assert features.shape == (72, model.backbone.out_dim)
    purity = neighbor_purity(mine_neighbors(features, 5).I, labels)
    assert purity > 0.6  # three classes: chance is about 1/3


def test_the_registry_builds_the_network_byol_saves() -> None:
    config = PipelineConfig().with_overrides(
        {"pretext.method": "byol", "pretext.lr": 0.4, "byol.hidden_dim": 32}
    )
    method = pretext_method("byol")
    settings = method.settings(config)
    assert isinstance(settings, BYOLConfig)
    assert settings.lr == 0.05  # byol.lr replaces pretext.lr (SimCLR's)
    stage = method.stage_config(config)
    assert stage["method"] == "byol" and stage["hidden_dim"] == 32
    assert method.parse(stage) == settings
    images, _ = synthetic(n_per_class=4, size=16)
    trained = train_byol(images, settings.model_copy(update={"epochs": 1, "device": "cpu"})).model
    rebuilt = method.build(settings, in_channels=1)
    rebuilt.load_state_dict(trained.state_dict())  # the same architecture, key for key
    with pytest.raises(ValueError, match="unknown pretext method 'moco'"):
        pretext_method("moco")

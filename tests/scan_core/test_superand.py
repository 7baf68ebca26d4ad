"""Super-AND pretext: schedule, memory bank, neighbourhood discovery and the training loop."""

import math

import numpy as np
import pytest
import torch

from scan_core.config import SuperANDConfig
from scan_core.inference import compute_embeddings
from scan_core.models import EmbeddingHead
from scan_core.superand import (
    MemoryBank,
    discover_neighbourhoods,
    superand_schedule,
    train_superand,
)
from scan_core.training import EpochLog
from tests.scan_core.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_reproduces_the_official_one_at_200_epochs() -> None:
    # official: w = 0.2 * (epoch // 80); lr * 0.1 ** ((epoch - 80) // 40) from epoch 80
    for epoch in range(200):
        lr_factor, w = superand_schedule(epoch, 200)
        assert w == pytest.approx(0.2 * (epoch // 80))
        official = 1.0 if epoch < 80 else 0.1 ** ((epoch - 80) // 40)
        assert lr_factor == pytest.approx(official)
    # scaled to 10 epochs per round: UE from epoch 4 (0.2) and 8 (0.4), lr /10 at 6, /100 at 8
    table = [superand_schedule(e, 10) for e in range(10)]
    assert [w for _, w in table] == pytest.approx([0] * 4 + [0.2] * 4 + [0.4] * 2)
    assert [f for f, _ in table] == pytest.approx([1] * 6 + [0.1] * 2 + [0.01] * 2)
    assert superand_schedule(0, 1) == (1.0, 0.0)
    with pytest.raises(ValueError, match="epoch"):
        superand_schedule(5, 5)


def test_memory_bank_logits_and_momentum_update() -> None:
    bank = MemoryBank(3, 2, temperature=0.5, momentum=0.5, generator=torch.Generator())
    bank.memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(bank.logits(z), torch.tensor([[0.0, 2.0, 0.0]]))
    bank.update(torch.tensor([0]), z)
    s = 1 / math.sqrt(2)  # normalise(0.5 * [1, 0] + 0.5 * [0, 1])
    assert torch.allclose(bank.memory[0], torch.tensor([s, s]))
    assert torch.equal(bank.memory[1:], torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    fresh = MemoryBank(5, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fresh.memory.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(3, 2, momentum=1.0)


def naive_discovery(memory: np.ndarray, num_anchors: int, size: int, t: float) -> np.ndarray:
    n = len(memory)
    sims = memory @ memory.T
    entropy = []
    for i in range(n):
        p = np.exp(sims[i] / t) / np.exp(sims[i] / t).sum()  # self included (official)
        entropy.append(-(p * np.log(p)).sum())
    out = np.full((n, size), -1)
    for i in np.argsort(entropy, kind="stable")[:num_anchors]:
        others = [j for j in np.argsort(-sims[i], kind="stable") if j != i]
        out[i] = others[:size]
    return out


@pytest.mark.parametrize(("num_anchors", "size", "t"), [(3, 1, 0.1), (5, 2, 0.5), (8, 3, 1.0)])
def test_discover_neighbourhoods_matches_naive(num_anchors: int, size: int, t: float) -> None:
    rng = np.random.default_rng(0)
    memory = rng.normal(size=(11, 4))
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    got = discover_neighbourhoods(torch.tensor(memory), num_anchors, size, t, batch_size=4)
    assert got.tolist() == naive_discovery(memory, num_anchors, size, t).tolist()


def test_discover_neighbourhoods_exact_small_case() -> None:
    # 0/1 and 2/3 are tight pairs, 4 sits between them; at t = 1 the pairs' distributions are
    # the most concentrated, so with 4 anchors each pair member gets its partner
    angles = torch.tensor([0.0, 0.05, 1.6, 1.65, 0.8])
    memory = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    neighbours = discover_neighbourhoods(memory, num_anchors=4, size=1, temperature=1.0)
    assert neighbours[:, 0].tolist() == [1, 0, 3, 2, -1]
    assert (discover_neighbourhoods(memory, 0) == -1).all()
    with pytest.raises(ValueError, match="num_anchors"):
        discover_neighbourhoods(memory, 6)
    with pytest.raises(ValueError, match="size"):
        discover_neighbourhoods(memory, 2, size=5)


def test_config_validates_rounds() -> None:
    with pytest.raises(ValueError, match="rounds"):
        SuperANDConfig(epochs=3, rounds=5)
    with pytest.raises(ValueError, match="anchor_rate"):
        SuperANDConfig(epochs=10, rounds=5, anchor_rate=0.5)


def test_superand_trains_in_rounds_and_is_seeded() -> None:
    x, y = synthetic(8)
    logs: list[EpochLog] = []
    cfg = SuperANDConfig(
        epochs=4, rounds=2, batch_size=12, lr=0.03, anchor_rate=0.5, ue_warmup_fraction=0.5
    )
    result = train_superand(x, cfg, progress=logs.append)
    assert [log.epoch for log in logs] == [1, 2, 3, 4] and logs[0].stage == "pretext"
    assert [log.metrics["round"] for log in logs] == [1, 1, 2, 2]
    # no anchors in the first round, half the samples in the second
    assert [log.metrics["anchors"] for log in logs] == [0.0, 0.0, 0.5, 0.5]
    # w(t) restarts each round: 0 for the first epoch of a round, 0.2 for the second
    assert [log.metrics["ue_weight"] for log in logs] == pytest.approx([0, 0.2, 0, 0.2])
    assert logs[0].metrics["ue"] == 0.0 and logs[1].metrics["ue"] > 0
    assert all(np.isfinite(log.metrics["loss"]) for log in logs)
    assert isinstance(result.model.head, EmbeddingHead)
    e1 = compute_embeddings(result.model, x, use_head=True)
    assert e1.shape == (24, 128) and np.allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    again = train_superand(x, cfg)
    assert np.allclose(compute_embeddings(again.model, x, use_head=True), e1, atol=1e-5)


def test_superand_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        train_superand(torch.zeros(4, 1, 16, 16), SuperANDConfig(epochs=1, rounds=1))
    with pytest.raises(ValueError, match="at least 3"):
        train_superand(
            torch.zeros(2, 1, 16, 16, dtype=torch.uint8), SuperANDConfig(epochs=1, rounds=1)
        )


@pytest.mark.parametrize(
    ("precision", "expected"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_superand_trains_in_the_configured_precision(precision: str, expected: torch.dtype) -> None:
    """The convolutions run in the configured arithmetic; the weights stay float32."""
    x, _ = synthetic(4)
    seen: set[torch.dtype] = set()

    def record(module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        cfg = SuperANDConfig(epochs=1, rounds=1, batch_size=12, precision=precision)  # type: ignore[arg-type]
        result = train_superand(x, cfg)
    finally:
        hook.remove()
    assert seen == {expected}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())

"""Each loss against a naive NumPy computation or an exact hand value."""

import math

import numpy as np
import pytest
import torch

from scan_core.losses import ConfidenceBasedCE, NTXentLoss, RotNetLoss, SCANLoss, entropy


def naive_ntxent(a: np.ndarray, b: np.ndarray, t: float) -> float:
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(a)
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [z[i] @ z[k] / t for k in range(2 * n) if k != i]
        losses.append(-(z[i] @ z[j] / t) + math.log(sum(math.exp(s) for s in sims)))
    return float(np.mean(losses))


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_ntxent_matches_naive(t: float) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    got = NTXentLoss(t)(torch.tensor(a), torch.tensor(b))
    assert float(got) == pytest.approx(naive_ntxent(a, b, t), rel=1e-6)


def test_ntxent_exact_value_for_orthogonal_batch() -> None:
    z = torch.eye(4)
    # positives have similarity 1, negatives 0: loss = -1/t + log(e^{1/t} + 6 e^0)
    t = 0.1
    expected = -1 / t + math.log(math.exp(1 / t) + 6)
    assert float(NTXentLoss(t)(z, z)) == pytest.approx(expected, abs=1e-6)  # float32


def test_ntxent_validates() -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match="shape"):
        NTXentLoss()(torch.zeros(3, 2), torch.zeros(4, 2))


def test_rotnet_loss_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 3])
    e2 = math.exp(2)
    expected = (-math.log(e2 / (e2 + 3)) + math.log(4)) / 2
    assert float(RotNetLoss()(logits, labels)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        RotNetLoss()(torch.zeros(2, 3), labels)


def naive_scan(la: np.ndarray, ln: np.ndarray, w: float) -> tuple[float, float, float]:
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    pa, pn = softmax(la), softmax(ln)
    consistency = float(np.mean([-math.log(pa[i] @ pn[i]) for i in range(len(pa))]))
    mean = pa.mean(axis=0)
    ent = float(-(mean * np.log(mean)).sum())
    return consistency - w * ent, consistency, ent


@pytest.mark.parametrize("w", [0.0, 1.0, 5.0])
def test_scan_loss_matches_naive(w: float) -> None:
    rng = np.random.default_rng(1)
    la, ln = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    total, cons, ent = SCANLoss(w)(torch.tensor(la), torch.tensor(ln))
    exp_total, exp_cons, exp_ent = naive_scan(la, ln, w)
    assert float(total) == pytest.approx(exp_total, rel=1e-6)
    assert float(cons) == pytest.approx(exp_cons, rel=1e-6)
    assert float(ent) == pytest.approx(exp_ent, rel=1e-6)


def test_scan_loss_exact_values() -> None:
    # uniform predictions: <p, p> = 1/C, batch entropy = log C
    c = 4
    logits = torch.zeros(3, c)
    total, cons, ent = SCANLoss(5.0)(logits, logits)
    assert float(cons) == pytest.approx(math.log(c))
    assert float(ent) == pytest.approx(math.log(c))
    assert float(total) == pytest.approx(math.log(c) - 5 * math.log(c))


def test_scan_loss_validates() -> None:
    with pytest.raises(ValueError, match="entropy_weight"):
        SCANLoss(-1.0)
    with pytest.raises(ValueError, match="logits"):
        SCANLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


def test_entropy_handles_zero_probabilities() -> None:
    assert float(entropy(torch.tensor([1.0, 0.0]))) == pytest.approx(0.0)
    assert float(entropy(torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2))


def test_confidence_ce_matches_naive_weighted_ce() -> None:
    weak = torch.tensor([[10.0, 0, 0], [10.0, 0, 0], [0, 10.0, 0], [0, 0, 0.1]])
    strong = torch.tensor([[1.0, 2, 0], [0.5, 0, 0], [0, 1.0, 3], [1.0, 1, 1]])
    loss, n = ConfidenceBasedCE(0.99)(weak, strong)
    assert n == 3  # the last row is not confident
    # targets 0, 0, 1; counts 2, 1 -> weights n/(present*count) = 3/4, 3/2
    logp = torch.log_softmax(strong, dim=1).numpy()
    w = {0: 0.75, 1: 1.5}
    terms = [(w[0], -logp[0, 0]), (w[0], -logp[1, 0]), (w[1], -logp[2, 1])]
    expected = sum(a * b for a, b in terms) / sum(a for a, _ in terms)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_confidence_ce_unweighted_and_errors() -> None:
    weak = torch.tensor([[10.0, 0], [10.0, 0]])
    strong = torch.tensor([[0.0, 0], [1.0, 0]])
    loss, _ = ConfidenceBasedCE(0.9, class_balance=False)(weak, strong)
    logp = torch.log_softmax(strong, dim=1)
    assert float(loss) == pytest.approx(float(-(logp[0, 0] + logp[1, 0]) / 2))
    with pytest.raises(ValueError, match="confidence above"):
        ConfidenceBasedCE(0.99)(torch.zeros(2, 2), strong)
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceBasedCE(1.0)

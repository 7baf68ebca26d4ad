"""The losses of the second seed method (IIC, L_cp, Super-AND) against naive NumPy versions."""

import math

import numpy as np
import pytest
import torch

from scan_core.losses import (
    IIC_EPS,
    ANDLoss,
    AUGLoss,
    ConsistencyPreservingLoss,
    IICLoss,
    UELoss,
    iic_joint,
)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def naive_iic(la: np.ndarray, lb: np.ndarray, lamb: float = 1.0, eps: float = IIC_EPS) -> float:
    pa, pb = softmax(la), softmax(lb)
    c = pa.shape[1]
    joint = np.zeros((c, c))
    for i in range(len(pa)):
        joint += np.outer(pa[i], pb[i])
    joint = (joint + joint.T) / 2
    joint /= joint.sum()
    pi, pj = joint.sum(axis=1), joint.sum(axis=0)
    total = 0.0
    for a in range(c):
        for b in range(c):
            p = max(joint[a, b], eps)
            total -= p * (
                math.log(p) - lamb * math.log(max(pi[a], eps)) - lamb * math.log(max(pj[b], eps))
            )
    return total


@pytest.mark.parametrize("lamb", [1.0, 1.5])
def test_iic_matches_naive(lamb: float) -> None:
    rng = np.random.default_rng(0)
    la, lb = rng.normal(size=(9, 4)) * 2, rng.normal(size=(9, 4)) * 2
    got = IICLoss(lamb=lamb)(torch.tensor(la), torch.tensor(lb))
    assert float(got) == pytest.approx(naive_iic(la, lb, lamb), rel=1e-9)


def test_iic_exact_values() -> None:
    c = 5
    confident = torch.eye(c).repeat(3, 1) * 60.0  # one-hot, every cluster used equally
    # identical confident views: P = I / C, so I(z, z') = H(z) = log C
    assert float(IICLoss()(confident, confident)) == pytest.approx(-math.log(c), abs=1e-6)
    # uniform predictions carry no information: P = 1/C^2 everywhere, I = 0
    uniform = torch.zeros(6, c, dtype=torch.float64)
    assert float(IICLoss()(uniform, uniform)) == pytest.approx(0.0, abs=1e-12)
    # inconsistent views (cluster i vs i+1) of a symmetrised joint: P = (I + shift)/2C
    shifted = torch.roll(confident, 1, dims=1)
    expected = -(math.log(c) - math.log(2))
    assert float(IICLoss()(confident, shifted)) == pytest.approx(expected, abs=1e-6)


def test_iic_eps_keeps_empty_clusters_finite() -> None:
    logits = torch.tensor([[50.0, 0.0, -50.0], [50.0, 0.0, -50.0]], requires_grad=True)
    loss = IICLoss()(logits, logits.detach().clone())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # all samples in cluster 0: no information at all
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_iic_joint_is_symmetric_and_normalised() -> None:
    rng = np.random.default_rng(1)
    pa = torch.tensor(softmax(rng.normal(size=(7, 3))))
    pb = torch.tensor(softmax(rng.normal(size=(7, 3))))
    joint = iic_joint(pa, pb)
    assert torch.allclose(joint, joint.T) and float(joint.sum()) == pytest.approx(1.0)
    assert float(IICLoss().from_joint(joint)) == pytest.approx(
        float(IICLoss()(pa.log(), pb.log())), rel=1e-9
    )


def test_iic_validates() -> None:
    with pytest.raises(ValueError, match="eps"):
        IICLoss(eps=0.0)
    with pytest.raises(ValueError, match="lamb"):
        IICLoss(lamb=0.0)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        IICLoss()(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        IICLoss().from_joint(torch.zeros(2, 3))


def naive_aug(a: np.ndarray, b: np.ndarray, t: float, spread: bool) -> float:
    z = np.concatenate([a, b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        partner = (i + n) % n2
        denominator = sum(math.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total -= math.log(math.exp(z[i] @ z[partner] / t) / denominator)
        if spread:
            for j in range(n2):
                if j not in (i, partner):
                    total -= math.log(1 - math.exp(z[i] @ z[j] / t) / denominator)
    return total / n2


@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_aug_and_cp_match_naive(spread: bool, t: float) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    expected = naive_aug(a, b, t, spread)
    for loss in (AUGLoss(t, spread), ConsistencyPreservingLoss(t, spread)):
        assert float(loss(torch.tensor(a), torch.tensor(b))) == pytest.approx(expected, rel=1e-9)


def test_aug_exact_value_for_orthogonal_batch() -> None:
    # two images, views identical and orthogonal to the other image: for each of the 4 rows the
    # partner has cosine 1 and the two others 0, so P(partner) = e^10 / (e^10 + 2)
    z = torch.eye(2, dtype=torch.float64)
    e = math.exp(10)
    p_pos, p_neg = e / (e + 2), 1 / (e + 2)
    expected = -(math.log(p_pos) + 2 * math.log(1 - p_neg))
    assert float(AUGLoss(0.1)(z, z)) == pytest.approx(expected, rel=1e-9)


def test_aug_gradient_moves_only_each_rows_own_embedding() -> None:
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.normal(size=(3, 4)), requires_grad=True)
    b = torch.tensor(rng.normal(size=(3, 4)), requires_grad=True)
    AUGLoss(0.5)(a, b).backward()
    # reference: every row's loss with the other rows' normalised embeddings as constants
    a2 = a.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    z = torch.nn.functional.normalize(torch.cat([a2, b2]), dim=1)
    keys = z.detach()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(6):
        logits = keys @ z[i] / 0.5
        others = [k for k in range(6) if k != i]
        log_p = logits[others] - torch.logsumexp(logits[others], dim=0)
        partner = others.index((i + 3) % 6)
        total = total - log_p[partner]
        total = total - sum(torch.log1p(-log_p[j].exp()) for j in range(5) if j != partner)
    (total / 6).backward()
    assert torch.allclose(a.grad, a2.grad) and torch.allclose(b.grad, b2.grad)


def test_aug_validates() -> None:
    with pytest.raises(ValueError, match="temperature"):
        AUGLoss(0.0)
    with pytest.raises(ValueError, match="B >= 2"):
        AUGLoss()(torch.zeros(1, 3), torch.zeros(1, 3))


def test_and_loss_matches_naive() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4, 7)) * 3
    indices = np.array([0, 3, 5, 6])
    neighbours = np.array([[-1, -1], [1, 2], [4, -1], [-1, -1]])
    p = softmax(logits)
    expected = 0.0
    for r in range(4):
        chosen = [indices[r], *[j for j in neighbours[r] if j >= 0]]
        expected -= math.log(p[r, chosen].sum())
    expected /= 4
    got = ANDLoss()(torch.tensor(logits), torch.tensor(indices), torch.tensor(neighbours))
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_and_loss_exact_value_and_validation() -> None:
    # uniform logits over 4 memory slots: an instance has p = 1/4, an anchor with 1 neighbour 1/2
    logits = torch.zeros(2, 4, dtype=torch.float64)
    got = ANDLoss()(logits, torch.tensor([0, 1]), torch.tensor([[-1], [2]]))
    assert float(got) == pytest.approx((math.log(4) + math.log(2)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="indices"):
        ANDLoss()(logits, torch.tensor([0]), torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="neighbours"):
        ANDLoss()(logits, torch.tensor([0, 1]), torch.tensor([-1, 2]))


def test_ue_loss_matches_naive_and_masks_self() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6)) * 4
    indices = np.array([2, 0, 5])
    masked = logits.copy()
    masked[np.arange(3), indices] = -10.0
    p = softmax(masked)
    expected = float(-(p * np.log(p)).sum(axis=1).mean())
    got = UELoss()(torch.tensor(logits), torch.tensor(indices))
    assert float(got) == pytest.approx(expected, rel=1e-9)
    # exact: self masked to -inf-like, 3 equal others -> entropy log 3; unmasked -> log 4
    flat = torch.zeros(1, 4, dtype=torch.float64)
    assert float(UELoss(self_logit=-1e4)(flat, torch.tensor([1]))) == pytest.approx(math.log(3))
    assert float(UELoss(self_logit=None)(flat, torch.tensor([1]))) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="indices"):
        UELoss()(flat, torch.tensor([0, 1]))

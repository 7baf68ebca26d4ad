"""Losses of the pretext, SCAN and self-labeling steps, each citing the equation it implements."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


class NTXentLoss(nn.Module):
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, Eq. 1).

    For 2N projections (two views of N images), each view's positive is the other view of the same
    image and its 2N - 2 negatives are all other views in the batch:
    ``l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t)`` with cosine similarity ``s``,
    averaged over all 2N anchors.

    Args:
        temperature: t (SCAN official: 0.1).

    Shapes:
        ``z_a, z_b``: ``(N, D)`` projections (normalised inside); returns a scalar.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.shape != z_b.shape or z_a.dim() != 2:
            raise ValueError(
                f"expected two (N, D) tensors of one shape, got {z_a.shape}, {z_b.shape}"
            )
        n = z_a.shape[0]
        z = F.normalize(torch.cat([z_a, z_b]), dim=1)
        logits = z @ z.T / self.temperature
        logits.fill_diagonal_(float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)


class RotNetLoss(nn.Module):
    """RotNet pretext loss (Gidaris et al. 2018, Eq. 2): cross-entropy over the 4 rotations.

    Shapes: ``logits (B, 4)``, ``rotations (B,)`` in {0, 1, 2, 3}; returns a scalar.
    """

    def forward(self, logits: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != 4:
            raise ValueError(f"expected logits of shape (B, 4), got {tuple(logits.shape)}")
        return F.cross_entropy(logits, rotations)


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy ``-sum p log p`` along ``dim`` (natural log, 0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(EPS))).sum(dim=dim)


class SCANLoss(nn.Module):
    """The SCAN clustering loss (Van Gansbeke et al., ECCV 2020, Eq. 2).

    ``L = -1/|B| sum_X log <Phi(X), Phi(k)> - lambda * H(mean_X Phi(X))``: a consistency term that
    makes an anchor and its mined neighbour agree, and the entropy of the batch-mean cluster
    distribution (its negative, ``sum_c p_c log p_c``, weighted by lambda) that prevents collapse.

    Args:
        entropy_weight: lambda (official: 5.0).

    Shapes:
        ``anchor_logits, neighbor_logits``: ``(B, C)``.

    Returns:
        ``(total, consistency, entropy)`` scalars; ``total = consistency - lambda * entropy``.
    """

    def __init__(self, entropy_weight: float = 5.0) -> None:
        super().__init__()
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.entropy_weight = entropy_weight

    def forward(
        self, anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if anchor_logits.shape != neighbor_logits.shape or anchor_logits.dim() != 2:
            raise ValueError(
                f"expected two (B, C) logits of one shape, got {tuple(anchor_logits.shape)} "
                f"and {tuple(neighbor_logits.shape)}"
            )
        p_anchor = F.softmax(anchor_logits, dim=1)
        p_neighbor = F.softmax(neighbor_logits, dim=1)
        similarity = (p_anchor * p_neighbor).sum(dim=1)
        consistency = -torch.log(similarity.clamp_min(EPS)).mean()
        batch_entropy = entropy(p_anchor.mean(dim=0))
        total = consistency - self.entropy_weight * batch_entropy
        return total, consistency, batch_entropy


class ConfidenceBasedCE(nn.Module):
    """Self-labeling loss (SCAN §3.3): cross-entropy on confident pseudo-labels.

    Samples whose weak-view max probability exceeds ``threshold`` get their argmax as a label; the
    loss is the cross-entropy of the strong view's logits against those labels, with
    inverse-frequency class weights (``w_c = n_conf / (n_classes_present * n_c)``) so dominant
    clusters do not swallow the rest.

    Args:
        threshold: Confidence threshold (official 0.99).
        class_balance: Use inverse-frequency weights.

    Shapes:
        ``weak_logits, strong_logits``: ``(B, C)``.

    Returns:
        ``(loss, n_confident)``; raises ``ValueError`` if no sample passes the threshold.
    """

    def __init__(self, threshold: float = 0.99, class_balance: bool = True) -> None:
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.class_balance = class_balance

    def forward(
        self, weak_logits: torch.Tensor, strong_logits: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        probs = F.softmax(weak_logits.detach(), dim=1)
        confidence, target = probs.max(dim=1)
        mask = confidence > self.threshold
        n_confident = int(mask.sum())
        if n_confident == 0:
            raise ValueError(
                f"No sample in the batch has confidence above {self.threshold}; lower the "
                "self-labeling threshold or train the SCAN step longer."
            )
        target_masked = target[mask]
        weight = None
        if self.class_balance:
            num_classes = weak_logits.shape[1]
            counts = torch.bincount(target_masked, minlength=num_classes).float()
            present = counts > 0
            weight = torch.zeros(num_classes, device=weak_logits.device)
            weight[present] = n_confident / (present.sum() * counts[present])
        # reduction "mean" with weights divides by the summed weights of the targets
        loss = F.cross_entropy(strong_logits[mask], target_masked, weight=weight)
        return loss, n_confident

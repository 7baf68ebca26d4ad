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

    Reliable pseudo-labels fixed beforehand (SPICE, Niu et al. 2022, §3.3: labels that the
    image's neighbours agree with) can be passed as ``fixed_targets`` (``-1`` = none): they
    replace the weak view's argmax and count as confident whatever the weak view says.

    Shapes:
        ``weak_logits, strong_logits``: ``(B, C)``; ``fixed_targets``: ``(B,)`` int64.

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
        self,
        weak_logits: torch.Tensor,
        strong_logits: torch.Tensor,
        fixed_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        probs = F.softmax(weak_logits.detach(), dim=1)
        confidence, target = probs.max(dim=1)
        mask = confidence > self.threshold
        if fixed_targets is not None:  # reliable labels (>= 0) take precedence
            known = fixed_targets >= 0
            target = torch.where(known, fixed_targets, target)
            mask = mask | known
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


# ----------------------------------------------------------------------------- IIC, Han et al.
# and Super-AND: the losses of the second seed method (docs/architecture.md, 'The method').

#: IIC's clamp for probabilities before the log (official ``IID_loss``: ``sys.float_info.epsilon``).
IIC_EPS = 2.220446049250313e-16


def iic_joint(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """IIC's joint distribution of two views' cluster assignments (Ji et al. 2019, Eq. 3).

    ``P = sym(sum_i p(x_i) p(x'_i)^T)`` normalised to sum 1, where ``sym(A) = (A + A^T) / 2``.

    Shapes:
        ``probs_a, probs_b``: ``(B, C)`` probabilities; returns ``(C, C)``.
    """
    if probs_a.shape != probs_b.shape or probs_a.dim() != 2:
        raise ValueError(
            f"expected two (B, C) probability tensors of one shape, got {tuple(probs_a.shape)} "
            f"and {tuple(probs_b.shape)}"
        )
    joint = probs_a.T @ probs_b
    joint = (joint + joint.T) / 2
    return joint / joint.sum()


class IICLoss(nn.Module):
    """Invariant Information Clustering loss (Ji et al., ICCV 2019, Eq. 1 and 3), ``-I(z, z')``.

    With the joint ``P`` of a sample's and its augmentation's predictions (:func:`iic_joint`) and
    its marginals ``P_c``, ``P_c'``:
    ``L = -sum_cc' P_cc' (log P_cc' - lamb log P_c - lamb log P_c')``, i.e. the negative mutual
    information for ``lamb = 1`` (Han et al. 2020's ``L_assign``). As in the official ``IID_loss``,
    ``P_cc'``, ``P_c`` and ``P_c'`` are clamped from below at ``eps`` before the log (the marginals
    are taken before the clamp), so empty entries give no NaN and no gradient.

    Args:
        eps: Clamp before the log (official: ``sys.float_info.epsilon``).
        lamb: Weight of the marginal entropies (official IIC: 1.0; > 1 favours balanced clusters).

    Shapes:
        ``logits_a, logits_b``: ``(B, C)`` logits of the two views; returns a scalar
        (at least ``-log C``, reached by confident, consistent, balanced predictions).
    """

    def __init__(self, eps: float = IIC_EPS, lamb: float = 1.0) -> None:
        super().__init__()
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if lamb <= 0:
            raise ValueError(f"lamb must be positive, got {lamb}")
        self.eps, self.lamb = eps, lamb

    def from_joint(self, joint: torch.Tensor) -> torch.Tensor:
        """The loss of a ``(C, C)`` joint distribution (e.g. accumulated over a held-out set)."""
        if joint.dim() != 2 or joint.shape[0] != joint.shape[1]:
            raise ValueError(f"expected a square (C, C) joint, got {tuple(joint.shape)}")
        p_i = joint.sum(dim=1, keepdim=True).clamp_min(self.eps)
        p_j = joint.sum(dim=0, keepdim=True).clamp_min(self.eps)
        p_ij = joint.clamp_min(self.eps)
        return -(
            p_ij * (torch.log(p_ij) - self.lamb * torch.log(p_i) - self.lamb * torch.log(p_j))
        ).sum()

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        if logits_a.shape != logits_b.shape or logits_a.dim() != 2:
            raise ValueError(
                f"expected two (B, C) logits of one shape, got {tuple(logits_a.shape)} "
                f"and {tuple(logits_b.shape)}"
            )
        joint = iic_joint(F.softmax(logits_a, dim=1), F.softmax(logits_b, dim=1))
        return self.from_joint(joint)


class AUGLoss(nn.Module):
    """Augmentation-invariant loss of Super-AND (Han et al. 2020, arXiv:2002.12158, §3.3).

    The "invariant and spreading" instance loss (Ye et al., CVPR 2019, Eq. 4-6) on a batch of
    ``2B`` L2-normalised embeddings, ``B`` images in two augmented views. For each embedding
    ``f_i`` with the other view ``f_i'`` of its image, with the rest of the batch as negatives:
    ``P(j | i) = exp(f_j . f_i / t) / sum_{k != i} exp(f_k . f_i / t)`` and
    ``L = -1/(2B) sum_i [log P(i' | i) + sum_{j != i, i'} log(1 - P(j | i))]``
    (the second sum only with ``spread_negatives``). As in the official code the other
    embeddings ``f_j`` are detached (constants), so each row only moves its own ``f_i``.

    The official Super-AND code feeds this loss the L2-normalised memory-bank logits
    (``(2B, N)``); this class takes the embeddings, as in the paper, which costs ``O(B^2 D)``
    instead of ``O(B^2 N)``.

    Args:
        temperature: t (official: 0.1).
        spread_negatives: Include the ``log(1 - P(j | i))`` terms of the negatives (official).
            Without them this is an instance-discrimination cross-entropy over the batch.

    Shapes:
        ``z_a, z_b``: ``(B, D)`` embeddings of the two views (normalised inside); returns a scalar.
    """

    def __init__(self, temperature: float = 0.1, spread_negatives: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.spread_negatives = spread_negatives

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.shape != z_b.shape or z_a.dim() != 2 or z_a.shape[0] < 2:
            raise ValueError(
                f"expected two (B, D) tensors of one shape with B >= 2, got {tuple(z_a.shape)} "
                f"and {tuple(z_b.shape)}"
            )
        n = z_a.shape[0]
        z = F.normalize(torch.cat([z_a, z_b]), dim=1)
        logits = z @ z.detach().T / self.temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log P(j | i)
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        rows = torch.arange(2 * n, device=z.device)
        loss = -log_p[rows, partner]
        if self.spread_negatives:
            negative = ~self_mask
            negative[rows, partner] = False
            log_not = torch.log1p(-log_p.exp().clamp(max=1 - 1e-7))
            loss = loss - (log_not * negative).sum(dim=1)
        return loss.mean()


class ConsistencyPreservingLoss(AUGLoss):
    """Consistency-preserving loss ``L_cp`` of Han et al., ECCV 2020 ("Mitigating Embedding and
    Class Assignment Mismatch", §3.2).

    Instance discrimination on the embedding during class assignment: the augmented view must
    identify its own source image among the batch, with temperature 0.1, so that the embedding
    learnt in stage 1 is not destroyed by the clustering loss. The official code computes it with
    the same criterion as Super-AND's augmentation loss (:class:`AUGLoss`, with the spreading
    negative terms), on the L2-normalised 128-d embedding of both views.

    Args:
        temperature: tau (official: 0.1).
        spread_negatives: Include the negatives' ``log(1 - P)`` terms (official).

    Shapes:
        ``z_a, z_b``: ``(B, D)`` embeddings of the two views; returns a scalar.
    """


class ANDLoss(nn.Module):
    """Neighbourhood loss of AND (Huang et al., ICML 2019, Eq. 4-5), as used by Super-AND.

    Over the non-parametric classifier ``p(j | i) = softmax_j(f_i . m_j / t)`` (logits against
    the memory bank ``m``), an instance sample must pick itself and an anchor sample its
    discovered neighbourhood ``N(i)`` (itself included):
    ``L = -mean_i log sum_{j in {i} + N(i)} p(j | i)``.

    Shapes:
        ``logits``: ``(B, N)`` memory logits; ``indices``: ``(B,)`` each row's own memory index;
        ``neighbours``: ``(B, K)`` memory indices of each row's neighbourhood, ``-1`` for none
        (instance samples have all ``-1``). Returns a scalar.
    """

    def forward(
        self, logits: torch.Tensor, indices: torch.Tensor, neighbours: torch.Tensor
    ) -> torch.Tensor:
        if logits.dim() != 2 or indices.shape != (logits.shape[0],):
            raise ValueError(
                f"expected logits (B, N) and indices (B,), got {tuple(logits.shape)} and "
                f"{tuple(indices.shape)}"
            )
        if neighbours.dim() != 2 or neighbours.shape[0] != logits.shape[0]:
            raise ValueError(f"expected neighbours (B, K), got {tuple(neighbours.shape)}")
        chosen = torch.cat([indices.view(-1, 1), neighbours], dim=1)
        picked = logits.gather(1, chosen.clamp_min(0)).masked_fill(chosen < 0, float("-inf"))
        log_p = torch.logsumexp(picked, dim=1) - torch.logsumexp(logits, dim=1)
        return -log_p.mean()


class UELoss(nn.Module):
    """Unification entropy loss of Super-AND (Han et al. 2020, arXiv:2002.12158, §3.2).

    The entropy of each sample's non-parametric class distribution over the *other* instances,
    ``L = mean_i H(softmax(logits_i))`` with the sample's own memory logit replaced by
    ``self_logit`` (official: -10, the cosine -1 at temperature 0.1). Minimising it makes each
    sample concentrate on a few similar instances, gathering neighbours in low-density space.
    Super-AND weights it with ``w(t)`` rising from 0 (see :mod:`scan_core.superand`).

    Args:
        self_logit: Value the own-instance logit is replaced with; ``None`` keeps it.

    Shapes:
        ``logits``: ``(B, N)`` memory logits; ``indices``: ``(B,)`` own memory indices;
        returns a scalar.
    """

    def __init__(self, self_logit: float | None = -10.0) -> None:
        super().__init__()
        self.self_logit = self_logit

    def forward(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or indices.shape != (logits.shape[0],):
            raise ValueError(
                f"expected logits (B, N) and indices (B,), got {tuple(logits.shape)} and "
                f"{tuple(indices.shape)}"
            )
        if self.self_logit is not None:
            logits = logits.scatter(1, indices.view(-1, 1), self.self_logit)
        log_p = F.log_softmax(logits, dim=1)
        return -(log_p.exp() * log_p).sum(dim=1).mean()

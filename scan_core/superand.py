"""Super-AND pretext training (Han et al. 2020, arXiv:2002.12158), stage 1 of the two-stage method.

Super-AND ("A Comprehensive Approach to Unsupervised Embedding Learning based on AND Algorithm")
extends AND (Huang et al., ICML 2019, "Unsupervised Deep Learning by Neighbourhood Discovery").
An embedding network (backbone -> linear -> 128-d unit sphere, :class:`EmbeddingHead`) is
trained against a memory bank holding one slowly updated embedding per image (Wu et al. 2018's
non-parametric classifier, temperature 0.1, momentum 0.5) with three losses
(official ``Criterion`` + ``UELoss``, Han et al. ECCV 2020 ``super_and.py``):

* :class:`~scan_core.losses.ANDLoss`: an instance picks its own memory slot; an *anchor* picks
  its discovered neighbourhood (itself + its nearest neighbour in memory).
* :class:`~scan_core.losses.AUGLoss`: two augmented views of an image identify each other
  within the batch (invariance to augmentation, spreading of instances).
* :class:`~scan_core.losses.UELoss` weighted by ``w(t)``: the entropy of each sample's
  distribution over the other instances, pulling similar samples together.

Training runs in rounds (official: 5 rounds of 200 epochs). Before every round but the first,
anchor neighbourhoods are rediscovered from the memory bank: the ``anchor_rate * round`` fraction
of samples whose similarity distribution over the memory has the lowest entropy become anchors,
each with its ``neighbourhood_size`` most similar other samples (official: 25% per round, 1
neighbour) -- AND's curriculum. Inside each round, the official code keeps the learning rate for
80 epochs, then divides it by 10 every 40 epochs, and sets ``w(t) = 0.2 * (epoch // 80)``; both
restart every round. :func:`superand_schedule` scales these to the configured epochs per round
(the same 40% / 20% fractions of the round), so that 200 epochs per round reproduce the official
schedule exactly.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from scan_core.config import SuperANDConfig
from scan_core.losses import ANDLoss, AUGLoss, UELoss
from scan_core.models import EmbeddingHead, PretextModel, build_backbone
from scan_core.pretext import PretextResult, pretext_setup
from scan_core.training import (
    EpochTimer,
    ProgressCallback,
    autocast,
    iterate_batches,
    set_lr,
)

logger = logging.getLogger(__name__)


class MemoryBank:
    """The non-parametric classifier of Wu et al. (CVPR 2018, Eq. 2-3) used by AND/Super-AND.

    Holds one L2-normalised embedding per image, ``memory (N, D)``. :meth:`logits` scores a batch
    of embeddings against every slot (``f . m_j / t``; the memory is a constant for the gradient);
    :meth:`update` moves the slots of a batch towards its new embeddings,
    ``m_i <- normalise(momentum * m_i + (1 - momentum) * f_i)``.

    Args:
        size: N, the number of images.
        dim: D, the embedding size.
        temperature: t (official 0.1).
        momentum: Memory momentum (official 0.5).
        generator: Seeds the random unit-vector initialisation.
        device: Where the memory lives.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        temperature: float = 0.1,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if size < 2 or dim < 1:
            raise ValueError(f"memory needs size >= 2 and dim >= 1, got {size}, {dim}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.temperature, self.momentum = temperature, momentum
        self.memory = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` embeddings -> ``(B, N)`` logits against the (constant) memory."""
        return z @ self.memory.T / self.temperature

    @torch.no_grad()
    def update(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """Momentum update of the slots ``indices (B,)`` with embeddings ``z (B, D)``."""
        mixed = self.momentum * self.memory[indices] + (1 - self.momentum) * z.detach()
        self.memory[indices] = F.normalize(mixed, dim=1)


@torch.no_grad()
def discover_neighbourhoods(
    memory: torch.Tensor,
    num_anchors: int,
    size: int = 1,
    temperature: float = 0.1,
    batch_size: int = 1024,
) -> torch.Tensor:
    """AND's anchor-neighbourhood discovery (Huang et al. 2019, §3.1-3.2; official ANsDiscovery).

    Each sample's entropy ``H(softmax(m_i . M / t))`` over the memory bank (self-similarity
    included, as in the official code) measures how ambiguous its neighbourhood is; the
    ``num_anchors`` samples of lowest entropy become anchors, each with its ``size`` most
    similar other samples as neighbourhood.

    Args:
        memory: ``(N, D)`` L2-normalised memory bank.
        num_anchors: How many anchors to select (0 gives none).
        size: Neighbours per anchor (official 1).
        temperature: t of the similarity softmax (official 0.1).
        batch_size: Rows of the ``N x N`` similarity computed at once.

    Returns:
        ``neighbours (N, size)`` long: memory indices of each anchor's neighbours, ``-1`` rows
        for the non-anchor (instance) samples.
    """
    n = memory.shape[0]
    if not 0 <= num_anchors <= n:
        raise ValueError(f"num_anchors must be between 0 and {n}, got {num_anchors}")
    if not 1 <= size < n:
        raise ValueError(f"neighbourhood size must be between 1 and {n - 1}, got {size}")
    entropy = torch.empty(n, dtype=memory.dtype, device=memory.device)
    nearest = torch.empty(n, size, dtype=torch.long, device=memory.device)
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n), device=memory.device)
        sims = memory[rows] @ memory.T
        log_p = F.log_softmax(sims / temperature, dim=1)
        entropy[rows] = -(log_p.exp() * log_p).sum(dim=1)
        sims[torch.arange(len(rows)), rows] = float("-inf")
        nearest[rows] = sims.topk(size, dim=1).indices
    neighbours = torch.full((n, size), -1, dtype=torch.long, device=memory.device)
    if num_anchors > 0:
        anchors = entropy.topk(num_anchors, largest=False).indices
        neighbours[anchors] = nearest[anchors]
    return neighbours


def superand_schedule(
    epoch: int, epochs_per_round: int, ue_weight: float = 0.2, warmup_fraction: float = 0.4
) -> tuple[float, float]:
    """Learning-rate factor and UE weight ``w(t)`` at 0-based ``epoch`` of a round.

    Official (200 epochs per round): ``w(t) = 0.2 * (epoch // 80)``; the learning rate is kept
    until epoch 120 and then divided by 10 every 40 epochs (``lr * 0.1 ** ((epoch - 80) // 40)``
    from epoch 80). Scaled here with ``step = round(0.4 * epochs_per_round)`` (80 of 200) and
    ``decay = round(0.2 * epochs_per_round)`` (40 of 200), each at least 1:
    ``w = ue_weight * (epoch // step)``, ``lr factor = 0.1 ** max(0, (epoch - step) // decay)``.
    """
    if epochs_per_round < 1 or not 0 <= epoch < epochs_per_round:
        raise ValueError(f"epoch must be in [0, {epochs_per_round}), got {epoch}")
    step = max(1, round(warmup_fraction * epochs_per_round))
    decay = max(1, round(warmup_fraction / 2 * epochs_per_round))
    weight = ue_weight * (epoch // step)
    lr_factor = 0.1 ** max(0, (epoch - step) // decay)
    return lr_factor, weight


def build_superand_model(config: SuperANDConfig, in_channels: int) -> PretextModel:
    """The Super-AND embedding network: backbone + :class:`EmbeddingHead` (the embedding)."""
    backbone = build_backbone(config.backbone, in_channels)
    return PretextModel(backbone, EmbeddingHead(backbone.out_dim, config.feature_dim))


def train_superand(
    images: torch.Tensor,
    config: SuperANDConfig,
    progress: ProgressCallback | None = None,
) -> PretextResult:
    """Train a Super-AND embedding on uint8 images ``(N, C, H, W)``.

    Every step takes two :class:`SimCLRTransform` views of a batch (official: RandomResizedCrop
    0.2-1, ColorJitter 0.4, grayscale 0.2, flip), embeds both (``(2B, 128)``, unit norm) and
    minimises ``ANDLoss + AUGLoss + w(t) * UELoss`` (official ``super_and.py``), then updates the
    memory slots of the batch with the mean of the two views' embeddings (the official code
    writes both views into the same slot, one of which wins). SGD with Nesterov momentum; the
    learning rate and ``w(t)`` follow :func:`superand_schedule` within each of ``config.rounds``
    rounds of ``config.epochs // config.rounds`` epochs, and neighbourhoods are rediscovered
    before every round after the first (:func:`discover_neighbourhoods`).

    Returns:
        A :class:`PretextResult` whose model is backbone + :class:`EmbeddingHead` (the 128-d
        embedding to mine neighbours on: ``compute_embeddings(model, images, use_head=True)``).
        Epoch reports carry ``loss``, ``and``, ``aug``, ``ue``, ``ue_weight``, ``lr``,
        ``round`` and ``anchors`` (fraction of samples that are anchors).
    """
    n = images.shape[0]
    setup = pretext_setup(images, config, "Super-AND", minimum=3)
    device, dtype, generator = setup.device, setup.dtype, setup.generator
    model = build_superand_model(config, images.shape[1]).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )
    bank = MemoryBank(
        n,
        config.feature_dim,
        temperature=config.temperature,
        momentum=config.memory_momentum,
        generator=generator,
        device=device,
    )
    augment = setup.views
    and_loss, aug_loss = ANDLoss(), AUGLoss(config.temperature)
    ue_loss = UELoss(self_logit=-1.0 / config.temperature)
    neighbours = torch.full((n, config.neighbourhood_size), -1, dtype=torch.long, device=device)
    batch_size = setup.batch_size
    per_round = config.epochs // config.rounds
    epochs = per_round * config.rounds
    timer = EpochTimer("pretext", epochs, progress)
    for round_ in range(config.rounds):
        if round_ > 0:
            num_anchors = min(n, math.floor(n * config.anchor_rate * round_))
            neighbours = discover_neighbourhoods(
                bank.memory, num_anchors, config.neighbourhood_size, config.temperature
            )
            logger.info("super-AND round %d: %d anchors", round_ + 1, num_anchors)
        anchor_fraction = float((neighbours[:, 0] >= 0).float().mean())
        for epoch in range(per_round):
            timer.start()
            lr_factor, ue_weight = superand_schedule(
                epoch, per_round, config.ue_weight, config.ue_warmup_fraction
            )
            lr = config.lr * lr_factor
            set_lr(optimizer, lr)
            model.train()
            sums, steps = np.zeros(4), 0
            for idx in iterate_batches(n, batch_size, generator):
                x = images[idx].to(device, non_blocking=True)
                views = torch.cat([augment(x, generator), augment(x, generator)])
                with autocast(device, dtype):
                    z = model(views.contiguous(memory_format=torch.channels_last)).float()
                b = len(idx)
                own = torch.cat([idx, idx]).to(device)
                logits = bank.logits(z)
                l_and = and_loss(logits, own, neighbours[own])
                l_aug = aug_loss(z[:b], z[b:])
                loss = l_and + l_aug
                l_ue = torch.zeros((), device=device)
                if ue_weight > 0:
                    l_ue = ue_loss(logits, own)
                    loss = loss + ue_weight * l_ue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bank.update(idx.to(device), (z[:b] + z[b:]).detach() / 2)
                sums += [float(t.detach()) for t in (loss, l_and, l_aug, l_ue)]
                steps += 1
            mean = sums / max(steps, 1)
            timer.done(
                round_ * per_round + epoch + 1,
                {
                    "loss": mean[0],
                    "and": mean[1],
                    "aug": mean[2],
                    "ue": mean[3],
                    "ue_weight": ue_weight,
                    "lr": lr,
                    "round": float(round_ + 1),
                    "anchors": anchor_fraction,
                },
            )
    model.eval()
    return PretextResult(
        model=model.cpu().to(memory_format=torch.contiguous_format), history=timer.history
    )

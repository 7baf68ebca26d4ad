"""BYOL pretext training (Grill et al. 2020, "Bootstrap Your Own Latent", arXiv:2006.07733).

An *online* network (backbone -> projector -> predictor) learns to predict, from one view of an
image, the projection of another view made by a *target* network (backbone -> projector) whose
weights are an exponential moving average of the online ones. There are no negative pairs:

* loss: ``2 - 2 cos(q_online(v1), z_target(v2))``, symmetrised over the two views (paper Eq. 2);
* target update after every step: ``xi <- tau xi + (1 - tau) theta``, with
  ``tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` rising from ``tau_base`` to 1 over the
  ``K`` steps of training (paper §3.2);
* projector and predictor: ``Linear -> BatchNorm -> ReLU -> Linear`` (paper §3.3: 4096 hidden
  units, 256 outputs; ``byol.hidden_dim`` and ``pretext.feature_dim`` here).

The saved model is the online backbone with its projector; like the paper's evaluation, the
embedding the pipeline mines neighbours on is the backbone's output (``embeds_with_head`` false).
The views and the optimiser are the pretext section's (SimCLR's augmentation, SGD with momentum
and a cosine schedule); the paper used LARS at ``0.2 x batch / 256`` with weight decay 1.5e-6 for
1000 epochs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from scan_core.config import BYOLConfig
from scan_core.models import PretextModel, build_backbone
from scan_core.pretext import PretextResult, pretext_setup
from scan_core.training import (
    EpochTimer,
    ProgressCallback,
    autocast,
    cosine_lr,
    iterate_batches,
    set_lr,
)


class BYOLMLP(nn.Module):
    """BYOL's projector / predictor: ``Linear -> BatchNorm1d -> ReLU -> Linear`` (unnormalised)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def build_byol_model(config: BYOLConfig, in_channels: int) -> PretextModel:
    """The saved BYOL network: backbone + projector; embeddings are the backbone's."""
    backbone = build_backbone(config.backbone, in_channels)
    projector = BYOLMLP(backbone.out_dim, config.hidden_dim, config.feature_dim)
    return PretextModel(backbone, projector, embeds_with_head=False)


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``2 - 2 cos(prediction, target)`` over the batch (the target carries no gradient)."""
    p = F.normalize(prediction, dim=1)
    z = F.normalize(target.detach(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def target_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's ``tau`` at ``step`` of ``total_steps``: ``base`` at the start, 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- tau target + (1 - tau) online`` for parameters; buffers are copied."""
    for param, source in zip(target.parameters(), online.parameters(), strict=True):
        param.mul_(tau).add_(source.detach(), alpha=1 - tau)
    for buffer, value in zip(target.buffers(), online.buffers(), strict=True):
        buffer.copy_(value)


def train_byol(
    images: torch.Tensor, config: BYOLConfig, progress: ProgressCallback | None = None
) -> PretextResult:
    """Train BYOL on uint8 images ``(N, C, H, W)``; returns backbone + projector (online)."""
    setup = pretext_setup(images, config, "BYOL")
    device, dtype, generator = setup.device, setup.dtype, setup.generator
    online = build_byol_model(config, images.shape[1]).to(device)
    online = online.to(memory_format=torch.channels_last)
    predictor = BYOLMLP(config.feature_dim, config.hidden_dim, config.feature_dim).to(device)
    target = copy.deepcopy(online).requires_grad_(False)
    params = [*online.parameters(), *predictor.parameters()]
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    batch_size, augment = setup.batch_size, setup.views
    steps_per_epoch = math.ceil(images.shape[0] / batch_size)
    total_steps, step = config.epochs * steps_per_epoch, 0
    timer = EpochTimer("pretext", config.epochs, progress)
    for epoch in range(config.epochs):
        timer.start()
        lr = cosine_lr(config.lr, epoch, config.epochs)
        set_lr(optimizer, lr)
        online.train(), predictor.train(), target.train()
        total, count, tau = 0.0, 0, config.target_momentum
        for idx in iterate_batches(images.shape[0], batch_size, generator):
            x = images[idx].to(device, non_blocking=True)
            views = torch.cat([augment(x, generator), augment(x, generator)])
            views = views.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                q = predictor(online(views)).float()
                with torch.no_grad():
                    z = target(views).float()
            b = len(idx)
            loss = byol_loss(q[:b], z[b:]) + byol_loss(q[b:], z[:b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tau = target_momentum(config.target_momentum, step, total_steps)
            update_target(target, online, tau)
            total += float(loss.detach())
            count += 1
            step += 1
        timer.done(epoch + 1, {"loss": total / max(count, 1), "lr": lr, "tau": tau})
    online.eval()
    return PretextResult(
        model=online.cpu().to(memory_format=torch.contiguous_format), history=timer.history
    )

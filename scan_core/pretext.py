"""Pretext training (SCAN step 1): SimCLR by default, RotNet as the paper's alternative."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from scan_core.config import PretextConfig, PretextTraining, resolve_device, resolve_precision
from scan_core.losses import NTXentLoss, RotNetLoss
from scan_core.models import PretextModel, RotNetHead, SimCLRProjectionHead, build_backbone
from scan_core.training import (
    EpochLog,
    EpochTimer,
    ProgressCallback,
    autocast,
    cosine_lr,
    iterate_batches,
    seed_everything,
    set_lr,
)
from scan_core.transforms import WeakTransform, pretext_view

logger = logging.getLogger(__name__)


@dataclass
class PretextResult:
    """The trained pretext model and its per-epoch history."""

    model: PretextModel
    history: list[EpochLog]


def build_pretext_model(config: PretextConfig, in_channels: int) -> PretextModel:
    """A randomly initialised pretext model (backbone + SimCLR or RotNet head) for ``config``;
    RotNet's embedding is the backbone's."""
    backbone = build_backbone(config.backbone, in_channels)
    if config.method == "simclr":
        return PretextModel(backbone, SimCLRProjectionHead(backbone.out_dim, config.feature_dim))
    return PretextModel(backbone, RotNetHead(backbone.out_dim), embeds_with_head=False)


@dataclass(frozen=True)
class PretextSetup:
    """What every pretext trainer starts from: the device and autocast dtype, the seeded
    generator, the augmented views of ``config.augment`` and the batch size."""

    device: str
    dtype: torch.dtype | None
    generator: torch.Generator
    views: nn.Module
    batch_size: int


def pretext_setup(
    images: torch.Tensor, config: PretextTraining, method: str, minimum: int = 2
) -> PretextSetup:
    """Check uint8 images ``(N, C, H, W)`` (at least ``minimum``), seed everything, and make the
    views. The trainer builds its network after this call (the seed covers its initialisation).

    Raises:
        ValueError: not uint8 4-D images, or too few of them for ``method``.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] < minimum:
        raise ValueError(
            f"{method} training needs at least {minimum} images, got {images.shape[0]}"
        )
    device = resolve_device(config.device)
    views = pretext_view(
        config.augment,
        min(images.shape[2:]),
        config.view_scale,
        config.crop_scale_min,
        config.color_jitter,
    )
    return PretextSetup(
        device=device,
        dtype=resolve_precision(config.precision, device),
        generator=seed_everything(config.seed),
        views=views,
        batch_size=min(config.batch_size, images.shape[0]),
    )


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the 0/90/180/270-degree rotations: ``(B, C, H, W)`` -> ``(4B, ...)`` and labels."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def train_pretext(
    images: torch.Tensor,
    config: PretextConfig,
    progress: ProgressCallback | None = None,
) -> PretextResult:
    """Train the pretext model on uint8 images ``(N, C, H, W)``.

    SimCLR: two views per image (``config.augment``: :class:`SimCLRTransform` or
    :class:`ShapeTransform`, rendered at ``config.view_scale`` of the image size), NT-Xent loss.
    RotNet: a weakly augmented image in its four rotations, cross-entropy on the rotation.
    SGD with momentum and a cosine schedule (official settings in :class:`PretextConfig`).
    """
    setup = pretext_setup(images, config, "pretext")
    device, dtype, generator = setup.device, setup.dtype, setup.generator
    model = build_pretext_model(config, images.shape[1]).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    batch_size, simclr = setup.batch_size, setup.views
    weak = WeakTransform()
    ntxent, rotnet = NTXentLoss(config.temperature), RotNetLoss()
    timer = EpochTimer("pretext", config.epochs, progress)
    for epoch in range(config.epochs):
        timer.start()
        lr = cosine_lr(config.lr, epoch, config.epochs)
        set_lr(optimizer, lr)
        model.train()
        total, steps = 0.0, 0
        for idx in iterate_batches(images.shape[0], batch_size, generator):
            x = images[idx].to(device, non_blocking=True)
            if config.method == "simclr":
                views = torch.cat([simclr(x, generator), simclr(x, generator)])
                with autocast(device, dtype):
                    z = model(views.contiguous(memory_format=torch.channels_last)).float()
                loss = ntxent(z[: len(idx)], z[len(idx) :])
            else:
                rotated, labels = rotate_batch(weak(x, generator))
                with autocast(device, dtype):
                    logits = model(rotated.contiguous(memory_format=torch.channels_last)).float()
                loss = rotnet(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
        timer.done(epoch + 1, {"loss": total / max(steps, 1), "lr": lr})
    model.eval()
    return PretextResult(
        model=model.cpu().to(memory_format=torch.contiguous_format), history=timer.history
    )

"""Invariant Information Clustering on its authors' recipe (Ji et al., ICCV 2019; official code
``xu-ji/IIC``), on the pretext backbone (docs/architecture.md, 'The method').

IIC maximises the mutual information between the cluster predictions of an image's two views
(:class:`~scan_core.losses.IICLoss`). What its authors ran, and what :func:`train_iic` does:

- **Light and heavy views.** Each image's light view (a crop of the evaluation view's size,
  centred or shifted) is paired with ``repeats`` heavy views (smaller or larger crops, rotation,
  colour jitter): :class:`~scan_core.transforms.IICView`, :func:`iic_views`. The light view's
  predictions are computed once and paired with every heavy copy.
- **Two heads, alternated.** Each epoch makes ``main_passes`` passes over the data with the main
  head (``num_clusters`` outputs, ``num_heads`` sub-heads), then ``overcluster_passes`` with an
  overclustering head (``overcluster_factor`` times the clusters). The overclustering head only
  shapes the shared network and is discarded.
- **Adam at a constant rate** (official 1e-4; 1e-3 by default here, for a far shorter
  schedule), no weight decay.

The sub-head with the lowest held-out IIC loss is kept; every sub-head's held-out loss, training
loss and smallest cluster share are reported each epoch (:func:`scan_core.clustering.head_report`).
The result is a :class:`~scan_core.clustering.ScanResult` with a plain
:class:`~scan_core.models.ClusteringModel` (backbone + one linear head), so prediction and the
rest of the pipeline treat it as any other clustering model.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn

from scan_core.clustering import ScanResult, ValidationProbe, head_report, split_validation
from scan_core.config import IICConfig, resolve_device, resolve_precision
from scan_core.losses import IICLoss
from scan_core.models import Backbone, ClusterHeads, ClusteringModel
from scan_core.training import (
    EpochTimer,
    ProgressCallback,
    autocast,
    iterate_batches,
    seed_everything,
)
from scan_core.transforms import IICView
from scan_core.twostage import check_assignment_inputs, iic_validation_losses

logger = logging.getLogger(__name__)


def iic_views(config: IICConfig) -> tuple[IICView, IICView]:
    """The light and the heavy view of ``config``."""
    light = IICView(scales=(1.0,), context=config.context, centre_p=config.light_centre_p)
    heavy = IICView(
        scales=config.heavy_scales,
        context=config.context,
        rotation=config.rotation,
        rotation_p=config.rotation_p,
        flip_p=config.flip_p,
        jitter=config.jitter,
        hue=config.hue,
    )
    return light, heavy


def iic_step_loss(
    backbone: nn.Module,
    heads: nn.Module,
    light: torch.Tensor,
    heavy: torch.Tensor,
    criterion: IICLoss,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The IIC loss of every sub-head ``(H,)`` for one batch.

    Args:
        backbone: Images -> features.
        heads: Features -> logits ``(H, B, C)``.
        light: ``(B, C, H, W)`` light views.
        heavy: ``(R * B, C, H, W)`` heavy views; copy ``r`` of image ``i`` at ``r * B + i``.
        criterion: The IIC loss.
        dtype: Autocast dtype (None: float32).
    """
    b = light.shape[0]
    if heavy.shape[0] % b:
        raise ValueError(f"{heavy.shape[0]} heavy views do not repeat {b} light views")
    repeats = heavy.shape[0] // b
    views = torch.cat([light, heavy]).contiguous(memory_format=torch.channels_last)
    with autocast(str(views.device), dtype):
        logits = heads(backbone(views)).float()  # (H, (1 + R) B, C)
    paired = logits[:, :b].repeat(1, repeats, 1)
    return torch.stack([criterion(a, h) for a, h in zip(paired, logits[:, b:], strict=True)])


def train_iic(
    images: torch.Tensor,
    backbone: Backbone,
    config: IICConfig,
    progress: ProgressCallback | None = None,
    *,
    probe: ValidationProbe | None = None,
) -> ScanResult:
    """Train IIC on uint8 images from a copy of ``backbone`` (never modified).

    Per epoch: ``config.main_passes`` passes with the main sub-heads, then
    ``config.overcluster_passes`` with the overclustering sub-heads (none when
    ``overcluster_factor`` is 0). Each step takes ``batch_size`` images, one light view each and
    ``repeats`` heavy views, and minimises the IIC loss averaged over the sub-heads.

    Args:
        images: uint8 ``(N, C, H, W)``.
        backbone: The pretext backbone.
        config: Settings (official values in :class:`~scan_core.config.IICConfig`).
        progress: Called after every epoch.
        probe: Optional ``(val_indices, val_predictions) -> metrics``, called for every sub-head
            after each epoch.

    Returns:
        A :class:`ScanResult` (best sub-head kept); ``head_losses`` are held-out IIC losses
        between the light and the heavy view.
    """
    check_assignment_inputs(images, config.num_clusters)
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    generator = seed_everything(config.seed)
    model = ClusteringModel(copy.deepcopy(backbone), config.num_clusters, config.num_heads)
    dim = model.backbone.out_dim
    over = ClusterHeads(dim, config.overcluster, config.num_heads) if config.overcluster else None
    passes: list[nn.Module] = [model.cluster_heads] * config.main_passes
    if over is not None:
        passes += [over] * config.overcluster_passes
    modules = nn.ModuleList([model] + ([over] if over is not None else []))
    modules.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        modules.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    light_view, heavy_view = iic_views(config)
    criterion = IICLoss()
    train_idx, val_idx = split_validation(images.shape[0], config.val_fraction, generator)
    batch_size = min(config.batch_size, len(train_idx))
    timer = EpochTimer("iic", config.epochs, progress)
    head_losses: list[float] = []
    for epoch in range(config.epochs):
        timer.start()
        model.train()
        sums = {id(model.cluster_heads): np.zeros(config.num_heads)}
        if over is not None:
            sums[id(over)] = np.zeros(config.num_heads)
        steps = dict.fromkeys(sums, 0)
        for heads in passes:
            for batch in iterate_batches(len(train_idx), batch_size, generator):
                x = images[torch.as_tensor(train_idx)[batch]].to(device, non_blocking=True)
                light = light_view(x, generator)
                heavy = heavy_view(x.repeat(config.repeats, 1, 1, 1), generator)
                per_head = iic_step_loss(model.backbone, heads, light, heavy, criterion, dtype)
                optimizer.zero_grad(set_to_none=True)
                per_head.mean().backward()
                optimizer.step()
                sums[id(heads)] += per_head.detach().cpu().numpy()
                steps[id(heads)] += 1
        train_losses = sums[id(model.cluster_heads)] / max(steps[id(model.cluster_heads)], 1)
        metrics = {"loss": float(train_losses.mean())}
        if over is not None:
            metrics["overcluster_loss"] = float((sums[id(over)] / max(steps[id(over)], 1)).mean())
        head_losses, val_pred = iic_validation_losses(
            model,
            images,
            val_idx,
            light_view,
            criterion,
            device,
            seed=config.seed + 1,
            second=heavy_view,
        )
        metrics.update(
            head_report(
                head_losses, val_pred, config.num_clusters, train_losses.tolist(), probe, val_idx
            )
        )
        timer.done(epoch + 1, metrics)
    return ScanResult.keep_best(model, head_losses, timer.history, val_idx)

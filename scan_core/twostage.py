"""Class assignment by mutual information: Han et al.'s stage 2 (docs/architecture.md,
'The method'); IIC on its own recipe is :mod:`scan_core.iic`.

``twostage`` is stage 2 of Han et al., ECCV 2020 ("Mitigating Embedding and Class
Assignment Mismatch in Unsupervised Image Classification"; official code ``main.py``): the
pretrained network up to its L2-normalised 128-d embedding is refined while Norm-FC sub-heads
(:class:`~scan_core.models.NormFCHead`, ``tau_c = 0.1``, random and frozen in the official code)
assign classes, minimising

    ``L = mean_h L_assign(head h) + lambda * L_cp``  (official lambda = 1.0, 5 sub-heads)

with ``L_assign`` the IIC loss on the two augmented views' predictions
(:class:`~scan_core.losses.IICLoss`) and ``L_cp`` the consistency-preserving instance loss on the
embedding (:class:`~scan_core.losses.ConsistencyPreservingLoss`, tau 0.1).

It returns a :class:`~scan_core.clustering.ScanResult` whose model is a plain
:class:`~scan_core.models.ClusteringModel` (its backbone is the pretext backbone followed by the
embedding head, :class:`EmbeddingBackbone`), so prediction
(:func:`scan_core.inference.predict_probabilities`) and self-labeling work unchanged. As in
:func:`scan_core.clustering.train_scan`, a random ``config.val_fraction`` of the images is held
out and the sub-head with the lowest held-out IIC loss is kept.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scan_core.clustering import ScanResult, ValidationProbe, head_report, split_validation
from scan_core.config import TwoStageConfig, resolve_device
from scan_core.losses import ConsistencyPreservingLoss, IICLoss
from scan_core.models import Backbone, ClusteringModel, EmbeddingHead, NormFCHead
from scan_core.training import (
    EpochTimer,
    ProgressCallback,
    cosine_lr,
    iterate_batches,
    seed_everything,
    set_lr,
)
from scan_core.transforms import IdentityTransform, SimCLRTransform

logger = logging.getLogger(__name__)


class EmbeddingBackbone(Backbone):
    """A backbone followed by an embedding head (e.g. the pretext model's), as one backbone.

    Shapes:
        images ``(B, C, H, W)`` -> ``(B, out_dim)`` L2-normalised embeddings, ``out_dim`` being
        the head's output size.
    """

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        device = next(iter(head.parameters()), torch.zeros(0)).device
        with torch.no_grad():
            self.out_dim = int(head(torch.zeros(1, backbone.out_dim, device=device)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def build_assignment_model(
    backbone: Backbone,
    config: TwoStageConfig,
    embedding_head: nn.Module | None = None,
) -> ClusteringModel:
    """The network to train: ``EmbeddingBackbone(backbone, embedding_head)`` (copies) +
    :class:`NormFCHead` (frozen when ``config.freeze_heads``); a fresh :class:`EmbeddingHead` to
    ``config.feature_dim`` when no head is given."""
    head = (
        copy.deepcopy(embedding_head)
        if embedding_head is not None
        else EmbeddingHead(backbone.out_dim, config.feature_dim)
    )
    net = EmbeddingBackbone(copy.deepcopy(backbone), head)
    model = ClusteringModel(net, config.num_clusters, config.num_heads)
    model.cluster_heads = NormFCHead(
        net.out_dim,
        config.num_clusters,
        config.num_heads,
        config.head_temperature,
        config.head_norm_axis,
    )
    if config.freeze_heads:
        model.cluster_heads.requires_grad_(False)
    return model


def iic_validation_losses(
    model: ClusteringModel,
    images: torch.Tensor,
    val_indices: np.ndarray,
    augment: nn.Module,
    criterion: IICLoss,
    device: str,
    seed: int,
    batch_size: int = 1024,
    second: nn.Module | None = None,
) -> tuple[list[float], np.ndarray]:
    """IIC loss per head on held-out images, and their argmax predictions ``(H, n_val)``.

    The joint distribution is accumulated over the whole held-out set from two augmented views
    (``augment`` and ``second``, default ``augment`` again) drawn with a generator seeded by
    ``seed`` (the same views every epoch, so the losses of different epochs and heads are
    comparable); predictions use the un-augmented images.
    """
    other = second if second is not None else augment
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    identity = IdentityTransform()
    joints: torch.Tensor | None = None
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(val_indices), batch_size):
            idx = torch.as_tensor(val_indices[start : start + batch_size])
            x = images[idx].to(device)
            n = len(idx)
            views = torch.cat([augment(x, generator), other(x, generator), identity(x)])
            probs = F.softmax(model(views.contiguous(memory_format=torch.channels_last)), dim=2)
            batch_joint = probs[:, :n].transpose(1, 2) @ probs[:, n : 2 * n]  # (H, C, C)
            joints = batch_joint if joints is None else joints + batch_joint
            predictions.append(probs[:, 2 * n :].argmax(dim=2).cpu())
    if joints is None:
        raise ValueError("the held-out set is empty")
    joints = (joints + joints.transpose(1, 2)) / 2
    losses = [float(criterion.from_joint(j / j.sum())) for j in joints]
    return losses, torch.cat(predictions, dim=1).numpy()


def check_assignment_inputs(images: torch.Tensor, num_clusters: int) -> None:
    """Raise ValueError unless ``images`` are uint8 ``(N, C, H, W)`` with at least
    ``num_clusters`` of them (two-stage and IIC training)."""
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if num_clusters > images.shape[0]:
        raise ValueError(f"cannot form {num_clusters} clusters from {images.shape[0]} images")


def train_twostage(
    images: torch.Tensor,
    backbone: Backbone,
    config: TwoStageConfig,
    progress: ProgressCallback | None = None,
    *,
    embedding_head: nn.Module | None = None,
    probe: ValidationProbe | None = None,
) -> ScanResult:
    """Train Han et al.'s stage 2 (the IIC loss + ``L_cp``) on uint8 images.

    Each step draws two :class:`SimCLRTransform` views of a batch (the official two-stage code
    uses its pretext augmentation for both views), embeds them, and minimises the IIC loss
    averaged over the sub-heads, plus ``config.cp_weight * L_cp`` on the embeddings. With
    ``config.overcluster > 0`` every epoch first makes one pass with an overclustering head of
    that many clusters, then one with the main heads (IIC's alternation). The learning rate
    follows a cosine schedule (the official code uses steps).

    Args:
        images: uint8 ``(N, C, H, W)``.
        backbone: The pretext backbone; it is copied, never modified.
        config: Settings (official two-stage defaults in :class:`TwoStageConfig`).
        progress: Called after every epoch.
        embedding_head: The pretext model's embedding head (its output is
            L2-normalised and refined); ``pretext_model.head`` for SimCLR or Super-AND.
        probe: Optional ``(val_indices, val_predictions) -> metrics``, called for every head
            after each epoch (:func:`scan_core.clustering.head_report`).

    Returns:
        A :class:`ScanResult` (best head kept); ``head_losses`` are held-out IIC losses.
    """
    check_assignment_inputs(images, config.num_clusters)
    n = images.shape[0]
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    model = build_assignment_model(backbone, config, embedding_head)
    passes: list[nn.Module] = [model.cluster_heads]
    if config.overcluster > 0:
        over = NormFCHead(
            model.backbone.out_dim,
            config.overcluster,
            config.num_heads,
            config.head_temperature,
            config.head_norm_axis,
        )
        if config.freeze_heads:
            over.requires_grad_(False)
        passes = [over, model.cluster_heads]  # the overclustering head first
    modules = nn.ModuleList([model, *passes[:-1]]).to(device).to(memory_format=torch.channels_last)
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.momentum > 0,
        )
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    augment = SimCLRTransform(crop_scale_min=config.crop_scale_min, jitter=config.color_jitter)
    iic = IICLoss()
    cp = ConsistencyPreservingLoss(config.cp_temperature)
    train_idx, val_idx = split_validation(n, config.val_fraction, generator)
    batch_size = min(config.batch_size, len(train_idx))
    timer = EpochTimer("twostage", config.epochs, progress)
    head_losses: list[float] = []
    for epoch in range(config.epochs):
        timer.start()
        lr = cosine_lr(config.lr, epoch, config.epochs)
        set_lr(optimizer, lr)
        model.train()
        sums, steps = np.zeros(3), 0
        per_head = np.zeros(config.num_heads)
        for heads in passes:
            for batch in iterate_batches(len(train_idx), batch_size, generator):
                idx = torch.as_tensor(train_idx)[batch]
                b = len(idx)
                x = images[idx].to(device, non_blocking=True)
                views = torch.cat([augment(x, generator), augment(x, generator)])
                emb = model.backbone(views.contiguous(memory_format=torch.channels_last))
                logits = heads(emb)  # (H, 2B, C)
                head_mi = torch.stack([iic(h[:b], h[b:]) for h in logits])
                loss_mi = head_mi.mean()
                loss = loss_mi
                loss_cp = torch.zeros((), device=device)
                if config.cp_weight > 0:
                    loss_cp = cp(emb[:b], emb[b:])
                    loss = loss + config.cp_weight * loss_cp
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if heads is model.cluster_heads:
                    sums += [float(loss.detach()), float(loss_mi.detach()), float(loss_cp.detach())]
                    per_head += head_mi.detach().cpu().numpy()
                    steps += 1
        head_losses, val_pred = iic_validation_losses(
            model, images, val_idx, augment, iic, device, seed=config.seed + 1
        )
        mean = sums / max(steps, 1)
        metrics = {"loss": mean[0], "iic": mean[1], "cp": mean[2], "lr": lr}
        train_losses = (per_head / max(steps, 1)).tolist()
        metrics.update(
            head_report(head_losses, val_pred, config.num_clusters, train_losses, probe, val_idx)
        )
        timer.done(epoch + 1, metrics)
    return ScanResult.keep_best(model, head_losses, timer.history, val_idx)

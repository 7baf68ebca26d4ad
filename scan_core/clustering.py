"""SCAN clustering training (SCAN step 3, Van Gansbeke et al. 2020, §3.2)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scan_core.config import ScanConfig, resolve_device, resolve_precision
from scan_core.losses import SCANLoss, entropy
from scan_core.models import Backbone, ClusteringModel
from scan_core.training import (
    EpochLog,
    EpochTimer,
    ProgressCallback,
    autocast,
    iterate_batches,
    seed_everything,
)
from scan_core.transforms import IdentityTransform, StrongTransform, WeakTransform

logger = logging.getLogger(__name__)

#: Optional per-epoch quality probe: ``(predictions of the held-out images) -> metrics``.
ValidationProbe = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class ScanResult:
    """The trained clustering model (best head kept), the head choice and the history."""

    model: ClusteringModel
    best_head: int
    head_losses: list[float]
    history: list[EpochLog]
    val_indices: np.ndarray
    #: Held-out SCAN loss of every warm-up head (empty without a warm-up).
    warmup_losses: list[float] = field(default_factory=list)

    @classmethod
    def keep_best(
        cls,
        model: ClusteringModel,
        head_losses: list[float],
        history: list[EpochLog],
        val_indices: np.ndarray,
        warmup_losses: list[float] | None = None,
    ) -> ScanResult:
        """Keep the head with the lowest held-out loss; return the model on the CPU, trainable
        (frozen heads unfrozen, so a later stage can fine-tune it) and in eval mode."""
        best = int(np.argmin(head_losses))
        model.keep_head(best)
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        return cls(
            model=model.cpu().to(memory_format=torch.contiguous_format),
            best_head=best,
            head_losses=head_losses,
            history=history,
            val_indices=val_indices,
            warmup_losses=warmup_losses or [],
        )


def split_validation(
    n: int, fraction: float, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, held-out) index split; the held-out part has at least 2 images."""
    order = torch.randperm(n, generator=generator).numpy()
    n_val = min(max(2, round(n * fraction)), n - 2)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def head_report(
    val_losses: list[float],
    predictions: np.ndarray,
    num_clusters: int,
    train_losses: list[float] | None = None,
    probe: ValidationProbe | None = None,
    val_indices: np.ndarray | None = None,
) -> dict[str, float]:
    """Every head's epoch metrics, ``head_<h>_*``: its held-out loss (``val_loss``), the smallest
    cluster's share of its held-out predictions (``min_share``: 0 means an empty cluster), its
    training loss when given, and what ``probe`` says of its predictions (e.g. ``acc`` when
    labels are known). ``predictions`` is ``(H, n_val)``.

    The head with the lowest held-out loss is the current choice: its ``val_loss``, its index
    (``best_head``) and its probe metrics are also reported without the ``head_<h>_`` prefix, so
    the probe runs once per head."""
    best = int(np.argmin(val_losses))
    out: dict[str, float] = {"val_loss": float(val_losses[best]), "best_head": float(best)}
    for h, loss in enumerate(val_losses):
        counts = np.bincount(predictions[h], minlength=num_clusters)
        out[f"head_{h}_val_loss"] = float(loss)
        out[f"head_{h}_min_share"] = float(counts.min() / max(counts.sum(), 1))
        if train_losses is not None:
            out[f"head_{h}_loss"] = float(train_losses[h])
        if probe is not None and val_indices is not None:
            for key, value in probe(val_indices, predictions[h]).items():
                out[f"head_{h}_{key}"] = float(value)
                if h == best:
                    out[key] = float(value)
    return out


#: Held-out anchors whose SCAN loss is reported after every epoch.
MONITOR_ANCHORS = 1000
#: Entropy weight of the held-out SCAN loss that picks the best head (official code: 1).
VALIDATION_ENTROPY_WEIGHT = 1.0


def scan_validation_losses(
    model: ClusteringModel,
    images: torch.Tensor,
    neighbors: np.ndarray,
    val_indices: np.ndarray,
    device: str,
    *,
    entropy_weight: float = VALIDATION_ENTROPY_WEIGHT,
    max_neighbors: int | None = None,
    batch_size: int = 1024,
) -> tuple[list[float], np.ndarray]:
    """SCAN loss per head on held-out anchors and their neighbours, without augmentation.

    The consistency term averages ``-log <p(x), p(n)>`` over every (anchor, neighbour) pair, using
    the first ``max_neighbors`` neighbours of each anchor (all when ``None``); the entropy term
    uses the mean prediction over the held-out anchors. As in the official code the entropy
    weight of this selection loss is 1, whatever the training weight.

    Returns:
        The loss of every head and the held-out argmax predictions of every head ``(H, n_val)``.
    """
    view = IdentityTransform()
    model.eval()

    def probs(indices: np.ndarray) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for s in range(0, len(indices), batch_size):
                x = view(images[torch.as_tensor(indices[s : s + batch_size])].to(device))
                out.append(F.softmax(model(x.contiguous(memory_format=torch.channels_last)), dim=2))
        return torch.cat(out, dim=1)  # (H, n, C)

    p_anchor = probs(val_indices)
    nbr = neighbors[val_indices, :max_neighbors]  # (n_val, K)
    unique, inverse = np.unique(nbr, return_inverse=True)
    index = torch.as_tensor(inverse.reshape(nbr.shape))
    losses = heldout_scan_losses(p_anchor, probs(unique), index, entropy_weight)
    return losses, p_anchor.argmax(dim=2).cpu().numpy()


def heldout_consistency(
    p_anchor: torch.Tensor,
    p_pool: torch.Tensor,
    neighbor_index: torch.Tensor,
    chunk: int = 4096,
) -> torch.Tensor:
    """SCAN's consistency term of every head from held-out predictions, without augmentation.

    Args:
        p_anchor: ``(H, n, C)`` probabilities of the held-out anchors.
        p_pool: ``(H, M, C)`` probabilities of the images their neighbours are among.
        neighbor_index: ``(n, K)`` rows of ``p_pool`` holding each anchor's neighbours.
        chunk: Anchors per step (bounds the ``(H, chunk, K, C)`` intermediate).

    Returns:
        ``(H,)``: ``mean -log <p(anchor), p(neighbour)>`` over every (anchor, neighbour) pair.
    """
    log_sum = torch.zeros(p_anchor.shape[0], device=p_anchor.device)
    for s in range(0, p_anchor.shape[1], chunk):
        p_nbr = p_pool[:, neighbor_index[s : s + chunk]]  # (H, chunk, K, C)
        similarity = (p_anchor[:, s : s + chunk].unsqueeze(2) * p_nbr).sum(-1)
        log_sum += torch.log(similarity.clamp_min(1e-8)).sum(dim=(1, 2))
    return -log_sum / neighbor_index.numel()


def heldout_scan_losses(
    p_anchor: torch.Tensor,
    p_pool: torch.Tensor,
    neighbor_index: torch.Tensor,
    entropy_weight: float,
    chunk: int = 4096,
) -> list[float]:
    """The SCAN loss of every head from held-out predictions (arguments as
    :func:`heldout_consistency`): ``consistency - entropy_weight * H(mean p(anchor))``."""
    consistency = heldout_consistency(p_anchor, p_pool, neighbor_index, chunk)
    ent = entropy(p_anchor.mean(dim=1), dim=-1)
    return [float(v) for v in consistency - entropy_weight * ent]


def feature_head_losses(
    heads: nn.Module,
    features: torch.Tensor,
    neighbors: torch.Tensor,
    val_indices: np.ndarray,
    entropy_weight: float = VALIDATION_ENTROPY_WEIGHT,
) -> list[float]:
    """:func:`heldout_scan_losses` of cluster heads on precomputed backbone features ``(N, D)``
    (every neighbour of every held-out anchor): the warm-up's head selection."""
    with torch.no_grad():
        probs = F.softmax(heads(features), dim=2)  # (H, N, C)
    val = torch.as_tensor(val_indices)
    return heldout_scan_losses(probs[:, val], probs, neighbors[val], entropy_weight)


def backbone_features(
    backbone: nn.Module, images: torch.Tensor, device: str, batch_size: int = 1024
) -> torch.Tensor:
    """Backbone features ``(N, D)`` of un-augmented images, in eval mode (no gradients)."""
    view = IdentityTransform()
    was_training = backbone.training
    backbone.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, images.shape[0], batch_size):
            x = view(images[s : s + batch_size].to(device))
            out.append(backbone(x.contiguous(memory_format=torch.channels_last)).float())
    backbone.train(was_training)
    return torch.cat(out).clone()  # a normal tensor, usable in autograd


def warm_up_heads(
    model: ClusteringModel,
    features: torch.Tensor,
    train_idx: np.ndarray,
    neighbors: torch.Tensor,
    config: ScanConfig,
    generator: torch.Generator,
    progress: ProgressCallback | None,
) -> None:
    """Train only the cluster heads with the SCAN loss on frozen, precomputed features.

    This is SCAN's ImageNet regime (backbone frozen, heads trained, paper §4.1) run on features
    of un-augmented images, so an epoch costs milliseconds instead of a pass through the network.
    It gives the full-network epochs that follow a head that already clusters, which matters
    when only a few of them fit the compute budget.
    """
    heads = model.cluster_heads
    optimizer = torch.optim.Adam(
        heads.parameters(), lr=config.head_warmup_lr, weight_decay=config.weight_decay
    )
    criterion = SCANLoss(config.entropy_weight)
    k = neighbors.shape[1]
    train_t = torch.as_tensor(train_idx)
    timer = EpochTimer("scan_warmup", config.head_warmup_epochs, progress)
    heads.train()
    for epoch in range(config.head_warmup_epochs):
        timer.start()
        total, steps = 0.0, 0
        for batch in iterate_batches(len(train_idx), config.batch_size, generator):
            anchors = train_t[batch]
            nbrs = neighbors[anchors, torch.randint(k, (len(anchors),), generator=generator)]
            logits = heads(torch.cat([features[anchors], features[nbrs]]))  # (H, 2B, C)
            loss = sum(criterion(h[: len(anchors)], h[len(anchors) :])[0] for h in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
            total += float(loss.detach()) / len(logits)  # type: ignore[union-attr]
            steps += 1
        timer.done(epoch + 1, {"loss": total / max(steps, 1)})


def train_scan(
    images: torch.Tensor,
    neighbors: np.ndarray,
    backbone: Backbone,
    config: ScanConfig,
    progress: ProgressCallback | None = None,
    probe: ValidationProbe | None = None,
    init_model: ClusteringModel | None = None,
) -> ScanResult:
    """Train cluster heads with the SCAN loss on uint8 images ``(N, C, H, W)``.

    Each step takes a batch of anchors and one random mined neighbour of each, both augmented
    (``config.augment``: SCAN's strong augmentation by default, as in the official code), and
    minimises :class:`SCANLoss` summed over the heads. A random ``config.val_fraction`` of the
    images is held out; after training the head with the lowest held-out SCAN loss is kept.

    Args:
        images: uint8 ``(N, C, H, W)``.
        neighbors: ``(N, K)`` mined neighbour indices (:func:`scan_core.neighbors.mine_neighbors`).
        backbone: The pretext backbone; it is copied, never modified.
        config: Settings (official defaults in :class:`ScanConfig`).
        progress: Called after every epoch.
        probe: Optional ``(val_indices, val_predictions) -> metrics``, called for every head's
            held-out predictions after each epoch (used by benchmarks to track accuracy when
            labels are known); see :func:`head_report`.
        init_model: Warm start from an earlier clustering model with the same number of clusters.
    """
    n = images.shape[0]
    if neighbors.ndim != 2 or neighbors.shape[0] != n:
        raise ValueError(f"neighbors must be (N, K) with N = {n}, got {neighbors.shape}")
    if config.num_clusters > n:
        raise ValueError(f"cannot form {config.num_clusters} clusters from {n} images")
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    generator = seed_everything(config.seed)
    warm_up = config.head_warmup_epochs > 0 and init_model is None
    if init_model is not None:
        model = copy.deepcopy(init_model)
    else:
        heads = max(config.warmup_heads, config.num_heads) if warm_up else config.num_heads
        model = ClusteringModel(copy.deepcopy(backbone), config.num_clusters, heads)
    model = model.to(device).to(memory_format=torch.channels_last)
    train_idx, val_idx = split_validation(n, config.val_fraction, generator)
    monitor_idx = val_idx[:MONITOR_ANCHORS]
    neighbors_t = torch.as_tensor(neighbors, dtype=torch.long)
    k = neighbors.shape[1]
    batch_size = min(config.batch_size, len(train_idx))
    warmup_losses: list[float] = []
    if warm_up:
        features = backbone_features(model.backbone, images, device)
        nbrs_dev = neighbors_t.to(device)
        warm_up_heads(model, features, train_idx, nbrs_dev, config, generator, progress)
        warmup_losses = feature_head_losses(model.cluster_heads, features, nbrs_dev, val_idx)
        kept = [int(i) for i in np.argsort(warmup_losses)[: config.num_heads]]
        model.keep_heads(kept)
        logger.info(
            "warm-up: kept head(s) %s of %d by held-out SCAN loss (%s)",
            kept,
            len(warmup_losses),
            ", ".join(f"{v:.3f}" for v in warmup_losses),
        )
    if not config.update_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    augment: nn.Module = StrongTransform() if config.augment == "strong" else WeakTransform()
    criterion = SCANLoss(config.entropy_weight)
    timer = EpochTimer("scan", config.epochs, progress)
    head_losses: list[float] = []
    for epoch in range(config.epochs):
        timer.start()
        model.train()
        if not config.update_backbone:
            model.backbone.eval()
        sums, per_head = np.zeros(3), np.zeros(len(model.cluster_heads.heads))
        steps = 0
        for batch in iterate_batches(len(train_idx), batch_size, generator):
            anchors = torch.as_tensor(train_idx)[batch]
            pick = torch.randint(k, (len(anchors),), generator=generator)
            nbrs = neighbors_t[anchors, pick]
            x = torch.cat([images[anchors], images[nbrs]]).to(device, non_blocking=True)
            x = augment(x, generator).contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits = model(x).float()  # (H, 2B, C)
            total = torch.zeros((), device=device)
            parts = torch.zeros(2)
            for h, head_logits in enumerate(logits):
                loss, consistency, ent = criterion(
                    head_logits[: len(anchors)], head_logits[len(anchors) :]
                )
                total = total + loss
                per_head[h] += float(loss.detach())
                parts += torch.stack([consistency.detach().cpu(), ent.detach().cpu()])
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            sums += np.array([float(total.detach()) / len(logits), *(parts / len(logits)).tolist()])
            steps += 1
        # a cheap per-epoch probe (a sample of held-out anchors, 5 neighbours each)
        head_losses, val_pred = scan_validation_losses(
            model, images, neighbors, monitor_idx, device, max_neighbors=5
        )
        metrics = {
            "loss": sums[0] / max(steps, 1),
            "consistency": sums[1] / max(steps, 1),
            "entropy": sums[2] / max(steps, 1),
        }
        train_losses = (per_head / max(steps, 1)).tolist()
        metrics.update(
            head_report(
                head_losses, val_pred, config.num_clusters, train_losses, probe, monitor_idx
            )
        )
        timer.done(epoch + 1, metrics)
    # the head choice uses every held-out anchor and all its neighbours
    head_losses, _ = scan_validation_losses(model, images, neighbors, val_idx, device)
    return ScanResult.keep_best(model, head_losses, timer.history, val_idx, warmup_losses)

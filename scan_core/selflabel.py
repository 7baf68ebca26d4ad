"""Step 4: fine-tuning on the model's own pseudo-labels.

``selflabel.method``:

* ``selflabel``: SCAN's self-labeling (Van Gansbeke et al. 2020, §3.3): the weak view's confident
  predictions (max probability above the threshold) are the labels of a strong view.
* ``spice``: SPICE's reliable pseudo-labels (Niu et al., IEEE TIP 2022, §3.3): before training,
  an image whose cluster at least ``reliable_consistency`` of its mined neighbours share gets
  that cluster as a fixed label; the confident predictions of the other images are used as in
  ``selflabel``.

Too few confident images (``min_confident_fraction``) mean the clusters are not sharp enough to
teach themselves: :class:`NoConfidentSamplesError`, which the pipeline turns into a skipped step
(the SCAN clusters stand).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from scan_core.clustering import ValidationProbe
from scan_core.config import SelfLabelConfig, resolve_device, resolve_precision
from scan_core.inference import predict_probabilities
from scan_core.losses import ConfidenceBasedCE
from scan_core.models import ClusteringModel
from scan_core.training import (
    EpochLog,
    EpochTimer,
    ProgressCallback,
    autocast,
    iterate_batches,
    seed_everything,
)
from scan_core.transforms import IdentityTransform, StrongTransform

logger = logging.getLogger(__name__)


class NoConfidentSamplesError(ValueError):
    """Too few images pass the self-labeling confidence threshold to train on."""


def reliable_labels(
    predictions: np.ndarray, neighbors: np.ndarray, consistency: float
) -> np.ndarray:
    """SPICE's reliable pseudo-labels: ``predictions[i]`` where at least ``consistency`` of
    image ``i``'s mined ``neighbors`` share it, else ``-1``.

    Shapes:
        predictions ``(N,)``, neighbors ``(N, K)``; returns ``(N,)`` int64.
    """
    pred = np.asarray(predictions, dtype=np.int64)
    nbr = np.asarray(neighbors, dtype=np.int64)
    if nbr.ndim != 2 or nbr.shape[0] != pred.shape[0]:
        raise ValueError(f"neighbors must be (N, K) with N = {pred.shape[0]}, got {nbr.shape}")
    agree = (pred[nbr] == pred[:, None]).mean(axis=1)
    return np.where(agree >= consistency, pred, -1)


def _spice_labels(
    predictions: np.ndarray, neighbors: np.ndarray | None, config: SelfLabelConfig
) -> np.ndarray:
    if neighbors is None:
        raise ValueError("selflabel.method spice needs the mined neighbours")
    labels = reliable_labels(predictions, neighbors, config.reliable_consistency)
    logger.info("spice: %d/%d images have reliable labels", (labels >= 0).sum(), len(labels))
    return labels


#: Labels fixed before training from the starting model's predictions and the mined neighbours
#: (``-1``: none); the other images are labelled by their confident predictions.
FixedLabels = Callable[[np.ndarray, "np.ndarray | None", SelfLabelConfig], np.ndarray]


@dataclass(frozen=True)
class Step4Method:
    """A step-4 method (``selflabel.method``): a name, a title, and the labels it fixes."""

    name: str
    title: str
    fixed_labels: FixedLabels | None = None


#: The step-4 registry (``selflabel.method``); the method's name is also a literal of
#: :class:`scan_core.config.SelfLabelConfig`.
STEP4_METHODS: dict[str, Step4Method] = {
    m.name: m
    for m in (
        Step4Method("selflabel", "SCAN self-labeling (confident predictions)"),
        Step4Method(
            "spice", "SPICE reliable labels, then SCAN self-labeling", fixed_labels=_spice_labels
        ),
    )
}


@dataclass
class SelfLabelResult:
    """The fine-tuned model (the epoch with the most confident images) and the history."""

    model: ClusteringModel
    history: list[EpochLog]
    confident_counts: list[int]


def count_confident(
    model: ClusteringModel, images: torch.Tensor, threshold: float, device: str
) -> tuple[int, np.ndarray]:
    """How many images the model predicts with max probability above ``threshold``; the argmaxes."""
    probs = predict_probabilities(model, images, device=device)
    return int((probs.max(axis=1) > threshold).sum()), probs.argmax(axis=1)


def train_selflabel(
    images: torch.Tensor,
    model: ClusteringModel,
    config: SelfLabelConfig,
    progress: ProgressCallback | None = None,
    probe: ValidationProbe | None = None,
    neighbors: np.ndarray | None = None,
) -> SelfLabelResult:
    """Fine-tune a one-head clustering model on its own pseudo-labels (``config.method``).

    Pseudo-labels come from the un-augmented image (as in the official code), the loss is
    :class:`ConfidenceBasedCE` on a :class:`StrongTransform` view. Training stops when the number
    of confident images has not grown for ``config.patience`` epochs; the model of the epoch with
    the most confident images is returned.

    Args:
        neighbors: ``(N, K)`` mined neighbours; needed by ``spice``.

    Raises:
        NoConfidentSamplesError: fewer than ``config.min_confident_fraction`` of the images (and
            at least one) are confident or reliable before training.
    """
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    generator = seed_everything(config.seed)
    model = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)
    n_confident, predictions = count_confident(model, images, config.threshold, device)
    fixed: torch.Tensor | None = None
    rule = STEP4_METHODS[config.method].fixed_labels
    if rule is not None:
        fixed = torch.as_tensor(rule(predictions, neighbors, config))
    usable = n_confident if fixed is None else max(n_confident, int((fixed >= 0).sum()))
    needed = max(1, math.ceil(config.min_confident_fraction * images.shape[0]))
    if usable < needed:
        raise NoConfidentSamplesError(
            f"only {usable} of {images.shape[0]} images are predicted with confidence above "
            f"{config.threshold}{' or reliably labelled' if fixed is not None else ''} "
            f"(at least {needed} needed, selflabel.min_confident_fraction = "
            f"{config.min_confident_fraction})"
        )
    logger.info("self-labeling starts with %d/%d confident images", n_confident, images.shape[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = ConfidenceBasedCE(config.threshold, config.class_balance)
    weak, strong = IdentityTransform(), StrongTransform()
    batch_size = min(config.batch_size, images.shape[0])
    timer = EpochTimer("selflabel", config.epochs, progress)
    counts = [n_confident]
    best_state = copy.deepcopy(model.state_dict())
    best_count, since_best = n_confident, 0
    all_idx = np.arange(images.shape[0])
    for epoch in range(config.epochs):
        timer.start()
        model.train()
        loss_sum, steps = 0.0, 0
        for idx in iterate_batches(images.shape[0], batch_size, generator):
            x = images[idx].to(device, non_blocking=True)
            with torch.no_grad(), autocast(device, dtype):
                weak_logits = model(weak(x).contiguous(memory_format=torch.channels_last))[0]
            with autocast(device, dtype):
                strong_logits = model(
                    strong(x, generator).contiguous(memory_format=torch.channels_last)
                )[0]
            weak_logits, strong_logits = weak_logits.float(), strong_logits.float()
            targets = None if fixed is None else fixed[idx].to(device)
            confident = weak_logits.softmax(1).max(1).values > config.threshold
            if targets is not None:
                confident = confident | (targets >= 0)
            if not bool(confident.any()):
                continue
            loss, _ = criterion(weak_logits, strong_logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            steps += 1
        n_confident, predictions = count_confident(model, images, config.threshold, device)
        counts.append(n_confident)
        metrics = {
            "loss": loss_sum / max(steps, 1),
            "confident": float(n_confident),
            "confident_fraction": n_confident / images.shape[0],
        }
        if probe is not None:
            metrics.update(probe(all_idx, predictions))
        timer.done(epoch + 1, metrics)
        if n_confident > best_count:
            best_count, since_best = n_confident, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= config.patience:
                logger.info("confident count stopped growing at %d; stopping", best_count)
                break
    model.load_state_dict(best_state)
    model.eval()
    return SelfLabelResult(model=model.cpu(), history=timer.history, confident_counts=counts)

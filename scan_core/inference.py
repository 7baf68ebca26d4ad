"""Batched inference: pretext embeddings and cluster probabilities."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scan_core.config import resolve_device
from scan_core.models import ClusteringModel, PretextModel
from scan_core.transforms import IdentityTransform

BatchProgress = Callable[[int, int], None]


def prepare_model(model: nn.Module, device: str) -> nn.Module:
    """Move a model to ``device`` in eval mode with channels-last memory (faster convs on CPU)."""
    return model.to(resolve_device(device)).to(memory_format=torch.channels_last).eval()


def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
    device: str,
    progress: BatchProgress | None,
) -> np.ndarray:
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    view = IdentityTransform()
    outputs = []
    n = images.shape[0]
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(device, non_blocking=True)
            x = view(x).contiguous(memory_format=torch.channels_last)
            outputs.append(fn(x).float().cpu())
            if progress is not None:
                progress(min(start + batch_size, n), n)
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outputs).numpy().astype(np.float32, copy=False)


def compute_embeddings(
    model: PretextModel,
    images: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: str = "auto",
    use_head: bool | None = None,
    progress: BatchProgress | None = None,
) -> np.ndarray:
    """L2-normalised embeddings ``(N, D)`` float32 of uint8 images ``(N, C, H, W)``.

    For SimCLR the official SCAN code mines neighbours on the 128-d projection-head output; for
    RotNet (whose head predicts rotations) on the backbone features. ``use_head=None`` follows
    the model (:attr:`PretextModel.embeds_with_head`).
    """
    if use_head is None:
        use_head = model.embeds_with_head
    model = prepare_model(model, device)  # type: ignore[assignment]
    dev = next(model.parameters()).device

    def embed(x: torch.Tensor) -> torch.Tensor:
        out = model(x) if use_head else model.features(x)
        return F.normalize(out, dim=1)

    return _batched(embed, images, batch_size, str(dev), progress)


def predict_probabilities(
    model: ClusteringModel,
    images: torch.Tensor,
    *,
    head: int = 0,
    batch_size: int = 1024,
    device: str = "auto",
    progress: BatchProgress | None = None,
) -> np.ndarray:
    """Cluster probabilities ``(N, C)`` of one head of a clustering model."""
    model = prepare_model(model, device)  # type: ignore[assignment]
    dev = next(model.parameters()).device

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return F.softmax(model(x)[head], dim=1)

    return _batched(probabilities, images, batch_size, str(dev), progress)

"""Tiny labelled image sets for the scan_core tests."""

from __future__ import annotations

import numpy as np
import torch


def synthetic(
    n_per_class: int = 24, size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """Three easy classes: bright top half, bright left half, bright centre square, plus noise."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, size, size)
    masks[0, : size // 2] = 1
    masks[1, :, : size // 2] = 1
    masks[2, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    labels = np.repeat(np.arange(3), n_per_class)
    x = masks[labels] * 200 + torch.rand(len(labels), size, size, generator=g) * 55
    return x.to(torch.uint8).unsqueeze(1), labels

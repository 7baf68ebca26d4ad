"""What every training loop shares: seeding, batching, progress reports, cosine schedules."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochLog:
    """One epoch's report: stage name, 1-based epoch, total epochs, metrics, wall seconds."""

    stage: str
    epoch: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


ProgressCallback = Callable[[EpochLog], None]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for augmentation and shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def iterate_batches(
    n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Yield index batches of a random permutation of ``range(n)`` (in order if no generator).

    With ``drop_last``, a final batch smaller than ``batch_size`` is dropped unless it is the only
    one (so tiny data sets still train), and batches of one sample are never yielded (BatchNorm).
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        if drop_last and len(batch) < batch_size and start > 0:
            return
        if len(batch) < 2:
            return
        yield batch


def cosine_lr(base_lr: float, epoch: int, epochs: int, final_fraction: float = 1e-3) -> float:
    """Cosine decay from ``base_lr`` to ``base_lr * final_fraction`` (SCAN/SimCLR official)."""
    eta_min = base_lr * final_fraction
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2


def autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class EpochTimer:
    """Measures an epoch and reports it to the progress callback and the log."""

    def __init__(self, stage: str, epochs: int, progress: ProgressCallback | None) -> None:
        self.stage, self.epochs, self.progress = stage, epochs, progress
        self.history: list[EpochLog] = []
        self._start = time.perf_counter()

    def start(self) -> None:
        self._start = time.perf_counter()

    def done(self, epoch: int, metrics: dict[str, float]) -> EpochLog:
        log = EpochLog(
            self.stage, epoch, self.epochs, dict(metrics), time.perf_counter() - self._start
        )
        self.history.append(log)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        logger.info("%s epoch %d/%d %s (%.1fs)", self.stage, epoch, self.epochs, shown, log.seconds)
        if self.progress is not None:
            self.progress(log)
        return log

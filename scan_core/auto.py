"""Settings chosen from the lake: what ``scan-lake run`` uses when no config file is given.

The paper's settings (500 SimCLR epochs of a ResNet-18, batch 512) are GPU settings for CIFAR;
they take days on a CPU and starve a lake of a few hundred images of optimizer steps. Here the
settings follow from what the lake and the machine are:

* the images (:func:`choose_image`): greyscale or colour from a sample of decoded images, the
  working size from their median short side (capped by what the device affords), and the pretext
  views: ``photo`` (SimCLR's crops, flips and colour jitter) for greyscale and colour images
  alike, since the ``shape`` views (:class:`~scan_core.transforms.ShapeTransform`, NMCE's
  Fashion-MNIST recipe) gave lower neighbour purity@20 on Fashion-MNIST in our ablation
  (``docs/architecture.md``); ``pretext.augment=shape`` selects them;
* the schedules (:func:`choose_schedule`), counted in images seen and optimizer steps: enough
  steps for a small lake to learn, a cap so that a large one is not trained for days, and an
  optional wall-time ``budget`` that scales them to fit on this machine (its speed is measured by
  :func:`measure_speed`).

The choices are deterministic given the lake's size class, the image sample, the device and the
budget, so a rerun on an unchanged lake computes the same settings and every stage is a cache
hit. The lake size enters as a power-of-two class (:func:`size_class`): a lake that grows within
its class keeps its settings, so its backbone and warm starts are reused. Every choice comes with
a one-line reason (:class:`AutoSettings`), logged by the pipeline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from scan_core.config import ImageConfig, PipelineConfig

DeviceKind = Literal["cpu", "cuda"]

#: Largest working image size per device: the convolution cost grows with its square.
MAX_SIZE: dict[str, int] = {"cpu": 32, "cuda": 64}
#: Smallest working size (the small CNN pools twice).
MIN_SIZE = 16
#: Fewest optimizer steps of a pretext and a SCAN stage, however small the lake.
MIN_STEPS = {"pretext": 1500, "scan": 300}

#: Seconds per image on the reference machine (2 CPU cores with bf16, small CNN, 28 x 28
#: greyscale, where :func:`measure_speed` takes :data:`REFERENCE_STEP_SECONDS`): a pretext view
#: at full size, a SCAN image (anchor or neighbour, strong augmentation, forward and backward),
#: a step-4 image, and everything else a run does per image (decode, embed, kNN, guard, assign,
#: evaluate). Other machines scale by their measured speed, other sizes by the image area.
REFERENCE_SECONDS = {"pretext": 3.0e-4, "scan": 5.0e-4, "selflabel": 3.0e-4, "other": 2.5e-3}
#: Fixed seconds of a run besides the stages (servers, MLflow, the flow itself).
FIXED_SECONDS = 45.0
#: :func:`measure_speed`'s best time on the reference machine.
REFERENCE_STEP_SECONDS = 0.05


@dataclass(frozen=True)
class ImageSample:
    """What the lake profile saw of one sampled image."""

    width: int
    height: int
    colour: bool


@dataclass(frozen=True)
class LakeProfile:
    """A sample of the lake's images (sizes, colour) and how many image objects it holds."""

    num_objects: int
    samples: tuple[ImageSample, ...]

    @property
    def median_side(self) -> int:
        """Median short side of the sampled images (28 when nothing could be sampled)."""
        if not self.samples:
            return 28
        return int(np.median([min(s.width, s.height) for s in self.samples]))

    @property
    def colour_fraction(self) -> float:
        """Fraction of the sampled images that have colour."""
        if not self.samples:
            return 0.0
        return sum(s.colour for s in self.samples) / len(self.samples)


def is_colourful(rgb: np.ndarray, tolerance: int = 12) -> bool:
    """Whether an ``(H, W, 3)`` uint8 image has colour: some pixel's channels differ by more
    than ``tolerance`` grey levels (a greyscale image saved as RGB, or JPEG chroma noise, does
    not count)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        return False
    x = rgb.astype(np.int16)
    spread = np.maximum(np.abs(x[..., 0] - x[..., 1]), np.abs(x[..., 1] - x[..., 2]))
    return bool(np.quantile(spread, 0.99) > tolerance)


def size_class(num_images: int) -> int:
    """The power of two nearest to ``num_images`` in log scale (at least 2): the lake size the
    schedules are computed for."""
    if num_images < 2:
        return 2
    return int(2 ** round(math.log2(num_images)))


@dataclass
class AutoSettings:
    """The chosen config, why, and the estimated seconds of each stage on this machine."""

    config: PipelineConfig
    reasons: dict[str, str] = field(default_factory=dict)
    estimate: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per choice, for logs and summaries."""
        return [f"{key}: {why}" for key, why in self.reasons.items()]


def choose_image(profile: LakeProfile, device: DeviceKind) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``image`` section and its reasons from the sampled images."""
    colour = profile.colour_fraction >= 0.5
    side = profile.median_side
    size = min(max(side, MIN_SIZE), MAX_SIZE[device])
    channels = 3 if colour else 1
    reasons = {
        "image.channels": (
            f"{channels} ({100 * profile.colour_fraction:.0f}% of {len(profile.samples)} sampled "
            "images have colour)"
        ),
        "image.size": (
            f"{size} (median short side {side} px"
            + (f", capped at {MAX_SIZE[device]} on {device}" if side > MAX_SIZE[device] else "")
            + (f", raised to the minimum {MIN_SIZE}" if side < MIN_SIZE else "")
            + ")"
        ),
    }
    return {"channels": channels, "size": size}, reasons


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _batch(n: int, preferred: int, min_steps: int = 4) -> int:
    """``preferred`` unless the lake is too small for ``min_steps`` batches an epoch."""
    return int(max(8, min(preferred, n // min_steps)))


def _area_factor(image: ImageConfig) -> float:
    return (image.size / 28) ** 2 * (1.0 if image.channels == 1 else 1.6)


def estimate_seconds(
    config: PipelineConfig, num_images: int, speed: float = 1.0
) -> dict[str, float]:
    """Estimated wall seconds of the stages that cost the most, on a machine ``speed`` times
    as fast as the reference (:data:`REFERENCE_SECONDS`)."""
    area = _area_factor(config.image) / speed
    pre, scan, sl = config.pretext, config.scan, config.selflabel
    views = 2 * num_images * pre.epochs * pre.view_scale**2
    out = {
        "pretext": views * REFERENCE_SECONDS["pretext"] * area,
        "scan": 2 * num_images * scan.epochs * REFERENCE_SECONDS["scan"] * area,
        "selflabel": (
            num_images * sl.epochs * REFERENCE_SECONDS["selflabel"] * area if sl.enabled else 0.0
        ),
        "other": num_images * REFERENCE_SECONDS["other"] * area + FIXED_SECONDS,
    }
    out["total"] = sum(out.values())
    return out


def choose_schedule(
    num_images: int,
    image: dict[str, Any],
    device: DeviceKind,
    budget_seconds: float | None = None,
    speed: float = 1.0,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The training sections (pretext, neighbors, scan, selflabel) for a lake of ``num_images``.

    Without a budget the schedules follow the lake size class: about 60 pretext epochs and 10
    SCAN epochs of a large lake, and for a small lake the number of epochs that gives it at
    least :data:`MIN_STEPS` optimizer steps (a few hundred images need hundreds of epochs to
    train at all), capped so that no lake is trained for days. A budget scales the epochs of the
    pretext, SCAN and step-4 stages down (never below the minimums) to fit.
    """
    n = size_class(num_images)
    gpu = device == "cuda"
    augment = "photo"  # greyscale too: the shape views scored lower (module docstring)
    pre_batch = _batch(n, 256 if gpu else 128)
    scan_batch = _batch(n, 256 if gpu else 128)
    backbone = ("resnet18_cifar" if image["size"] <= 64 else "resnet18") if gpu else "small_cnn"
    config: dict[str, Any] = {
        "image": image,
        "pretext": {
            "method": "simclr",
            "backbone": backbone,
            "batch_size": pre_batch,
            "view_scale": 1.0 if gpu else 0.72,
            "augment": augment,
        },
        "neighbors": {"k": int(_clamp(round(n / 40), 5, 20))},
        "scan": {"batch_size": scan_batch, "num_heads": 5, "head_warmup_epochs": 30},
        "selflabel": {"batch_size": _batch(n, 1000, 2)},
    }
    base = PipelineConfig.model_validate(config)
    floors = {
        "pretext": math.ceil(MIN_STEPS["pretext"] * pre_batch / n),
        "scan": math.ceil(MIN_STEPS["scan"] * scan_batch / (0.9 * n)),
        "selflabel": 1,
    }
    full = {
        "pretext": int(_clamp(max(60, floors["pretext"]), 1, 500 if gpu else 800)),
        "scan": int(_clamp(max(10, floors["scan"]), 1, 100 if gpu else 200)),
        "selflabel": 5,
    }
    scale = 1.0
    if budget_seconds is not None:
        estimate = estimate_seconds(_with_epochs(base, full), num_images, speed)
        trainable = estimate["pretext"] + estimate["scan"] + estimate["selflabel"]
        scale = _clamp((budget_seconds - estimate["other"]) / trainable, 0.0, 1.0)
    epochs = {k: max(floors[k], int(full[k] * scale)) for k in full}
    reasons = {
        "pretext": (
            f"SimCLR with {augment} views (crops, flips, jitter; "
            f"{'greyscale' if image['channels'] == 1 else 'colour'} images), {backbone} on "
            f"{device}, batch {pre_batch}"
        ),
        "pretext.epochs": (
            f"{epochs['pretext']} ({epochs['pretext'] * math.ceil(n / pre_batch)} steps for a "
            f"lake of about {n} images"
            + (f"; scaled to {100 * scale:.0f}% to fit the budget" if scale < 1 else "")
            + ")"
        ),
        "scan.epochs": (
            f"{epochs['scan']} ({epochs['scan'] * math.ceil(0.9 * n / scan_batch)} steps), "
            "5 heads after a 30-epoch warm-up of 10 heads on frozen features"
        ),
        "neighbors.k": f"{config['neighbors']['k']} (about 1/40 of the lake, 5..20)",
    }
    if any(int(full[k] * scale) < floors[k] for k in full):
        reasons["budget"] = "the budget is below the minimum schedule: the minimums are used"
    chosen = _with_epochs(base, epochs).model_dump(mode="json")
    return {k: chosen[k] for k in ("image", "pretext", "neighbors", "scan", "selflabel")}, reasons


def _with_epochs(config: PipelineConfig, epochs: dict[str, int]) -> PipelineConfig:
    return config.with_overrides(
        {
            "pretext.epochs": epochs["pretext"],
            "scan.epochs": epochs["scan"],
            "selflabel.epochs": epochs["selflabel"],
        }
    )


def auto_config(
    profile: LakeProfile,
    num_images: int,
    device: DeviceKind,
    budget_seconds: float | None = None,
    speed: float = 1.0,
) -> AutoSettings:
    """The whole config for a lake: :func:`choose_image` and :func:`choose_schedule`, the other
    sections at their defaults."""
    image, image_reasons = choose_image(profile, device)
    sections, reasons = choose_schedule(num_images, image, device, budget_seconds, speed)
    config = PipelineConfig.model_validate(sections)
    return AutoSettings(
        config=config,
        reasons={**image_reasons, **reasons},
        estimate=estimate_seconds(config, num_images, speed),
    )


def measure_speed(repeats: int = 3) -> float:
    """How fast this machine trains the reference network compared with the reference machine
    (> 1: faster): a few SimCLR steps of the small CNN on random 28 x 28 images, timed."""
    import torch

    from scan_core.losses import NTXentLoss
    from scan_core.models import SimCLRProjectionHead, SmallCNNBackbone

    backbone = SmallCNNBackbone(1)
    model = torch.nn.Sequential(backbone, SimCLRProjectionHead(backbone.out_dim, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = NTXentLoss(0.1)
    x = torch.randn(256, 1, 28, 28)
    best = math.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        z = model(x)
        loss = loss_fn(z[:128], z[128:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        best = min(best, time.perf_counter() - start)
    return REFERENCE_STEP_SECONDS / best

"""Batched augmentations: SimCLR views, the weak view and SCAN's strong augmentation.

Each transform works on a whole batch of uint8 images ``(B, C, H, W)`` on any device and draws
independent random parameters per image, so augmentation costs a few tensor ops per batch instead
of a Python loop per image (this matters on a 2-core CPU, where per-image PIL pipelines cost as
much as the training step). As in torchvision transforms v2, the random part (``make_params``) is
split from deterministic kernels (the module-level functions below, each taking per-image
parameters), which are unit-tested on their own; torchvision's own kernels are used where they
accept a batch (``autocontrast``, ``equalize``).

All transforms return float images normalised with :func:`normalize`, shape ``(B, C, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

MEAN = 0.5
STD = 0.25


# ----------------------------------------------------------------------------- kernels


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in [0, 255] -> float32 in [0, 1] (floats pass through)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> the network's input scale ``(x - 0.5) / 0.25``."""
    return (images - MEAN) / STD


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of RGB images, kept as ``(B, 1, H, W)``; single-channel images unchanged."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _per_image(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return values.to(images.device, images.dtype).view(-1, 1, 1, 1)


def blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other`` per image, clamped to [0, 1] (as PIL does)."""
    f = _per_image(factors, images)
    return (f * images + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with black: factor 0 gives black, 1 the original."""
    return blend(images, torch.zeros_like(images), factors)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level: factor 0 gives flat grey, 1 the original."""
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return blend(images, mean.expand_as(images), factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with the grey version: factor 0 gives greyscale. No-op on single-channel images."""
    if images.shape[1] == 1:
        return images
    return blend(images, grayscale(images).expand_as(images), factors)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` in [-0.5, 0.5] per image (torchvision kernel); 1 channel: no-op."""
    if images.shape[1] == 1:
        return images
    return torch.stack(
        [TF.adjust_hue(img, float(s)) for img, s in zip(images, shifts, strict=True)]
    )


def adjust_sharpness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend with a smoothed copy (PIL's 3x3 SMOOTH kernel, borders kept): 0 blurs, 1 keeps."""
    c = images.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device)
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    smooth[..., 0, :], smooth[..., -1, :] = images[..., 0, :], images[..., -1, :]
    smooth[..., :, 0], smooth[..., :, -1] = images[..., :, 0], images[..., :, -1]
    return blend(images, smooth, factors)


def solarize(images: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Invert every pixel at or above the per-image threshold (in [0, 1])."""
    t = _per_image(thresholds, images)
    return torch.where(images >= t, 1.0 - images, images)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` (1..8) bits of each 8-bit channel value, per image."""
    as_uint8 = (images * 255).round().to(torch.int32)
    masks = (0xFF << (8 - bits.to(torch.int32))) & 0xFF
    return (as_uint8 & masks.to(images.device).view(-1, 1, 1, 1)).float() / 255.0


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to the full [0, 1] range (torchvision kernel)."""
    return TF.autocontrast(images)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each channel (torchvision kernel, on the 8-bit values)."""
    as_uint8 = (images * 255).round().to(torch.uint8)
    return TF.equalize(as_uint8).float() / 255.0


def affine(images: torch.Tensor, theta: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Warp by per-image affine maps ``theta (B, 2, 3)`` in normalised output->input coordinates.

    Pixels sampled from outside the image get ``fill``. Bilinear interpolation.
    """
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    shifted = images - fill
    return (
        F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        + fill
    )


def geometric_theta(
    angle_deg: torch.Tensor | None = None,
    shear: tuple[torch.Tensor, torch.Tensor] | None = None,
    translate: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Build ``(B, 2, 3)`` affine maps for rotation (degrees), shear (x, y) and translation.

    Translation is a fraction of the image size (positive moves the content right / down).
    """
    tensors = [t for t in (angle_deg, *(shear or ()), *(translate or ())) if t is not None]
    n = batch if batch is not None else tensors[0].shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    if angle_deg is not None:
        a = angle_deg * math.pi / 180
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    if shear is not None:
        theta[:, 0, 1] += shear[0]
        theta[:, 1, 0] += shear[1]
    if translate is not None:
        theta[:, 0, 2] = -2 * translate[0]
        theta[:, 1, 2] = -2 * translate[1]
    return theta


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int | None = None
) -> torch.Tensor:
    """Crop per-image boxes and resize them to ``size x size`` (default: the input size),
    optionally flipping.

    Args:
        images: ``(B, C, H, W)`` float.
        boxes: ``(B, 4)`` as ``(x0, y0, w, h)`` fractions of the image.
        flip: ``(B,)`` bool, flip horizontally.
        size: Side of the output in pixels; ``None`` keeps ``(H, W)``.
    """
    x0, y0, w, h = boxes.unbind(dim=1)
    sign = 1.0 - 2.0 * flip.float()
    theta = torch.zeros(images.shape[0], 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 1, 1] = h
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 2] = 2 * y0 + h - 1
    shape = list(images.shape) if size is None else [*images.shape[:2], size, size]
    grid = F.affine_grid(theta.to(images), shape, align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutout(
    images: torch.Tensor, centers: torch.Tensor, lengths: torch.Tensor | int, fill: float = 0.5
) -> torch.Tensor:
    """Fill a ``length`` x ``length`` square (clipped at the borders) around per-image centres.

    ``centers`` is ``(B, 2)`` integer ``(y, x)`` pixel positions; ``lengths`` the side of each
    image's square, ``(B,)`` integers or one int for all (0 leaves the image as it is).
    """
    _, _, h, w = images.shape
    ys = torch.arange(h, device=images.device).view(1, h, 1)
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    cy = centers[:, 0].to(images.device).view(-1, 1, 1)
    cx = centers[:, 1].to(images.device).view(-1, 1, 1)
    length = torch.as_tensor(lengths, device=images.device).view(-1, 1, 1)
    top, left = cy - length // 2, cx - length // 2
    inside = (ys >= top) & (ys < top + length) & (xs >= left) & (xs < left + length)
    return images.masked_fill(inside.unsqueeze(1), fill)


# ----------------------------------------------------------------------------- parameters


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def sample_crop_boxes(
    n: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``(n, 4)`` = ``(x0, y0, w, h)`` as fractions of the image.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); boxes that do not fit are shrunk to
    fit (torchvision retries instead; the distributions differ only at the extremes).
    """
    area = _uniform(n, scale[0], scale[1], generator)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    x0 = torch.rand(n, generator=generator) * (1 - w)
    y0 = torch.rand(n, generator=generator) * (1 - h)
    return torch.stack([x0, y0, w, h], dim=1)


def scaled_size(image_size: int, scale: float, minimum: int = 8) -> int | None:
    """The side of views rendered at ``scale`` of ``image_size`` (at least ``minimum`` pixels);
    ``None`` (keep the input size) when ``scale`` is 1."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if scale == 1:
        return None
    return min(image_size, max(minimum, round(scale * image_size)))


# ----------------------------------------------------------------------------- transforms


def _check_view(size: int | None, jitter: float, hue: float, **probabilities: float) -> None:
    """Validate the settings views share: output size, colour jitter and probabilities."""
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels or None, got {size}")
    for name, p in probabilities.items():
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be a probability, got {p}")
    if not 0 <= jitter <= 1 or not 0 <= hue <= 0.5:
        raise ValueError(f"jitter must be in [0, 1] and hue in [0, 0.5], got {jitter}, {hue}")


class SimCLRTransform(nn.Module):
    """One SimCLR view (Chen et al. 2020, Appendix A; SCAN's CIFAR settings).

    RandomResizedCrop(scale=(crop_scale_min, 1)) to ``size x size`` pixels (default: the input
    size), horizontal flip p 0.5, ColorJitter(jitter, jitter, jitter, hue) with probability
    ``jitter_p``, random grayscale p ``grayscale_p``. Call twice on the same batch for the two
    views.

    A ``size`` below the input size renders the views at a lower resolution, as FixRes
    (Touvron et al., NeurIPS 2019, §3) recommends for RandomResizedCrop training: the crop zooms
    objects in, so smaller views show them at about their apparent size in the full-resolution
    test image, for ``(size / H)^2`` of the convolution cost.
    """

    def __init__(
        self,
        crop_scale_min: float = 0.2,
        jitter: float = 0.4,
        hue: float = 0.1,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        flip_p: float = 0.5,
        size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
        _check_view(size, jitter, hue, jitter_p=jitter_p, grayscale_p=grayscale_p, flip_p=flip_p)
        self.crop_scale_min = crop_scale_min
        self.jitter, self.hue = jitter, hue
        self.jitter_p, self.grayscale_p, self.flip_p = jitter_p, grayscale_p, flip_p
        self.size = size

    def make_params(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        j = self.jitter
        return {
            "boxes": sample_crop_boxes(n, (self.crop_scale_min, 1.0), generator=generator),
            "flip": torch.rand(n, generator=generator) < self.flip_p,
            "jitter": torch.rand(n, generator=generator) < self.jitter_p,
            "brightness": _uniform(n, 1 - j, 1 + j, generator),
            "contrast": _uniform(n, 1 - j, 1 + j, generator),
            "saturation": _uniform(n, 1 - j, 1 + j, generator),
            "hue": _uniform(n, -self.hue, self.hue, generator),
            "gray": torch.rand(n, generator=generator) < self.grayscale_p,
        }

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = to_float(images)
        p = self.make_params(x.shape[0], generator)
        x = resized_crop(x, p["boxes"], p["flip"], self.size)
        on = p["jitter"].to(x.device).view(-1, 1, 1, 1)
        jittered = adjust_brightness(x, p["brightness"])
        jittered = adjust_contrast(jittered, p["contrast"])
        jittered = adjust_saturation(jittered, p["saturation"])
        if self.hue > 0 and x.shape[1] == 3:
            jittered = adjust_hue(jittered, p["hue"])
        x = torch.where(on, jittered, x)
        if x.shape[1] == 3:
            gray = p["gray"].to(x.device).view(-1, 1, 1, 1)
            x = torch.where(gray, grayscale(x).expand_as(x), x)
        return normalize(x)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (reflect-padded borders).

    Args:
        images: ``(B, C, H, W)`` float.
        sigmas: ``(B,)`` standard deviations in pixels (> 0).
        kernel_size: Odd side of the kernel.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    radius = kernel_size // 2
    h, w = images.shape[-2:]
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    s = sigmas.to(images.device, images.dtype).view(-1, 1)
    weights = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * s**2))
    weights = (weights / weights.sum(dim=1, keepdim=True)).view(-1, 1, 1, 1, kernel_size)
    mode = "reflect" if min(h, w) > radius else "replicate"
    x = F.pad(images, (radius, radius, radius, radius), mode=mode)
    # separable: a weighted sum of shifted copies, rows then columns (one kernel per image)
    rows = weights[..., 0] * x[..., :, 0:w]
    for j in range(1, kernel_size):
        rows = rows + weights[..., j] * x[..., :, j : j + w]
    out = weights[..., 0] * rows[..., 0:h, :]
    for j in range(1, kernel_size):
        out = out + weights[..., j] * rows[..., j : j + h, :]
    return out


class ShapeTransform(nn.Module):
    """A view for small greyscale or shape-like images (the Fashion-MNIST augmentation of NMCE,
    Li et al. 2022): a random zoom (``scale``) and shift (up to ``translate`` of the size on each
    axis), a 3x3 Gaussian blur with sigma ~ U(``blur_sigma``), brightness x U(``brightness``);
    no crop, no flip, no colour jitter (left-right and crop invariances are wrong for digits and
    characters, and crops of a 28-pixel object leave little of it).

    Pixels warped in from outside the image repeat the border, so a white background stays white.
    ``size`` renders the view at a lower resolution, as :class:`SimCLRTransform` does.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.8, 1.1),
        translate: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        brightness: tuple[float, float] = (0.5, 1.5),
        size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be an increasing pair of positive numbers, got {scale}")
        if not 0 <= translate < 1:
            raise ValueError(f"translate must be in [0, 1), got {translate}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be an increasing positive pair, got {blur_sigma}")
        if not 0 <= brightness[0] <= brightness[1]:
            raise ValueError(f"brightness must be an increasing pair >= 0, got {brightness}")
        if size is not None and size < 1:
            raise ValueError(f"size must be a positive number of pixels or None, got {size}")
        self.scale, self.translate = scale, translate
        self.blur_sigma, self.brightness, self.size = blur_sigma, brightness, size

    def make_params(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        t = self.translate
        return {
            "scale": _uniform(n, self.scale[0], self.scale[1], generator),
            "tx": _uniform(n, -t, t, generator),
            "ty": _uniform(n, -t, t, generator),
            "sigma": _uniform(n, self.blur_sigma[0], self.blur_sigma[1], generator),
            "brightness": _uniform(n, self.brightness[0], self.brightness[1], generator),
        }

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = to_float(images)
        p = self.make_params(x.shape[0], generator)
        theta = torch.zeros(x.shape[0], 2, 3)
        theta[:, 0, 0] = 1 / p["scale"]
        theta[:, 1, 1] = 1 / p["scale"]
        theta[:, 0, 2] = -2 * p["tx"]
        theta[:, 1, 2] = -2 * p["ty"]
        shape = list(x.shape) if self.size is None else [*x.shape[:2], self.size, self.size]
        grid = F.affine_grid(theta.to(x), shape, align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = gaussian_blur(x, p["sigma"])
        return normalize(adjust_brightness(x, p["brightness"]))


def pretext_view(
    augment: str, image_size: int, view_scale: float, crop_scale_min: float, jitter: float
) -> nn.Module:
    """The pretext views of ``augment``: ``photo`` (:class:`SimCLRTransform`) or ``shape``
    (:class:`ShapeTransform`), rendered at ``view_scale`` of ``image_size``."""
    size = scaled_size(image_size, view_scale)
    if augment == "photo":
        return SimCLRTransform(crop_scale_min=crop_scale_min, jitter=jitter, size=size)
    if augment == "shape":
        return ShapeTransform(size=size)
    raise ValueError(f"Unknown pretext augmentation '{augment}': choose photo or shape.")


class WeakTransform(nn.Module):
    """The weak view: horizontal flip and a mild random crop (scale ``crop_scale_min``..1)."""

    def __init__(self, crop_scale_min: float = 0.8, flip_p: float = 0.5) -> None:
        super().__init__()
        if not 0 < crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
        self.crop_scale_min, self.flip_p = crop_scale_min, flip_p

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = to_float(images)
        n = x.shape[0]
        boxes = sample_crop_boxes(n, (self.crop_scale_min, 1.0), (0.9, 1 / 0.9), generator)
        flip = torch.rand(n, generator=generator) < self.flip_p
        return normalize(resized_crop(x, boxes, flip))


class IdentityTransform(nn.Module):
    """No augmentation: the evaluation view (uint8 -> normalised float)."""

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return normalize(to_float(images))


#: The 14 operations of SCAN's strong augmentation with their magnitude ranges (official code).
STRONG_OPS: tuple[tuple[str, float, float], ...] = (
    ("identity", 0.0, 1.0),
    ("autocontrast", 0.0, 1.0),
    ("equalize", 0.0, 1.0),
    ("rotate", -30.0, 30.0),
    ("solarize", 0.0, 1.0),
    ("color", 0.05, 0.95),
    ("posterize", 4.0, 8.0),
    ("contrast", 0.05, 0.95),
    ("brightness", 0.05, 0.95),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.1, 0.1),
    ("shear_y", -0.1, 0.1),
    ("translate_x", -0.1, 0.1),
    ("translate_y", -0.1, 0.1),
)


#: The operations of :data:`STRONG_OPS` that are affine warps (one ``grid_sample`` per batch).
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def strong_op_theta(op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """The ``(B, 2, 3)`` affine maps of a geometric op of :data:`GEOMETRIC_OPS`."""
    zero = torch.zeros_like(magnitudes)
    if op == "rotate":
        return geometric_theta(angle_deg=magnitudes)
    if op == "shear_x":
        return geometric_theta(shear=(magnitudes, zero))
    if op == "shear_y":
        return geometric_theta(shear=(zero, magnitudes))
    if op == "translate_x":
        return geometric_theta(translate=(magnitudes, zero))
    if op == "translate_y":
        return geometric_theta(translate=(zero, magnitudes))
    raise ValueError(f"'{op}' is not a geometric strong augmentation op.")


def apply_strong_op(images: torch.Tensor, op: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """Apply one of :data:`STRONG_OPS` with per-image magnitudes to float images in [0, 1]."""
    if op == "identity":
        return images
    if op in GEOMETRIC_OPS:
        return affine(images, strong_op_theta(op, magnitudes))
    if op == "autocontrast":
        return autocontrast(images)
    if op == "equalize":
        return equalize(images)
    if op == "solarize":
        return solarize(images, magnitudes)
    if op == "color":
        return adjust_saturation(images, magnitudes)
    if op == "posterize":
        return posterize(images, magnitudes.round())
    if op == "contrast":
        return adjust_contrast(images, magnitudes)
    if op == "brightness":
        return adjust_brightness(images, magnitudes)
    if op == "sharpness":
        return adjust_sharpness(images, magnitudes)
    raise ValueError(f"Unknown strong augmentation op '{op}'.")


@dataclass(frozen=True)
class StrongParams:
    """Random parameters of :class:`StrongTransform` for one batch."""

    boxes: torch.Tensor
    flip: torch.Tensor
    ops: torch.Tensor  # (B, num_ops) indices into STRONG_OPS
    magnitudes: torch.Tensor  # (B, num_ops) in each op's range
    cutout_centers: torch.Tensor  # (B, 2)
    cutout_lengths: torch.Tensor  # (B,) side of each image's Cutout square, in pixels


class StrongTransform(nn.Module):
    """SCAN's strong augmentation (Van Gansbeke et al. 2020, §3.3 and official code).

    Horizontal flip, random crop, then ``num_ops`` operations drawn with replacement from the 14
    of :data:`STRONG_OPS`, each with a magnitude drawn uniformly from its range, then Cutout of a
    square whose side is drawn per image uniformly from 1 to ``cutout_fraction * size`` pixels.
    The official code draws it from 1 to 16 px on 32 px CIFAR images (``cutout_fraction`` 0.5;
    its ``Cutout`` calls ``random.randint(1, length)`` for every image), so the average hole
    covers under a tenth of the image, not the quarter that a fixed half-size square covers.
    """

    def __init__(
        self, num_ops: int = 4, cutout_fraction: float = 0.5, crop_scale_min: float = 0.8
    ) -> None:
        super().__init__()
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        if not 0 <= cutout_fraction <= 1:
            raise ValueError(f"cutout_fraction must be in [0, 1], got {cutout_fraction}")
        self.num_ops, self.cutout_fraction, self.crop_scale_min = (
            num_ops,
            cutout_fraction,
            crop_scale_min,
        )

    def make_params(
        self, n: int, height: int, width: int, generator: torch.Generator | None
    ) -> StrongParams:
        ops = torch.randint(len(STRONG_OPS), (n, self.num_ops), generator=generator)
        low = torch.tensor([lo for _, lo, _ in STRONG_OPS])[ops]
        high = torch.tensor([hi for _, _, hi in STRONG_OPS])[ops]
        magnitudes = low + (high - low) * torch.rand(n, self.num_ops, generator=generator)
        centers = torch.stack(
            [
                torch.randint(height, (n,), generator=generator),
                torch.randint(width, (n,), generator=generator),
            ],
            dim=1,
        )
        longest = round(self.cutout_fraction * min(height, width))
        lengths = (
            torch.randint(1, longest + 1, (n,), generator=generator)
            if longest > 0
            else torch.zeros(n, dtype=torch.long)
        )
        return StrongParams(
            boxes=sample_crop_boxes(n, (self.crop_scale_min, 1.0), (0.9, 1 / 0.9), generator),
            flip=torch.rand(n, generator=generator) < 0.5,
            ops=ops,
            magnitudes=magnitudes,
            cutout_centers=centers,
            cutout_lengths=lengths,
        )

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = to_float(images)
        n, _, h, w = x.shape
        return normalize(self.transform(x, self.make_params(n, h, w, generator)))

    def transform(self, x: torch.Tensor, p: StrongParams) -> torch.Tensor:
        """The deterministic part: float images in [0, 1] and their parameters -> [0, 1].

        In every slot each image gets one op. The images of each op are processed together,
        and all images of the five geometric ops share one warp (an affine map per image), so a
        slot costs at most ten kernel calls whatever the batch size.
        """
        x = resized_crop(x, p.boxes, p.flip)
        geometric = torch.tensor([name in GEOMETRIC_OPS for name, _, _ in STRONG_OPS])
        for slot in range(self.num_ops):
            column, magnitudes = p.ops[:, slot], p.magnitudes[:, slot]
            warped = geometric[column].nonzero().squeeze(1)
            if len(warped):
                theta = torch.empty(len(warped), 2, 3)
                for op_index in column[warped].unique().tolist():
                    of_op = (column[warped] == op_index).nonzero().squeeze(1)
                    theta[of_op] = strong_op_theta(
                        STRONG_OPS[op_index][0], magnitudes[warped[of_op]]
                    )
                rows = warped.to(x.device)
                x.index_copy_(0, rows, affine(x.index_select(0, rows), theta))
            for op_index in column.unique().tolist():
                name = STRONG_OPS[op_index][0]
                if name == "identity" or name in GEOMETRIC_OPS:
                    continue
                selected = (column == op_index).nonzero().squeeze(1)
                rows = selected.to(x.device)
                out = apply_strong_op(x.index_select(0, rows), name, magnitudes[selected])
                x.index_copy_(0, rows, out)
        return cutout(x, p.cutout_centers, p.cutout_lengths)


class IICView(nn.Module):
    """A view of IIC's own augmentation (Ji et al., ICCV 2019; the official greyscale transforms
    of ``xu-ji/IIC``), as batched tensor ops.

    The official MNIST views crop a 28-pixel image: the evaluation view is its centre 20 pixels,
    the light view a 20-pixel crop (centre or random, half each), the heavy view a random crop of
    16, 20 or 24 pixels after a rotation of up to 25 degrees (half of the time), with colour
    jitter (brightness, contrast, saturation 0.4, hue 0.125) and no flip. Here the evaluation
    view is the whole stored image, so every geometric setting is relative to it: ``scales`` are
    crop sides as fractions of the image's side (the official heavy crops are 16/20, 20/20 and
    24/20 of the evaluation view), and ``context`` is how far crops may reach around it (official
    28/20 = 1.4); what lies outside the stored image repeats its border.

    Args:
        scales: Crop sides, one drawn uniformly per image.
        context: Side of the area crops may come from, relative to the image (>= 1).
        centre_p: Probability of a centred crop instead of a random position.
        rotation: Largest rotation in degrees (before the crop, about the image centre).
        rotation_p: Probability of rotating.
        flip_p: Probability of a horizontal flip.
        jitter: Brightness, contrast and saturation factors drawn from ``U(1 - jitter, 1 +
            jitter)``, applied to every image (0: none).
        hue: Hue shift drawn from ``U(-hue, hue)`` (colour images only).
        size: Side of the output in pixels; ``None`` keeps the input size.
    """

    def __init__(
        self,
        scales: tuple[float, ...] = (1.0,),
        context: float = 1.4,
        centre_p: float = 0.0,
        rotation: float = 0.0,
        rotation_p: float = 0.5,
        flip_p: float = 0.0,
        jitter: float = 0.0,
        hue: float = 0.0,
        size: int | None = None,
    ) -> None:
        super().__init__()
        if not scales or any(not 0 < s <= context for s in scales):
            raise ValueError(f"scales must be crop sides in (0, context={context}], got {scales}")
        if context < 1:
            raise ValueError(f"context must be at least 1 (the whole image), got {context}")
        if not 0 <= rotation <= 180:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {rotation}")
        _check_view(size, jitter, hue, centre_p=centre_p, rotation_p=rotation_p, flip_p=flip_p)
        self.scales, self.context, self.centre_p = tuple(scales), context, centre_p
        self.rotation, self.rotation_p, self.flip_p = rotation, rotation_p, flip_p
        self.jitter, self.hue, self.size = jitter, hue, size

    def make_params(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        choice = torch.randint(len(self.scales), (n,), generator=generator)
        side = torch.tensor(self.scales)[choice]
        reach = (self.context - side).clamp(min=0)  # how far the crop's centre may move
        centred = torch.rand(n, generator=generator) < self.centre_p
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * reach.unsqueeze(1)
        rotate = torch.rand(n, generator=generator) < self.rotation_p
        angle = _uniform(n, -self.rotation, self.rotation, generator) * rotate
        j = self.jitter
        return {
            "side": side,
            "shift": shift.masked_fill(centred.unsqueeze(1), 0.0),
            "angle": angle,
            "flip": torch.rand(n, generator=generator) < self.flip_p,
            "brightness": _uniform(n, 1 - j, 1 + j, generator),
            "contrast": _uniform(n, 1 - j, 1 + j, generator),
            "saturation": _uniform(n, 1 - j, 1 + j, generator),
            "hue": _uniform(n, -self.hue, self.hue, generator),
        }

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        x = to_float(images)
        p = self.make_params(x.shape[0], generator)
        # output point u of the crop -> rotated-image point shift + side * u -> source pixel
        rot = geometric_theta(angle_deg=p["angle"])[:, :, :2]
        sign = 1.0 - 2.0 * p["flip"].float()
        scale = torch.diag_embed(torch.stack([p["side"] * sign, p["side"]], dim=1))
        theta = torch.cat([rot @ scale, (rot @ p["shift"].unsqueeze(2))], dim=2)
        shape = list(x.shape) if self.size is None else [*x.shape[:2], self.size, self.size]
        grid = F.affine_grid(theta.to(x), shape, align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter > 0:
            x = adjust_brightness(x, p["brightness"])
            x = adjust_contrast(x, p["contrast"])
            x = adjust_saturation(x, p["saturation"])
        if self.hue > 0 and x.shape[1] == 3:
            x = adjust_hue(x, p["hue"])
        return normalize(x)

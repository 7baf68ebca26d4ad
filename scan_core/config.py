"""Typed configuration, one object per stage (DESIGN.md §3.4).

Every config is a frozen pydantic model that forbids unknown keys, so a typo in a config file or a
``--set`` override fails before any training starts, and ``fingerprint()`` gives the stable hash
that goes into the stage's cache key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackboneName = Literal["small_cnn", "resnet18_cifar", "resnet18", "resnet50"]
Device = Literal["auto", "cpu", "cuda"]


class StageConfig(BaseModel):
    """Base of all stage configs: frozen, strict about unknown keys, hashable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def fingerprint(self) -> str:
        """Return a stable SHA-256 hex digest of the config's JSON form."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class ImageConfig(StageConfig):
    """How lake images become tensors (see :mod:`scan_core.images`).

    Attributes:
        channels: 1 (greyscale) or 3 (RGB); every image is converted to it.
        size: Images become ``size x size``.
        resize: Mixed sizes: ``crop`` (short side to ``size``, centre crop), ``squash`` (ignore the
            aspect ratio) or ``pad`` (long side to ``size``, pad with the edge colour).
        background: Grey level that transparent pixels are composited over.
        max_pixels: Larger images are refused as decompression bombs.
    """

    channels: Literal[1, 3] = 1
    size: int = Field(28, ge=8, le=1024)
    resize: Literal["crop", "squash", "pad"] = "crop"
    background: Literal["black", "white"] = "black"
    max_pixels: int = Field(50_000_000, ge=1)


class PretextConfig(StageConfig):
    """Self-supervised representation learning (SCAN step 1).

    Official SimCLR settings on CIFAR: 500 epochs, batch 512, SGD lr 0.4, momentum 0.9,
    weight decay 1e-4, cosine schedule to lr * 0.1**3, temperature 0.1, 128-d head.
    """

    method: Literal["simclr", "rotnet"] = "simclr"
    backbone: BackboneName = "small_cnn"
    feature_dim: int = Field(128, ge=2)
    epochs: int = Field(500, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(0.4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.1, gt=0)
    crop_scale_min: float = Field(0.2, gt=0, le=1)
    color_jitter: float = Field(0.4, ge=0, le=1)
    seed: int = 0
    device: Device = "auto"


class NeighborsConfig(StageConfig):
    """kNN mining on the pretext features (SCAN step 2)."""

    k: int = Field(20, ge=1)
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_below: int = Field(200_000, ge=1)
    recall_sample: int = Field(1000, ge=1)


class ScanConfig(StageConfig):
    """SCAN clustering (SCAN step 3, paper Eq. 2).

    Official CIFAR settings: Adam lr 1e-4, weight decay 1e-4, batch 128, entropy weight 5.0,
    one head, whole network updated.
    """

    num_clusters: int = Field(10, ge=2)
    num_heads: int = Field(1, ge=1)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    entropy_weight: float = Field(5.0, ge=0)
    update_backbone: bool = True
    augment: Literal["weak", "strong"] = "strong"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    device: Device = "auto"


class SelfLabelConfig(StageConfig):
    """Self-labeling fine-tuning (SCAN step 4).

    Official: threshold 0.99, CE on a strong view with inverse-frequency weights, Adam 1e-4,
    batch 1000; stop when the number of confident samples stops growing.
    """

    enabled: bool = True
    threshold: float = Field(0.99, gt=0, lt=1)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(1000, ge=2)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    class_balance: bool = True
    patience: int = Field(3, ge=1)
    seed: int = 0
    device: Device = "auto"


class PipelineConfig(StageConfig):
    """The whole pipeline's science settings, one section per stage."""

    image: ImageConfig = ImageConfig()
    pretext: PretextConfig = PretextConfig()
    neighbors: NeighborsConfig = NeighborsConfig()
    scan: ScanConfig = ScanConfig()
    selflabel: SelfLabelConfig = SelfLabelConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> PipelineConfig:
        if self.pretext.backbone == "small_cnn" and self.image.size < 16:
            raise ValueError("image.size must be at least 16 for the small_cnn backbone")
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> PipelineConfig:
        """Return a copy with dotted-key overrides applied, e.g. ``{"scan.epochs": 5}``."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            node = data
            parts = dotted.split(".")
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], dict):
                    raise ValueError(f"Unknown config section '{part}' in '{dotted}'.")
                node = node[part]
            if parts[-1] not in node:
                raise ValueError(f"Unknown config key '{dotted}'.")
            node[parts[-1]] = value
        return PipelineConfig.model_validate(data)


def resolve_device(device: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is present, else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use 'auto'.")
    return device

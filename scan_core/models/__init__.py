"""Networks: backbones, heads, and the pretext / clustering models built from them."""

from scan_core.models.backbones import (
    Backbone,
    ResNetCifarBackbone,
    SmallCNNBackbone,
    TorchvisionResNetBackbone,
    build_backbone,
)
from scan_core.models.heads import (
    ClusterHeads,
    ClusteringModel,
    EmbeddingHead,
    NormFCHead,
    NormFCLayer,
    PretextModel,
    RotNetHead,
    SimCLRProjectionHead,
)

__all__ = [
    "Backbone",
    "ClusterHeads",
    "ClusteringModel",
    "EmbeddingHead",
    "NormFCHead",
    "NormFCLayer",
    "PretextModel",
    "ResNetCifarBackbone",
    "RotNetHead",
    "SimCLRProjectionHead",
    "SmallCNNBackbone",
    "TorchvisionResNetBackbone",
    "build_backbone",
]

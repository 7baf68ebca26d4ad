"""Heads and the two networks SCAN trains: the pretext model and the clustering model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scan_core.models.backbones import Backbone


class SimCLRProjectionHead(nn.Module):
    """SimCLR projection head g(.) (Chen et al., ICML 2020, §2.1): Linear-ReLU-Linear, L2-norm.

    Args:
        in_dim: Backbone feature size.
        out_dim: Projection size (SCAN/SimCLR: 128).
        hidden_dim: Hidden size (defaults to ``in_dim``, as in the SCAN code).

    Shapes:
        ``(B, in_dim)`` -> ``(B, out_dim)`` with unit L2 norm rows.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got {in_dim}, {out_dim}")
        hidden = hidden_dim or in_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)


class RotNetHead(nn.Module):
    """RotNet classifier (Gidaris et al., ICLR 2018): features -> 4 rotation logits.

    Shapes: ``(B, in_dim)`` -> ``(B, 4)``.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ClusterHeads(nn.Module):
    """Several linear cluster heads trained at once (SCAN §3.2: keep the lowest-loss head).

    Args:
        in_dim: Backbone feature size.
        num_clusters: Outputs per head (C).
        num_heads: Number of heads (H).

    Shapes:
        ``(B, in_dim)`` -> logits ``(H, B, C)``.
    """

    def __init__(self, in_dim: int, num_clusters: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_clusters) for _ in range(num_heads))
        self.num_clusters = num_clusters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads])


class PretextModel(nn.Module):
    """Backbone + pretext head. ``forward`` returns the head output; ``features`` the backbone's."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class ClusteringModel(nn.Module):
    """Phi_eta of SCAN: a backbone (initialised from the pretext) + linear cluster heads.

    ``forward`` returns logits ``(H, B, C)``; after training, :meth:`keep_head` drops all heads
    but the chosen one, so ``forward`` returns ``(1, B, C)``.
    """

    def __init__(self, backbone: Backbone, num_clusters: int, num_heads: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.cluster_heads = ClusterHeads(backbone.out_dim, num_clusters, num_heads)

    @property
    def num_clusters(self) -> int:
        return self.cluster_heads.num_clusters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cluster_heads(self.backbone(x))

    def keep_head(self, index: int) -> None:
        """Keep only head ``index`` (the one with the lowest validation SCAN loss)."""
        heads = self.cluster_heads.heads
        if not 0 <= index < len(heads):
            raise ValueError(f"head index {index} out of range for {len(heads)} heads")
        self.cluster_heads.heads = nn.ModuleList([heads[index]])

"""Heads and the two networks SCAN trains: the pretext model and the clustering model."""

from __future__ import annotations

from typing import Literal

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
    """Backbone + pretext head. ``forward`` returns the head output; ``features`` the backbone's.

    ``embeds_with_head``: the pretext embedding (what neighbours are mined on) is the head's
    output (SimCLR's projection, Super-AND's embedding); false when the head is a training device
    only (RotNet's rotation classifier, BYOL's projector) and the embedding is the backbone's.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, embeds_with_head: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embeds_with_head = embeds_with_head

    @property
    def embedding_head(self) -> nn.Module | None:
        """The head that maps backbone features to the pretext embedding (None: the identity)."""
        return self.head if self.embeds_with_head else None

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
        self.keep_heads([index])

    def keep_heads(self, indices: list[int]) -> None:
        """Keep only the heads ``indices``, in that order (e.g. the lowest-loss heads first)."""
        heads = self.cluster_heads.heads
        if not indices:
            raise ValueError("keep at least one head")
        for index in indices:
            if not 0 <= index < len(heads):
                raise ValueError(f"head index {index} out of range for {len(heads)} heads")
        self.cluster_heads.heads = nn.ModuleList([heads[i] for i in indices])


class EmbeddingHead(nn.Module):
    """Linear projection to a low-dimensional L2-normalised embedding.

    The embedding of non-parametric instance discrimination (Wu et al., CVPR 2018, §3.1), AND
    (Huang et al. 2019) and Super-AND (Han et al. 2020): backbone features -> ``Linear`` ->
    unit sphere (official: 128-d).

    Shapes:
        ``(B, in_dim)`` -> ``(B, out_dim)`` with unit L2 norm rows.
    """

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got {in_dim}, {out_dim}")
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x), dim=1)


class NormFCLayer(nn.Module):
    """One normalised fully-connected classifier: cosine-like logits divided by a temperature.

    ``logits = (x / |x|) W_n^T / temperature``, no bias (Han et al., ECCV 2020, §3.2), where the
    weight ``W (C, in_dim)`` is L2-normalised along ``norm_axis``:

    * ``"cluster"``: every cluster's weight vector has unit norm, so logits are cosines in
      ``[-1/t, 1/t]`` (the paper's description);
    * ``"feature"``: every embedding dimension's weights across the C clusters have unit norm
      (the official code's ``Normalize`` over dim 1 of its ``(in_dim, C)`` weight); a cluster
      vector then has norm about ``sqrt(in_dim / C)``, so logits are that much sharper.

    Shapes:
        ``(B, in_dim)`` -> ``(B, num_clusters)``.
    """

    def __init__(
        self,
        in_dim: int,
        num_clusters: int,
        temperature: float = 0.1,
        norm_axis: Literal["cluster", "feature"] = "feature",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if norm_axis not in ("cluster", "feature"):
            raise ValueError(f"norm_axis must be 'cluster' or 'feature', got {norm_axis!r}")
        self.weight = nn.Parameter(torch.empty(num_clusters, in_dim))
        nn.init.normal_(self.weight)  # official initialisation
        self.temperature = temperature
        self.norm_axis = norm_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1 if self.norm_axis == "cluster" else 0)
        return F.linear(F.normalize(x, dim=1), weight) / self.temperature


class NormFCHead(ClusterHeads):
    """Several normalised-FC cluster heads (Han et al., ECCV 2020, §3.2 "Norm-FC classifier").

    Each sub-head (:class:`NormFCLayer`) has L2-normalised weights, no bias, and divides its
    logits by the temperature ``tau_c`` (official 0.1; the paper's ablation on CIFAR-10: 81.0%
    ACC, 56.0% without weight normalisation, 19.5% with ``tau_c = 1``). Official: 5 sub-heads
    whose random weights stay frozen (``requires_grad_(False)``), normalised per embedding
    dimension (``norm_axis="feature"``, see :class:`NormFCLayer`). A drop-in for
    :class:`ClusterHeads`, so a :class:`ClusteringModel` can carry it.

    Args:
        in_dim: Embedding size (128).
        num_clusters: Outputs per head (C).
        num_heads: Number of sub-heads (H, official 5).
        temperature: tau_c (official 0.1).
        norm_axis: ``"cluster"`` (unit weight vector per cluster, the paper's wording) or
            ``"feature"`` (the official code).

    Shapes:
        ``(B, in_dim)`` -> logits ``(H, B, C)``.
    """

    def __init__(
        self,
        in_dim: int,
        num_clusters: int,
        num_heads: int = 5,
        temperature: float = 0.1,
        norm_axis: Literal["cluster", "feature"] = "feature",
    ) -> None:
        super().__init__(in_dim, num_clusters, num_heads)
        self.heads = nn.ModuleList(
            NormFCLayer(in_dim, num_clusters, temperature, norm_axis) for _ in range(num_heads)
        )
        self.temperature = temperature

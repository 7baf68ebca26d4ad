"""Model checkpoints in a stage directory: ``torch.save(state_dict)`` plus a JSON description
that is enough to rebuild the module (loaded back with ``weights_only=True``).

Clustering models of every method (``clustering.method``) share one layout: a backbone,
optionally followed by an L2-normalised embedding head (two-stage and K-means models work on the
pretext embedding), and one cluster head (linear, or Norm-FC for two-stage). The description
says which; descriptions written before the methods existed mean a plain backbone and a linear
head.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch
from torch import nn

from scan_core.config import PretextConfig, SuperANDConfig
from scan_core.models import (
    ClusteringModel,
    EmbeddingHead,
    NormFCHead,
    PretextModel,
    SimCLRProjectionHead,
    build_backbone,
)
from scan_core.pretext import build_pretext_model
from scan_core.twostage import EmbeddingBackbone
from tasks.errors import ScanLakeError
from tasks.storage import Storage

CHECKPOINT = "model.pt"
DESCRIPTION = "model.json"


def state_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict serialised with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load_state(workspace: Storage, rel_dir: str) -> dict[str, Any]:
    """Load a stage's state_dict safely: ``weights_only=True`` unpickles tensors and plain
    containers only, so a checkpoint that would run code when loaded is refused, never run.

    Raises:
        ScanLakeError: the checkpoint holds other Python objects, or is not a checkpoint.
    """
    path = f"{rel_dir}/{CHECKPOINT}"
    data = workspace.read_bytes(path)
    cause: Exception
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    except pickle.UnpicklingError as exc:
        problem, cause = "holds Python objects other than tensors, which are never unpickled", exc
    except RuntimeError as exc:  # not a torch zip archive: truncated or overwritten
        detail = " ".join(str(exc).split())[:120]
        problem, cause = f"is not a readable PyTorch checkpoint ({detail})", exc
    raise ScanLakeError(
        f"The checkpoint {workspace.uri(path)} {problem}: point --workspace at a fresh folder "
        "to recompute the stages, and check who can write this one."
    ) from cause


def load_pretext_model(workspace: Storage, rel_dir: str) -> PretextModel:
    """Rebuild the pretext model of a pretext stage directory."""
    description = workspace.read_json(f"{rel_dir}/{DESCRIPTION}")
    config = dict(description["config"])
    if config.get("method") == "superand":  # backbone + 128-d embedding head
        superand = SuperANDConfig.model_validate({k: v for k, v in config.items() if k != "method"})
        backbone = build_backbone(superand.backbone, description["in_channels"])
        model = PretextModel(backbone, EmbeddingHead(backbone.out_dim, superand.feature_dim))
    else:
        model = build_pretext_model(
            PretextConfig.model_validate(config), description["in_channels"]
        )
    model.load_state_dict(load_state(workspace, rel_dir))
    return model.eval()


def embedding_description(head: nn.Module | None) -> dict[str, Any]:
    """How to rebuild the embedding head between backbone and cluster head (None: identity)."""
    if head is None:
        return {"head": "none"}
    if isinstance(head, SimCLRProjectionHead):
        first, last = head.mlp[0], head.mlp[2]
        return {"head": "simclr", "dim": last.out_features, "hidden": first.out_features}
    if isinstance(head, EmbeddingHead):
        return {"head": "linear", "dim": head.fc.out_features}
    raise ValueError(f"no checkpoint description for an embedding head {type(head).__name__}")


def _embedding_head(description: dict[str, Any], in_dim: int) -> nn.Module:
    kind = description["head"]
    if kind == "simclr":
        return SimCLRProjectionHead(in_dim, description["dim"], description["hidden"])
    if kind == "linear":
        return EmbeddingHead(in_dim, description["dim"])
    return nn.Identity()


def clustering_description(
    backbone: str,
    in_channels: int,
    num_clusters: int,
    embedding: dict[str, Any] | None = None,
    cluster_head: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What :func:`load_clustering_model` needs to rebuild a one-head clustering model.

    Args:
        backbone: Backbone name.
        in_channels: Image channels.
        num_clusters: Cluster outputs.
        embedding: :func:`embedding_description` of the embedding head after the backbone
            (two-stage, K-means); None for none (SCAN, IIC).
        cluster_head: ``{"kind": "normfc", "temperature": t, "norm_axis": a}`` for a Norm-FC
            head (two-stage); None for a linear head.
    """
    out: dict[str, Any] = {
        "backbone": backbone,
        "in_channels": in_channels,
        "num_clusters": num_clusters,
    }
    if embedding is not None:
        out["embedding"] = embedding
    if cluster_head is not None:
        out["cluster_head"] = cluster_head
    return out


def build_clustering_model(description: dict[str, Any]) -> ClusteringModel:
    """An untrained one-head clustering model of the architecture ``description`` names."""
    net = build_backbone(description["backbone"], description["in_channels"])
    if "embedding" in description:
        net = EmbeddingBackbone(net, _embedding_head(description["embedding"], net.out_dim))
    k = description["num_clusters"]
    model = ClusteringModel(net, k, 1)
    head = description.get("cluster_head")
    if head is not None and head.get("kind") == "normfc":
        model.cluster_heads = NormFCHead(net.out_dim, k, 1, head["temperature"], head["norm_axis"])
    return model


def load_clustering_model(workspace: Storage, rel_dir: str) -> ClusteringModel:
    """Rebuild the (one-head) clustering model of a scan, selflabel or assign stage directory."""
    description = workspace.read_json(f"{rel_dir}/{DESCRIPTION}")
    model = build_clustering_model(description)
    model.load_state_dict(load_state(workspace, rel_dir))
    return model.eval()


def reorder_clusters(model: ClusteringModel, order: np.ndarray) -> ClusteringModel:
    """Permute the cluster outputs of ``model`` in place: new output ``j`` is old output
    ``order[j]`` (the rows of every head's weight and bias, if it has one, are reordered; a
    Norm-FC head normalises per cluster or across clusters, which a permutation keeps).
    Returns ``model``.

    Raises:
        ValueError: ``order`` is not a permutation of the model's clusters.
    """
    index = np.asarray(order, dtype=np.int64)
    if sorted(index.tolist()) != list(range(model.num_clusters)):
        raise ValueError(f"order must be a permutation of 0 .. {model.num_clusters - 1}")
    rows = torch.as_tensor(index)
    with torch.no_grad():
        for head in model.cluster_heads.heads:
            weight = head.weight
            assert isinstance(weight, torch.Tensor)
            weight.copy_(weight[rows].clone())
            bias: torch.Tensor | None = getattr(head, "bias", None)
            if bias is not None:
                bias.copy_(bias[rows].clone())
    return model

"""Model checkpoints in a stage directory: ``torch.save(state_dict)`` plus a JSON description
that is enough to rebuild the module (loaded back with ``weights_only=True``)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from scan_core.config import PretextConfig
from scan_core.models import ClusteringModel, PretextModel, build_backbone
from scan_core.pretext import build_pretext_model
from tasks.storage import Storage

CHECKPOINT = "model.pt"
DESCRIPTION = "model.json"


def state_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict serialised with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load_state(workspace: Storage, rel_dir: str) -> dict[str, Any]:
    """Load a stage's state_dict safely (``weights_only=True``)."""
    data = workspace.read_bytes(f"{rel_dir}/{CHECKPOINT}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


def load_pretext_model(workspace: Storage, rel_dir: str) -> PretextModel:
    """Rebuild the pretext model of a pretext stage directory."""
    description = workspace.read_json(f"{rel_dir}/{DESCRIPTION}")
    model = build_pretext_model(
        PretextConfig.model_validate(description["config"]), description["in_channels"]
    )
    model.load_state_dict(load_state(workspace, rel_dir))
    return model.eval()


def clustering_description(backbone: str, in_channels: int, num_clusters: int) -> dict[str, Any]:
    """What :func:`load_clustering_model` needs to rebuild a one-head clustering model."""
    return {"backbone": backbone, "in_channels": in_channels, "num_clusters": num_clusters}


def load_clustering_model(workspace: Storage, rel_dir: str) -> ClusteringModel:
    """Rebuild the (one-head) clustering model of a scan or selflabel stage directory."""
    description = workspace.read_json(f"{rel_dir}/{DESCRIPTION}")
    backbone = build_backbone(description["backbone"], description["in_channels"])
    model = ClusteringModel(backbone, description["num_clusters"], 1)
    model.load_state_dict(load_state(workspace, rel_dir))
    return model.eval()


def reorder_clusters(model: ClusteringModel, order: np.ndarray) -> ClusteringModel:
    """Permute the cluster outputs of ``model`` in place: new output ``j`` is old output
    ``order[j]`` (the rows of every head's weight and bias are reordered). Returns ``model``.

    Raises:
        ValueError: ``order`` is not a permutation of the model's clusters.
    """
    index = np.asarray(order, dtype=np.int64)
    if sorted(index.tolist()) != list(range(model.num_clusters)):
        raise ValueError(f"order must be a permutation of 0 .. {model.num_clusters - 1}")
    rows = torch.as_tensor(index)
    with torch.no_grad():
        for head in model.cluster_heads.heads:
            head.weight.copy_(head.weight[rows].clone())
            head.bias.copy_(head.bias[rows].clone())
    return model

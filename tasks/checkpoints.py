"""Model checkpoints in a stage directory: ``torch.save(state_dict)`` plus a JSON description
that is enough to rebuild the module (loaded back with ``weights_only=True``).

Clustering models of every method (``clustering.method``) share one layout: a backbone,
optionally followed by an L2-normalised embedding head (two-stage and K-means models work on the
pretext embedding), and one cluster head (linear, or Norm-FC for two-stage). The description
says which; descriptions written before the methods existed mean a plain backbone and a linear
head.

Both files are read back from the workspace, so neither is trusted: the checkpoint is never
unpickled beyond tensors (``weights_only=True``) and must fit the network its description builds;
the description is validated (:class:`PretextDescription`, :class:`ClusteringDescription`). A file
that fails is a :class:`~tasks.errors.WorkspaceFileError` naming it.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from scan_core.config import BackboneName
from scan_core.methods import pretext_method_of
from scan_core.models import (
    ClusteringModel,
    EmbeddingHead,
    NormFCHead,
    PretextModel,
    SimCLRProjectionHead,
    build_backbone,
)
from scan_core.twostage import EmbeddingBackbone
from tasks.storage import Storage, validation_problem

CHECKPOINT = "model.pt"
DESCRIPTION = "model.json"


class PretextDescription(BaseModel):
    """``model.json`` of a pretext stage: its stage config and the image channels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: dict[str, Any]
    in_channels: Literal[1, 3]


class EmbeddingDescription(BaseModel):
    """The embedding head between backbone and cluster head (:func:`embedding_description`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    head: Literal["none", "simclr", "linear"]
    dim: int | None = Field(None, ge=1, le=65536)
    hidden: int | None = Field(None, ge=1, le=65536)

    @model_validator(mode="after")
    def _sizes_of_the_head(self) -> EmbeddingDescription:
        needs = {"none": (), "linear": ("dim",), "simclr": ("dim", "hidden")}[self.head]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.head} embedding head needs {' and '.join(missing)}")
        return self


class ClusterHeadDescription(BaseModel):
    """A Norm-FC cluster head (two-stage)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["normfc"]
    temperature: float = Field(gt=0)
    norm_axis: Literal["cluster", "feature"]


class ClusteringDescription(BaseModel):
    """``model.json`` of a clustering stage (scan, selflabel, assign): what
    :func:`build_clustering_model` needs (:func:`clustering_description`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: BackboneName
    in_channels: Literal[1, 3]
    num_clusters: int = Field(ge=2, le=100_000)
    embedding: EmbeddingDescription | None = None
    cluster_head: ClusterHeadDescription | None = None


def state_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict serialised with ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load_state(workspace: Storage, rel_dir: str) -> dict[str, Any]:
    """Load a stage's state_dict safely: ``weights_only=True`` unpickles tensors and plain
    containers only, so a checkpoint that would run code when loaded is refused, never run.

    Raises:
        WorkspaceFileError: the checkpoint holds other Python objects, or is not a checkpoint.
    """
    path = f"{rel_dir}/{CHECKPOINT}"
    data = workspace.read_bytes(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a Python object, or bytes that are no pickle
        reason = str(exc).partition("WeightsUnpickler error:")[2] or str(exc)
        problem = (
            "is not a checkpoint of tensors only: the tensors-only loader refused it and nothing "
            f"in it was run ({_detail(reason)})"
        )
        raise workspace.bad_file(path, problem) from exc
    except (RuntimeError, EOFError, ValueError) as exc:  # not a torch archive: cut or replaced
        raise workspace.bad_file(
            path, f"is not a readable PyTorch checkpoint ({_detail(exc)})"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise workspace.bad_file(path, "is not a state_dict of named tensors")
    return state


def _detail(exc: object) -> str:
    text = " ".join(str(exc).split())[:120]
    return text or type(exc).__name__


def _fill(model: nn.Module, workspace: Storage, rel_dir: str) -> None:
    """Load the stage's checkpoint into ``model``, which its description built.

    Raises:
        WorkspaceFileError: the checkpoint does not fit that network.
    """
    state = load_state(workspace, rel_dir)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        detail = " ".join(str(exc).split())[:120]
        raise workspace.bad_file(
            f"{rel_dir}/{CHECKPOINT}",
            f"does not fit the network {DESCRIPTION} describes ({detail})",
        ) from exc


def read_pretext_description(workspace: Storage, rel_dir: str) -> PretextDescription:
    """The validated ``model.json`` of a pretext stage folder.

    Raises:
        WorkspaceFileError: it is not a pretext model description.
    """
    return workspace.read_model(
        f"{rel_dir}/{DESCRIPTION}", PretextDescription, "pretext model description"
    )


def read_clustering_description(workspace: Storage, rel_dir: str) -> ClusteringDescription:
    """The validated ``model.json`` of a scan, selflabel or assign stage folder.

    Raises:
        WorkspaceFileError: it is not a clustering model description.
    """
    return workspace.read_model(
        f"{rel_dir}/{DESCRIPTION}", ClusteringDescription, "clustering model description"
    )


def load_pretext_model(workspace: Storage, rel_dir: str) -> PretextModel:
    """Rebuild the pretext model of a pretext stage directory.

    Raises:
        WorkspaceFileError: the description or the checkpoint cannot be used.
    """
    description = read_pretext_description(workspace, rel_dir)
    config = dict(description.config)
    try:
        method = pretext_method_of(config)
        model = method.build(method.parse(config), description.in_channels)
    except ValidationError as exc:
        problem = f"has an invalid pretext config ({validation_problem(exc)})"
        raise workspace.bad_file(f"{rel_dir}/{DESCRIPTION}", problem) from exc
    except ValueError as exc:  # an unknown method
        raise workspace.bad_file(f"{rel_dir}/{DESCRIPTION}", str(exc)) from exc
    _fill(model, workspace, rel_dir)
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


def _embedding_head(description: EmbeddingDescription, in_dim: int) -> nn.Module:
    if description.head == "simclr":
        assert description.dim is not None and description.hidden is not None  # validated
        return SimCLRProjectionHead(in_dim, description.dim, description.hidden)
    if description.head == "linear":
        assert description.dim is not None  # validated
        return EmbeddingHead(in_dim, description.dim)
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


def build_clustering_model(description: dict[str, Any] | ClusteringDescription) -> ClusteringModel:
    """An untrained one-head clustering model of the architecture ``description`` names."""
    spec = ClusteringDescription.model_validate(description)
    net = build_backbone(spec.backbone, spec.in_channels)
    if spec.embedding is not None:
        net = EmbeddingBackbone(net, _embedding_head(spec.embedding, net.out_dim))
    k = spec.num_clusters
    model = ClusteringModel(net, k, 1)
    head = spec.cluster_head
    if head is not None:
        model.cluster_heads = NormFCHead(net.out_dim, k, 1, head.temperature, head.norm_axis)
    return model


def load_clustering_model(workspace: Storage, rel_dir: str) -> ClusteringModel:
    """Rebuild the (one-head) clustering model of a scan, selflabel or assign stage directory.

    Raises:
        WorkspaceFileError: the description or the checkpoint cannot be used.
    """
    model = build_clustering_model(read_clustering_description(workspace, rel_dir))
    _fill(model, workspace, rel_dir)
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

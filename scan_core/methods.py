"""The method registries: one per method kind, so the flow, the tasks and the cache keys ask an
entry what to do instead of branching on method names (docs/architecture.md, 'Methods').

* :data:`PRETEXT` (``pretext.method``): SimCLR, RotNet, Super-AND, BYOL. An entry says where its
  settings come from, how it trains, how its saved network is rebuilt, and what its stage key
  depends on.
* :data:`CLUSTERING` (``clustering.method``): SCAN, two-stage, IIC, K-means. An entry says which
  settings it takes for ``k`` clusters, which inputs it reads (pixels, mined neighbours,
  embeddings) and which stage keys its key holds, how it trains, and whether warm starts,
  step 4 and the guard apply to it.
* :data:`STEP4` (``selflabel.method``): SCAN's self-labeling and SPICE's reliable labels
  (:data:`scan_core.selflabel.STEP4_METHODS`).

Adding a method is one entry here, its settings in :mod:`scan_core.config` (a literal of the
method field and, if it has settings of its own, a section) and its training module.

This module only names things; the cache keys follow each method's own ``modules``, never this
file (``tasks/keys.py``), so adding a method leaves the keys of the others unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from scan_core.byol import build_byol_model, train_byol
from scan_core.clustering import ScanResult, train_scan
from scan_core.config import (
    BYOLConfig,
    IICConfig,
    KMeansClusteringConfig,
    PipelineConfig,
    PretextConfig,
    ScanConfig,
    StageConfig,
    SuperANDConfig,
    TwoStageConfig,
)
from scan_core.iic import train_iic
from scan_core.kmeans import build_kmeans_model, fit_kmeans
from scan_core.models import ClusteringModel, PretextModel
from scan_core.pretext import PretextResult, build_pretext_model, train_pretext
from scan_core.selflabel import STEP4_METHODS, Step4Method
from scan_core.superand import build_superand_model, train_superand
from scan_core.training import EpochLog, ProgressCallback
from scan_core.twostage import EmbeddingBackbone, train_twostage

#: What a stage config records (JSON values).
StageDict = dict[str, Any]


def _method_error(kind: str, name: str, known: dict[str, Any]) -> ValueError:
    return ValueError(f"unknown {kind} method '{name}': choose one of {', '.join(known)}")


# --- pretext (SCAN step 1) ---------------------------------------------------------------------


@dataclass(frozen=True)
class PretextMethod:
    """A pretext method (``pretext.method``).

    Attributes:
        name: The ``pretext.method`` value.
        title: How summaries name it.
        settings_class: Its typed settings.
        section: The pipeline config section with the settings only it has (None: the
            ``pretext`` section is all of them; its stage config then is that section as it
            always was, ``method`` included).
        train: ``(uint8 images, settings, progress) -> PretextResult``.
        build: ``(settings, in_channels) -> PretextModel``: an untrained network of the saved
            architecture (for loading checkpoints).
        key_name: The name its stage key and code version are computed under.
        modules: The ``scan_core`` modules its key follows (and what they import).
        format_version: Bumped when its stage changes what it writes.
    """

    name: str
    title: str
    settings_class: type[StageConfig]
    section: str | None
    train: Callable[[torch.Tensor, Any, ProgressCallback | None], PretextResult]
    build: Callable[[Any, int], PretextModel]
    key_name: str
    modules: tuple[str, ...]
    format_version: int = 1

    def settings(self, config: PipelineConfig) -> StageConfig:
        """Its typed settings in ``config``."""
        if self.section is None:
            return self.settings_class.model_validate(config.pretext.model_dump())
        return config.pretext_with(self.section, self.settings_class)

    def stage_config(self, config: PipelineConfig) -> StageDict:
        """The pretext stage's config (what the manifest and the checkpoint description hold)."""
        if self.section is None:
            return config.pretext.model_dump(mode="json")
        return {"method": self.name, **self.settings(config).model_dump(mode="json")}

    def parse(self, stage_config: StageDict) -> StageConfig:
        """The typed settings of a stage config of this method (raises ValidationError)."""
        if self.section is None:
            return self.settings_class.model_validate(stage_config)
        own = {k: v for k, v in stage_config.items() if k != "method"}
        return self.settings_class.model_validate(own)


_LOADS_PRETEXT_MODEL = ("scan_core.pretext", "scan_core.models")


def _train_pretext_method(name: str, title: str) -> PretextMethod:
    """SimCLR or RotNet: the ``pretext`` section alone, trained by :func:`train_pretext`, keyed
    as the pretext stage always was."""
    return PretextMethod(
        name=name,
        title=title,
        settings_class=PretextConfig,
        section=None,
        train=train_pretext,
        build=build_pretext_model,
        key_name="pretext",
        modules=("scan_core.pretext",),
    )


PRETEXT: dict[str, PretextMethod] = {
    m.name: m
    for m in (
        _train_pretext_method("simclr", "SimCLR"),
        _train_pretext_method("rotnet", "RotNet"),
        PretextMethod(
            name="superand",
            title="Super-AND",
            settings_class=SuperANDConfig,
            section="superand",
            train=train_superand,
            build=build_superand_model,
            key_name="superand",
            modules=("scan_core.superand", *_LOADS_PRETEXT_MODEL),
        ),
        PretextMethod(
            name="byol",
            title="BYOL",
            settings_class=BYOLConfig,
            section="byol",
            train=train_byol,
            build=build_byol_model,
            key_name="byol",
            modules=("scan_core.byol", *_LOADS_PRETEXT_MODEL),
        ),
    )
}


def pretext_method(name: str) -> PretextMethod:
    """The registry entry of ``pretext.method`` ``name`` (ValueError: none)."""
    if name not in PRETEXT:
        raise _method_error("pretext", name, PRETEXT)
    return PRETEXT[name]


def pretext_method_of(stage_config: StageDict) -> PretextMethod:
    """The entry of a pretext stage config (configs of SimCLR and RotNet name theirs in
    ``method``, which defaults to SimCLR)."""
    return pretext_method(str(stage_config.get("method", "simclr")))


# --- clustering (SCAN step 3 and its alternatives) ---------------------------------------------


@dataclass(frozen=True)
class ClusteringData:
    """What a clustering method reads; the stage loads only what the entry's ``needs`` name.

    ``images`` are uint8 ``(N, C, H, W)``, in the row order of ``neighbors`` when those are
    needed too (else in catalog order); ``init`` is a warm start's model.
    """

    pretext: PretextModel
    images: torch.Tensor | None = None
    neighbors: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    init: ClusteringModel | None = None


@dataclass
class ClusteringOutcome:
    """A trained one-head clustering model and what the stage records of it.

    Attributes:
        model: The model (its best head).
        history: Per-epoch metrics (empty for K-means).
        metrics: Logged once (held-out loss of every head, the head kept, inertia).
        summary: Added to the stage summary.
        cluster_head: ``{"kind": "normfc", ...}`` for a Norm-FC cluster head (None: linear).
    """

    model: ClusteringModel
    history: list[EpochLog] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    cluster_head: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClusteringMethod:
    """A clustering method (``clustering.method``).

    Attributes:
        name: The ``clustering.method`` value; also the name its stage key is computed under.
        title: How summaries name it.
        settings_class: Its typed settings (with ``num_clusters``).
        settings_for: ``(pipeline config, k) -> settings`` for ``k`` clusters.
        needs: What it reads: ``images``, ``neighbors``, ``embeddings``.
        key_inputs: The stage keys its own key holds: ``pretext``, ``neighbors``, ``images``
            (the catalog's images), ``embed``.
        train: ``(data, settings, progress) -> ClusteringOutcome``.
        modules: The ``scan_core`` modules its key follows.
        warm_start: It can start from the previous run's model (growing lakes).
        self_labels: Step 4 follows it.
        guarded: The guard compares its partition with K-means'.
        format_version: Bumped when its stage changes what it writes.
    """

    name: str
    title: str
    settings_class: type[StageConfig]
    settings_for: Callable[[PipelineConfig, int], StageConfig]
    needs: frozenset[str]
    key_inputs: tuple[str, ...]
    train: Callable[[ClusteringData, Any, ProgressCallback | None], ClusteringOutcome]
    modules: tuple[str, ...]
    warm_start: bool = False
    self_labels: bool = False
    guarded: bool = True
    format_version: int = 1

    def stage_config(self, settings: StageConfig) -> StageDict:
        """The stage config of ``settings`` (SCAN's is its section as it always was; the others
        name their method)."""
        dump = settings.model_dump(mode="json")
        return dump if self.name == "scan" else {"method": self.name, **dump}

    def parse(self, stage_config: StageDict) -> StageConfig:
        """The typed settings of a stage config of this method (raises ValidationError)."""
        own = {k: v for k, v in stage_config.items() if k != "method"}
        return self.settings_class.model_validate(own)


def _head_metrics(method: str, head_losses: list[float], best_head: int) -> dict[str, float]:
    """The head choice, logged once: every head's held-out loss on all held-out images (the
    per-epoch ``head_<h>_val_loss`` uses a sample) and the head kept (the lowest)."""
    losses = {f"{method}/head_{i}_selection_loss": v for i, v in enumerate(head_losses)}
    return {**losses, f"{method}/best_head": float(best_head)}


def _outcome(method: str, result: ScanResult) -> ClusteringOutcome:
    """The outcome of a method that keeps the head with the lowest held-out loss."""
    best = result.best_head
    return ClusteringOutcome(
        model=result.model,
        history=result.history,
        metrics=_head_metrics(method, result.head_losses, best),
        summary={"best_head": best, "val_loss": result.head_losses[best]},
    )


def _train_scan(
    data: ClusteringData, settings: ScanConfig, progress: ProgressCallback | None
) -> ClusteringOutcome:
    assert data.images is not None and data.neighbors is not None  # needs
    result = train_scan(
        data.images,
        data.neighbors,
        data.pretext.backbone,
        settings,
        progress=progress,
        init_model=data.init,
    )
    return _outcome("scan", result)


def _train_twostage(
    data: ClusteringData, settings: TwoStageConfig, progress: ProgressCallback | None
) -> ClusteringOutcome:
    assert data.images is not None  # needs
    result = train_twostage(
        data.images,
        data.pretext.backbone,
        settings,
        progress=progress,
        embedding_head=data.pretext.embedding_head,
    )
    outcome = _outcome("twostage", result)
    if isinstance(result.model.backbone, EmbeddingBackbone):
        outcome.cluster_head = {
            "kind": "normfc",
            "temperature": settings.head_temperature,
            "norm_axis": settings.head_norm_axis,
        }
    return outcome


def _train_iic(
    data: ClusteringData, settings: IICConfig, progress: ProgressCallback | None
) -> ClusteringOutcome:
    assert data.images is not None  # needs
    return _outcome("iic", train_iic(data.images, data.pretext.backbone, settings, progress))


def _train_kmeans(
    data: ClusteringData, settings: KMeansClusteringConfig, progress: ProgressCallback | None
) -> ClusteringOutcome:
    assert data.embeddings is not None  # needs
    result = fit_kmeans(data.embeddings, settings.num_clusters, settings)
    head = data.pretext.embedding_head
    model = build_kmeans_model(data.pretext.backbone, result.centroids, settings.temperature, head)
    return ClusteringOutcome(
        model=model,
        metrics={"kmeans/inertia": result.inertia},
        summary={"inertia": result.inertia},
    )


_LOADS_CLUSTERING_MODEL = ("scan_core.models", "scan_core.twostage")

CLUSTERING: dict[str, ClusteringMethod] = {
    m.name: m
    for m in (
        ClusteringMethod(
            name="scan",
            title="SCAN",
            settings_class=ScanConfig,
            settings_for=lambda c, k: c.scan.model_copy(update={"num_clusters": k}),
            needs=frozenset({"images", "neighbors"}),
            key_inputs=("neighbors", "pretext"),
            train=_train_scan,
            modules=(
                "scan_core.clustering",
                *_LOADS_PRETEXT_MODEL,
                *_LOADS_CLUSTERING_MODEL,
            ),
            warm_start=True,
            self_labels=True,
        ),
        ClusteringMethod(
            name="twostage",
            title="two-stage (Han et al. 2020: IIC + consistency-preserving loss, Norm-FC heads)",
            settings_class=TwoStageConfig,
            settings_for=lambda c, k: c.twostage_config(k),
            needs=frozenset({"images"}),
            key_inputs=("pretext", "images"),
            train=_train_twostage,
            modules=("scan_core.twostage", *_LOADS_PRETEXT_MODEL),
        ),
        ClusteringMethod(
            name="iic",
            title="IIC (Ji et al. 2019: light/heavy views, overclustering head)",
            settings_class=IICConfig,
            settings_for=lambda c, k: c.iic_config(k),
            needs=frozenset({"images"}),
            key_inputs=("pretext", "images"),
            train=_train_iic,
            modules=("scan_core.iic", "scan_core.twostage", *_LOADS_PRETEXT_MODEL),
        ),
        ClusteringMethod(
            name="kmeans",
            title="K-means on the pretext embeddings",
            settings_class=KMeansClusteringConfig,
            settings_for=lambda c, k: KMeansClusteringConfig(
                **c.kmeans.model_dump(), num_clusters=k
            ),
            needs=frozenset({"embeddings"}),
            key_inputs=("embed",),
            train=_train_kmeans,
            modules=("scan_core.kmeans", *_LOADS_PRETEXT_MODEL),
            guarded=False,
        ),
    )
}


def clustering_method(name: str) -> ClusteringMethod:
    """The registry entry of ``clustering.method`` ``name`` (ValueError: none)."""
    if name not in CLUSTERING:
        raise _method_error("clustering", name, CLUSTERING)
    return CLUSTERING[name]


def clustering_method_of(stage_config: StageDict) -> ClusteringMethod:
    """The entry of a clustering stage config (SCAN's configs carry no ``method``)."""
    return clustering_method(str(stage_config.get("method", "scan")))


# --- step 4 --------------------------------------------------------------------------------------

#: The step-4 registry (``selflabel.method``).
STEP4: dict[str, Step4Method] = STEP4_METHODS

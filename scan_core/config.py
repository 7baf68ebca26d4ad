"""Typed configuration, one object per stage.

Every config is a frozen pydantic model that forbids unknown keys, so a typo in a config file or a
``--set`` override fails before any training starts, and ``fingerprint()`` gives the stable hash
that goes into the stage's cache key.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

BackboneName = Literal["small_cnn", "resnet18_cifar", "resnet18", "resnet50"]
Device = Literal["auto", "cpu", "cuda"]
#: Training arithmetic: ``auto`` = bfloat16 autocast where the device computes it natively (a CUDA
#: GPU with bf16, a CPU with AVX512-BF16 or AMX), float32 elsewhere.
Precision = Literal["auto", "fp32", "bf16"]
#: Pretext views: ``photo`` = SimCLR's (random resized crop, flip, colour jitter, greyscale);
#: ``shape`` = for small greyscale or shape-like images (zoom, shift, blur, brightness; no crop,
#: no flip), :class:`scan_core.transforms.ShapeTransform`.
PretextAugment = Literal["photo", "shape"]


StageConfigT = TypeVar("StageConfigT", bound="StageConfig")


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


class PretextTraining(StageConfig):
    """What every pretext method's training has: backbone, embedding size, schedule, optimiser,
    augmentation, seed, device (SimCLR's values by default; :class:`PretextConfig`,
    :class:`SuperANDConfig`)."""

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
    view_scale: float = Field(1.0, gt=0, le=1)
    augment: PretextAugment = "photo"
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"


class PretextConfig(PretextTraining):
    """Self-supervised representation learning (SCAN step 1).

    Official SimCLR settings on CIFAR: 500 epochs, batch 512, SGD lr 0.4, momentum 0.9,
    weight decay 1e-4, cosine schedule to lr * 0.1**3, temperature 0.1, 128-d head.
    ``method = "superand"`` trains Super-AND (Han et al. 2020) with these settings plus the
    pipeline's ``superand`` section (:meth:`PipelineConfig.superand_config`); its official
    values differ: lr 0.03, weight decay 5e-4, batch 128, 1000 epochs in 5 rounds.

    ``view_scale`` renders the augmented training views (SimCLR, Super-AND) at that fraction of
    the image size (official: 1). Below 1 it trains at a lower resolution than the embeddings
    are computed at, as FixRes recommends (:class:`scan_core.transforms.SimCLRTransform`), for
    ``view_scale ** 2`` of the convolution cost per epoch.
    """

    method: Literal["simclr", "rotnet", "superand", "byol"] = "simclr"


class NeighborsConfig(StageConfig):
    """kNN mining on the pretext features (SCAN step 2): exact below ``exact_below`` images,
    else approximate (IVF) with as many probed lists as it takes to reach ``min_recall``
    (recall@k against exact search on ``recall_sample`` images)."""

    k: int = Field(20, ge=1)
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_below: int = Field(200_000, ge=1)
    recall_sample: int = Field(1000, ge=1)
    min_recall: float = Field(0.95, gt=0, le=1)


class ScanConfig(StageConfig):
    """SCAN clustering (SCAN step 3, paper Eq. 2).

    Official CIFAR settings: Adam lr 1e-4, weight decay 1e-4, batch 128, entropy weight 5.0,
    one head, whole network updated. ``head_warmup_epochs`` first trains the heads alone on
    frozen, precomputed backbone features (SCAN's ImageNet regime without augmentation; off by
    default), which is cheap and lets a CPU budget spend few full-network epochs well.
    ``warmup_heads`` heads start from different random initialisations in that warm-up (10, as
    SCAN's ImageNet runs train 10 heads; restarts are nearly free on frozen features) and the
    ``num_heads`` with the lowest held-out SCAN loss go on to the full-network epochs, after
    which the head with the lowest held-out loss is kept. Restarts on frozen features differ
    widely in accuracy and the lowest-loss one scores above the average restart, but the warm-up
    ranking does not carry through full-network training, while the held-out loss after it does
    (README, Benchmarks), so train several heads through the full network (``num_heads`` 5, as
    ``bench/quality.py`` does) rather than relying on the warm-up choice.
    """

    num_clusters: int = Field(10, ge=2)
    num_heads: int = Field(1, ge=1)
    epochs: int = Field(50, ge=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    entropy_weight: float = Field(5.0, ge=0)
    head_warmup_epochs: int = Field(0, ge=0)
    head_warmup_lr: float = Field(1e-2, gt=0)
    warmup_heads: int = Field(10, ge=1)
    update_backbone: bool = True
    augment: Literal["weak", "strong"] = "strong"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _check_training(self) -> ScanConfig:
        if self.epochs + self.head_warmup_epochs == 0:
            raise ValueError("scan.epochs and scan.head_warmup_epochs cannot both be 0")
        return self


class SelfLabelConfig(StageConfig):
    """Step 4: fine-tuning on the model's own pseudo-labels (:mod:`scan_core.selflabel`).

    Official (SCAN's self-labeling): threshold 0.99, CE on a strong view with inverse-frequency
    weights, Adam 1e-4, batch 1000; stop when the number of confident samples stops growing;
    an error when no sample passes the threshold. Here a step with fewer than
    ``min_confident_fraction`` confident images is skipped and the SCAN clusters stand, and with
    ``keep_only_if_better`` its model is kept only when its clusters score a higher kNN
    modularity than the model it started from (the guard's label-free criterion,
    :mod:`scan_core.guard`). ``method = "spice"`` adds SPICE's reliable labels: images whose
    cluster at least ``reliable_consistency`` of their mined neighbours share.
    """

    enabled: bool = True
    method: Literal["selflabel", "spice"] = "selflabel"
    threshold: float = Field(0.99, gt=0, lt=1)
    min_confident_fraction: float = Field(0.05, ge=0, le=1)
    reliable_consistency: float = Field(0.9, gt=0, le=1)
    keep_only_if_better: bool = True
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(1000, ge=2)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    class_balance: bool = True
    patience: int = Field(3, ge=1)
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"


class GrowthConfig(StageConfig):
    """How a growing lake is re-clustered (docs/architecture.md, 'Growing lakes').

    These settings choose which inputs a run builds on (an earlier pretext backbone, the previous
    run's model); they are not hashed into any stage key themselves: the keys of the inputs they
    choose are, and a warm stage's key holds its (shorter) epochs.

    Attributes:
        retrain_pretext_after: Retrain the pretext backbone once the images it was not trained on
            exceed this fraction of the images it was trained on (0 retrains on every change).
        warm_start: Start SCAN from the previous run's final model when the backbone, the number
            of clusters and the SCAN and self-labeling settings are those of the previous run.
        warm_scan_epochs: SCAN epochs of a warm start (at most ``scan.epochs``).
        warm_selflabel_epochs: Self-labeling epochs of a warm start (at most ``selflabel.epochs``).
        warm_lr_scale: Learning rates of a warm start, as a fraction of ``scan.lr`` and
            ``selflabel.lr``: a warm start fine-tunes a model that already clusters, and at the
            full rate the clusters of images seen before drift. In ``bench/growth.py`` the full
            rate kept churn above the 5% target while 0.3 kept it below, with ACC close to a
            from-scratch run (README, Benchmarks; ``bench/results/growth.md``). The lower rate
            trades the warm model's gain for stable clusters; retraining the backbone
            (``retrain_pretext_after``) refreshes it.
    """

    retrain_pretext_after: float = Field(0.5, ge=0)
    warm_start: bool = True
    warm_scan_epochs: int = Field(5, ge=1)
    warm_selflabel_epochs: int = Field(2, ge=1)
    warm_lr_scale: float = Field(0.3, gt=0, le=1)


class DuplicatesConfig(StageConfig):
    """Duplicate report (``scan_core/duplicates.py``): exact duplicates share a content hash;
    near-duplicates are the same picture stored twice after an edit (re-encoded, resized, slightly
    cropped, brightened), found on the decoded pixels with the embeddings as a second opinion.

    A pair must pass all three checks. The defaults were calibrated by ``bench/duplicates.py`` on
    a Fashion-MNIST lake with planted copies (the figures are in ``bench/results/duplicates.md``),
    choosing the setting that finds the most copies while flagging fewer than 1% of the images of
    the lake without copies; a lake of small, very uniform images like that one is the hard case,
    so photos of varied scenes flag fewer distinct pairs.

    Attributes:
        max_hamming: Largest Hamming distance between the two 64-bit perceptual hashes (of the
            canonical views). Tight: re-encoding, 2x resizing and brightening move the hash by a
            few bits at most, while distinct pictures of one kind on small uniform images are
            often only a little further apart, so a looser radius lets in many more distinct pairs
            than copies; the copies missed are mostly 0.5x resizes and crops, whose lost detail
            and shifted framing flip more bits.
        min_pixel_similarity: Smallest correlation between the two canonical views (greyscale,
            centred and scaled on the picture's moments, brightness-normalised). Set just below
            what re-encoded, resized and brightened copies reach, and above most distinct pairs
            that pass the hash check; a higher value flags fewer distinct pairs and loses the
            blurred (0.5x) copies first.
        min_cosine: Smallest cosine similarity of the two embeddings. Deliberately loose: SimCLR
            embeddings are trained to ignore exactly these edits, so a copy is always close to its
            original, and the check only removes pairs the model sees as different pictures.
    """

    max_hamming: int = Field(4, ge=0, le=64)
    min_pixel_similarity: float = Field(0.985, gt=-1, le=1)
    min_cosine: float = Field(0.8, ge=-1, le=1)


class PromotionConfig(StageConfig):
    """When a run's registered model becomes the ``champion`` (``tasks/promotion.py``); no stage
    key depends on it.

    A run is promoted when no cluster is empty (``allowed_empty_clusters``), its clusters are not
    collapsed, and (where the run compared its partition with K-means without labels, the guard) the
    partition it kept scores at least as well as K-means'. Collapse is measured by the *balance* of
    the cluster sizes: the effective number of clusters ``exp(H)`` (``H`` the entropy of the size
    distribution; SCAN's entropy term maximises the same quantity on the mean prediction) divided by
    the number of clusters. It is 1 for equal sizes and ``m / k`` when ``m`` of ``k`` clusters share
    the images equally; one class holding 40% of the images and nine equal ones the rest gives 0.73.

    Attributes:
        min_balance: Smallest balance promoted; the default refuses a model that effectively
            uses fewer than half of its clusters.
        allowed_empty_clusters: Empty clusters a promoted model may have (raise it only for
            deliberate overclustering).
    """

    min_balance: float = Field(0.5, ge=0, le=1)
    allowed_empty_clusters: int = Field(0, ge=0)


class GuardConfig(StageConfig):
    """The label-free guard after clustering (:mod:`scan_core.guard`): the trained model's
    partition against K-means (the ``kmeans`` section) on the same pretext embeddings, scored
    by their modularity on the mined kNN graph; the better one becomes the run's clusters.

    Attributes:
        enabled: Run the guard (off: the trained model is always kept).
        margin: How much higher K-means' modularity must be to replace the trained model.
    """

    enabled: bool = True
    margin: float = Field(0.0, ge=0, le=1)


ClusteringMethod = Literal["scan", "twostage", "iic", "kmeans"]


class ClusteringConfig(StageConfig):
    """Which method the clustering stage runs; the methods share the stages (docs/architecture.md,
    'The method').

    Attributes:
        method: ``scan`` (SCAN, the ``scan`` section; the default), ``twostage`` (Han et al.'s
            stage 2: IIC + ``L_cp`` with Norm-FC heads on the pretext embedding, the ``twostage``
            section), ``iic`` (IIC on its authors' recipe, the ``iic`` section) or ``kmeans``
            (K-means on the pretext embeddings, the ``kmeans`` section). Self-labeling (SCAN
            step 4) follows ``scan`` only. Every method makes ``scan.num_clusters`` clusters (or
            the ``--clusters auto`` choice).
    """

    method: ClusteringMethod = "scan"


class SuperANDSettings(StageConfig):
    """The settings of Super-AND that a pretext stage does not have (the pipeline's ``superand``
    section, used with ``pretext.method = superand``; :class:`SuperANDConfig` adds the pretext
    settings: backbone, epochs, batch size, optimiser, augmentation, seed, device).

    Official (CIFAR-10): 5 rounds, memory momentum 0.5, 25% more anchors per round with 1
    neighbour each, ``w(t) = 0.2 * (epoch // 80)`` of 200 epochs per round.
    """

    rounds: int = Field(5, ge=1)
    memory_momentum: float = Field(0.5, ge=0, lt=1)
    anchor_rate: float = Field(0.25, gt=0, le=1)
    neighbourhood_size: int = Field(1, ge=1)
    ue_weight: float = Field(0.2, ge=0)
    ue_warmup_fraction: float = Field(0.4, gt=0, le=1)


class BYOLSettings(StageConfig):
    """The settings of BYOL that a pretext stage does not have (the pipeline's ``byol`` section,
    used with ``pretext.method = byol``; :class:`BYOLConfig` adds the pretext settings).

    Official (ImageNet, Grill et al. 2020): target momentum 0.996 rising to 1, projector and
    predictor with 4096 hidden units and 256 outputs (``pretext.feature_dim``), LARS at
    ``0.2 x batch / 256``. Here the optimiser is the pretext section's SGD, whose learning rate
    for SimCLR (``pretext.lr``) is too high for BYOL, so BYOL has its own: ``lr`` replaces
    ``pretext.lr`` (how it was chosen: README, Benchmarks).
    """

    lr: float = Field(0.05, gt=0)
    target_momentum: float = Field(0.99, ge=0, lt=1)
    hidden_dim: int = Field(512, ge=2)


class TwoStageSettings(StageConfig):
    """The settings of two-stage class assignment but the number of clusters (the
    pipeline's ``twostage`` section; the pipeline's number of clusters is ``scan.num_clusters``
    or the ``--clusters auto`` choice). See :class:`TwoStageConfig` for the official values.
    """

    num_heads: int = Field(5, ge=1)
    overcluster: int = Field(0, ge=0)
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=2)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    feature_dim: int = Field(128, ge=2)
    head_temperature: float = Field(0.1, gt=0)
    head_norm_axis: Literal["cluster", "feature"] = "feature"
    freeze_heads: bool = True
    cp_weight: float = Field(1.0, ge=0)
    cp_temperature: float = Field(0.1, gt=0)
    crop_scale_min: float = Field(0.2, gt=0, le=1)
    color_jitter: float = Field(0.4, ge=0, le=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"


class IICSettings(StageConfig):
    """The settings of IIC class assignment (``clustering.method = iic``; the pipeline's ``iic``
    section) but the number of clusters. See :class:`IICConfig` for the official values and what
    is scaled here.
    """

    num_heads: int = Field(5, ge=1)
    overcluster_factor: int = Field(5, ge=0)
    main_passes: int = Field(2, ge=1)
    overcluster_passes: int = Field(1, ge=0)
    repeats: int = Field(5, ge=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(140, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    context: float = Field(1.4, ge=1, le=2)
    light_centre_p: float = Field(0.5, ge=0, le=1)
    heavy_scales: tuple[float, ...] = (0.8, 1.0, 1.2)
    rotation: float = Field(25.0, ge=0, le=180)
    rotation_p: float = Field(0.5, ge=0, le=1)
    flip_p: float = Field(0.0, ge=0, le=1)
    jitter: float = Field(0.4, ge=0, le=1)
    hue: float = Field(0.125, ge=0, le=0.5)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _check_iic(self) -> IICSettings:
        if self.overcluster_factor == 1:
            raise ValueError(
                "overcluster_factor must be 0 (no overclustering head) or at least 2 (the "
                "overclustering head has that many times the clusters)"
            )
        if self.overcluster_factor and not self.overcluster_passes:
            raise ValueError(
                "overcluster_passes must be at least 1 when overcluster_factor is set "
                "(set overcluster_factor to 0 for no overclustering head)"
            )
        if not self.heavy_scales or any(not 0 < s <= self.context for s in self.heavy_scales):
            raise ValueError(
                f"heavy_scales must be crop sides in (0, context={self.context}], "
                f"got {list(self.heavy_scales)}"
            )
        return self


class KMeansConfig(StageConfig):
    """K-means on the pretext embeddings as the clustering method (the SCAN paper's "pretext +
    K-means" baseline; :mod:`scan_core.kmeans`).

    Attributes:
        n_init: k-means++ restarts (the lowest inertia is kept); 3, as the evaluate stage's
            ``kmeans_acc`` baseline, so both give the same clustering.
        max_iter: Lloyd iterations per restart.
        temperature: Softmax temperature of the cluster probabilities
            ``softmax(-|z - c|^2 / temperature)``; it sets the confidences only, never which
            centroid is nearest.
        seed: Random state of the restarts.
    """

    n_init: int = Field(3, ge=1)
    max_iter: int = Field(300, ge=1)
    temperature: float = Field(0.1, gt=0)
    seed: int = 0


class KMeansClusteringConfig(KMeansConfig):
    """K-means as the clustering method: the ``kmeans`` section for ``num_clusters`` clusters."""

    num_clusters: int = Field(10, ge=2)


class ClusterCountConfig(StageConfig):
    """Choosing k without labels (``--clusters auto``; :mod:`scan_core.model_selection`).

    Every k in ``k_min .. k_max`` gets ``num_heads`` linear SCAN heads trained from different
    random starts on the frozen pretext features and their neighbours; ``criterion`` picks k
    from the label-free scores (``stability_1se``: the smallest k whose heads agree, in mean
    pairwise ARI, within one standard error of the most stable k).
    """

    k_min: int = Field(2, ge=2)
    k_max: int = Field(20, ge=2)
    criterion: Literal[
        "stability_1se",
        "stability",
        "scan_loss",
        "consistency",
        "neighbour_agreement",
        "assignment_entropy",
        "eigengap",
    ] = "stability_1se"
    num_heads: int = Field(8, ge=2)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(1e-2, gt=0)
    entropy_weight: float = Field(5.0, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_range(self) -> ClusterCountConfig:
        if self.k_max < self.k_min:
            raise ValueError(f"k_max ({self.k_max}) must be at least k_min ({self.k_min})")
        return self


class PipelineConfig(StageConfig):
    """The whole pipeline's science settings, one section per stage."""

    image: ImageConfig = ImageConfig()
    pretext: PretextConfig = PretextConfig()
    neighbors: NeighborsConfig = NeighborsConfig()
    scan: ScanConfig = ScanConfig()
    selflabel: SelfLabelConfig = SelfLabelConfig()
    growth: GrowthConfig = GrowthConfig()
    duplicates: DuplicatesConfig = DuplicatesConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    superand: SuperANDSettings = SuperANDSettings()
    byol: BYOLSettings = BYOLSettings()
    twostage: TwoStageSettings = TwoStageSettings()
    iic: IICSettings = IICSettings()
    kmeans: KMeansConfig = KMeansConfig()
    cluster_count: ClusterCountConfig = ClusterCountConfig()
    promotion: PromotionConfig = PromotionConfig()
    guard: GuardConfig = GuardConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> PipelineConfig:
        if self.pretext.backbone == "small_cnn" and self.image.size < 16:
            raise ValueError("image.size must be at least 16 for the small_cnn backbone")
        return self

    @model_validator(mode="after")
    def _check_methods(self) -> PipelineConfig:
        if self.pretext.method == "superand":
            rounds = self.superand.rounds
            if self.pretext.epochs < rounds:
                raise ValueError(
                    f"pretext.epochs ({self.pretext.epochs}) must be at least superand.rounds "
                    f"({rounds}) for pretext.method superand (epochs count all rounds)"
                )
            if self.superand.anchor_rate * (rounds - 1) > 1:
                raise ValueError(
                    "superand.anchor_rate * (superand.rounds - 1) exceeds 1 (more anchors than "
                    "images): lower one of them"
                )
        overcluster = self.twostage.overcluster
        if self.clustering.method == "twostage" and 0 < overcluster <= (self.scan.num_clusters):
            raise ValueError(
                f"twostage.overcluster ({overcluster}) must exceed scan.num_clusters "
                f"({self.scan.num_clusters}), or be 0 for none"
            )
        return self

    def pretext_with(self, section: str, settings: type[StageConfigT]) -> StageConfigT:
        """A pretext method's settings: the ``pretext`` section's (backbone, epochs, batch size,
        lr, momentum, weight decay, temperature, augmentation, seed, device, precision) with
        those of the method's own ``section`` (e.g. ``superand``), as ``settings``."""
        shared = self.pretext.model_dump(exclude={"method"})
        own = getattr(self, section).model_dump()
        return settings.model_validate({**shared, **own})

    def superand_config(self) -> SuperANDConfig:
        """The Super-AND settings of ``pretext.method = superand`` (:meth:`pretext_with`)."""
        return self.pretext_with("superand", SuperANDConfig)

    def twostage_config(self, num_clusters: int | None = None) -> TwoStageConfig:
        """The ``twostage`` section for ``num_clusters`` clusters (default
        ``scan.num_clusters``)."""
        k = self.scan.num_clusters if num_clusters is None else num_clusters
        return TwoStageConfig.model_validate({**self.twostage.model_dump(), "num_clusters": k})

    def iic_config(self, num_clusters: int | None = None) -> IICConfig:
        """The ``iic`` section for ``num_clusters`` clusters (default ``scan.num_clusters``)."""
        k = self.scan.num_clusters if num_clusters is None else num_clusters
        return IICConfig.model_validate({**self.iic.model_dump(), "num_clusters": k})

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


def resolve_precision(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on a resolved ``device`` (None: plain float32)."""
    import torch

    if precision == "fp32":
        return None
    if device.startswith("cuda"):
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        cpu = torch.cpu
        native = cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    if precision == "bf16" or native:
        return torch.bfloat16
    return None


def resolve_device(device: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is present, else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use 'auto'.")
    return device


class SuperANDConfig(PretextTraining, SuperANDSettings):
    """Super-AND embedding learning (stage 1 of Han et al. 2020; :mod:`scan_core.superand`).

    Official settings (CIFAR-10, ``super_and.py``): 5 rounds of 200 epochs, batch 128, SGD
    Nesterov lr 0.03, momentum 0.9, weight decay 5e-4, memory temperature 0.1 and momentum 0.5,
    25% more anchors per round with 1 neighbour each, ``w(t) = 0.2 * (epoch // 80)``.
    ``epochs`` counts all rounds together (``epochs // rounds`` per round); the lr steps and
    ``w(t)`` are scaled to the round length (``ue_warmup_fraction`` = 80 / 200). The settings
    only Super-AND has (rounds, memory, anchors, UE weight) come from :class:`SuperANDSettings`;
    the others are those a pretext stage has (:meth:`PipelineConfig.superand_config`).
    """

    # the official values where they differ from SimCLR's
    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.03, gt=0)
    weight_decay: float = Field(5e-4, ge=0)

    @model_validator(mode="after")
    def _check_rounds(self) -> SuperANDConfig:
        if self.epochs < self.rounds:
            raise ValueError(f"epochs ({self.epochs}) must be at least rounds ({self.rounds})")
        if self.anchor_rate * (self.rounds - 1) > 1:
            raise ValueError(
                f"anchor_rate * (rounds - 1) = {self.anchor_rate * (self.rounds - 1):.2f} would "
                "make more anchors than samples; lower anchor_rate or rounds"
            )
        return self


class BYOLConfig(PretextTraining, BYOLSettings):
    """BYOL embedding learning (:mod:`scan_core.byol`): the pretext section's settings with the
    ``byol`` section's, whose ``lr`` replaces ``pretext.lr`` (:meth:`PipelineConfig.pretext_with`).
    """

    lr: float = Field(0.05, gt=0)


class TwoStageConfig(TwoStageSettings):
    """Han et al.'s stage 2 (:mod:`scan_core.twostage`): IIC + ``cp_weight * L_cp`` with
    Norm-FC heads on the pretext embedding.

    Official two-stage settings (CIFAR-10, ``main.py``): 5 sub-heads, Norm-FC ``tau_c`` 0.1 with
    random frozen weights normalised per embedding dimension (``head_norm_axis="feature"``;
    normalising each cluster vector instead clustered Fashion-MNIST much worse, README,
    Benchmarks; see :class:`scan_core.models.NormFCLayer`), ``L_cp`` weight 1.0 and
    temperature 0.1, SGD Nesterov lr 0.01, momentum 0.9, weight decay 5e-4, batch 128,
    300 epochs. ``overcluster`` > 0 adds an overclustering head of that many clusters,
    alternated with the main one each epoch (not in the official two-stage code). Every setting
    but ``num_clusters`` comes from :class:`TwoStageSettings`.
    """

    num_clusters: int = Field(10, ge=2)

    @model_validator(mode="after")
    def _check_overcluster(self) -> TwoStageConfig:
        if 0 < self.overcluster <= self.num_clusters:
            raise ValueError(
                f"overcluster ({self.overcluster}) must exceed num_clusters "
                f"({self.num_clusters}), or be 0 for none"
            )
        return self


class IICConfig(IICSettings):
    """Invariant Information Clustering (Ji et al., ICCV 2019; :mod:`scan_core.iic`) as its
    authors ran it on MNIST (``xu-ji/IIC``, ``cluster_greyscale_twohead``), on the pretext
    backbone.

    Official settings: Adam lr 1e-4, no weight decay, constant rate; 5 sub-heads of the main head
    and an overclustering head with 5x the classes (50 for MNIST's 10; 70 for CIFAR-10),
    alternated: per epoch 2 passes over the data with the main head (``main_passes``), 1 with the
    overclustering head (``overcluster_passes``); each batch holds 140 images (``batch_size``)
    repeated 5 times (``repeats``, 700 pairs), each copy with its own heavy view paired with the
    image's light view; light view: a crop of the evaluation view's size, centred half of the
    time (``light_centre_p``), otherwise anywhere within 28/20 of it (``context``); heavy view: a
    random crop of 16, 20 or 24 pixels of the 20-pixel evaluation view (``heavy_scales`` 0.8,
    1.0, 1.2), rotated by up to 25 degrees half of the time, colour jitter 0.4 with hue 0.125,
    no flip (flip on for CIFAR); 3,200 epochs from a randomly initialised VGG-style network.

    Scaled to the CPU budget: ``epochs`` 10 instead of thousands, so ``lr`` 1e-3 instead of 1e-4
    (at the official rate the mutual information grows too slowly for so short a schedule;
    README, Benchmarks), starting from the pretext backbone (as every clustering method here)
    instead of random weights; views are rendered at the stored image size rather than resized
    to 24 pixels. The sub-head with the lowest held-out IIC loss is kept (the paper keeps the
    lowest training loss).
    """

    num_clusters: int = Field(10, ge=2)

    @property
    def overcluster(self) -> int:
        """Outputs of the overclustering head (0: none)."""
        return self.overcluster_factor * self.num_clusters

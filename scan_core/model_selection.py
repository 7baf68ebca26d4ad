"""Choosing the number of clusters k without labels (``--clusters auto``).

Training a full SCAN model per candidate k is too expensive, so every k is scored with cheap
*feature heads*: linear SCAN heads (Van Gansbeke et al. 2020, Eq. 2) trained on the frozen
pretext embeddings and their mined neighbours, several heads from different random starts at once
(:func:`train_feature_heads`, a few seconds per k on a CPU). From those heads and from the
features themselves, :func:`score_cluster_counts` measures label-free criteria for every k:

* ``scan_loss``: held-out SCAN loss (consistency - entropy of the mean prediction, weight 1),
* ``consistency``: held-out ``-mean log <p(anchor), p(neighbour)>``,
* ``neighbour_agreement``: fraction of held-out (anchor, neighbour) pairs with the same argmax,
* ``assignment_entropy``: mean entropy of a held-out sample's prediction, divided by ``log k``,
* ``stability``: mean adjusted Rand index between the argmax clusterings of the heads trained
  from different random starts (Ben-Hur et al. 2002; Lange et al. 2004),
* ``eigengap``: the gap ``lambda_{k+1} - lambda_k`` of the normalised Laplacian of the symmetric
  kNN graph (von Luxburg 2007, §8.3), computed once from the neighbours.

:func:`choose_num_clusters` picks k with one of them (``ClusterCountConfig.criterion``) and says
why. The default, ``stability_1se``, takes the smallest k whose stability is within one standard
error of the best (the one-standard-error rule). On Fashion-MNIST it chose more clusters than
the 10 classes (on SimCLR features stability kept rising with k; README, Benchmarks), and the
SCAN loss, assignment entropy, consistency, agreement and eigengap curves were monotone in k or
flat (they pick an end of the range), so treat the choice as a suggestion and look at the
curves.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh
from sklearn.metrics import adjusted_rand_score

from scan_core.clustering import heldout_consistency
from scan_core.config import ClusterCountConfig
from scan_core.losses import SCANLoss, entropy
from scan_core.training import cosine_lr, set_lr

logger = logging.getLogger(__name__)

#: Criteria where a larger value is better (the others are minimised).
MAXIMISED = frozenset({"neighbour_agreement", "stability", "eigengap"})


@dataclass
class FeatureHeads:
    """Linear SCAN heads trained on frozen features: ``weight (H, D, k)``, ``bias (H, k)``."""

    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` features -> ``(H, N, k)`` logits."""
        return torch.einsum("nd,hdk->hnk", features, self.weight) + self.bias[:, None, :]

    def probabilities(self, features: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Softmax predictions ``(H, N, k)`` of every head, float32."""
        x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
        with torch.no_grad():
            parts = [
                F.softmax(self.logits(x[s : s + batch_size]), dim=2)
                for s in range(0, len(x), batch_size)
            ]
        return torch.cat(parts, dim=1).numpy()


def train_feature_heads(
    features: np.ndarray,
    neighbors: np.ndarray,
    num_clusters: int,
    train_indices: np.ndarray,
    *,
    num_heads: int = 5,
    epochs: int = 20,
    batch_size: int = 512,
    lr: float = 1e-3,
    entropy_weight: float = 5.0,
    seed: int = 0,
) -> FeatureHeads:
    """Train ``num_heads`` linear SCAN heads (independent random starts) on frozen features.

    Each step takes a batch of anchors from ``train_indices`` and one random mined neighbour of
    each, and minimises the summed :class:`~scan_core.losses.SCANLoss` of the heads with Adam
    (cosine learning-rate decay, so that every head settles in its optimum).

    Args:
        features: ``(N, D)`` pretext embeddings.
        neighbors: ``(N, K)`` mined neighbour indices.
        num_clusters: k.
        train_indices: Anchors to train on.
        num_heads: Heads trained from different random initialisations.
        epochs: Passes over ``train_indices``.
        batch_size: Anchors per step.
        lr: Adam learning rate.
        entropy_weight: SCAN's lambda (official 5.0).
        seed: Seeds the initialisation and the sampling.
    """
    if num_clusters < 2:
        raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    nbr = torch.as_tensor(neighbors, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    bound = 1 / math.sqrt(d)  # nn.Linear's default initialisation
    weight = (torch.rand(num_heads, d, num_clusters, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(num_heads, num_clusters, generator=generator) * 2 - 1) * bound
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    heads = FeatureHeads(weight, bias)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    criterion = SCANLoss(entropy_weight)
    train = torch.as_tensor(train_indices, dtype=torch.long)
    batch_size = min(batch_size, len(train))
    for epoch in range(epochs):
        set_lr(optimizer, cosine_lr(lr, epoch, epochs))
        order = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            anchors = order[start : start + batch_size]
            pick = torch.randint(nbr.shape[1], (len(anchors),), generator=generator)
            logits = heads.logits(torch.cat([x[anchors], x[nbr[anchors, pick]]]))
            b = len(anchors)
            loss = sum(criterion(h[:b], h[b:])[0] for h in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
    return FeatureHeads(weight.detach(), bias.detach())


def knn_laplacian_eigenvalues(neighbors: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` smallest eigenvalues of the normalised Laplacian of the kNN graph.

    The graph links every sample to its mined neighbours, symmetrised (``W = A + A^T``, 0/1/2
    weights); ``L = I - D^{-1/2} W D^{-1/2}``. Computed as ``1 -`` the largest eigenvalues of the
    normalised adjacency with ARPACK (``scipy.sparse.linalg.eigsh``).
    """
    n, k = neighbors.shape
    if not 1 <= count < n - 1:
        raise ValueError(f"count must be between 1 and {n - 2}, got {count}")
    rows = np.repeat(np.arange(n), k)
    a = sp.csr_matrix((np.ones(n * k), (rows, neighbors.ravel())), shape=(n, n))
    w = a + a.T
    d = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = sp.diags(1 / np.sqrt(np.maximum(d, 1e-12)))
    adjacency = inv_sqrt @ w @ inv_sqrt
    v0 = np.random.default_rng(0).random(n)
    values = eigsh(adjacency, k=count, which="LA", return_eigenvectors=False, v0=v0)
    return np.sort(1 - values)


@dataclass
class ClusterCountResult:
    """Label-free scores of every candidate k and the choice made from them.

    Attributes:
        ks: The candidate numbers of clusters, ascending.
        criteria: Criterion name -> one value per k (see the module docstring), for curves.
        criterion: The criterion that chose.
        chosen_k: The chosen number of clusters.
        explanation: One sentence saying why, for run summaries.
        predictions: k -> argmax cluster ids ``(N,)`` of the best feature head (lowest held-out
            SCAN loss) at that k.
    """

    ks: list[int]
    criteria: dict[str, list[float]]
    criterion: str
    chosen_k: int
    explanation: str
    predictions: dict[int, np.ndarray] = field(default_factory=dict)


def _pairwise_ari(clusterings: np.ndarray) -> tuple[float, float]:
    """Mean ARI over all pairs of clusterings and its standard error (std / sqrt(#clusterings))."""
    pairs = list(itertools.combinations(range(len(clusterings)), 2))
    if not pairs:
        return float("nan"), float("nan")
    aris = np.array([adjusted_rand_score(clusterings[i], clusterings[j]) for i, j in pairs])
    return float(aris.mean()), float(aris.std() / math.sqrt(len(clusterings)))


CRITERIA = (
    "scan_loss",
    "consistency",
    "neighbour_agreement",
    "assignment_entropy",
    "stability",
    "stability_se",
)

#: Scores every k of a list: ``(criteria of k, best head's argmax ids)`` per k, in order.
CountScorer = Callable[[list[int]], list[tuple[dict[str, float], np.ndarray]]]


def check_count_inputs(
    features: np.ndarray, neighbors: np.ndarray, config: ClusterCountConfig
) -> np.ndarray:
    """``features`` as float32 after checking the shapes against ``neighbors`` and ``k_max``.

    Raises:
        ValueError: mismatched shapes, or ``k_max`` not below the number of samples.
    """
    features = np.asarray(features, dtype=np.float32)
    n = features.shape[0]
    if features.ndim != 2 or neighbors.shape[0] != n or neighbors.ndim != 2:
        raise ValueError(
            f"features must be (N, D) and neighbors (N, K) with the same N, got "
            f"{features.shape} and {neighbors.shape}"
        )
    if config.k_max >= n:
        raise ValueError(f"k_max ({config.k_max}) must be smaller than the {n} samples")
    return features


def count_split(n: int, config: ClusterCountConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: the held-out split every k is scored on (by ``config.seed``)."""
    order = np.random.default_rng(config.seed).permutation(n)
    n_val = max(2, round(n * config.val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def score_cluster_count(
    features: np.ndarray, neighbors: np.ndarray, k: int, config: ClusterCountConfig
) -> tuple[dict[str, float], np.ndarray]:
    """The criteria of the module docstring for one k (heads seeded by ``config.seed + k``),
    and the best head's argmax ids on all samples; independent of the other ks."""
    features = check_count_inputs(features, neighbors, config)
    train_idx, val_idx = count_split(features.shape[0], config)
    val_nbr = neighbors[val_idx]
    heads = train_feature_heads(
        features,
        neighbors,
        k,
        train_idx,
        num_heads=config.num_heads,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        entropy_weight=config.entropy_weight,
        seed=config.seed + k,
    )
    probs = torch.as_tensor(heads.probabilities(features))  # (H, N, k)
    p_val = probs[:, val_idx]
    consistency = heldout_consistency(p_val, probs, torch.as_tensor(val_nbr))
    scan_loss = consistency - entropy(p_val.mean(dim=1), dim=-1)
    best = int(scan_loss.argmin())
    argmax = probs.argmax(dim=2).numpy()
    agree = (argmax[:, val_idx, None] == argmax[:, val_nbr]).mean(axis=(1, 2))
    mean_ari, se_ari = _pairwise_ari(argmax[:, val_idx])
    criteria = {
        "scan_loss": float(scan_loss[best]),
        "consistency": float(consistency[best]),
        "neighbour_agreement": float(agree[best]),
        "assignment_entropy": float(entropy(p_val[best], dim=-1).mean()) / math.log(k),
        "stability": mean_ari,
        "stability_se": se_ari,
    }
    logger.info("k=%d: %s", k, " ".join(f"{name}={v:.4f}" for name, v in criteria.items()))
    return criteria, argmax[best]


def score_cluster_counts(
    features: np.ndarray,
    neighbors: np.ndarray,
    config: ClusterCountConfig,
    scorer: CountScorer | None = None,
) -> tuple[list[int], dict[str, list[float]], dict[int, np.ndarray]]:
    """Every criterion of the module docstring for every k in ``config.k_min .. config.k_max``.

    Args:
        scorer: Scores a list of ks (e.g. in parallel, each k by :func:`score_cluster_count`);
            default: one k after the other, here.

    Returns:
        ``(ks, criteria, predictions)``: criteria map a name to one value per k;
        ``predictions`` holds the best head's argmax ids on all samples for every k.
    """
    features = check_count_inputs(features, neighbors, config)
    n = features.shape[0]
    ks = list(range(config.k_min, config.k_max + 1))
    if scorer is None:
        scored = [score_cluster_count(features, neighbors, k, config) for k in ks]
    else:
        scored = scorer(ks)
    criteria: dict[str, list[float]] = {name: [s[name] for s, _ in scored] for name in CRITERIA}
    predictions = {k: prediction for k, (_, prediction) in zip(ks, scored, strict=True)}
    eigenvalues = knn_laplacian_eigenvalues(neighbors, min(config.k_max + 1, n - 2))
    criteria["eigengap"] = [float(eigenvalues[k] - eigenvalues[k - 1]) for k in ks]
    return ks, criteria, predictions


def pick_num_clusters(
    ks: list[int], criteria: dict[str, list[float]], config: ClusterCountConfig
) -> tuple[int, str]:
    """Choose k from scores of :func:`score_cluster_counts` by ``config.criterion``.

    ``stability_1se`` (default) applies the one-standard-error rule (Breiman et al. 1984, as
    for cross-validation) to head stability (mean pairwise ARI between heads trained from
    different random starts): the smallest k whose stability is within one standard error of the
    most stable k's. The other criteria pick the k with the best value (minimum of a loss or
    entropy, maximum of an agreement, stability or eigengap).

    Returns:
        ``(chosen_k, explanation)``.
    """
    name = config.criterion
    if name == "stability_1se":
        stability = np.asarray(criteria["stability"])
        best = int(np.argmax(stability))
        floor = stability[best] - criteria["stability_se"][best]
        index = int(np.flatnonzero(stability >= floor)[0])
        return ks[index], (
            f"k={ks[index]} is the smallest k in {ks[0]}..{ks[-1]} whose clusterings agree across "
            f"{config.num_heads} random restarts (mean ARI {stability[index]:.3f}) within one "
            f"standard error of the most stable k={ks[best]} (ARI {stability[best]:.3f})."
        )
    values = np.asarray(criteria[name])
    index = int(np.argmax(values) if name in MAXIMISED else np.argmin(values))
    word = "highest" if name in MAXIMISED else "lowest"
    return ks[index], (
        f"k={ks[index]} has the {word} {name.replace('_', ' ')} ({values[index]:.4f}) of "
        f"k = {ks[0]}..{ks[-1]}."
    )


def choose_num_clusters(
    features: np.ndarray,
    neighbors: np.ndarray,
    config: ClusterCountConfig,
    scorer: CountScorer | None = None,
) -> ClusterCountResult:
    """Score k in ``config.k_min .. config.k_max`` and pick one by ``config.criterion``.

    Args:
        features: ``(N, D)`` pretext embeddings (L2-normalised).
        neighbors: ``(N, K)`` mined neighbour indices.
        config: Range, criterion and head-training settings.
        scorer: How the ks are scored (:func:`score_cluster_counts`); default: in order, here.
    """
    ks, criteria, predictions = score_cluster_counts(features, neighbors, config, scorer)
    chosen, explanation = pick_num_clusters(ks, criteria, config)
    logger.info("choose_num_clusters: %s", explanation)
    return ClusterCountResult(
        ks=ks,
        criteria=criteria,
        criterion=config.criterion,
        chosen_k=chosen,
        explanation=explanation,
        predictions=predictions,
    )

"""Evaluation plots (SCAN step 5), each rendered to PNG bytes.

Pure functions: arrays in, PNG bytes out; the caller decides where to write them (MLflow
artifacts, object storage). Figures are built with matplotlib's object API on the Agg canvas
(``matplotlib.figure.Figure``), never through pyplot, so no global figure state is created or
leaked and the functions are safe to call from worker threads. Every figure is saved at
``DPI`` dots per inch with a fixed size (constrained layout), so its pixel size is
``figsize * DPI``.
"""

from __future__ import annotations

import io
import logging
from typing import Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

logger = logging.getLogger(__name__)

DPI = 100
#: Confusion matrices up to this many rows and columns get their counts written in the cells.
MAX_ANNOTATED = 20
#: The prototype grid shows at most this many clusters (rows).
MAX_PROTOTYPE_ROWS = 50
#: Displayed size of one prototype tile, in inches.
TILE_INCHES = 0.6
PAD = 2
PAD_VALUE = 255
EMPTY_VALUE = 225

EmbeddingMethod = Literal["pca", "tsne"]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _finite_array(values: np.ndarray, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return arr


def _cluster_ids(values: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(values)
    if ids.shape != (n,) or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"clusters must be {n} integer cluster ids, got {ids.dtype} {ids.shape}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"clusters must be ids >= 0, got {int(ids.min())}")
    return ids.astype(np.int64, copy=False)


def plot_confusion_matrix(
    confusion: np.ndarray,
    class_names: list[str] | None = None,
    cluster_ids: list[int] | np.ndarray | None = None,
    title: str = "Confusion matrix",
) -> bytes:
    """Heat map of a ``(num_classes, num_clusters)`` count matrix (rows classes, columns clusters).

    Counts are written in the cells when the matrix is at most ``MAX_ANNOTATED`` x
    ``MAX_ANNOTATED``. Pass ``cluster_ids`` to label the columns of a reordered matrix
    (``confusion_matrix(..., match=True)`` with ``matched_cluster_order``).

    Args:
        confusion: Non-negative counts ``(num_classes, num_clusters)``.
        class_names: Row labels (default the class ids).
        cluster_ids: Column labels (default ``0 .. num_clusters - 1``).
        title: Figure title.
    """
    counts = _finite_array(confusion, "confusion", 2)
    if counts.min() < 0:
        raise ValueError("confusion must hold non-negative counts")
    n_rows, n_cols = counts.shape
    if class_names is not None and len(class_names) != n_rows:
        raise ValueError(f"got {len(class_names)} class names for {n_rows} rows")
    if cluster_ids is not None and len(cluster_ids) != n_cols:
        raise ValueError(f"got {len(cluster_ids)} cluster ids for {n_cols} columns")
    fig = _new_figure(
        float(np.clip(2.5 + 0.45 * n_cols, 5, 16)), float(np.clip(1.5 + 0.4 * n_rows, 4, 14))
    )
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="images")
    if n_cols <= 60:
        ax.set_xticks(np.arange(n_cols))
        labels = cluster_ids if cluster_ids is not None else np.arange(n_cols)
        ax.set_xticklabels([str(c) for c in labels], fontsize=8, rotation=90 if n_cols > 20 else 0)
    if n_rows <= 60:
        ax.set_yticks(np.arange(n_rows))
        ax.set_yticklabels(
            class_names if class_names is not None else [str(r) for r in range(n_rows)], fontsize=8
        )
    if n_rows <= MAX_ANNOTATED and n_cols <= MAX_ANNOTATED:
        threshold = counts.max() / 2
        for (r, c), value in np.ndenumerate(counts):
            ax.text(
                c,
                r,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > threshold else "black",
            )
    ax.set_xlabel("cluster")
    ax.set_ylabel("class")
    ax.set_title(title)
    return _to_png(fig)


def select_prototypes(probabilities: np.ndarray, per_cluster: int) -> dict[int, np.ndarray]:
    """The most confident members of every cluster (SCAN Fig. 5 "prototypes").

    Each image belongs to its argmax cluster; a cluster's prototypes are its members with the
    highest probability for it, most confident first (ties by index). Runs in ``O(N log N)``.

    Args:
        probabilities: Cluster probabilities ``(N, num_clusters)``.
        per_cluster: How many prototypes to keep per cluster.

    Returns:
        ``{cluster: indices}`` for every cluster ``0 .. num_clusters - 1``; ``indices`` int64 has
        at most ``per_cluster`` entries and is empty for an empty cluster.
    """
    probs = _finite_array(probabilities, "probabilities", 2)
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be >= 1, got {per_cluster}")
    n, num_clusters = probs.shape
    assigned = probs.argmax(axis=1)
    confidence = probs[np.arange(n), assigned]
    order = np.lexsort((np.arange(n), -confidence, assigned))  # by cluster, then confidence
    starts = np.searchsorted(assigned[order], np.arange(num_clusters + 1))
    return {
        c: order[starts[c] : min(starts[c + 1], starts[c] + per_cluster)].astype(np.int64)
        for c in range(num_clusters)
    }


def _as_images(images: np.ndarray) -> np.ndarray:
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 (N, C, H, W) with C = 1 or 3, got {imgs.dtype} {imgs.shape}"
        )
    return imgs


def prototype_mosaic(
    images: np.ndarray,
    selection: dict[int, np.ndarray],
    cluster_ids: list[int] | np.ndarray,
    per_cluster: int,
) -> np.ndarray:
    """Tile the selected images into one RGB array: one row per cluster, best prototype first.

    Tiles are separated by ``PAD`` white pixels; slots without an image (small or empty
    clusters) are light grey. Grayscale images are repeated over the three channels.

    Args:
        images: uint8 ``(N, C, H, W)``, ``C`` in {1, 3}.
        selection: ``{cluster: indices}`` as from :func:`select_prototypes`.
        cluster_ids: The clusters to show, one row each, in order.
        per_cluster: Number of columns.

    Returns:
        uint8 ``(rows * (H + PAD) + PAD, per_cluster * (W + PAD) + PAD, 3)``.
    """
    imgs = _as_images(images)
    _, _, h, w = imgs.shape
    rows = len(cluster_ids)
    mosaic = np.full(
        (rows * (h + PAD) + PAD, per_cluster * (w + PAD) + PAD, 3), PAD_VALUE, dtype=np.uint8
    )
    for r, cluster in enumerate(cluster_ids):
        chosen = selection.get(int(cluster), np.empty(0, dtype=np.int64))[:per_cluster]
        for j in range(per_cluster):
            y, x = PAD + r * (h + PAD), PAD + j * (w + PAD)
            if j < len(chosen):
                mosaic[y : y + h, x : x + w] = imgs[chosen[j]].transpose(1, 2, 0)  # C broadcast
            else:
                mosaic[y : y + h, x : x + w] = EMPTY_VALUE
    return mosaic


def largest_clusters(sizes: np.ndarray, limit: int) -> np.ndarray:
    """Ids of the ``limit`` largest clusters (ties by lower id), returned in increasing id order.

    All clusters when there are at most ``limit``.
    """
    counts = np.asarray(sizes)
    if counts.ndim != 1 or limit < 1:
        raise ValueError(f"need 1-D sizes and limit >= 1, got shape {counts.shape}, limit {limit}")
    return np.sort(np.argsort(-counts, kind="stable")[:limit]).astype(np.int64)


def plot_prototype_grid(
    images: np.ndarray,
    probabilities: np.ndarray,
    per_cluster: int = 8,
    cluster_ids: list[int] | np.ndarray | None = None,
    sizes: np.ndarray | None = None,
) -> bytes:
    """Grid of the most confident images of each cluster, one row per cluster.

    Rows are labelled with the cluster id and its size (argmax members); an empty cluster is an
    empty (grey) row. At most ``MAX_PROTOTYPE_ROWS`` (50) clusters are drawn: by default all of
    them when there are at most 50, otherwise the 50 largest (in id order); passing more than 50
    ``cluster_ids`` is an error.

    Args:
        images: uint8 ``(N, C, H, W)``, ``C`` in {1, 3}.
        probabilities: Cluster probabilities ``(N, num_clusters)``.
        per_cluster: Prototypes per row (see :func:`select_prototypes`).
        cluster_ids: Which clusters to show, in this order.
        sizes: The clusters' sizes, when ``images`` are a subset of the clustered images that
            holds every cluster's prototypes (default: counted from ``probabilities``).
    """
    imgs = _as_images(images)
    probs = _finite_array(probabilities, "probabilities", 2)
    if probs.shape[0] != imgs.shape[0]:
        raise ValueError(
            f"got {imgs.shape[0]} images but probabilities for {probs.shape[0]} samples"
        )
    num_clusters = probs.shape[1]
    if sizes is None:
        sizes = np.bincount(probs.argmax(axis=1), minlength=num_clusters)
    elif np.shape(sizes) != (num_clusters,):
        raise ValueError(f"sizes must have one count per cluster ({num_clusters})")
    if cluster_ids is None:
        ids = largest_clusters(sizes, MAX_PROTOTYPE_ROWS)
        if ids.size < num_clusters:
            logger.info(
                "prototype grid: showing the %d largest of %d clusters", ids.size, num_clusters
            )
    else:
        ids = np.asarray(cluster_ids, dtype=np.int64)
        if ids.ndim != 1 or not 1 <= ids.size <= MAX_PROTOTYPE_ROWS:
            raise ValueError(
                f"cluster_ids must list between 1 and {MAX_PROTOTYPE_ROWS} clusters, got {ids.size}"
            )
        if ids.min() < 0 or ids.max() >= num_clusters:
            raise ValueError(f"cluster_ids must be in [0, {num_clusters - 1}]")
    selection = select_prototypes(probs, per_cluster)
    mosaic = prototype_mosaic(imgs, selection, ids, per_cluster)
    _, _, h, w = imgs.shape
    tile_h = TILE_INCHES * h / w
    fig = _new_figure(per_cluster * TILE_INCHES + 1.8, len(ids) * tile_h + 0.8)
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.set_yticks(PAD + np.arange(len(ids)) * (h + PAD) + h / 2)
    ax.set_yticklabels([f"{c} (n={sizes[c]})" for c in ids], fontsize=8)
    ax.set_xticks([])
    ax.set_title(
        f"Most confident images per cluster ({len(ids)} of {num_clusters} clusters)", fontsize=10
    )
    return _to_png(fig)


def plot_cluster_sizes(sizes: np.ndarray, title: str = "Cluster sizes") -> bytes:
    """Bar chart of the number of images per cluster, with the uniform size as a dashed line.

    Args:
        sizes: Non-negative counts ``(num_clusters,)``, e.g. from ``cluster_sizes``.
        title: Figure title.
    """
    counts = _finite_array(sizes, "sizes", 1)
    if counts.min() < 0:
        raise ValueError("sizes must be non-negative counts")
    k = counts.size
    fig = _new_figure(float(np.clip(3 + 0.15 * k, 6, 16)), 4)
    ax = fig.add_subplot()
    ax.bar(np.arange(k), counts, color="tab:blue", width=0.8)
    ax.axhline(
        counts.mean(),
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"uniform ({counts.mean():.1f})",
    )
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title(f"{title} (empty: {int((counts == 0).sum())} of {k})")
    ax.legend(loc="upper right", fontsize=8)
    return _to_png(fig)


def pca_2d(embeddings: np.ndarray) -> np.ndarray:
    """Project ``(N, d)`` embeddings onto their first two principal components (SVD), ``(N, 2)``.

    Signs follow sklearn's ``svd_flip`` convention (each component's largest loading is
    positive), so the result is deterministic.
    """
    x = _finite_array(embeddings, "embeddings", 2)
    if x.shape[1] < 2:
        raise ValueError(f"embeddings need at least 2 dimensions, got {x.shape[1]}")
    centered = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    components = vt[:2]
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    return centered @ components.T


def embedding_coordinates(
    embeddings: np.ndarray,
    clusters: np.ndarray,
    *,
    max_points: int = 5000,
    seed: int = 0,
    method: EmbeddingMethod = "pca",
) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D points drawn by :func:`plot_embedding_map` and their clusters.

    A random subsample (``seed``) of at most ``max_points`` rows, in their original order, is
    projected with :func:`pca_2d` or t-SNE (sklearn, perplexity ``min(30, (n - 1) / 3)``).

    Returns:
        ``(coordinates (n, 2), clusters (n,))`` with ``n = min(N, max_points)``.
    """
    x = _finite_array(embeddings, "embeddings", 2)
    ids = _cluster_ids(clusters, x.shape[0])
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if method not in ("pca", "tsne"):
        raise ValueError(f"Unknown method '{method}': choose 'pca' or 'tsne'.")
    if x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"need at least 2 embeddings of at least 2 dimensions, got {x.shape}")
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, ids = x[keep], ids[keep]
    if method == "pca":
        return pca_2d(x), ids
    from sklearn.manifold import TSNE  # imported lazily: slow to import, rarely used

    perplexity = float(min(30.0, max(1.0, (x.shape[0] - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), ids


def plot_embedding_map(
    embeddings: np.ndarray,
    clusters: np.ndarray,
    *,
    max_points: int = 5000,
    seed: int = 0,
    method: EmbeddingMethod = "pca",
) -> bytes:
    """Scatter plot of a 2-D map of the embeddings, coloured by cluster.

    See :func:`embedding_coordinates` for the subsampling and the projection. A legend is drawn
    for at most 20 clusters.

    Args:
        embeddings: ``(N, d)`` features, ``d >= 2``.
        clusters: Cluster ids ``(N,)``.
        max_points: Random subsample size (keeps the plot and t-SNE fast).
        seed: Seed of the subsample and of t-SNE.
        method: ``"pca"`` (default, exact and fast) or ``"tsne"``.
    """
    n_total = np.asarray(embeddings).shape[0]
    coords, ids = embedding_coordinates(
        embeddings, clusters, max_points=max_points, seed=seed, method=method
    )
    present = np.unique(ids)
    fig = _new_figure(7, 6)
    ax = fig.add_subplot()
    palette = "tab10" if present.size <= 10 else "tab20" if present.size <= 20 else "turbo"
    cmap = colormaps[palette].resampled(max(present.size, 2))
    colour_index = np.searchsorted(present, ids)
    scatter = ax.scatter(
        coords[:, 0],
        coords[:, 1],
        c=colour_index,
        cmap=cmap,
        s=6,
        vmin=-0.5,
        vmax=max(present.size - 0.5, 0.5),
        linewidths=0,
    )
    if present.size <= 20:
        handles, _ = scatter.legend_elements(num=list(range(present.size)))
        ax.legend(
            handles,
            [str(c) for c in present],
            title="cluster",
            fontsize=7,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
        )
    ax.set_title(f"{method.upper()} map of {len(ids)} of {n_total} embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    return _to_png(fig)


def plot_confidence_histogram(
    confidences: np.ndarray, *, threshold: float | None = None, bins: int = 20
) -> bytes:
    """Histogram of per-image confidences (max cluster probability) on [0, 1].

    Args:
        confidences: Values in [0, 1], ``(N,)``.
        threshold: Optional self-labeling threshold (official 0.99), drawn as a line with the
            share of images above it.
        bins: Number of equal-width bins.
    """
    values = _finite_array(confidences, "confidences", 1)
    if values.min() < 0 or values.max() > 1:
        raise ValueError("confidences must lie in [0, 1]")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, range=(0.0, 1.0), color="tab:blue", edgecolor="white")
    if threshold is not None:
        share = float((values > threshold).mean())
        ax.axvline(
            threshold,
            color="tab:red",
            linestyle="--",
            label=f"threshold {threshold:g}: {share:.1%} above",
        )
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("images")
    ax.set_title(f"Confidence of {values.size} images (mean {values.mean():.3f})")
    return _to_png(fig)


def plot_curve(
    xs: np.ndarray | list[float],
    ys: np.ndarray | list[float],
    xlabel: str,
    ylabel: str,
    title: str,
    mark: float | None = None,
) -> bytes:
    """Line plot of ``ys`` against ``xs`` (e.g. a criterion versus the number of clusters).

    Args:
        xs, ys: Equal-length 1-D values (``ys`` may hold NaN for missing points).
        xlabel, ylabel, title: Axis labels and title.
        mark: Optional x value among ``xs`` whose point is highlighted and annotated (e.g. the
            chosen number of clusters).
    """
    x = _finite_array(np.asarray(xs), "xs", 1)
    y = np.asarray(ys, dtype=np.float64)
    if y.shape != x.shape:
        raise ValueError(f"xs and ys must have the same length, got {x.shape} and {y.shape}")
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(x, y, marker="o", markersize=4, color="tab:blue")
    if mark is not None:
        hits = np.flatnonzero(np.isclose(x, mark))
        if hits.size == 0:
            raise ValueError(f"mark={mark} is not one of the xs")
        mx, my = x[hits[0]], y[hits[0]]
        ax.plot([mx], [my], marker="*", markersize=14, color="tab:red", linestyle="none")
        ax.annotate(
            f"{mx:g}: {my:.4g}",
            (mx, my),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
            color="tab:red",
        )
    if np.all(x == np.round(x)):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _to_png(fig)


def normalise_curve(values: np.ndarray | list[float]) -> np.ndarray:
    """Min-max scale a curve to [0, 1] (NaN kept; a flat curve becomes 0.5 everywhere)."""
    y = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(y)
    if not finite.any():
        return y.copy()
    lo, hi = y[finite].min(), y[finite].max()
    if hi - lo <= 1e-12:
        return np.where(finite, 0.5, np.nan)
    return (y - lo) / (hi - lo)


def plot_cluster_count(
    ks: list[int] | np.ndarray,
    criteria: dict[str, list[float]],
    criterion: str,
    chosen_k: int,
) -> bytes:
    """The label-free criteria of choosing k (``--clusters auto``) against k.

    Left: the criterion that chose (for ``stability_1se``, the stability with one standard
    error above and below each k and a dashed line at the best stability minus its standard
    error), the chosen k starred in red. Right: every criterion scaled to [0, 1] to compare
    their shapes, the chosen k as a dashed vertical line.

    Args:
        ks: Candidate numbers of clusters, ascending.
        criteria: Criterion name -> one value per k (``stability_se`` is drawn as error bars).
        criterion: The criterion that chose (``stability_1se`` draws ``stability``).
        chosen_k: The chosen k, one of ``ks``.
    """
    x = _finite_array(np.asarray(ks), "ks", 1)
    curves = {name: np.asarray(v, dtype=np.float64) for name, v in criteria.items()}
    for name, values in curves.items():
        if values.shape != x.shape:
            raise ValueError(f"criterion {name} has {values.size} values for {x.size} ks")
    shown = "stability" if criterion == "stability_1se" else criterion
    if shown not in curves:
        raise ValueError(f"criterion {shown} is not among the curves {sorted(curves)}")
    hits = np.flatnonzero(x == chosen_k)
    if hits.size == 0:
        raise ValueError(f"chosen_k={chosen_k} is not one of the ks")
    fig = _new_figure(11, 4)
    left, right = fig.subplots(1, 2)
    y = curves[shown]
    se = curves.get("stability_se") if shown == "stability" else None
    if se is not None:
        left.errorbar(
            x,
            y,
            yerr=se,
            marker="o",
            markersize=4,
            color="tab:blue",
            capsize=3,
            label=f"{shown} ± 1 SE",
        )
        if criterion == "stability_1se" and np.isfinite(y).any():
            best = int(np.nanargmax(y))
            floor = y[best] - se[best]
            left.axhline(
                floor,
                color="tab:gray",
                linestyle="--",
                linewidth=1,
                label=f"best - 1 SE ({floor:.3f})",
            )
    else:
        left.plot(x, y, marker="o", markersize=4, color="tab:blue", label=shown)
    left.plot(
        [chosen_k],
        [y[hits[0]]],
        marker="*",
        markersize=14,
        color="tab:red",
        linestyle="none",
        label=f"chosen k = {chosen_k}",
    )
    left.set_xlabel("number of clusters k")
    left.set_ylabel(shown.replace("_", " "))
    rule = "stability, 1-SE rule" if criterion == "stability_1se" else criterion.replace("_", " ")
    left.set_title(f"Choice by {rule}: k = {chosen_k}")
    left.legend(loc="best", fontsize=8)
    colours = colormaps["tab10"]
    others = [name for name in curves if name != "stability_se"]
    for i, name in enumerate(others):
        right.plot(
            x,
            normalise_curve(curves[name]),
            marker="o",
            markersize=3,
            color=colours(i % 10),
            label=name.replace("_", " "),
        )
    right.axvline(chosen_k, color="tab:red", linestyle="--", linewidth=1)
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("number of clusters k")
    right.set_ylabel("scaled to [0, 1]")
    right.set_title("All label-free criteria")
    right.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _to_png(fig)

"""Plots: valid PNGs of the expected pixel size, exact selection/projection logic, validation."""

import io

import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf
from PIL import Image

from scan_core.plots import (
    EMPTY_VALUE,
    PAD,
    PAD_VALUE,
    embedding_coordinates,
    largest_clusters,
    normalise_curve,
    pca_2d,
    plot_cluster_count,
    plot_cluster_sizes,
    plot_confidence_histogram,
    plot_confusion_matrix,
    plot_curve,
    plot_embedding_map,
    plot_prototype_grid,
    prototype_mosaic,
    select_prototypes,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode(png: bytes) -> np.ndarray:
    """Check the PNG signature, decode with PIL and return the RGBA pixels (H, W, 4)."""
    assert isinstance(png, bytes)
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.mode == "RGBA"
    return np.asarray(image)


def has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 3) -> bool:
    return bool((np.abs(pixels[..., :3].astype(int) - rgb) <= tol).all(axis=-1).any())


def test_confusion_matrix_plot() -> None:
    confusion = np.array([[50, 0, 3, 1, 0, 0], [0, 40, 0, 0, 2, 0]] + [[1, 1, 1, 1, 1, 1]] * 2)
    pixels = decode(plot_confusion_matrix(confusion, class_names=["a", "b", "c", "d"]))
    assert pixels.shape == (400, 520, 4)  # figsize (5.2, 4) at 100 dpi
    assert has_colour(pixels, (8, 48, 107))  # the darkest "Blues" colour: the 50-count cell
    # large matrices (no annotations) scale the figure up to its cap
    big = decode(plot_confusion_matrix(np.ones((25, 30)), cluster_ids=list(range(30))))
    assert big.shape == (1150, 1600, 4)
    assert Gcf.get_num_fig_managers() == 0  # no pyplot figure was created


def test_select_prototypes_exact() -> None:
    probabilities = np.array(
        [
            [0.6, 0.3, 0.1],  # 0 -> cluster 0
            [0.9, 0.05, 0.05],  # 1 -> cluster 0, most confident
            [0.2, 0.7, 0.1],  # 2 -> cluster 1
            [0.7, 0.2, 0.1],  # 3 -> cluster 0
            [0.1, 0.8, 0.1],  # 4 -> cluster 1
            [0.6, 0.2, 0.2],  # 5 -> cluster 0, ties with 0: lower index first
        ]
    )
    selection = select_prototypes(probabilities, per_cluster=3)
    assert set(selection) == {0, 1, 2}
    np.testing.assert_array_equal(selection[0], [1, 3, 0])
    np.testing.assert_array_equal(selection[1], [4, 2])
    assert selection[2].size == 0  # empty cluster
    assert selection[2].dtype == np.int64
    np.testing.assert_array_equal(select_prototypes(probabilities, 1)[0], [1])
    with pytest.raises(ValueError, match="per_cluster"):
        select_prototypes(probabilities, 0)


def test_largest_clusters() -> None:
    np.testing.assert_array_equal(largest_clusters(np.array([5, 9, 0, 9, 7]), 3), [1, 3, 4])
    np.testing.assert_array_equal(largest_clusters(np.array([1, 2]), 50), [0, 1])


def test_prototype_mosaic_pixels() -> None:
    images = (np.arange(5, dtype=np.uint8) * 40 + 10)[:, None, None, None] * np.ones(
        (1, 1, 3, 2), dtype=np.uint8
    )  # grayscale (5, 1, 3, 2), image i filled with 10 + 40 i
    selection = {0: np.array([3, 1]), 1: np.array([], dtype=np.int64), 2: np.array([4])}
    mosaic = prototype_mosaic(images, selection, [2, 0, 1], per_cluster=2)
    h, w = 3, 2
    assert mosaic.shape == (3 * (h + PAD) + PAD, 2 * (w + PAD) + PAD, 3)
    assert mosaic.dtype == np.uint8

    def tile(r: int, j: int) -> np.ndarray:
        y, x = PAD + r * (h + PAD), PAD + j * (w + PAD)
        return mosaic[y : y + h, x : x + w]

    assert (tile(0, 0) == 170).all()  # row 0 = cluster 2: image 4
    assert (tile(0, 1) == EMPTY_VALUE).all()  # cluster 2 has a single prototype
    assert (tile(1, 0) == 130).all() and (tile(1, 1) == 50).all()  # cluster 0: images 3, 1
    assert (tile(2, 0) == EMPTY_VALUE).all() and (tile(2, 1) == EMPTY_VALUE).all()  # empty
    assert (mosaic[:PAD] == PAD_VALUE).all() and (mosaic[:, :PAD] == PAD_VALUE).all()
    colour = np.zeros((1, 3, 2, 2), dtype=np.uint8)
    colour[0, 0], colour[0, 2] = 200, 30
    rgb = prototype_mosaic(colour, {0: np.array([0])}, [0], per_cluster=1)
    np.testing.assert_array_equal(rgb[PAD, PAD], [200, 0, 30])


def test_prototype_grid_plot_and_row_cap() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 3, 8, 8), dtype=np.uint8)
    probabilities = rng.dirichlet(np.ones(3), size=30)
    pixels = decode(plot_prototype_grid(images, probabilities, per_cluster=4))
    assert pixels.shape == (260, 420, 4)  # (4 * 0.6 + 1.8, 3 * 0.6 + 0.8) inches
    gray = rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8)
    assert decode(plot_prototype_grid(gray, probabilities, 2, cluster_ids=[1])).shape[0] == 140
    # 60 clusters: only the 50 largest rows are drawn
    many = np.eye(60)[np.arange(120) % 60]
    capped = decode(plot_prototype_grid(np.zeros((120, 1, 4, 4), np.uint8), many, per_cluster=1))
    assert capped.shape[0] == round((50 * 0.6 + 0.8) * 100)
    with pytest.raises(ValueError, match="between 1 and 50"):
        plot_prototype_grid(images, np.eye(60)[np.arange(30)], cluster_ids=list(range(51)))
    with pytest.raises(ValueError, match="uint8"):
        plot_prototype_grid(images.astype(np.float32), probabilities)
    with pytest.raises(ValueError, match="uint8"):
        plot_prototype_grid(images[:, :2], probabilities)
    with pytest.raises(ValueError, match="30 images"):
        plot_prototype_grid(images, probabilities[:10])
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        plot_prototype_grid(images, probabilities, cluster_ids=[3])


def test_cluster_sizes_plot() -> None:
    pixels = decode(plot_cluster_sizes(np.array([5, 0, 7, 3])))
    assert pixels.shape == (400, 600, 4)
    assert has_colour(pixels, (31, 119, 180))  # tab:blue bars
    assert decode(plot_cluster_sizes(np.arange(40))).shape == (400, 900, 4)
    with pytest.raises(ValueError, match="non-negative"):
        plot_cluster_sizes(np.array([3, -1]))
    with pytest.raises(ValueError, match="1-D"):
        plot_cluster_sizes(np.array([]))


def test_pca_2d_exact() -> None:
    x = np.array([[-2.0, 0, 0], [2, 0, 0], [0, -1, 0], [0, 1, 0]]) + 5.0
    np.testing.assert_allclose(pca_2d(x), [[-2, 0], [2, 0], [0, -1], [0, 1]], atol=1e-12)
    # rotated data: coordinates are the rotation-free ones (up to the deterministic sign)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    coords = pca_2d(x[:, :2] @ rot.T)
    np.testing.assert_allclose(np.abs(coords), [[2, 0], [2, 0], [0, 1], [0, 1]], atol=1e-12)
    with pytest.raises(ValueError, match="2 dimensions"):
        pca_2d(np.zeros((4, 1)))


def test_embedding_coordinates_subsample_and_tsne() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(50, 4))
    clusters = np.arange(50) % 5
    coords, ids = embedding_coordinates(embeddings, clusters, max_points=20, seed=1)
    assert coords.shape == (20, 2)
    again, ids_again = embedding_coordinates(embeddings, clusters, max_points=20, seed=1)
    np.testing.assert_array_equal(coords, again)
    np.testing.assert_array_equal(ids, ids_again)
    other, _ = embedding_coordinates(embeddings, clusters, max_points=20, seed=2)
    assert not np.allclose(coords, other)
    full, full_ids = embedding_coordinates(embeddings, clusters)
    np.testing.assert_allclose(full, pca_2d(embeddings))
    np.testing.assert_array_equal(full_ids, clusters)
    # t-SNE keeps two far-apart blobs apart
    blobs = np.concatenate([rng.normal(size=(15, 3)), rng.normal(size=(15, 3)) + 20])
    labels = np.repeat([0, 1], 15)
    tsne, tsne_ids = embedding_coordinates(blobs, labels, method="tsne")
    assert tsne.shape == (30, 2)
    gap = np.linalg.norm(tsne[labels == 0].mean(0) - tsne[labels == 1].mean(0))
    spread = max(tsne[labels == k].std(0).max() for k in (0, 1))
    assert gap > 3 * spread
    with pytest.raises(ValueError, match="Unknown method"):
        embedding_coordinates(embeddings, clusters, method="umap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clusters must be 50"):
        embedding_coordinates(embeddings, clusters[:10])


def test_embedding_map_plot() -> None:
    rng = np.random.default_rng(0)
    pixels = decode(plot_embedding_map(rng.normal(size=(40, 6)), np.arange(40) % 3, max_points=30))
    assert pixels.shape == (600, 700, 4)
    assert has_colour(pixels, (31, 119, 180), tol=10)  # cluster 0 in tab10 blue
    many = decode(plot_embedding_map(rng.normal(size=(60, 3)), np.arange(60) % 30))
    assert many.shape == (600, 700, 4)


def test_confidence_histogram_plot() -> None:
    confidences = np.random.default_rng(0).random(100)
    pixels = decode(plot_confidence_histogram(confidences, threshold=0.9))
    assert pixels.shape == (400, 600, 4)
    assert has_colour(pixels, (214, 39, 40), tol=10)  # the tab:red threshold line
    plain = decode(plot_confidence_histogram(confidences))
    assert not has_colour(plain, (214, 39, 40), tol=10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_confidence_histogram(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="threshold"):
        plot_confidence_histogram(confidences, threshold=2.0)


def test_curve_plot() -> None:
    xs, ys = [2, 3, 4, 5], [0.1, 0.5, 0.3, 0.2]
    pixels = decode(plot_curve(xs, ys, "clusters", "score", "criterion", mark=3))
    assert pixels.shape == (400, 600, 4)
    assert has_colour(pixels, (214, 39, 40), tol=10)  # the red marked point
    unmarked = decode(plot_curve(xs, ys, "clusters", "score", "criterion"))
    assert not has_colour(unmarked, (214, 39, 40), tol=10)
    with pytest.raises(ValueError, match="not one of the xs"):
        plot_curve(xs, ys, "clusters", "score", "criterion", mark=7)
    with pytest.raises(ValueError, match="same length"):
        plot_curve(xs, ys[:3], "clusters", "score", "criterion")


def test_normalise_curve() -> None:
    np.testing.assert_allclose(normalise_curve([2.0, 4.0, 3.0]), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalise_curve([1.0, 1.0]), [0.5, 0.5])
    scaled = normalise_curve([np.nan, 1.0, 3.0])
    assert np.isnan(scaled[0]) and scaled[1:].tolist() == [0.0, 1.0]


def test_cluster_count_plot() -> None:
    ks = [2, 3, 4, 5]
    criteria = {
        "scan_loss": [-0.5, -0.9, -1.1, -1.2],
        "stability": [0.6, 0.9, 0.88, 0.7],
        "stability_se": [0.05, 0.02, 0.03, 0.1],
        "eigengap": [0.1, 0.3, 0.05, 0.02],
    }
    pixels = decode(plot_cluster_count(ks, criteria, "stability_1se", 3))
    assert pixels.shape == (400, 1100, 4)  # figsize (11, 4) at 100 dpi
    assert has_colour(pixels, (214, 39, 40), tol=10)  # the red star and line at the chosen k
    decode(plot_cluster_count(ks, criteria, "eigengap", 3))  # another criterion, no error bars
    with pytest.raises(ValueError, match="not one of the ks"):
        plot_cluster_count(ks, criteria, "stability_1se", 7)
    with pytest.raises(ValueError, match="values for 4 ks"):
        plot_cluster_count(ks, {**criteria, "eigengap": [0.1]}, "stability", 3)
    with pytest.raises(ValueError, match="not among the curves"):
        plot_cluster_count(ks, criteria, "consistency", 3)

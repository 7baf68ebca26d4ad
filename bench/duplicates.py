"""Near-duplicate benchmark (issue 26, point 6): planted copies in a Fashion-MNIST lake.

Two disjoint lakes of 5,000 Fashion-MNIST images each (from the Debian package's 70,000) are
built in memory as the objects a lake holds (PNG bytes, as ``flows/demo.py`` writes them); 200
images of each get a planted copy, 40 per edit: re-encoded as JPEG quality 70, resized to 0.5x,
resized to 2x (bicubic), cropped by 5% of each side (at a random offset), brightened by 1.3
(``PIL.ImageEnhance.Brightness``). Every object is decoded the way the pipeline's catalog step
decodes lake objects (:func:`scan_core.images.decode_images`, default 28x28 greyscale image
config), so the detector sees what the duplicates stage loads from the pixel store.

- The *calibration* lake picks the thresholds: every (max Hamming distance, min pixel
  similarity) on a grid is scored, and the setting with the best F1 on the planted pairs among
  those that flag fewer than 1% of the clean lake's images is chosen.
- The *test* lake (other images, other copies) measures the chosen setting and the config
  defaults (:class:`scan_core.config.DuplicatesConfig`): precision and recall on the planted
  pairs (a found pair is right when it is a planted (original, copy) pair; every other pair found,
  clean pairs included, counts against precision), recall per edit, and the fraction of images
  flagged in the same lake without the copies.

The main measurement is the pixel stage alone (perceptual hash + canonical-view correlation): the
embeddings' second opinion (``min_cosine``) needs a trained pretext model. With it the pipeline
can only flag fewer pairs (recall at most this). To measure it, ``--write-lake L`` writes the test
lake's objects, the real CLI runs on them keeping every pixel pair (``--set
duplicates.min_cosine=-1``), and ``--report`` scores the run's duplicates report at several cosine
thresholds, adding a section to the results (run it after the main measurement, which rewrites
them).

Writes ``bench/results/duplicates.json`` and ``bench/results/duplicates.md``. Run with
``OMP_NUM_THREADS=1 uv run python bench/duplicates.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from scan_core.config import DuplicatesConfig, ImageConfig
from scan_core.data import encode_png, lake_key, load_fashion_mnist
from scan_core.duplicates import (
    Fingerprints,
    fingerprints,
    hash_pairs,
    near_duplicates,
    pair_cosines,
)
from scan_core.images import decode_images

ROOT = Path(__file__).resolve().parents[1]
EDITS = ("jpeg_q70", "resize_0.5x", "resize_2x", "crop_5pct", "brighten_1.3")
HAMMING_GRID = tuple(range(2, 21, 2))
PIXEL_GRID = (0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.992, 0.994, 0.995, 0.996, 0.997, 0.998)


def _save(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def edited_copy(pixels: np.ndarray, edit: str, rng: np.random.Generator) -> bytes:
    """The bytes of an edited copy of a uint8 ``(H, W)`` image."""
    image = Image.fromarray(pixels)
    w, h = image.size
    if edit == "jpeg_q70":
        return _save(image, "JPEG", quality=70)
    if edit == "resize_0.5x":
        return _save(image.resize((w // 2, h // 2), Image.Resampling.BICUBIC))
    if edit == "resize_2x":
        return _save(image.resize((2 * w, 2 * h), Image.Resampling.BICUBIC))
    if edit == "crop_5pct":
        dw, dh = max(1, round(0.05 * w)), max(1, round(0.05 * h))
        x, y = int(rng.integers(0, dw + 1)), int(rng.integers(0, dh + 1))
        return _save(image.crop((x, y, x + w - dw, y + h - dh)))
    if edit == "brighten_1.3":
        return _save(ImageEnhance.Brightness(image).enhance(1.3))
    raise ValueError(f"unknown edit {edit}")


def build_lake(
    images: np.ndarray, planted: int, rng: np.random.Generator
) -> tuple[list[bytes], list[tuple[int, int]], list[str]]:
    """Objects of a lake: the images as PNGs, then one edited copy of each of the first
    ``planted`` (edits in turn, equal shares); the planted (original, copy) pairs and their edits.
    """
    objects = [encode_png(a) for a in images]
    pairs, edits = [], []
    share = planted // len(EDITS)
    for i in range(planted):
        edit = EDITS[min(i // share, len(EDITS) - 1)]
        objects.append(edited_copy(images[i], edit, rng))
        pairs.append((i, len(objects) - 1))
        edits.append(edit)
    return objects, pairs, edits


def score(
    found: set[tuple[int, int]],
    truth: list[tuple[int, int]],
    edits: list[str],
    clean_images: int,
) -> dict[str, Any]:
    """Precision, recall, recall per edit and flagged clean images of the pairs ``found``."""
    true = set(truth)
    tp = len(found & true)
    per_edit = {
        e: sum(p in found for p, pe in zip(truth, edits, strict=True) if pe == e)
        / sum(pe == e for pe in edits)
        for e in EDITS
    }
    clean_pairs = [p for p in found if p[1] < clean_images]
    return {
        "precision": tp / len(found) if found else 1.0,
        "recall": tp / len(true),
        "recall_per_edit": per_edit,
        "pairs_found": len(found),
        "true_pairs_found": tp,
        "clean_pairs_found": len(clean_pairs),
    }


def flagged_fraction(prints: Fingerprints, max_hamming: int, min_pixel: float) -> float:
    """Fraction of images in at least one near-duplicate pair."""
    result = near_duplicates(prints, max_hamming, min_pixel)
    return len(set(result.first.tolist()) | set(result.second.tolist())) / len(prints)


def calibrate(
    prints: Fingerprints,
    clean: Fingerprints,
    truth: list[tuple[int, int]],
    edits: list[str],
    clean_images: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grid's best setting (F1 among those flagging < 1% of the clean lake) and the grid."""
    top = max(HAMMING_GRID)
    pairs = hash_pairs(prints.hashes, top)
    pixel = pair_cosines(prints.views, pairs.first, pairs.second)
    clean_pairs = hash_pairs(clean.hashes, top)
    clean_pixel = pair_cosines(clean.views, clean_pairs.first, clean_pairs.second)
    grid = []
    for radius in HAMMING_GRID:
        for threshold in PIXEL_GRID:
            keep = (pairs.hamming <= radius) & (pixel >= threshold)
            found = set(zip(pairs.first[keep].tolist(), pairs.second[keep].tolist(), strict=True))
            result = score(found, truth, edits, clean_images)
            ck = (clean_pairs.hamming <= radius) & (clean_pixel >= threshold)
            flagged = set(clean_pairs.first[ck].tolist()) | set(clean_pairs.second[ck].tolist())
            p, r = result["precision"], result["recall"]
            grid.append(
                {
                    "max_hamming": radius,
                    "min_pixel_similarity": threshold,
                    "precision": p,
                    "recall": r,
                    "f1": 2 * p * r / (p + r) if p + r else 0.0,
                    "flagged_fraction_clean": len(flagged) / len(clean),
                }
            )
    allowed = [g for g in grid if g["flagged_fraction_clean"] < 0.01] or grid
    return max(allowed, key=lambda g: (g["f1"], g["recall"])), grid


def measure(
    seed: int, images: np.ndarray, planted: int, config: ImageConfig
) -> tuple[Fingerprints, Fingerprints, list[tuple[int, int]], list[str], float]:
    """Build one lake (with and without copies), decode it as the pipeline does, fingerprint it;
    also the seconds taken by decoding and fingerprinting the lake with copies."""
    rng = np.random.default_rng(seed)
    objects, truth, edits = build_lake(images, planted, rng)
    start = time.perf_counter()
    decoded = decode_images(objects, config).numpy()
    prints = fingerprints(decoded)
    seconds = time.perf_counter() - start
    clean = Fingerprints(prints.hashes[: len(images)], prints.views[: len(images)])
    return prints, clean, truth, edits, seconds


def copy_key(index: int, edit: str) -> str:
    """Lake key of the planted copy of image ``index``."""
    return f"copies/{index:06d}-{edit}.{'jpg' if edit == 'jpeg_q70' else 'png'}"


def test_lake(
    args: argparse.Namespace,
) -> tuple[list[str], list[bytes], list[tuple[int, int]], list[str]]:
    """Keys and objects of the test lake (the one :func:`main` measures), its planted pairs (row
    indices into the keys) and their edits."""
    pixels, _ = load_fashion_mnist("all")
    order = np.random.default_rng(args.seed).permutation(len(pixels))
    images = pixels[order[args.images : 2 * args.images]]
    objects, truth, edits = build_lake(images, args.planted, np.random.default_rng(args.seed + 2))
    keys = [lake_key(i) for i in range(args.images)]
    keys += [copy_key(i, e) for (i, _), e in zip(truth, edits, strict=True)]
    return keys, objects, truth, edits


def write_lake(args: argparse.Namespace) -> None:
    """Write the test lake's objects under ``args.write_lake`` for a real pipeline run."""
    keys, objects, _, _ = test_lake(args)
    for key, data in zip(keys, objects, strict=True):
        path = args.write_lake / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print(f"{len(keys)} objects under {args.write_lake}")


def score_report(args: argparse.Namespace) -> dict[str, Any]:
    """Score a pipeline run's duplicates report on the test lake written by ``--write-lake``,
    at each embedding cosine threshold (the run should record every pixel pair:
    ``--set duplicates.min_cosine=-1``)."""
    import pyarrow.parquet as pq

    keys, _, truth, edits = test_lake(args)
    row = {k: i for i, k in enumerate(keys)}
    table = pq.read_table(args.report)
    if not {"kind", "uri", "duplicate_uri", "cosine"} <= set(table.schema.names):
        raise SystemExit(f"{args.report} is not a duplicates report")
    near = [r for r in table.to_pylist() if r["kind"] == "near"]

    def index(uri: str) -> int:
        return row[uri.split(f"{args.lake_prefix.rstrip('/')}/", 1)[1]]

    pairs = [
        (tuple(sorted((index(r["uri"]), index(r["duplicate_uri"])))), float(r["cosine"]))
        for r in near
    ]
    out = {}
    for threshold in (-1.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99):
        found = {p for p, c in pairs if c >= threshold}
        result = score(found, truth, edits, args.images)  # type: ignore[arg-type]
        clean = {i for p in found if p[1] < args.images for i in p}
        out[str(threshold)] = {**result, "flagged_fraction_clean_in_lake": len(clean) / args.images}
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The results page."""
    test = summary["test"]
    lines = [
        "# Near-duplicate benchmark (issue 26, point 6)",
        "",
        f"{summary['n_images']} Fashion-MNIST images + {summary['planted']} planted copies "
        f"({summary['planted'] // len(EDITS)} per edit); thresholds calibrated on a disjoint "
        "lake of the same make. Pixel stage only (perceptual hash + canonical-view "
        "correlation; the embeddings' second opinion is not applied). "
        f"{summary['seconds']:.1f} s to decode and fingerprint the test lake, 1 thread, "
        f"{summary['machine']}. Produced by `{summary['command']}`.",
        "",
        f"Thresholds: max Hamming distance {summary['thresholds']['max_hamming']} of 64 bits, "
        f"min pixel similarity {summary['thresholds']['min_pixel_similarity']}.",
        "",
        "| | precision | recall | flagged (clean lake) | pairs found | of them planted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("calibration lake", summary["calibration"]), ("test lake", test)):
        lines.append(
            f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{100 * r['flagged_fraction_clean']:.2f}% | {r.get('pairs_found', '')} | "
            f"{r.get('true_pairs_found', '')} |"
        )
    lines += ["", "Recall per edit (test lake):", "", "| edit | recall |", "|---|---:|"]
    lines += [f"| {e} | {v:.3f} |" for e, v in test["recall_per_edit"].items()]
    run = summary.get("pipeline_run")
    if run:
        lines += [
            "",
            "## With the embeddings (a real pipeline run)",
            "",
            "The test lake written as objects and run through the CLI, every pixel pair kept "
            "(`duplicates.min_cosine=-1`), then scored at each embedding cosine threshold "
            f"(`{run['command']}`):",
            "",
            "| min cosine | precision | recall | flagged (in the lake) | pairs found |",
            "|---:|---:|---:|---:|---:|",
        ]
        for threshold, r in run["by_min_cosine"].items():
            lines.append(
                f"| {threshold} | {r['precision']:.3f} | {r['recall']:.3f} | "
                f"{100 * r['flagged_fraction_clean_in_lake']:.2f}% | {r['pairs_found']} |"
            )
        lines += [
            "",
            "Flagged (in the lake): images of the 5,000 originals paired with another original "
            "in the lake with copies.",
        ]
    targets = summary["targets_met"]
    lines += [
        "",
        "Targets (precision >= 0.9, recall >= 0.9, < 1% of the clean lake flagged): "
        + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Build the lakes, calibrate, measure, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--write-lake", type=Path, help="only write the test lake's objects to this folder"
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="only score this duplicates.parquet of a pipeline run on the --write-lake lake",
    )
    parser.add_argument("--lake-prefix", default="", help="the lake URL the run's URIs start with")
    parser.add_argument(
        "--run-set", nargs="*", default=[], help="the --set options of that run (recorded)"
    )
    args = parser.parse_args()
    if args.write_lake:
        write_lake(args)
        return
    if args.report:
        scored = score_report(args)
        print(json.dumps(scored, indent=2))
        summary_path = args.out / "duplicates.json"
        summary = json.loads(summary_path.read_text())
        summary["pipeline_run"] = {
            "command": (
                "OMP_NUM_THREADS=1 uv run python bench/duplicates.py --write-lake L; "
                f"python -m flows.cli run --lake L --workspace W --config configs/tiny.yaml "
                f"{' '.join(f'--set {o}' for o in args.run_set)}; "
                "bench/duplicates.py --report W/duplicates/<key>/<attempt>/duplicates.parquet "
                "--lake-prefix L"
            ),
            "by_min_cosine": scored,
        }
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        (args.out / "duplicates.md").write_text(markdown(summary))
        return
    pixels, _ = load_fashion_mnist("all")
    order = np.random.default_rng(args.seed).permutation(len(pixels))
    calib_images = pixels[order[: args.images]]
    test_images = pixels[order[args.images : 2 * args.images]]
    config = ImageConfig()

    cal, cal_clean, cal_truth, cal_edits, _ = measure(
        args.seed + 1, calib_images, args.planted, config
    )
    chosen, grid = calibrate(cal, cal_clean, cal_truth, cal_edits, args.images)

    prints, clean, truth, edits, seconds = measure(args.seed + 2, test_images, args.planted, config)
    defaults = DuplicatesConfig()
    results = {}
    for name, (radius, threshold) in {
        "chosen": (chosen["max_hamming"], chosen["min_pixel_similarity"]),
        "defaults": (defaults.max_hamming, defaults.min_pixel_similarity),
    }.items():
        start = time.perf_counter()
        found_pairs = near_duplicates(prints, radius, threshold)
        pair_seconds = time.perf_counter() - start
        found = set(zip(found_pairs.first.tolist(), found_pairs.second.tolist(), strict=True))
        results[name] = {
            **score(found, truth, edits, args.images),
            "flagged_fraction_clean": flagged_fraction(clean, radius, threshold),
            "pair_seconds": pair_seconds,
        }
    test = results["defaults"]
    summary = {
        "precision": test["precision"],
        "recall": test["recall"],
        "flagged_fraction_clean": test["flagged_fraction_clean"],
        "recall_per_edit": test["recall_per_edit"],
        "thresholds": {
            "max_hamming": defaults.max_hamming,
            "min_pixel_similarity": defaults.min_pixel_similarity,
            "min_cosine": "not applied (pixel stage only)",
            "hash_bits": 64,
        },
        "calibrated_thresholds": {
            "max_hamming": chosen["max_hamming"],
            "min_pixel_similarity": chosen["min_pixel_similarity"],
        },
        "defaults_equal_calibration": (
            chosen["max_hamming"] == defaults.max_hamming
            and chosen["min_pixel_similarity"] == defaults.min_pixel_similarity
        ),
        "n_images": args.images,
        "planted": args.planted,
        "edits": list(EDITS),
        "seconds": seconds + test["pair_seconds"],
        "measures": "pixel stage only: decoded as the catalog step decodes, perceptual hash + "
        "canonical-view correlation; no embeddings",
        "calibration": chosen,
        "test": test,
        "test_with_calibrated": results["chosen"],
        "grid": grid,
        "targets_met": {
            "precision": test["precision"] >= 0.9,
            "recall": test["recall"] >= 0.9,
            "flagged_fraction_clean": test["flagged_fraction_clean"] < 0.01,
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared, niced)",
        "command": "OMP_NUM_THREADS=1 uv run python bench/duplicates.py",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "duplicates.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "duplicates.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()

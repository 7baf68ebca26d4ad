"""Lakes of several sizes through the CLI with no config file: the automatic settings, the guard
against K-means and step 4 as a new user meets them.

For every size N (default 200, 1,000, 5,000, 20,000 and 70,000) the lake holds the first N
Fashion-MNIST images (train split first; its order is already shuffled) as PNG objects with a
labels sidecar, and ``scan-lake run --lake L --workspace W --clusters 10`` (plus ``--budget`` when
given) runs in a subprocess on a fresh workspace and state dir, so every run starts cold, as a
first run of a user does. The labels are used only here and by the evaluate stage.

Per size, ``bench/results/lake_sizes.json`` holds ``n_images``, ``seconds`` (wall time of the CLI
process), ``acc``, ``nmi``, ``ari`` (the run's final clusters), ``kmeans_raw_acc`` (K-means on
the raw pixels, computed here), ``kmeans_features_acc`` (K-means on the run's pretext
embeddings, the evaluate stage's ``kmeans_acc``), ``kept`` (the partition the guard kept:
``model`` or ``kmeans``), ``step4`` (what step 4 did), ``failed``, and more: the guard's two
candidates' ACC, the seeds, the settings chosen and the stage seconds.
``bench/results/lake_sizes.md`` has the table, the targets and the machine.

A lake of another kind checks that nothing here is tuned to Fashion-MNIST: ``--dataset digits``
runs the 1,797 handwritten digits that ship with scikit-learn (8x8, upscaled to 32x32 PNGs,
10 classes), written to ``lake_sizes_digits.json``/``.md``.

Usage::

    uv run python bench/lake_sizes.py                         # every size (hours on a CPU)
    uv run python bench/lake_sizes.py --sizes 200,1000        # some sizes (merged into the file)
    uv run python bench/lake_sizes.py --budget 30m            # the same with a budget
    uv run python bench/lake_sizes.py --dataset digits        # the digits lake (1,797 images)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (200, 1000, 5000, 20_000, 70_000)
CLUSTERS = 10
#: A final ACC this far below the better K-means baseline still meets the target (issue 27).
TOLERANCE = 0.01
ROW_KEYS = (
    "n_images",
    "seconds",
    "acc",
    "nmi",
    "ari",
    "kmeans_raw_acc",
    "kmeans_features_acc",
    "kept",
    "step4",
    "failed",
)


def load_dataset(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, H, W), labels (N,))`` of ``fashion`` (all 70,000 Fashion-MNIST
    images) or ``digits`` (scikit-learn's 1,797 digits, 8x8 grey levels 0..16 upscaled
    bilinearly to 32x32 and stretched to 0..255)."""
    if dataset == "fashion":
        from scan_core.data import load_fashion_mnist

        return load_fashion_mnist("all")
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BILINEAR))
            for im in small
        ]
    )
    return big, digits.target.astype(np.int64)


def write_lake(dataset: str, lake: Path, n: int) -> None:
    """The first ``n`` images of ``dataset`` as PNG objects with the labels sidecar."""
    if dataset == "fashion":
        from flows.demo import write_demo_lake

        write_demo_lake(str(lake), n)
        return
    from scan_core.data import LABELS_SIDECAR, labels_table, lake_key, lake_objects
    from tasks.storage import Storage

    images, labels = load_dataset(dataset)
    store = Storage(str(lake))
    for key, data in lake_objects(images[:n]):
        (lake / key).parent.mkdir(parents=True, exist_ok=True)
        (lake / key).write_bytes(data)
    store.write_table(
        LABELS_SIDECAR, labels_table([lake_key(i) for i in range(n)], labels[:n]), "digits-lake"
    )


def raw_pixel_kmeans_acc(dataset: str, n: int) -> float:
    """Hungarian ACC of K-means (3 k-means++ restarts, seed 0) on the raw pixels of the lake."""
    from scan_core.evaluation import hungarian_accuracy, kmeans

    images, labels = load_dataset(dataset)
    x = images[:n].reshape(n, -1).astype(np.float32) / 255.0
    return hungarian_accuracy(labels[:n], kmeans(x, CLUSTERS, n_init=3, seed=0))


def step4_of(result: dict[str, Any]) -> str:
    """What step 4 did, in a few words."""
    info = result.get("step4") or {}
    skipped = result.get("skipped", {}).get("selflabel")
    method = info.get("method", "selflabel")
    if info.get("skipped"):
        return f"{method}: skipped (too few confident images)"
    if info.get("kept"):
        return f"{method}: kept"
    if skipped:
        return f"{method}: not kept ({skipped[:80]})"
    return f"{method}: not run"


def run_size(dataset: str, n: int, work: Path, budget: str | None) -> dict[str, Any]:
    """Build the lake of ``n`` images and run the CLI on it; the row of the results."""
    folder = work / f"{dataset}-{n}"
    if folder.exists():
        shutil.rmtree(folder)
    lake, workspace, state = folder / "lake", folder / "workspace", folder / "state"
    write_lake(dataset, lake, n)
    out = folder / "result.json"
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        *("--lake", str(lake), "--workspace", str(workspace)),
        *("--clusters", str(CLUSTERS)),
        *(("--budget", budget) if budget else ()),
        *("--json", str(out)),
    ]
    env = {
        **os.environ,
        "SCAN_LAKE_STATE_DIR": str(state),
        "SCAN_LAKE_MLFLOW_EXPERIMENT": "scan-lake-bench-lake-sizes",
        "PYTHONUNBUFFERED": "1",
    }
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    (folder / "run.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    result = json.loads(out.read_text()) if out.exists() else {}
    failed = done.returncode != 0 or not result.get("ok", False)
    metrics = result.get("metrics", {})
    row: dict[str, Any] = {
        "n_images": n,
        "seconds": seconds,
        "acc": metrics.get("acc"),
        "nmi": metrics.get("nmi"),
        "ari": metrics.get("ari"),
        "kmeans_raw_acc": round(raw_pixel_kmeans_acc(dataset, n), 4),
        "kmeans_features_acc": metrics.get("kmeans_acc"),
        "kept": (result.get("guard") or {}).get("kept"),
        "step4": step4_of(result) if not failed else None,
        "failed": failed,
    }
    row["more"] = {
        "model_acc": metrics.get("guard_model_acc"),
        "guard_kmeans_acc": metrics.get("guard_kmeans_acc"),
        "neighbor_purity": metrics.get("neighbor_purity"),
        "guard": result.get("guard"),
        "settings": result.get("settings"),
        "seeds": {"pretext": 0, "scan": 0, "selflabel": 0, "kmeans": 0},
        "stage_seconds": {
            r["stage"]: r["seconds"] for r in result.get("stages", []) if not r["cached"]
        },
        "error": result.get("error") if failed else None,
        "exit_status": done.returncode,
        "budget": budget,
    }
    return row


def meets(row: dict[str, Any]) -> bool | None:
    """Whether a row meets issue 27's target: no failure, ACC at least both K-means baselines
    (within :data:`TOLERANCE`)."""
    if row["failed"] or row["acc"] is None:
        return False
    best = max(v for v in (row["kmeans_raw_acc"], row["kmeans_features_acc"]) if v is not None)
    return bool(row["acc"] >= best - TOLERANCE)


def markdown(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    """The results table with the targets, the machine and the command."""

    def f(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        f"# Lake sizes ({context['dataset']}): the CLI with no config (`--clusters 10`"
        + (f", `--budget {context['budget']}`" if context["budget"] else "")
        + ")",
        "",
        f"Machine: {context['cpu']}, {context['cpus']} cores, torch {context['torch']}, "
        f"precision of training: bf16 where the CPU has it. Measured {context['date']}.",
        "",
        "| images | seconds | ACC | NMI | ARI | K-means raw | K-means features | SCAN model ACC "
        "| kept | step 4 | failed | >= baselines - 1 pt |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_images']} | {r['seconds']:.0f} | {f(r['acc'])} | {f(r['nmi'])} | "
            f"{f(r['ari'])} | {f(r['kmeans_raw_acc'])} | {f(r['kmeans_features_acc'])} | "
            f"{f(r['more'].get('model_acc'))} | {f(r['kept'])} | {f(r['step4'])} | "
            f"{'**yes**' if r['failed'] else 'no'} | {'yes' if meets(r) else '**no**'} |"
        )
    lines += [
        "",
        "ACC/NMI/ARI: the run's final clusters (Hungarian ACC). K-means raw: K-means on the raw "
        "pixels; K-means features: on the run's pretext embeddings (the baseline the guard "
        "compares against). SCAN model ACC: the trained model's clusters before the guard (the "
        "guard keeps them unless K-means scores a higher mean kNN modularity over the "
        "embedding and the pixel neighbour graphs). Seeds: 0 everywhere (the defaults).",
        "",
        "Settings the runs chose (from the first row's JSON: `more.settings` per row):",
        "",
    ]
    for r in rows:
        settings = r["more"].get("settings") or {}
        lines.append(
            f"- {r['n_images']} images: "
            + "; ".join(f"{k}: {v}" for k, v in settings.items() if k.endswith("epochs"))
        )
    lines += ["", "## Command", "", "```bash", context["command"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the sizes, merge the rows into the results file, write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("fashion", "digits"), default="fashion")
    parser.add_argument("--sizes", default=None, help="comma-separated image counts")
    parser.add_argument("--budget", default=None, help="passed to scan-lake run, e.g. 30m")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "lake_sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    default = DEFAULT_SIZES if args.dataset == "fashion" else (len(load_dataset("digits")[1]),)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] if args.sizes else list(default)
    args.work.mkdir(parents=True, exist_ok=True)
    name = "lake_sizes" + ("" if args.dataset == "fashion" else f"_{args.dataset}")
    name += "_budget" if args.budget else ""
    path = args.out / f"{name}.json"
    previous = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = {r["n_images"]: r for r in previous}
    for n in sizes:
        row = run_size(args.dataset, n, args.work, args.budget)
        rows[n] = row
        print(json.dumps({k: row[k] for k in ROW_KEYS}), flush=True)
        import torch

        context = {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "budget": args.budget,
            "dataset": args.dataset,
            "command": "uv run python bench/lake_sizes.py"
            + (f" --dataset {args.dataset}" if args.dataset != "fashion" else "")
            + (f" --budget {args.budget}" if args.budget else ""),
        }
        ordered = [rows[k] for k in sorted(rows)]
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": context, "rows": ordered}, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(markdown(ordered, context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

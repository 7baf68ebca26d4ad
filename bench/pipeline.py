"""Pipeline caching benchmark on a Fashion-MNIST demo lake (CPU).

Scenarios, run one after the other on the same lake and workspace in one process:

- ``first``: empty workspace, every stage runs;
- ``no_change``: the same lake again (target: <= 5% of ``first``, no stage run);
- ``scan_config_change``: ``scan.seed`` changed (target: only scan, selflabel, assign, evaluate);
- ``new_images_10pct``: 10% more images (target: the backbone is reused and only the new images
  are embedded).

Writes ``bench/results/pipeline.json`` and ``bench/results/pipeline.md``. Run with
``uv run python bench/pipeline.py [--images 10000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run the scenarios and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "pipeline")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config override key=value (e.g. scan.epochs=20), repeatable",
    )
    args = parser.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    os.environ["SCAN_LAKE_STATE_DIR"] = str(args.work / "state")
    os.environ.setdefault("SCAN_LAKE_MLFLOW_EXPERIMENT", "scan-lake-bench")

    from tasks.settings import MachineSettings, prepare_environment

    prepare_environment(MachineSettings())

    from flows.demo import write_demo_lake
    from flows.pipeline import scan_pipeline
    from tasks.config import build_config, parse_overrides

    lake, workspace = str(args.work / "lake"), str(args.work / "workspace")
    write_demo_lake(lake, args.images)
    base = build_config(args.config, parse_overrides(args.overrides))
    changed = base.with_overrides({"scan.seed": base.scan.seed + 1})

    runs: list[dict[str, Any]] = []

    def run(scenario: str, config: Any) -> None:
        start = time.perf_counter()
        result = scan_pipeline(
            lake=lake, workspace=workspace, config=config.model_dump(mode="json")
        )
        seconds = time.perf_counter() - start
        runs.append(
            {
                "scenario": scenario,
                "seconds": round(seconds, 2),
                "stages_run": result["stages_run"],
                "images": result["counts"]["unique_images"],
                "objects_read": result["counts"]["objects_read"],
                "images_embedded": result["counts"]["images_embedded"],
                "acc": result["metrics"].get("acc"),
            }
        )
        print(json.dumps(runs[-1]), flush=True)

    run("first", base)
    run("no_change", base)
    run("scan_config_change", changed)
    write_demo_lake(lake, args.images // 10, start=args.images)
    run("new_images_10pct", changed)

    first = runs[0]["seconds"]
    report = {
        "runs": runs,
        "images": args.images,
        "config": str(args.config.relative_to(ROOT)),
        "overrides": args.overrides,
        "no_change_fraction_of_first": round(runs[1]["seconds"] / first, 4),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Pipeline caching benchmark ({args.images} Fashion-MNIST images, "
        f"{report['config']} {' '.join(args.overrides)}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[1]:.1f} at the end)",
        "",
        "| scenario | seconds | % of first | stages run | objects read | images embedded |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['scenario']} | {r['seconds']:.1f} | {100 * r['seconds'] / first:.1f} | "
            f"{', '.join(r['stages_run']) or '(none)'} | {r['objects_read']} | "
            f"{r['images_embedded']} |"
        )
    (args.out / "pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

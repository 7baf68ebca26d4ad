"""``scan-lake``: run the pipeline on a lake, or the demo, from the command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tasks.errors import ScanLakeError
from tasks.settings import MachineSettings, prepare_environment
from tasks.storage import Storage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sort an image lake into semantic clusters with SCAN.",
)
console = Console()
state: dict[str, bool] = {"debug": False}

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    state["debug"] = debug


class _Bars:
    """Rich progress bars fed by :mod:`tasks.progress` reports."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, note: str) -> None:
        if stage not in self.bars:
            self.bars[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(
            self.bars[stage], completed=done, total=total, description=f"{stage} {note[:60]}"
        )


class _QuietUserErrors(logging.Filter):
    """Drop the traceback from Prefect's log records of a :class:`ScanLakeError` (the CLI prints
    the one-sentence message; ``--debug`` keeps tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ScanLakeError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_prefect_tracebacks() -> None:
    if state["debug"]:
        return
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _QuietUserErrors) for f in target.filters):
            target.addFilter(_QuietUserErrors())


def _run_flow(lake: str, workspace: str, config: dict[str, Any], growth: float) -> dict[str, Any]:
    from flows.pipeline import scan_pipeline
    from tasks import progress as progress_hub

    _quiet_prefect_tracebacks()

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(
        *columns, console=console, transient=False, redirect_stdout=False, redirect_stderr=False
    ) as bars:
        reporter = _Bars(bars)
        progress_hub.add_reporter(reporter)
        try:
            return scan_pipeline(
                lake=lake, workspace=workspace, config=config, reuse_pretext_growth=growth
            )
        finally:
            progress_hub.remove_reporter(reporter)


def _report(result: dict[str, Any], settings: MachineSettings, seconds: float) -> None:
    stages = Table(title="Stages")
    for column in ("stage", "cached", "seconds"):
        stages.add_column(column)
    for record in result["stages"]:
        stages.add_row(
            record["stage"], "yes" if record["cached"] else "no", f"{record['seconds']:.1f}"
        )
    console.print(stages)
    metrics = Table(title="Metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for key, value in sorted(result["metrics"].items()):
        metrics.add_row(key, f"{value:.4f}")
    console.print(metrics)
    sizes = Table(title="Cluster sizes")
    sizes.add_column("cluster", justify="right")
    sizes.add_column("images", justify="right")
    for i, size in enumerate(result["cluster_sizes"]):
        sizes.add_row(str(i), str(size))
    console.print(sizes)
    counts = result["counts"]
    console.print(
        f"{counts['objects']} objects, {counts['unique_images']} unique images, "
        f"{counts['quarantined']} quarantined; stages run: "
        f"{', '.join(result['stages_run']) or 'none (all cached)'}; {seconds:.1f} s."
    )
    console.print(
        "\nMLflow UI:  uv run mlflow ui --backend-store-uri "
        f"{settings.tracking_uri}  (then open the run {result['mlflow']['parent_run_id']})\n"
        f"Prefect UI: PREFECT_HOME={os.environ['PREFECT_HOME']} uv run prefect server start"
    )


def _fail(exc: BaseException) -> None:
    if state["debug"]:
        raise exc
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    lake: Annotated[str, typer.Option(help="Lake URL: a folder or s3://bucket/prefix.")],
    workspace: Annotated[str, typer.Option(help="Workspace URL for artifacts and caches.")],
    clusters: Annotated[
        int | None, typer.Option(help="Number of clusters (scan.num_clusters).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key=value.")] = None,
    reuse_pretext_growth: Annotated[
        float, typer.Option(help="Keep the backbone while the lake grew by at most this fraction.")
    ] = 0.2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Run the pipeline on LAKE, caching stages under WORKSPACE."""
    try:
        from tasks.config import build_config, parse_overrides

        cfg = build_config(config, parse_overrides(set_ or []), clusters)
        settings = MachineSettings()
        Storage(lake, settings).check_reachable()  # fail fast, before Prefect starts
        Storage(workspace, settings).check_reachable(create=True)
        prepare_environment(settings)
        start = time.perf_counter()
        result = _run_flow(lake, workspace, cfg.model_dump(mode="json"), reuse_pretext_growth)
        seconds = time.perf_counter() - start
    except ScanLakeError as exc:
        _fail(exc)
        return
    result["seconds"] = seconds
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))
    _report(result, settings, seconds)


@app.command()
def demo(
    images: Annotated[int, typer.Option(help="Fashion-MNIST images in the demo lake.")] = 10_000,
    directory: Annotated[Path, typer.Option(help="Where the demo lake and workspace go.")] = Path(
        "demo"
    ),
    config: Annotated[Path, typer.Option(help="YAML config file.")] = DEMO_CONFIG,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key=value.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Build a demo lake of Fashion-MNIST PNGs and run the whole pipeline on it."""
    try:
        from tasks.config import build_config, parse_overrides

        cfg = build_config(config, parse_overrides(set_ or []))
        settings = MachineSettings()
        prepare_environment(settings)
        from flows.demo import write_demo_lake

        lake, workspace = directory / "lake", directory / "workspace"
        start = time.perf_counter()
        written = write_demo_lake(str(lake), images)
        console.print(f"demo lake {lake}: {images} Fashion-MNIST images ({written} written)")
        result = _run_flow(str(lake), str(workspace), cfg.model_dump(mode="json"), 0.2)
        seconds = time.perf_counter() - start
    except ScanLakeError as exc:
        _fail(exc)
        return
    result["seconds"] = seconds
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))
    _report(result, settings, seconds)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="scan-lake")


if __name__ == "__main__":
    sys.exit(main())

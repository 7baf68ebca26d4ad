"""``scan-lake``: run the pipeline on a lake, or the demo, from the command line; export a run's
cluster gallery."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deployments.scan_lake import DEFAULT_CRON, DEPLOYMENT_NAME
from flows.report import RunResult, report, to_console
from tasks.errors import ScanLakeError, stage_of, user_error
from tasks.settings import MachineSettings, prepare_environment
from tasks.storage import Storage

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sort an image lake into semantic clusters with SCAN.",
)
console = Console()

_CLUSTERS_HELP = (
    "Number of clusters (scan.num_clusters), or 'auto' to choose it without labels in "
    "cluster_count.k_min..k_max."
)
_SET_HELP = (
    "Override one config key, KEY=VALUE (a YAML scalar); repeat it for several keys, e.g. "
    "--set scan.epochs=20 --set pretext.backbone=resnet18."
)
_PRESET_HELP = (
    "Settings when no --config is given: 'auto' (default) chooses them from the lake (image "
    "count, size, colour) and the device; 'paper' takes the SCAN paper's (500 pretext epochs: "
    "GPU settings)."
)
_BUDGET_HELP = (
    "Wall time the automatic settings should fit on this machine, e.g. 30m, 2h, 1h30m (the "
    "schedules are scaled down to it, never below their minimums)."
)
_WORKERS_HELP = (
    "Start a local Dask cluster of N worker processes (one thread each) for the parallel work: "
    "decoding new lake objects, embedding, the ks of --clusters auto."
)
_DASK_HELP = (
    "Run the parallel work on the existing Dask cluster whose scheduler is at ADDRESS "
    "(host:port; default: SCAN_LAKE_DASK_ADDRESS). Its workers need this environment and a "
    "workspace they can reach (s3:// or a shared folder)."
)
_JSON_HELP = (
    "Write the result as JSON to this file, or '-' for stdout (the tables are not printed "
    'then). A failed run writes {"ok": false, "error": ..., "stage": ...}.'
)
state: dict[str, bool] = {"debug": False}

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"scan-lake {importlib.metadata.version('scan-lake')}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
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
    """Drop the traceback from console log records of an error a user can fix
    (:func:`tasks.errors.user_error`): the CLI prints its one sentence. The records sent to the
    Prefect API keep their tracebacks, and ``--debug`` keeps them on the console too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_prefect_tracebacks() -> None:
    if state["debug"]:
        return
    for handler in logging.getLogger().handlers:  # Prefect's console handler sits on the root
        if not any(isinstance(f, _QuietUserErrors) for f in handler.filters):
            handler.addFilter(_QuietUserErrors())


def _run_flow(
    lake: str,
    workspace: str,
    config: dict[str, Any] | None,
    retrain_pretext: bool = False,
    clusters: int | str | None = None,
    overrides: dict[str, Any] | None = None,
    budget: float | None = None,
    preset: str = "auto",
    workers: int | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
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
        wanted: int | Literal["auto"] | None = None
        if clusters == "auto":
            wanted = "auto"
        elif isinstance(clusters, int):
            wanted = clusters
        chosen: Literal["auto", "paper"] = "paper" if preset == "paper" else "auto"
        try:
            return scan_pipeline(
                lake=lake,
                workspace=workspace,
                config=config,
                clusters=wanted,
                retrain_pretext=retrain_pretext,
                preset=chosen,
                overrides=overrides,
                budget=budget,
                workers=workers,
                dask_address=dask_address,
            )
        finally:
            progress_hub.remove_reporter(reporter)


def _automatic(config: Path | None, preset: str, budget: float | None) -> bool:
    """Whether the run uses the automatic settings (no --config, --preset auto).

    Raises:
        ScanLakeError: an unknown preset, or a budget with settings that are not automatic.
    """
    if preset not in ("auto", "paper"):
        raise ScanLakeError(f"--preset {preset!r} is unknown: choose auto or paper.")
    automatic = config is None and preset == "auto"
    if budget is not None and not automatic:
        raise ScanLakeError(
            "--budget sizes the automatic settings: drop --config / --preset paper, or drop "
            "--budget and set the epochs yourself."
        )
    return automatic


def _report(result: dict[str, Any]) -> None:
    """The run's report on the terminal (the same blocks as its Prefect summary), then how to
    open the Prefect UI."""
    to_console(report(RunResult.model_validate(result)), console)
    console.print(
        f"\nPrefect UI: PREFECT_HOME={os.environ['PREFECT_HOME']} uv run prefect server start",
        soft_wrap=True,
    )


def _sentence(exc: BaseException) -> str:
    """The message of ``exc`` on one line, safe to print with rich markup."""
    return escape(" ".join(str(exc).split()))


def _fail(exc: BaseException) -> None:
    if state["debug"]:
        raise exc
    console.print(f"[bold red]error:[/] {_sentence(exc)}", soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _json_output(json_out: Path | None) -> Iterator[None]:
    """With ``--json -`` everything but the JSON goes to stderr (progress bars, messages)."""
    if json_out is None or str(json_out) != "-":
        yield
        return
    console.file = sys.stderr
    try:
        yield
    finally:
        console.file = None  # type: ignore[assignment]  # back to the current sys.stdout


def _write_json(json_out: Path, value: dict[str, Any]) -> None:
    text = json.dumps(value, indent=2, default=str)
    if str(json_out) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        json_out.write_text(text)


def _failure(exc: BaseException) -> dict[str, Any]:
    """The ``--json`` of a failed run: its one sentence and the stage it stopped in."""
    message, status = _message(exc)
    return {"ok": False, "error": message, "stage": stage_of(exc), "exit_status": status}


def _stop(exc: Exception, json_out: Path | None) -> None:
    """End a failed run: its ``--json`` (:func:`_failure`), its one sentence (the traceback with
    ``--debug``) and the exit status."""
    if json_out is not None:
        _write_json(json_out, _failure(exc))
    if state["debug"]:
        raise exc
    message, status = _message(exc)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(status) from None


def _finish(
    result: dict[str, Any], settings: MachineSettings, seconds: float, json_out: Path | None
) -> None:
    result["ok"], result["seconds"] = True, seconds
    if json_out is not None:
        _write_json(json_out, result)
    if json_out is None or str(json_out) != "-":
        _report(result)


@app.command()
def run(
    lake: Annotated[str, typer.Option(help="Lake URL: a folder or s3://bucket/prefix.")],
    workspace: Annotated[str, typer.Option(help="Workspace URL for artifacts and caches.")],
    clusters: Annotated[str | None, typer.Option(help=_CLUSTERS_HELP)] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    retrain_pretext: Annotated[
        bool,
        typer.Option(
            "--retrain-pretext",
            help="Train the backbone on the current images even if the lake grew less than "
            "growth.retrain_pretext_after since the current one was trained.",
        ),
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help=_JSON_HELP)] = None,
    preset: Annotated[str, typer.Option(help=_PRESET_HELP)] = "auto",
    budget: Annotated[str | None, typer.Option(help=_BUDGET_HELP)] = None,
    workers: Annotated[int | None, typer.Option(help=_WORKERS_HELP)] = None,
    dask: Annotated[str | None, typer.Option(metavar="ADDRESS", help=_DASK_HELP)] = None,
) -> None:
    """Run the pipeline on LAKE, caching stages under WORKSPACE."""
    with _json_output(json_out):
        try:
            from tasks.auto import parse_budget
            from tasks.config import build_config, parse_clusters, parse_overrides

            wanted = parse_clusters(clusters)
            overrides = parse_overrides(set_ or [])
            seconds_budget = parse_budget(budget)
            automatic = _automatic(config, preset, seconds_budget)
            cfg = build_config(config, overrides, wanted)  # checks keys and values now
            from tasks.parallel import requested

            workers, dask = requested(workers, dask)
            settings = MachineSettings()
            Storage(lake, settings).check_reachable()  # fail fast, before Prefect starts
            Storage(workspace, settings).check_reachable(create=True)
            prepare_environment(settings)
            start = time.perf_counter()
            result = _run_flow(
                lake,
                workspace,
                None if automatic else cfg.model_dump(mode="json"),
                retrain_pretext,
                wanted,
                overrides if automatic else None,
                seconds_budget,
                preset,
                workers,
                dask,
            )
            seconds = time.perf_counter() - start
        except Exception as exc:
            _stop(exc, json_out)
            return
        _finish(result, settings, seconds, json_out)


@app.command()
def demo(
    images: Annotated[int, typer.Option(help="Fashion-MNIST images in the demo lake.")] = 20_000,
    directory: Annotated[Path, typer.Option(help="Where the demo lake and workspace go.")] = Path(
        "demo"
    ),
    config: Annotated[Path, typer.Option(help="YAML config file.")] = DEMO_CONFIG,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help=_JSON_HELP)] = None,
    workers: Annotated[int | None, typer.Option(help=_WORKERS_HELP)] = None,
    dask: Annotated[str | None, typer.Option(metavar="ADDRESS", help=_DASK_HELP)] = None,
) -> None:
    """Build a demo lake of Fashion-MNIST PNGs and run the whole pipeline on it."""
    with _json_output(json_out):
        try:
            from tasks.config import build_config, parse_overrides
            from tasks.parallel import requested

            cfg = build_config(config, parse_overrides(set_ or []))
            workers, dask = requested(workers, dask)
            settings = MachineSettings()
            prepare_environment(settings)
            from flows.demo import write_demo_lake

            lake, workspace = directory / "lake", directory / "workspace"
            start = time.perf_counter()
            written = write_demo_lake(str(lake), images)
            console.print(f"demo lake {lake}: {images} Fashion-MNIST images ({written} written)")
            result = _run_flow(
                str(lake),
                str(workspace),
                cfg.model_dump(mode="json"),
                workers=workers,
                dask_address=dask,
            )
            seconds = time.perf_counter() - start
        except Exception as exc:
            _stop(exc, json_out)
            return
        _finish(result, settings, seconds, json_out)


@app.command()
def export(
    lake: Annotated[str, typer.Option(help="Lake URL, as the run was given it.")],
    workspace: Annotated[str, typer.Option(help="Workspace URL of the run.")],
    out: Annotated[
        str, typer.Option(help="Folder or s3:// prefix for index.html, thumbnails and CSVs.")
    ],
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Prefect flow run id or MLflow run id of the run (default: the lake's latest).",
        ),
    ] = None,
) -> None:
    """Write the cluster gallery of a finished run of LAKE: OUT/index.html (a static page)."""
    try:
        from tasks.gallery import export_gallery

        index = export_gallery(lake, workspace, out, run_id)
    except ScanLakeError as exc:
        _fail(exc)
        return
    console.print(f"Gallery: {escape(index)}", soft_wrap=True)


_CRON_HELP = "Cron schedule of the re-clustering (server time zone)."


def _deployment_setup(
    lake: str,
    workspace: str,
    clusters: str | None,
    config: Path | None,
    set_: list[str] | None,
    check_storage: bool,
    budget: str | None = None,
    workers: int | None = None,
    dask: str | None = None,
) -> dict[str, Any]:
    """Validate a deployment request and point Prefect at its server; the flow parameters."""
    from deployments.scan_lake import check_api, deployment_parameters
    from tasks.config import parse_overrides

    parameters = deployment_parameters(
        lake, workspace, clusters, config, parse_overrides(set_ or []), budget, workers, dask
    )
    settings = MachineSettings()
    if check_storage:
        Storage(lake, settings).check_reachable()
        Storage(workspace, settings).check_reachable(create=True)
    prepare_environment(settings)
    check_api()
    return parameters


@app.command()
def serve(
    lake: Annotated[str, typer.Option(help="Lake URL: a folder or s3://bucket/prefix.")],
    workspace: Annotated[str, typer.Option(help="Workspace URL for artifacts and caches.")],
    clusters: Annotated[str | None, typer.Option(help=_CLUSTERS_HELP)] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    cron: Annotated[str, typer.Option(help=_CRON_HELP)] = DEFAULT_CRON,
    name: Annotated[str, typer.Option(help="Deployment name.")] = DEPLOYMENT_NAME,
    budget: Annotated[str | None, typer.Option(help=_BUDGET_HELP)] = None,
    workers: Annotated[int | None, typer.Option(help=_WORKERS_HELP)] = None,
    dask: Annotated[str | None, typer.Option(metavar="ADDRESS", help=_DASK_HELP)] = None,
) -> None:
    """Serve the scheduled deployment: register it with the Prefect server (PREFECT_API_URL) and
    run its scheduled and requested runs in this process until Ctrl-C."""
    try:
        from deployments.scan_lake import build_deployment, serve_deployments

        parameters = _deployment_setup(
            lake, workspace, clusters, config, set_, True, budget, workers, dask
        )
        deployment = build_deployment(parameters, name=name, cron=cron)
    except ScanLakeError as exc:
        _fail(exc)
        return
    except ValueError as exc:  # an invalid cron expression
        _fail(ScanLakeError(f"Cannot build the deployment ({exc}): check --cron."))
        return
    console.print(f"Serving scan_pipeline/{name} (cron '{cron}'); Ctrl-C stops.")
    serve_deployments(deployment)


@app.command()
def deploy(
    lake: Annotated[str, typer.Option(help="Lake URL: a folder or s3://bucket/prefix.")],
    workspace: Annotated[str, typer.Option(help="Workspace URL for artifacts and caches.")],
    work_pool: Annotated[str, typer.Option(help="Process work pool (created if missing).")] = (
        "scan-lake"
    ),
    clusters: Annotated[str | None, typer.Option(help=_CLUSTERS_HELP)] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
    cron: Annotated[str, typer.Option(help=_CRON_HELP)] = DEFAULT_CRON,
    name: Annotated[str, typer.Option(help="Deployment name.")] = DEPLOYMENT_NAME,
    budget: Annotated[str | None, typer.Option(help=_BUDGET_HELP)] = None,
    workers: Annotated[int | None, typer.Option(help=_WORKERS_HELP)] = None,
    dask: Annotated[str | None, typer.Option(metavar="ADDRESS", help=_DASK_HELP)] = None,
) -> None:
    """Register the scheduled deployment on a process work pool; a worker
    (`prefect worker start --pool WORK_POOL`) runs it."""
    try:
        from deployments.scan_lake import deploy_to_work_pool

        parameters = _deployment_setup(
            lake, workspace, clusters, config, set_, False, budget, workers, dask
        )
        deployment_id = deploy_to_work_pool(parameters, work_pool, name=name, cron=cron)
    except ScanLakeError as exc:
        _fail(exc)
        return
    except ValueError as exc:
        _fail(ScanLakeError(f"Cannot register the deployment ({exc}): check --cron."))
        return
    console.print(
        f"Deployment scan_pipeline/{name} ({deployment_id}) on work pool '{work_pool}', cron "
        f"'{cron}'. Start a worker: uv run prefect worker start --pool {work_pool}",
        soft_wrap=True,
    )


def _message(exc: BaseException) -> tuple[str, int]:
    """The one sentence for ``exc`` and the exit status: 2 when a user can fix the cause, 1 for
    anything else (a bug, or a case not handled yet)."""
    known = user_error(exc)
    if known is not None:
        return " ".join(str(known).split()), 2
    detail = " ".join(str(exc).split())[:300]
    return (
        f"the run stopped on an unexpected {type(exc).__name__} ({detail}): rerun with --debug "
        "for the traceback and report it; finished stages are kept.",
        1,
    )


def _exit_code(exc: Exception) -> int:
    """Print the one sentence for ``exc`` and return the exit status (:func:`_message`)."""
    message, status = _message(exc)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return status


def main() -> None:
    """Console-script entry point: every failure ends in one sentence (``--debug``: traceback)."""
    try:
        app(prog_name="scan-lake")
    except Exception as exc:
        if state["debug"]:
            raise
        sys.exit(_exit_code(exc))


if __name__ == "__main__":
    main()

"""MLflow tracking on a real sqlite store: several runs starting at once on a fresh state dir."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Barrier
from pathlib import Path

RUNS_AT_ONCE = 3


def _first_use(tracking_uri: str, barrier: Barrier, results: mp.Queue) -> None:
    from tasks import tracking

    barrier.wait()
    try:
        results.put(("ok", tracking.ensure_experiment(tracking_uri, "scan-lake")))
    except Exception as error:  # reported to the test, which shows it
        results.put(("error", f"{type(error).__name__}: {error}"))


def test_runs_starting_together_on_a_fresh_store_share_one_experiment(tmp_path: Path) -> None:
    """MLflow creates a sqlite store's tables on first use; processes doing that at the same
    moment failed with "duplicate column name" before the first use was serialised."""
    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(RUNS_AT_ONCE), context.Queue()
    processes = [
        context.Process(target=_first_use, args=(uri, barrier, results))
        for _ in range(RUNS_AT_ONCE)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert all(status == "ok" for status, _ in outcomes), outcomes
    assert len({experiment for _, experiment in outcomes}) == 1
    assert (tmp_path / "state" / "mlflow.db.lock").exists()


def test_run_links_follow_the_tracking_uri() -> None:
    from tasks.tracking import run_link, ui_command

    server = "http://mlflow.example:5000/"
    assert run_link(server, "3", "abc") == "http://mlflow.example:5000/#/experiments/3/runs/abc"
    assert ui_command(server) is None
    local = "sqlite:////data/state/mlflow.db"
    assert run_link(local, "3", "abc") == "#/experiments/3/runs/abc"
    assert run_link(local, "3", "abc", "http://10.0.0.5:5001") == (
        "http://10.0.0.5:5001/#/experiments/3/runs/abc"
    )
    assert ui_command(local) == f"uv run mlflow ui --backend-store-uri {local}"

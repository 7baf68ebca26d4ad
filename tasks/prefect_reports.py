"""What a flow run shows in the Prefect UI besides its Markdown summary: progress artifacts that
long stages update (a deployed run has no terminal for progress bars), table artifacts of the
metrics and cluster sizes, link artifacts to the MLflow run, the assignments and the gallery, and
the log lines of ``scan_core`` and ``tasks``.

Library modules log with ``logging.getLogger(__name__)`` and know nothing of Prefect: while the
flow runs, :func:`library_logs_to_prefect` hands their records (INFO and up) to Prefect's API
log handler, which files each under the flow or task run it was emitted in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

logger = logging.getLogger(__name__)

#: Loggers whose records reach the run's logs (``PREFECT_LOGGING_EXTRA_LOGGERS`` names them too).
LIBRARY_LOGGERS = ("scan_core", "tasks")
#: Shortest interval between two updates of one progress artifact.
PROGRESS_INTERVAL_SECONDS = 5.0


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from ``parts``."""
    text = "-".join(parts).lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text)).strip("-")


class ProgressArtifacts:
    """A :mod:`tasks.progress` reporter that keeps one Prefect progress artifact per stage up to
    date: created at the first report, updated at most every ``interval`` seconds and at the
    end (``done == total``). A failure to reach the API stops the reports (the stage goes on)."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self.ids: dict[str, UUID] = {}
        self.last: dict[str, float] = {}
        self.failed = False

    def __call__(self, stage: str, done: int, total: int, note: str) -> None:
        if self.failed or total <= 0:
            return
        now = time.monotonic()
        if done < total and now - self.last.get(stage, -math.inf) < self.interval:
            return
        self.last[stage] = now
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = 100.0 * min(max(done, 0), total) / total
        description = f"{stage}: {done}/{total} {note}".strip()[:500]
        try:
            if stage in self.ids:
                update_progress_artifact(self.ids[stage], percent, description=description)
            else:
                created = create_progress_artifact(
                    percent, key=artifact_key("progress", stage), description=description
                )
                assert isinstance(created, UUID)  # called synchronously, never a coroutine
                self.ids[stage] = created
        except Exception as exc:  # the UI is not worth stopping a stage for
            self.failed = True
            logger.warning("progress artifacts stopped: the Prefect API refused one (%s)", exc)


@contextlib.contextmanager
def library_logs_to_prefect(
    names: tuple[str, ...] = LIBRARY_LOGGERS, level: int = logging.INFO
) -> Iterator[None]:
    """While the block runs, send the records of the ``names`` loggers at ``level`` and above to
    the Prefect API (the run they are emitted in); restore the loggers afterwards."""
    from prefect.logging.handlers import APILogHandler

    added: list[tuple[logging.Logger, logging.Handler]] = []
    levels: list[tuple[logging.Logger, int]] = []
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in target.handlers):
            handler: logging.Handler = APILogHandler()
            target.addHandler(handler)
            added.append((target, handler))
        if target.getEffectiveLevel() > level:
            levels.append((target, target.level))
            target.setLevel(level)
    try:
        yield
    finally:
        for target, handler in added:
            target.removeHandler(handler)
        for target, old in levels:
            target.setLevel(old)


def publish_tables(result: dict[str, Any]) -> None:
    """Table artifacts of a finished run: its metrics, and its clusters (size, growth)."""
    from prefect.artifacts import create_table_artifact

    metrics = [
        {"metric": k, "value": round(float(v), 6)} for k, v in sorted(result["metrics"].items())
    ]
    create_table_artifact(
        table=metrics, key="scan-pipeline-metrics", description="Metrics of the scan-lake run"
    )
    growth = {r["cluster"]: r for r in result.get("lineage", {}).get("clusters", [])}
    clusters = []
    for cluster, size in zip(result["cluster_ids"], result["cluster_sizes"], strict=True):
        row = growth.get(cluster, {})
        clusters.append(
            {
                "cluster": cluster,
                "size": size,
                "status": row.get("status", "kept"),
                "growth": row.get("growth", size),
                "new_images": row.get("new_images", size),
            }
        )
    create_table_artifact(
        table=clusters,
        key="scan-pipeline-clusters",
        description="Cluster sizes (objects) and growth (unique images) since the last run",
    )


def publish_links(links: dict[str, tuple[str, str]]) -> None:
    """One link artifact per entry: ``key -> (link, text)``."""
    from prefect.artifacts import create_link_artifact

    for key, (link, text) in links.items():
        create_link_artifact(link=link, link_text=text, key=artifact_key(key), description=text)

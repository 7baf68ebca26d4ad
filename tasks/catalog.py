"""Catalog stage: the lake's usable images and its quarantine list as Parquet tables."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from tasks.schemas import CATALOG, LISTING, QUARANTINE
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage

CATALOG_FILE = "catalog.parquet"
QUARANTINE_FILE = "quarantine.parquet"


def read_catalog(workspace: Storage, catalog: StageOutput) -> pa.Table:
    """The catalog table of a catalog stage output.

    Raises:
        WorkspaceFileError: it is not a catalog table (:data:`tasks.schemas.CATALOG`).
    """
    return workspace.read_table(f"{catalog.rel_dir}/{CATALOG_FILE}", schema=CATALOG)


@task(name="catalog", **STAGE_TASK_OPTIONS)
def catalog(request: StageRequest, listing: str) -> StageOutput:
    """Split the lake snapshot ``listing`` into the catalog and quarantine tables.

    ``request.config`` carries ``image`` (the ImageConfig dict) and ``image_config_key``.
    """

    def body(run: StageRun) -> dict[str, Any]:
        rows = run.workspace.read_table(listing, schema=LISTING)
        ok = pc.is_null(rows["reason"])
        good = rows.filter(ok)
        bad = rows.filter(pc.invert(ok))
        catalog = pa.table(
            {
                "image_id": good["image_id"],
                "uri": good["uri"],
                "bytes": good["size"],
                "width": good["width"],
                "height": good["height"],
                "mode": good["mode"],
                "label": good["label"],
            },
            schema=CATALOG,
        )
        quarantine = pa.table({"uri": bad["uri"], "reason": bad["reason"]}, schema=QUARANTINE)
        run.write_table(CATALOG_FILE, catalog)
        run.write_table(QUARANTINE_FILE, quarantine)
        unique = len(set(good["image_id"].to_pylist()))
        labelled = len(good) - good["label"].null_count
        counts = {
            "objects": len(rows),
            "images": len(good),
            "unique_images": unique,
            "duplicates": len(good) - unique,
            "quarantined": len(bad),
            "labelled": labelled,
        }
        run.log_metrics({f"catalog/{k}": float(v) for k, v in counts.items()})
        if len(bad):
            lines = [
                f"{u}\t{r}"
                for u, r in zip(bad["uri"].to_pylist(), bad["reason"].to_pylist(), strict=True)
            ]
            run.log_artifact("quarantine.tsv", ("uri\treason\n" + "\n".join(lines)).encode())
        return {
            **counts,
            "image_config": request.config["image"],
            "image_config_key": request.config["image_config_key"],
            "has_labels": labelled > 0,
        }

    return run_stage(request, body)

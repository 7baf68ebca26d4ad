"""Planted files: a finished workspace whose files are replaced by a pickle that would run code
(create a marker folder) when unpickled, by Prefect result records naming the pickle serializer,
or by garbage, and what the pipeline does when it reads them back (shared by
``test_workspace_trust.py`` and ``bench/robustness.py``).

Every file of a finished workspace is of one :data:`KINDS` entry: read back by a rerun (through
the reader the pipeline uses for it), with the outcome the pipeline promises: ``refused`` (one
:class:`~tasks.errors.WorkspaceFileError` sentence naming the file) or ``recomputed`` (the file is
ignored or written again), or ``unread`` (written for people and MLflow, never read back).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scan_core.config import ImageConfig
from tasks.errors import ScanLakeError, WorkspaceFileError
from tasks.stage import StageOutput, stage_output
from tasks.storage import Storage
from tests.pipeline.cli_runs import cli_env, error_lines, run_cli
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_local

Outcome = Literal["refused", "recomputed", "unread"]


class RunsCode:
    """Unpickles as a call of ``os.mkdir(marker)``: if it is ever unpickled, the marker exists."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


def pickle_payload(marker: Path) -> bytes:
    """A plain pickle that runs ``os.mkdir(marker)`` when loaded."""
    import pickle

    return pickle.dumps(RunsCode(str(marker)))


def torch_payload(marker: Path) -> bytes:
    """A ``torch.save`` checkpoint whose state holds the pickle payload beside a tensor."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(str(marker))}, buffer)
    return buffer.getvalue()


def prefect_record(marker: Path) -> bytes:
    """A Prefect 3 result record that names the (cloud)pickle serializer: what Prefect's result
    persistence would load from ``<workspace>/_prefect/<cache key>``, running the payload."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    metadata = ResultRecordMetadata(serializer=PickleSerializer(), storage_key="planted")
    return ResultRecord(metadata=metadata, result=RunsCode(str(marker))).serialize()


def _other_table() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image_id": [1, 2], "note": ["not", "this"]}), buffer)
    return buffer.getvalue()


#: Ways to damage a file: ``(original bytes, marker) -> planted bytes``.
VARIANTS: dict[str, Callable[[bytes, Path], bytes]] = {
    "pickle": lambda data, marker: pickle_payload(marker),
    "garbage": lambda data, marker: b"\x00\xffnot what was written\x13" * 8,
    "truncated": lambda data, marker: data[: len(data) // 2],
    "empty": lambda data, marker: b"",
}
#: Extra ways for JSON files (valid JSON, wrong shape) and tables (valid Parquet, wrong
#: columns) and checkpoints (a torch archive holding the payload).
JSON_VARIANTS: dict[str, Callable[[bytes, Path], bytes]] = {
    "other JSON": lambda data, marker: json.dumps({"stage": 7, "summary": [1]}).encode()
}
TABLE_VARIANTS: dict[str, Callable[[bytes, Path], bytes]] = {
    "other columns": lambda data, marker: _other_table()
}
CHECKPOINT_VARIANTS: dict[str, Callable[[bytes, Path], bytes]] = {
    "torch pickle": lambda data, marker: torch_payload(marker)
}


@dataclass
class Finished:
    """A finished CLI run on a local lake: where things are and what its stages were."""

    home: Path
    lake: str
    workspace: Path
    env: dict[str, str]
    result: dict[str, Any]

    def outputs(self, ws: Storage) -> dict[str, StageOutput]:
        """Stage name -> committed output (read from the untouched manifests)."""
        found = {r["stage"]: stage_output(ws, r["stage"], r["key"]) for r in self.result["stages"]}
        return {name: output for name, output in found.items() if output is not None}

    def copy(self, name: str) -> Path:
        """A copy of the workspace next to it (a rerun may write into it)."""
        target = self.workspace.parent / name
        shutil.copytree(self.workspace, target)
        return target


def finished_run(home: Path, fashion: tuple[np.ndarray, np.ndarray], images: int = 40) -> Finished:
    """One CLI run of the tiny config on a local lake of ``images`` Fashion-MNIST PNGs."""
    images_, labels = fashion
    lake, workspace = home / "lake", home / "workspace"
    write_local(lake, lake_contents(images_[:images], labels[:images], extras=False))
    env = cli_env(home, SCAN_LAKE_MLFLOW_EXPERIMENT="planted")
    out = home / "first.json"
    args = ["run", "--lake", str(lake), "--workspace", str(workspace), "--config"]
    done = run_cli([*args, str(TINY_CONFIG), "--json", str(out)], env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return Finished(home, str(lake), workspace, env, json.loads(out.read_text()))


# -- readers: what a rerun calls for each kind of file -------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the readers need: the workspace, the lake, the stages' outputs, the images."""

    ws: Storage
    lake: str
    outputs: dict[str, StageOutput]
    image_config: ImageConfig
    image_config_key: str
    ids: list[str]


def _stage_of(rel: str) -> str:
    return rel.split("/")[0]


def _read_manifest(ctx: Context, rel: str) -> Any:
    stage, key = rel.split("/")[:2]
    return stage_output(ctx.ws, stage, key)


def _read_history(ctx: Context, rel: str) -> Any:
    from tasks.history import load_previous

    record, note = load_previous(ctx.ws, ctx.lake)
    assert record is None and ctx.ws.uri(rel) in note, note  # recomputed: a cold start
    return note


def _read_index(ctx: Context, rel: str) -> Any:
    from tasks.lake import previous_index

    assert previous_index(ctx.ws, rel) == {}  # recomputed: every object read again
    return "every object is read again"


def _read_listing(ctx: Context, rel: str) -> Any:
    from tasks.lake import scan_lake
    from tasks.schemas import LISTING

    snapshot = scan_lake.fn(ctx.lake, ctx.ws.url, ctx.image_config.model_dump())
    assert snapshot.listing == rel
    ctx.ws.read_table(rel, schema=LISTING)  # recomputed: written again by the scan
    return "written again by the lake scan"


def _read_pixels(ctx: Context, rel: str) -> Any:
    from tasks.pixels import load_pixels, stored_ids

    stored_ids(ctx.ws, ctx.image_config_key)
    return load_pixels(ctx.ws, ctx.image_config_key, ctx.ids, ctx.image_config)


def _read_embedding_store(ctx: Context, rel: str) -> Any:
    from tasks.embed import read_embeddings_table

    return read_embeddings_table(ctx.ws, [rel])


def _read_model(ctx: Context, rel: str) -> Any:
    from tasks.checkpoints import load_clustering_model, load_pretext_model

    folder = rel.rpartition("/")[0]
    if _stage_of(rel) == "pretext":
        return load_pretext_model(ctx.ws, folder)
    return load_clustering_model(ctx.ws, folder)


def _read_stage_table(ctx: Context, rel: str) -> Any:
    from tasks.assign import image_clusters, read_assignments
    from tasks.catalog import read_catalog
    from tasks.embed import read_embeddings
    from tasks.guard import read_partitions
    from tasks.neighbors import read_neighbor_indices

    output = ctx.outputs[_stage_of(rel)]
    readers: dict[str, list[Callable[[Storage, StageOutput], Any]]] = {
        "catalog.parquet": [read_catalog],
        "embeddings.parquet": [read_embeddings],
        "neighbors.parquet": [read_neighbor_indices],
        "assignments.parquet": [read_assignments, image_clusters],
        "partitions.parquet": [lambda ws, out: read_partitions(ws, out, ctx.ids)],
    }
    return [read(ctx.ws, output) for read in readers[rel.rpartition("/")[2]]]


def _read_train_ids(ctx: Context, rel: str) -> Any:
    from tasks.manifest import read_manifest
    from tasks.pretext import backbone_candidates

    key = rel.split("/")[1]
    manifest = read_manifest(ctx.ws, "pretext", key)
    assert manifest is not None
    found = backbone_candidates(ctx.ws, manifest.config, ctx.image_config_key, set(ctx.ids))
    assert key not in {c.key for c in found}  # recomputed: not a backbone to build on
    return "not offered as a backbone to reuse"


@dataclass(frozen=True)
class Kind:
    """A kind of workspace file: its path pattern, what a rerun does with a bad one, its
    reader, and the damage to try on it."""

    name: str
    pattern: str
    outcome: Outcome
    read: Callable[[Context, str], Any] | None = None
    variants: tuple[str, ...] = ()


_BASIC = tuple(VARIANTS)
_JSON = (*_BASIC, *JSON_VARIANTS)
_TABLE = (*_BASIC, *TABLE_VARIANTS)
_MODEL = (*_BASIC, *CHECKPOINT_VARIANTS)
_KEY = r"[0-9a-f]{64}"
_ATTEMPT = rf"[a-z_]+/{_KEY}/[0-9]{{8}}T[0-9]{{6}}-[0-9a-f]{{8}}"

KINDS: tuple[Kind, ...] = (
    Kind("Prefect result record (left by earlier versions)", r"_prefect/.+", "unread"),
    Kind("stage manifest", rf"[a-z_]+/{_KEY}/_manifest\.json", "refused", _read_manifest, _JSON),
    Kind("run record", r"history/[0-9a-f]{24}/latest\.json", "recomputed", _read_history, _JSON),
    Kind("dated run record", r"history/[0-9a-f]{24}/runs/[0-9TZ]+\.json", "unread"),
    Kind("lake index", r"lake-index/[0-9a-f]{24}\.parquet", "recomputed", _read_index, _TABLE),
    Kind("lake snapshot", rf"listings/{_KEY}\.parquet", "recomputed", _read_listing, _TABLE),
    Kind(
        "pixel store shard",
        r"pixels/[0-9a-f]{32}/part-[0-9a-f]{32}\.parquet",
        "refused",
        _read_pixels,
        _TABLE,
    ),
    Kind(
        "embedding store shard",
        rf"embedding-store/{_KEY}/(part|shard)-[0-9a-f]{{32}}\.parquet",
        "refused",
        _read_embedding_store,
        _TABLE,
    ),
    Kind("checkpoint", rf"{_ATTEMPT}/model\.pt", "refused", _read_model, _MODEL),
    Kind("model description", rf"{_ATTEMPT}/model\.json", "refused", _read_model, _JSON),
    Kind(
        "stage table",
        rf"{_ATTEMPT}/(catalog|embeddings|neighbors|assignments|partitions)\.parquet",
        "refused",
        _read_stage_table,
        _TABLE,
    ),
    Kind(
        "training images of a backbone",
        rf"pretext/{_KEY}/[^/]+/train_ids\.parquet",
        "recomputed",
        _read_train_ids,
        _TABLE,
    ),
    Kind(
        "report for people and MLflow",
        rf"{_ATTEMPT}/(quarantine|cluster_lineage|duplicates)\.parquet"
        rf"|{_ATTEMPT}/(?!model\.)[a-z_]+\.(png|json)"
        r"|gallery/[0-9a-f]{24}/[0-9a-f]{24}/.+",
        "unread",
    ),
)


def kind_of(rel: str) -> Kind:
    """The one kind whose pattern ``rel`` matches (AssertionError when none or several do)."""
    found = [k for k in KINDS if re.fullmatch(k.pattern, rel)]
    assert len(found) == 1, f"{rel}: kinds {[k.name for k in found]}"
    return found[0]


def context(finished: Finished) -> Context:
    """The readers' context for the finished workspace (read before anything is planted)."""
    from tasks.catalog import read_catalog
    from tasks.lake import unique_ids

    ws = Storage(str(finished.workspace))
    outputs = finished.outputs(ws)
    catalog = outputs["catalog"]
    ids = unique_ids(read_catalog(ws, catalog))
    return Context(
        ws=ws,
        lake=finished.lake,
        outputs=outputs,
        image_config=ImageConfig.model_validate(catalog.summary["image_config"]),
        image_config_key=str(catalog.summary["image_config_key"]),
        ids=ids,
    )


@dataclass(frozen=True)
class Planted:
    """One file damaged one way, read back: what happened."""

    rel: str
    kind: str
    variant: str
    outcome: Outcome
    happened: str  # the sentence, or what was recomputed
    ok: bool  # the promised outcome, one sentence naming the file, and no code run


def plant_and_read(ctx: Context, rel: str, variant: str, marker: Path) -> Planted:
    """Replace ``rel`` by ``variant`` of it, call its kind's reader, put the file back."""
    kind = kind_of(rel)
    assert kind.read is not None
    damage = {**VARIANTS, **JSON_VARIANTS, **TABLE_VARIANTS, **CHECKPOINT_VARIANTS}[variant]
    path = Path(ctx.ws.path(rel))
    original = path.read_bytes()
    path.write_bytes(damage(original, marker))
    try:
        try:
            value = kind.read(ctx, rel)
            happened, refused = f"read as {type(value).__name__}: {str(value)[:120]}", False
        except WorkspaceFileError as exc:
            happened, refused = str(exc), True
        except (ScanLakeError, AssertionError) as exc:
            happened, refused = f"{type(exc).__name__}: {exc}", False
    finally:
        path.write_bytes(original)
    if kind.outcome == "refused":
        ok = refused and ctx.ws.uri(rel) in happened and "\n" not in happened
    else:
        ok = not refused and not happened.startswith("AssertionError")
    return Planted(rel, kind.name, variant, kind.outcome, happened, ok and not marker.exists())


def every_file(workspace: Path) -> list[str]:
    """Workspace-relative paths of every file of a workspace, sorted."""
    return sorted(str(p.relative_to(workspace)) for p in workspace.rglob("*") if p.is_file())


# -- reruns through the console script ---------------------------------------------------------


@dataclass(frozen=True)
class Rerun:
    """A CLI rerun on a workspace with planted files."""

    status: int
    output: str
    errors: list[str]
    result: dict[str, Any] | None
    code_ran: bool


def rerun(
    finished: Finished,
    name: str,
    plant: Callable[[Path, Path], list[str]],
    extra: list[str] | None = None,
) -> tuple[Rerun, list[str]]:
    """Copy the finished workspace, ``plant(workspace, marker)`` into it (returns the planted
    paths), run the same command again (plus ``extra`` arguments)."""
    workspace = finished.copy(f"ws-{name}")
    marker = finished.home / f"code-ran-{name}"
    planted = plant(workspace, marker)
    out = finished.home / f"{name}.json"
    args = ["run", "--lake", finished.lake, "--workspace", str(workspace), "--config"]
    done = run_cli([*args, str(TINY_CONFIG), "--json", str(out), *(extra or [])], finished.env)
    output = done.stdout + done.stderr
    result = json.loads(out.read_text()) if out.exists() else None
    return Rerun(
        done.returncode, output, error_lines(done.stdout), result, marker.exists()
    ), planted


def plant_recomputed_kinds(finished: Finished) -> Callable[[Path, Path], list[str]]:
    """Prefect result records (pickle serializer) under ``_prefect/`` for every stage key, the
    pickle payload in the run record, the lake index and the snapshot."""

    def plant(workspace: Path, marker: Path) -> list[str]:
        record = prefect_record(marker)
        rels = [f"_prefect/{r['key']}" for r in finished.result["stages"]]
        for rel in rels:
            (workspace / rel).parent.mkdir(parents=True, exist_ok=True)
            (workspace / rel).write_bytes(record)
        for rel in every_file(workspace):
            if kind_of(rel).name in ("run record", "lake index", "lake snapshot"):
                (workspace / rel).write_bytes(pickle_payload(marker))
                rels.append(rel)
        return rels

    return plant


def plant_kind(kind: str, payload: Callable[[Path], bytes]) -> Callable[[Path, Path], list[str]]:
    """``payload(marker)`` in every file of kind ``kind``."""

    def plant(workspace: Path, marker: Path) -> list[str]:
        rels = [rel for rel in every_file(workspace) if kind_of(rel).name == kind]
        for rel in rels:
            (workspace / rel).write_bytes(payload(marker))
        return rels

    return plant

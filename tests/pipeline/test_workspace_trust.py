"""Nothing the workspace holds is trusted (issue 26.1): one finished run on a local lake, then a
pickle that would run code (create a marker folder) and plain garbage planted in every file a
rerun reads back. Nothing is ever unpickled; each bad file is either recomputed or refused with
one sentence naming it. In-process for every file of the workspace, through the console script
for the kinds of files a rerun meets first (Prefect result records, run record, lake index,
manifests, checkpoints)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.planted import (
    KINDS,
    Context,
    Finished,
    context,
    every_file,
    finished_run,
    kind_of,
    plant_and_read,
    plant_kind,
    plant_recomputed_kinds,
    rerun,
    torch_payload,
)
from tests.pipeline.planted import pickle_payload as pickled

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env: Path,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
) -> Finished:
    return finished_run(tmp_path_factory.mktemp("planted"), fashion)


@pytest.fixture(scope="module")
def ctx(finished: Finished) -> Iterator[Context]:
    yield context(finished)


def test_every_file_of_a_finished_workspace_is_of_a_known_kind(finished: Finished) -> None:
    """A file kind added later without a reader (or a reason it is never read) fails here."""
    files = every_file(finished.workspace)
    kinds = {kind_of(rel).name for rel in files}
    read = {k.name for k in KINDS if k.outcome != "unread"}
    assert read <= kinds, read - kinds  # the run made every kind a rerun reads
    assert not any(rel.startswith("_prefect/") for rel in files)


def test_every_file_a_rerun_reads_is_refused_or_recomputed_never_run(
    finished: Finished, ctx: Context, tmp_path: Path
) -> None:
    """Each file read back, damaged each way (a pickle payload, garbage, cut in half, empty,
    valid JSON or Parquet of another shape, a torch archive holding the payload), one at a
    time: the reader refuses it with one sentence naming it, or ignores or rewrites it."""
    marker = tmp_path / "code-ran"
    results = [
        plant_and_read(ctx, rel, variant, marker)
        for rel in every_file(finished.workspace)
        for variant in kind_of(rel).variants
    ]
    assert not marker.exists()
    failed = [(p.rel, p.variant, p.happened) for p in results if not p.ok]
    assert failed == []
    tried = {(p.kind, p.outcome) for p in results}
    assert {(k.name, k.outcome) for k in KINDS if k.outcome != "unread"} == tried
    assert len(results) >= 100


def test_a_rerun_over_planted_prefect_records_history_and_lake_index_completes(
    finished: Finished,
) -> None:
    """Prefect result records naming the pickle serializer under ``_prefect/<stage key>`` (the
    attack of issue 26), the payload as the run record, lake index and snapshot: the rerun
    never loads the records, ignores or rewrites the rest, and every stage is a cache hit."""
    got, planted = rerun(finished, "recomputed", plant_recomputed_kinds(finished))
    assert got.status == 0, got.output[-3000:]
    assert not got.code_ran
    assert len(planted) == len(finished.result["stages"]) + 3
    assert got.result is not None and got.result["stages_run"] == []
    assert "is not JSON" in got.output and "Starting cold" in got.output  # the run record
    assert "Traceback" not in got.output


def test_a_rerun_over_planted_manifests_stops_with_one_sentence(finished: Finished) -> None:
    got, planted = rerun(finished, "manifests", plant_kind("stage manifest", pickled))
    assert planted and not got.code_ran
    assert got.status == 2, got.output[-3000:]
    assert len(got.errors) == 1, got.output[-3000:]
    assert "/catalog/" in got.errors[0] and "/_manifest.json is not JSON" in got.errors[0]
    assert "so that the next run computes it again" in got.errors[0]
    assert "Traceback" not in got.output


def test_a_rerun_that_loads_planted_checkpoints_stops_with_one_sentence(
    finished: Finished,
) -> None:
    """Checkpoints replaced by torch archives holding the payload; a changed SCAN setting makes
    the rerun load the pretext model: refused, never run."""
    got, planted = rerun(
        finished, "checkpoints", plant_kind("checkpoint", torch_payload), ["--set", "scan.epochs=2"]
    )
    assert planted and not got.code_ran
    assert got.status == 2, got.output[-3000:]
    assert len(got.errors) == 1, got.output[-3000:]
    sentence = got.errors[0]
    assert "/pretext/" in sentence and "/model.pt is not a checkpoint of tensors only" in sentence
    assert "nothing in it was run" in sentence and "Traceback" not in got.output

"""Robustness benchmark (issues 6, 26): every bad-input, bad-request, fault, security and trust
case against real servers (SeaweedFS S3, MLflow on sqlite, a Prefect server), through the real
console script.

Cases, reusing the test helpers of ``tests/pipeline`` (messy.py, bad_requests.py, faults.py,
leaks.py):

- bad input: a messy lake (usable oddities and objects to quarantine), one run;
- bad requests: every request that cannot train, each one process;
- faults: the S3 server killed mid-run then restarted and the command rerun; SIGKILL while a
  stage writes, then a rerun; two runs on one workspace at once; the lake's keys and ETags;
- security: a planted secret searched for everywhere a run records things; a checkpoint that
  would run code; a config file with a Python tag; keys that look like paths;
- trust (issue 26): after one run, every file of the workspace that a rerun reads, replaced by
  a pickle that would run code, garbage, half of itself, nothing, or JSON / Parquet of another
  shape (``tests/pipeline/planted.py``): refused with one sentence naming it, or recomputed,
  and the code never runs; reruns of the console script over Prefect result records naming the
  pickle serializer, pickled manifests, checkpoints and pixel store shards.

Writes ``bench/results/robustness.json`` and ``bench/results/robustness.md``: every case tried,
what happened (the sentence, or the quarantine reason), and for every run that completed the
invariant objects in the lake = clustered + quarantined, counted in the workspace's own tables.
Run with ``uv run python bench/robustness.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Report:
    """The cases tried and the invariant of every completed run."""

    def __init__(self) -> None:
        self.cases: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []

    def case(self, group: str, name: str, happened: str, ok: bool) -> None:
        """Record one case: what happened (a sentence, a reason, counts) and whether it is
        what the issue asks for."""
        self.cases.append({"group": group, "case": name, "happened": happened, "ok": bool(ok)})
        print(f"[{'ok' if ok else 'FAIL'}] {group} / {name}: {happened}", flush=True)

    def run(self, name: str, counts: dict[str, Any]) -> None:
        """Record the invariant of a completed run."""
        self.runs.append({"run": name, **counts})
        print(f"[{'ok' if counts['holds'] else 'FAIL'}] invariant / {name}: {counts}", flush=True)


def committed_table(fs: Any, workspace: str, record: dict[str, Any], name: str) -> Any:
    """Table ``name`` of the committed stage of a result's stage ``record`` (``workspace`` is
    ``bucket/prefix`` on ``fs``)."""
    import pyarrow.parquet as pq

    from tasks.manifest import StageManifest, committed_dir

    stage_dir = f"{record['stage']}/{record['key']}"
    manifest = StageManifest.model_validate_json(
        fs.cat_file(f"{workspace}/{stage_dir}/_manifest.json")
    )
    return pq.read_table(f"{workspace}/{committed_dir(stage_dir, manifest)}/{name}", filesystem=fs)


def invariant(fs: Any, lake: str, workspace: str, result: dict[str, Any]) -> dict[str, Any]:
    """Objects in the lake (listed now, labels sidecar aside) against the rows of the run's
    assignments (clustered) and quarantine tables; ``holds`` when every object is in exactly
    one of them."""
    from scan_core.data import LABELS_SIDECAR
    from tasks.assign import ASSIGNMENTS_FILE
    from tasks.catalog import QUARANTINE_FILE
    from tests.pipeline.cli_runs import object_state

    keys = [k for k in object_state(fs, lake) if k != LABELS_SIDECAR]
    records = {r["stage"]: r for r in result["stages"]}
    clustered = committed_table(fs, workspace, records["assign"], ASSIGNMENTS_FILE)
    quarantined = committed_table(fs, workspace, records["catalog"], QUARANTINE_FILE)
    uris = clustered["uri"].to_pylist() + quarantined["uri"].to_pylist()
    return {
        "objects_in_lake": len(keys),
        "clustered": clustered.num_rows,
        "quarantined": quarantined.num_rows,
        "holds": sorted(uris) == sorted(f"{result['lake']}/{k}" for k in keys),
    }


def one_line(text: str) -> str:
    """The CLI's error sentence(s) of ``text``, or its last line."""
    from tests.pipeline.cli_runs import error_lines

    errors = error_lines(text)
    if errors:
        return " / ".join(e.removeprefix("error: ") for e in errors)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def bad_input(report: Report, work: Path, fashion: Any) -> None:
    """The messy lake on S3: each object clustered or quarantined with its reason."""
    import s3fs

    from scan_core.data import lake_objects
    from tests.pipeline.cli_runs import cli_env, run_cli
    from tests.pipeline.conftest import TINY_CONFIG, write_objects
    from tests.pipeline.messy import MAX_OBJECT_BYTES, bad_objects, odd_images

    fs = s3fs.S3FileSystem(
        key="scan-lake-test",
        secret="scan-lake-test",
        client_kwargs={"endpoint_url": os.environ["SCAN_LAKE_S3_ENDPOINT_URL"]},
        skip_instance_cache=True,
    )
    fs.mkdir("messy")
    images = fashion[0]
    plain, odd = dict(lake_objects(images[:30])), odd_images(images[30:51])
    bad = bad_objects(images[51:53])
    write_objects(fs, "messy/lake", {**plain, **odd, **{k: v for k, (v, _) in bad.items()}})
    home = work / "bad-input"
    env = cli_env(home, SCAN_LAKE_MAX_OBJECT_BYTES=str(MAX_OBJECT_BYTES))
    args = ["run", "--lake", "s3://messy/lake", "--workspace", "s3://messy/ws"]
    done = run_cli([*args, "--config", str(TINY_CONFIG), "--json", str(home / "r.json")], env)
    if done.returncode != 0:
        report.case("bad input", "messy lake run", one_line(done.stdout + done.stderr), False)
        return
    result = json.loads((home / "r.json").read_text())
    records = {r["stage"]: r for r in result["stages"]}
    quarantine = committed_table(fs, "messy/ws", records["catalog"], "quarantine.parquet")
    reasons = dict(
        zip(quarantine["uri"].to_pylist(), quarantine["reason"].to_pylist(), strict=True)
    )
    clusters = committed_table(fs, "messy/ws", records["assign"], "assignments.parquet")
    assigned = dict(zip(clusters["uri"].to_pylist(), clusters["cluster"].to_pylist(), strict=True))
    for key, (_, fragment) in bad.items():
        reason = reasons.get(f"s3://messy/lake/{key}") or ""
        report.case(
            "bad input", f"`{key}`", f"quarantined: {reason}", bool(reason) and fragment in reason
        )
    for key in odd:
        cluster = assigned.get(f"s3://messy/lake/{key}")
        report.case("bad input", f"`{key}`", f"clustered (cluster {cluster})", cluster is not None)
    clustered = [k for k in plain if f"s3://messy/lake/{k}" in assigned]
    report.case(
        "bad input",
        f"{len(plain)} plain Fashion-MNIST PNGs",
        f"{len(clustered)} clustered",
        len(clustered) == len(plain),
    )
    report.run("bad input: messy lake", invariant(fs, "messy/lake", "messy/ws", result))


def bad_requests(report: Report, work: Path, fashion: Any, secure: Any) -> None:
    """Every bad request: exit status 2 and one sentence, before any training."""
    from tests.pipeline.bad_requests import prepare, run_cases, stage_objects
    from tests.pipeline.cli_runs import error_lines

    root = work / "bad-requests"
    root.mkdir()
    where = prepare(root, fashion, secure)
    refused = run_cases(root, where, os.environ["SCAN_LAKE_MLFLOW_TRACKING_URI"])
    for name, refusal in refused.items():
        output = refusal.done.stdout + refusal.done.stderr
        errors = error_lines(refusal.done.stdout)
        ok = (
            refusal.done.returncode == 2
            and len(errors) == 1
            and all(fragment in errors[0] for fragment in refusal.case.expect)
            and "Traceback" not in output
            and secure.secret not in output
            and stage_objects(refusal.workspace, secure) == []
        )
        happened = f"exit {refusal.done.returncode}, nothing trained: {one_line(output)}"
        report.case("bad request", name, happened, ok)


def faults(report: Report, work: Path, fashion: Any) -> None:
    """Outage with restart, SIGKILL mid-write, two runs at once, a read-only lake."""
    from flows.pipeline import STAGES
    from tests.pipeline.faults import BUCKET, concurrent, fault_lake, kill_mid_write, outage

    tracking_uri = f"sqlite:///{work / 'faults-mlflow.db'}"
    (work / "weed-faults").mkdir()
    with fault_lake(work / "weed-faults", tracking_uri, fashion) as lake:
        home = work / "outage"
        home.mkdir()
        got = outage(lake, home)
        retries = sum(f"retry {i}/3" in got["output"] for i in (1, 2, 3))
        report.case(
            "fault",
            "S3 server killed once pretext is committed",
            f"exit {got['status']} after {retries} logged retries with backoff: "
            f"{one_line(got['output'])}",
            got["status"] == 2 and len(got["errors"]) == 1 and retries == 3,
        )
        result = got["result"]
        committed = sorted(got["committed"], key=STAGES.index)
        if result is not None:
            ran = [r["stage"] for r in result["stages"]]
            report.case(
                "fault",
                "same command after the server is back",
                f"exit {got['rerun_status']}; cached: {', '.join(committed)}; ran: "
                f"{', '.join(result['stages_run'])}; stage runs finished over both runs: "
                f"{dict(got['finished'])}",
                result["stages_run"] == [s for s in ran if s not in got["committed"]]
                and got["finished"] == Counter(ran),
            )
            report.run(
                "fault: rerun after the outage",
                invariant(lake.fs, f"{BUCKET}/lake", f"{BUCKET}/ws-outage", result),
            )
        else:
            report.case(
                "fault",
                "same command after the server is back",
                one_line(got["rerun_output"]),
                False,
            )

        home = work / "kill"
        home.mkdir()
        got = kill_mid_write(lake, home, "evaluate")
        partial_files = sorted(got["left"]["attempts"].get(got["partial"], []))
        result = got["result"]
        ok = (
            not got["left"]["committed"]
            and bool(partial_files)
            and got["rerun_status"] == 0
            and result is not None
            and result["stages_run"] == ["evaluate"]
            and got["manifest"]["dir"] != got["partial"]
        )
        report.case(
            "fault",
            "SIGKILL while evaluate writes its files",
            f"killed with {', '.join(partial_files)} written and no manifest; the rerun "
            f"(exit {got['rerun_status']}) ran "
            f"{', '.join(result['stages_run']) if result else '?'} into a new attempt folder; "
            f"the partial folder is never named by a manifest",
            ok,
        )
        if result is not None:
            report.run(
                "fault: rerun after SIGKILL",
                invariant(lake.fs, f"{BUCKET}/lake", f"{BUCKET}/ws-killed", result),
            )

        home = work / "twice"
        home.mkdir()
        got = concurrent(lake, home)
        results = got["results"]
        agree = None not in results and results[0]["metrics"] == results[1]["metrics"]
        champion = None not in results and got["champion"] == str(results[0]["model_version"])
        report.case(
            "fault",
            "two runs on one workspace at once",
            f"exits {got['statuses']}; {len(got['committed'])} stages committed once each, "
            f"problems: {got['problems'] or 'none'}; commit races lost and adopted: "
            f"{', '.join(got['discarded']) or 'none'}; same metrics: {agree}; registry "
            f"champion = the committed model (version {got['champion']}): {champion}",
            got["statuses"] == [0, 0] and not got["problems"] and agree and champion,
        )
        for label, result in zip(("a", "b"), results, strict=True):
            if result is not None:
                report.run(
                    f"fault: concurrent run {label}",
                    invariant(lake.fs, f"{BUCKET}/lake", f"{BUCKET}/ws-twice", result),
                )

        after = lake.lake_state()
        report.case(
            "fault",
            "the lake is read-only to the pipeline",
            f"{len(after)} keys with sizes and ETags identical before and after all runs above",
            after == lake.before,
        )


def security(report: Report, work: Path, fashion: Any, secure: Any) -> None:
    """Planted secret, pickled checkpoint, YAML Python tag, keys that look like paths."""
    import torch

    from scan_core.data import lake_objects
    from tasks.checkpoints import CHECKPOINT, load_state
    from tasks.errors import ScanLakeError
    from tasks.lake import refusal
    from tasks.storage import ObjectInfo, Storage
    from tests.pipeline.cli_runs import cli_env, error_lines, run_cli
    from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_objects
    from tests.pipeline.leaks import search_run, server_state

    home = work / "secure"
    images, labels = fashion
    objects = lake_contents(images[:30], labels[:30], extras=False)
    odd = ("odd/%2e%2e/%2e%2e/dots.png", "odd/.../three-dots.png", "odd/~root/tilde.png")
    objects.update(dict(zip(odd, (v for _, v in lake_objects(images[30:33])), strict=True)))
    write_objects(secure.admin, f"{secure.lake_bucket}/lake-sec", objects)
    before = server_state(secure.admin)
    env = cli_env(home, SCAN_LAKE_MLFLOW_EXPERIMENT="secure", **secure.env())
    args = ["run", "--lake", f"s3://{secure.lake_bucket}/lake-sec"]
    args += ["--workspace", f"s3://{secure.work_bucket}/ws-secure", "--config", str(TINY_CONFIG)]
    done = run_cli([*args, "--json", str(home / "r.json")], env)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        report.case("security", "run with the pipeline's credentials", one_line(output), False)
    else:
        result = json.loads((home / "r.json").read_text())
        search = search_run(secure.secret, home, result, secure.admin, output)
        for place, (searched, hits) in search.places.items():
            report.case(
                "security",
                f"planted secret in {place}",
                f"searched {searched}: {'found in ' + ', '.join(hits) if hits else 'not found'}",
                not hits,
            )
        after = server_state(secure.admin)
        changed = sorted(k for k in after if before.get(k) != after[k])
        outside = [k for k in changed if not k.startswith(f"{secure.work_bucket}/ws-secure/")]
        report.case(
            "security",
            "lake keys that look like paths (`%2e%2e`, `...`, `~`)",
            f"clustered as keys; {len(changed)} objects written, {len(outside)} outside the "
            "workspace prefix; nothing else on the server changed",
            bool(changed) and not outside and all(after.get(k) == v for k, v in before.items()),
        )
        report.run(
            "security: credentialed run",
            invariant(
                secure.admin,
                f"{secure.lake_bucket}/lake-sec",
                f"{secure.work_bucket}/ws-secure",
                result,
            ),
        )

    for key in ("../escape.png", "a/../../escape.png", "/etc/passwd", "a/./b.png"):
        reason = refusal(ObjectInfo(key=key, size=10, version="v"), max_bytes=1000)
        try:
            Storage(str(work / "ws-unsafe")).write_bytes(key, b"x")
            refused = "written!"
        except ValueError as exc:
            refused = str(exc)
        report.case(
            "security",
            f"lake key `{key}` (AWS S3 accepts it, SeaweedFS does not)",
            f"quarantined: {reason}; as a workspace path: {refused}",
            bool(reason) and refused.startswith("refusing the path"),
        )

    marker = work / "checkpoint-code-ran"
    workspace = Storage(str(work / "ws-checkpoint"))
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(str(marker))}, buffer)
    workspace.write_bytes(f"scan/key/evil/{CHECKPOINT}", buffer.getvalue())
    try:
        load_state(workspace, "scan/key/evil")
        happened, ok = "loaded!", False
    except ScanLakeError as exc:
        happened, ok = str(exc), not marker.exists()
    report.case("security", "checkpoint that runs code when unpickled", happened, ok)

    marker = work / "yaml-code-ran"
    config = work / "evil.yaml"
    config.write_text(f"scan: !!python/object/apply:os.mkdir ['{marker}']\n")
    home = work / "yaml"
    done = run_cli(
        ["run", "--lake", str(work), "--workspace", str(home / "ws"), "--config", str(config)],
        cli_env(home, prefect_api=False),
    )
    errors = error_lines(done.stdout)
    report.case(
        "security",
        "config file with a `!!python/object/apply` tag",
        f"exit {done.returncode}: {one_line(done.stdout + done.stderr)}",
        done.returncode == 2 and len(errors) == 1 and not marker.exists(),
    )


def trust(report: Report, work: Path, fashion: Any) -> None:
    """Planted files in a finished local workspace: per kind of file, in-process through the
    pipeline's reader, then reruns of the console script."""
    from tests.pipeline.planted import (
        KINDS,
        context,
        every_file,
        finished_run,
        kind_of,
        pickle_payload,
        plant_and_read,
        plant_kind,
        plant_recomputed_kinds,
        rerun,
        torch_payload,
    )

    home = work / "planted"
    home.mkdir()
    finished = finished_run(home, fashion)
    ctx = context(finished)
    marker = work / "planted-code-ran"
    files = every_file(finished.workspace)
    for kind in KINDS:
        mine = [rel for rel in files if kind_of(rel) is kind]
        if not mine:  # e.g. Prefect result records: the reruns below plant them
            continue
        if kind.outcome == "unread":
            report.case(
                "trust",
                f"{kind.name} ({len(mine)} files)",
                "never read back by a run (written for people and MLflow, or left by earlier "
                "versions)",
                True,
            )
            continue
        tried = [plant_and_read(ctx, rel, v, marker) for rel in mine for v in kind.variants]
        example = next((p for p in tried if p.variant == "pickle"), tried[0])
        verdict = (
            "refused with one sentence naming the file"
            if kind.outcome == "refused"
            else ("recomputed")
        )
        report.case(
            "trust",
            f"{kind.name}: {', '.join(kind.variants)} ({len(mine)} files)",
            f"{sum(p.ok for p in tried)} of {len(tried)} {verdict}, no code run; pickle: "
            f"{example.happened.replace(str(finished.workspace), '<ws>')[:400]}",
            bool(tried) and all(p.ok for p in tried) and not marker.exists(),
        )

    reruns = [
        ("recomputed", plant_recomputed_kinds(finished), [], 0),
        ("manifests", plant_kind("stage manifest", pickle_payload), [], 2),
        ("checkpoints", plant_kind("checkpoint", torch_payload), ["--set", "scan.epochs=2"], 2),
        ("pixels", plant_kind("pixel store shard", pickle_payload), [], 2),
    ]
    names = {
        "recomputed": "Prefect result records naming the pickle serializer under _prefect/<stage "
        "key>, pickled run record, lake index and snapshot",
        "manifests": "every stage manifest pickled",
        "checkpoints": "every checkpoint a torch archive holding the payload, and a changed SCAN "
        "setting (the pretext model is loaded)",
        "pixels": "every pixel store shard pickled",
    }
    for name, plant, extra, status in reruns:
        got, planted = rerun(finished, name, plant, extra)
        cached = got.result is not None and got.result["stages_run"] == []
        happened = (
            f"exit {got.status}, {len(planted)} files planted, code run: {got.code_ran}; "
            + ("every stage cached" if cached else one_line(got.output))
        )
        ok = got.status == status and not got.code_ran and "Traceback" not in got.output
        ok = ok and (cached if status == 0 else len(got.errors) == 1)
        report.case("trust", f"rerun: {names[name]}", happened.replace(str(home), "<home>"), ok)


class _RunsCode:
    """Pickles as a call of ``os.mkdir(marker)``: runs code if ever unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


def markdown(report: Report, seconds: float) -> str:
    """The results as Markdown."""
    ok = sum(c["ok"] for c in report.cases)
    holds = sum(r["holds"] for r in report.runs)
    lines = [
        "# Robustness benchmark (issues 6, 26)",
        "",
        f"{len(report.cases)} cases, {ok} as required; the invariant objects in lake = clustered "
        f"+ quarantined held in {holds} of {len(report.runs)} completed runs. Real SeaweedFS S3, "
        f"MLflow on sqlite, a Prefect server, the `scan-lake` console script; {seconds:.0f} s on "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[1]:.1f}). Produced by "
        "`uv run python bench/robustness.py`.",
        "",
        "## Completed runs: objects in the lake = clustered + quarantined",
        "",
        "Counted in the run's own committed tables (assignments, quarantine) against a fresh "
        "listing of the lake (labels sidecar aside); `holds`: every object is in exactly one.",
        "",
        "| run | objects in lake | clustered | quarantined | holds |",
        "|---|---:|---:|---:|---|",
    ]
    for r in report.runs:
        lines.append(
            f"| {r['run']} | {r['objects_in_lake']} | {r['clustered']} | {r['quarantined']} | "
            f"{'yes' if r['holds'] else '**no**'} |"
        )
    lines += [
        "",
        "Refused requests stop before the first stage: nothing is clustered or written "
        "(checked: no stage folder in the workspace).",
        "",
        "## Every case",
        "",
        "| # | group | case | what happened | as required |",
        "|---:|---|---|---|---|",
    ]
    for i, c in enumerate(report.cases, start=1):
        happened = c["happened"].replace("|", "\\|").replace("\n", " ")
        name = c["case"].replace("|", "\\|")
        verdict = "yes" if c["ok"] else "**no**"
        lines.append(f"| {i} | {c['group']} | {name} | {happened} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Start the servers, run every case, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "robustness")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    work: Path = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    state = work / "state"
    state.mkdir()
    os.environ.update(
        {
            "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "SCAN_LAKE_STATE_DIR": str(state),
            "SCAN_LAKE_MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
            "AWS_ACCESS_KEY_ID": "scan-lake-test",
            "AWS_SECRET_ACCESS_KEY": "scan-lake-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    from prefect.testing.utilities import prefect_test_harness

    from scan_core.data import load_fashion_mnist
    from tests.pipeline.conftest import start_secure_s3
    from tests.pipeline.weed import WeedServer

    images, labels = load_fashion_mnist("train")
    fashion = (images[:240], labels[:240])
    start = time.perf_counter()
    report = Report()
    (work / "weed").mkdir()
    (work / "weed-secure").mkdir()
    anonymous = WeedServer(work / "weed")
    anonymous.start()
    secure_server, secure = start_secure_s3(work / "weed-secure")
    try:
        os.environ["SCAN_LAKE_S3_ENDPOINT_URL"] = anonymous.endpoint
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = anonymous.endpoint
        with prefect_test_harness(server_startup_timeout=300):
            bad_input(report, work, fashion)
            bad_requests(report, work, fashion, secure)
            faults(report, work, fashion)
            security(report, work, fashion, secure)
            trust(report, work, fashion)
    finally:
        secure_server.stop()
        anonymous.stop()
    seconds = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "cases": report.cases,
        "runs": report.runs,
        "cases_as_required": sum(c["ok"] for c in report.cases),
        "invariant_held": sum(r["holds"] for r in report.runs),
        "seconds": round(seconds, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
    }
    (args.out / "robustness.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "robustness.md").write_text(markdown(report, seconds))
    print(markdown(report, seconds))


if __name__ == "__main__":
    main()

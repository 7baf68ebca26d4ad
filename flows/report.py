"""The run's result as one typed model, and the one report made of it.

:class:`RunResult` is what ``scan_pipeline`` returns (as a dict, :meth:`RunResult.as_dict`) and
what ``scan-lake run --json`` writes. :func:`report` turns it into a list of blocks (headings,
sentences, tables) once; :func:`to_markdown` renders them as the Prefect summary and
:func:`to_console` as the CLI's output, so the two never say different things.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from scan_core.methods import clustering_method, pretext_method
from tasks.parallel import engine_sentence
from tasks.pretext import PretextPlan


class StageRecord(BaseModel):
    """How one stage went in this flow run: ``run_id`` is the MLflow run of a stage that ran,
    ``source_run_id`` the run that made a cached stage's output."""

    stage: str
    key: str
    state: str
    cached: bool
    run_id: str | None
    source_run_id: str | None
    seconds: float
    summary: dict[str, Any]


class Counts(BaseModel):
    """What the lake scan found and what this run computed."""

    objects: int
    images: int
    unique_images: int
    quarantined: int
    objects_read: int
    images_decoded: int
    images_embedded: int


class GrowthInfo(BaseModel):
    """The warm or cold start of a growing lake and what it built on."""

    start: str
    reason: str
    warm_from: str | None
    relabel_from: str | None
    previous_flow_run_id: str | None


class ClusteringInfo(BaseModel):
    """The methods and the number of clusters (``auto``: the ``--clusters auto`` choice)."""

    pretext_method: str
    method: str
    num_clusters: int
    auto: dict[str, Any] | None


class MlflowInfo(BaseModel):
    """Where the run's MLflow records are and how to open them."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    link: str
    ui_command: str | None


class RunResult(BaseModel):
    """A finished run: what ran, what it measured, what it decided and where its outputs are."""

    model_config = ConfigDict(extra="forbid")

    lake: str
    workspace: str
    flow_run_id: str
    lake_fingerprint: str
    counts: Counts
    lake_scan_seconds: float
    stages: list[StageRecord]
    stages_run: list[str]
    metrics: dict[str, float]
    cluster_sizes: list[int]
    cluster_ids: list[int]
    pretext: PretextPlan
    growth: GrowthInfo
    lineage: dict[str, Any]
    clustering: ClusteringInfo
    skipped: dict[str, str]
    settings: dict[str, str]
    guard: dict[str, Any] | None
    step4: dict[str, Any]
    duplicates: dict[str, float]
    duplicates_report: str
    model_version: Any = None
    promotion: dict[str, Any] | None
    assignments: str
    gallery: str | None
    gallery_error: str | None
    mlflow: MlflowInfo
    parallel: dict[str, Any] | None = None
    #: Set by the CLI: the run finished, and its wall time there.
    ok: bool | None = None
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The flow's return value and the ``--json`` document (nested models as dicts; values
        taken from stage summaries as they are)."""
        return self.model_dump()


# --- the report: blocks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A sentence (``bullet``: an item of a list). Code spans are in backticks; ``link`` is a
    ``(label, url)`` appended to it."""

    text: str
    bullet: bool = False
    link: tuple[str, str] | None = None


@dataclass(frozen=True)
class Grid:
    """A table; ``right`` are the indices of right-aligned (numeric) columns."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: frozenset[int] = frozenset()


Block = Heading | Text | Grid


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _near_rule(thresholds: dict[str, Any] | None) -> str:
    """The near-duplicate rule of a duplicates summary, in words."""
    if not thresholds:
        return "thresholds not recorded"
    return (
        f"hashes within {thresholds['max_hamming']} bits, pixel similarity >= "
        f"{thresholds['min_pixel_similarity']}, embedding cosine >= {thresholds['min_cosine']}"
    )


def overclustering_line(metrics: dict[str, float]) -> str | None:
    """The many-to-one sentence when there are more clusters than label classes, else None."""
    clusters, classes = metrics.get("num_clusters"), metrics.get("num_classes")
    if clusters is None or classes is None or clusters <= classes:
        return None
    return (
        f"Overclustering: {clusters:.0f} clusters for {classes:.0f} label classes. Many-to-one "
        f"ACC {metrics['many_to_one_acc']:.4f} (every cluster counted as its majority class) "
        f"beside Hungarian ACC {metrics['acc']:.4f} (one cluster per class, the other "
        f"{clusters - classes:.0f} clusters counted wrong)."
    )


def _mlflow(info: MlflowInfo) -> Text:
    """The sentence that leads to the MLflow run: a link, or how to open a local store's UI."""
    if info.ui_command is None or info.link.startswith(("http://", "https://")):
        return Text("MLflow run", link=(info.parent_run_id, info.link))
    return Text(f"MLflow run `{info.parent_run_id}`: open `{info.ui_command}`, then `{info.link}`.")


def _outputs(result: RunResult) -> list[Block]:
    """Where the run's outputs are: assignments, gallery, registered model and its promotion."""
    blocks: list[Block] = [Text(f"Assignments: `{result.assignments}`.", bullet=True)]
    if result.gallery:
        blocks.append(Text("Cluster gallery:", bullet=True, link=(result.gallery, result.gallery)))
    else:
        blocks.append(
            Text(
                f"Cluster gallery: not written ({result.gallery_error}); `scan-lake export` "
                "writes it.",
                bullet=True,
            )
        )
    decision = result.promotion
    if decision:
        blocks.append(
            Text(
                f"Model `{decision['registered_model']}` version {decision['version']}: "
                f"{decision['reason']}.",
                bullet=True,
            )
        )
    return blocks


def _tables(result: RunResult) -> list[Block]:
    """Stages, metrics and cluster sizes."""
    stages = tuple(
        (r.stage, "yes" if r.cached else "no", f"{r.seconds:.1f}") for r in result.stages
    )
    metrics = tuple((k, f"{v:.4f}") for k, v in sorted(result.metrics.items()))
    sizes = tuple(
        (str(c), str(s)) for c, s in zip(result.cluster_ids, result.cluster_sizes, strict=True)
    )
    return [
        Grid("Stages", ("stage", "cached", "seconds"), stages, frozenset({2})),
        Grid("Metrics", ("metric", "value"), metrics, frozenset({1})),
        Grid("Cluster sizes", ("cluster", "size"), sizes, frozenset({0, 1})),
    ]


def _clustering(result: RunResult) -> list[Block]:
    """Methods, the number of clusters (and why, for ``--clusters auto``), skipped stages, what
    the guard kept, the automatic settings, overclustering."""
    info = result.clustering
    blocks: list[Block] = [
        Heading("Clustering"),
        Text(
            f"Pretext: {pretext_method(info.pretext_method).title}; clustering: "
            f"{clustering_method(info.method).title}.",
            bullet=True,
        ),
    ]
    auto = info.auto
    if auto is None:
        blocks.append(Text(f"Clusters: {info.num_clusters} (requested).", bullet=True))
    else:
        blocks.append(
            Text(
                f"Clusters: {info.num_clusters}, chosen automatically (--clusters auto) from "
                f"k = {auto['ks'][0]}..{auto['ks'][-1]} by `{auto['criterion']}`: "
                f"{auto['explanation']} Curves: `{auto['plot']}` (also in MLflow, stage "
                "choose_k).",
                bullet=True,
            )
        )
    for stage, reason in result.skipped.items():
        blocks.append(Text(f"{stage}: skipped ({reason}).", bullet=True))
    if result.guard:
        blocks.append(
            Text(f"Kept: {result.guard['kept']} ({result.guard['reason']}).", bullet=True)
        )
    over = overclustering_line(result.metrics)
    if over is not None:
        blocks.append(Text(over, bullet=True))
    if result.settings:
        rows = tuple((key, why) for key, why in result.settings.items())
        blocks.append(Grid("Settings (why)", ("setting", "chosen"), rows))
    return blocks


def _growth(result: RunResult) -> list[Block]:
    """Backbone, warm/cold start, embedded images, churn, clusters born and vanished,
    per-cluster growth."""
    pre, plan, lineage = result.pretext, result.growth, result.lineage
    blocks: list[Block] = [
        Heading("Growth"),
        Text(
            f"Backbone `{pre.key[:12]}` ({'reused' if pre.reused else 'own'}): {pre.reason}.",
            bullet=True,
        ),
        Text(f"{plan.start.capitalize()} start: {plan.reason}.", bullet=True),
        Text(
            f"Images embedded: {result.counts.images_embedded} of {result.counts.unique_images}.",
            bullet=True,
        ),
    ]
    if lineage.get("churn") is None:
        blocks.append(
            Text("Cluster ids: first run on this lake (no earlier run to match).", bullet=True)
        )
    else:
        blocks += [
            Text(
                f"Churn: {_percent(lineage['churn'])} of {lineage['shared_images']} previously "
                f"seen images changed cluster ({lineage['changed_images']}); "
                f"{lineage['new_images']} new, {lineage['removed_images']} removed images.",
                bullet=True,
            ),
            Text(
                f"Clusters born: {lineage['born'] or 'none'}; vanished: "
                f"{lineage['vanished'] or 'none'}.",
                bullet=True,
            ),
        ]
    columns: tuple[str, ...] = ("cluster", "status", "before", "now", "growth", "stayed")
    columns += ("moved in", "moved out", "new", "removed")
    rows = tuple(
        (
            str(r["cluster"]),
            str(r["status"]),
            str(r["previous_size"]),
            str(r["size"]),
            f"{r['growth']:+d}",
            str(r["stayed"]),
            str(r["moved_in"]),
            str(r["moved_out"]),
            str(r["new_images"]),
            str(r["removed_images"]),
        )
        for r in lineage.get("clusters", [])
    )
    blocks.append(Grid("Cluster growth", columns, rows, frozenset({0, *range(2, 10)})))
    return blocks


def _duplicates(result: RunResult) -> list[Block]:
    dup = result.duplicates
    return [
        Heading("Duplicates"),
        Text(
            f"Exact: {dup.get('exact_duplicate_objects', 0):.0f} extra objects in "
            f"{dup.get('exact_groups', 0):.0f} groups; near (same picture after an edit: "
            f"{_near_rule(_thresholds(result))}): "
            f"{dup.get('near_pairs', 0):.0f} pairs of {dup.get('near_images', 0):.0f} images "
            f"(`{result.duplicates_report}`)."
        ),
    ]


def _thresholds(result: RunResult) -> dict[str, Any] | None:
    """The duplicates stage's thresholds, from its stage record."""
    record = next((r for r in result.stages if r.stage == "duplicates"), None)
    return None if record is None else record.summary.get("thresholds")


def report(result: RunResult) -> list[Block]:
    """The run's report, in the order the Prefect summary and the CLI show it."""
    counts = result.counts
    stages_run = ", ".join(result.stages_run) or "none (all cached)"
    took = "" if result.seconds is None else f"; {result.seconds:.1f} s"
    return [
        Heading(f"scan-lake run on `{result.lake}`", level=1),
        Text(f"Workspace `{result.workspace}`."),
        _mlflow(result.mlflow),
        *_outputs(result),
        Text(
            f"Objects {counts.objects}, images {counts.images} ({counts.unique_images} "
            f"unique), quarantined {counts.quarantined}. Stages run: {stages_run}{took}. "
            f"{engine_sentence(result.parallel)}"
        ),
        *_tables(result),
        *_clustering(result),
        *_growth(result),
        *_duplicates(result),
    ]


# --- renderers -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    """The report as Markdown (the Prefect summary artifact)."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Text):
            text = block.text
            if block.link is not None:
                text = f"{text} [{block.link[0]}]({block.link[1]})."
            lines.append(f"- {text}" if block.bullet else text)
            if not block.bullet:
                lines.append("")
        else:
            if lines and lines[-1] != "":
                lines.append("")
            align = ["---:" if i in block.right else "---" for i in range(len(block.columns))]
            lines += [
                f"**{block.title}**",
                "",
                "| " + " | ".join(block.columns) + " |",
                "|" + "|".join(align) + "|",
                *("| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def _plain(text: str) -> str:
    """A sentence for the terminal: no backticks, no Rich markup."""
    return escape(text.replace("`", ""))


def to_console(blocks: list[Block], console: Console) -> None:
    """The report on the terminal (the CLI)."""
    for block in blocks:
        if isinstance(block, Heading):
            console.print(f"\n[bold]{_plain(block.text)}[/bold]", soft_wrap=True)
        elif isinstance(block, Text):
            text = _plain(block.text)
            if block.link is not None:
                text = f"{text} {escape(block.link[1])}"
            console.print(f"- {text}" if block.bullet else text, soft_wrap=True)
        else:
            table = Table(title=block.title)
            for i, column in enumerate(block.columns):
                table.add_column(column, justify="right" if i in block.right else "left")
            for row in block.rows:
                table.add_row(*(escape(c) for c in row))
            console.print(table)

"""The cluster gallery: a static HTML report of one finished run, ``<out>/index.html``, to open
in a browser without a server (``scan-lake export``; the flow writes one per run).

Per cluster: its size, the most confident, a random and the least confident images (thumbnails
made from the lake objects, ``thumbs/``), its growth since the previous run (the assign stage's
lineage) and the duplicate pairs among its images (the duplicates stage's report); a CSV of the
URIs of its objects (``clusters/cluster-<id>.csv``). For the run: the evaluate stage's plots
(``plots/``) and the least confident objects of the whole lake (``least_confident.csv`` and
thumbnails). Every string that comes from the lake (object keys!) is HTML-escaped; the page has
no script.

Reading and rendering are separate: :func:`gallery_data` reads a run's tables,
:func:`gallery_files` reads the lake objects it shows and renders every file, :func:`render`
is pure.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from scan_core.config import ImageConfig
from scan_core.images import ImageDecodeError, decode_image, image_id
from tasks import tracking
from tasks.assign import read_assignments
from tasks.duplicates import DUPLICATES_FILE
from tasks.errors import ScanLakeError
from tasks.history import RunRecord, find_record, history_dir
from tasks.pixels import png_bytes
from tasks.storage import Storage
from tasks.tracking import TrackingRef

logger = logging.getLogger(__name__)

INDEX = "index.html"
#: Workspace folder of the galleries the flow writes.
GALLERY_DIR = "gallery"
#: Thumbnail edge in pixels (images are padded to a square).
THUMB_SIZE = 96
#: Thumbnails per group (most confident, random, least confident) of a cluster.
PER_GROUP = 8
#: Duplicate pairs shown per cluster (all of them are in the duplicates report).
DUPLICATE_PAIRS = 6
#: Least confident objects of the lake: shown, and listed in ``least_confident.csv``.
LEAST_SHOWN, LEAST_LISTED = 24, 200

PLOT_CAPTIONS = {
    "prototypes.png": "Prototypes: the most confident images of each cluster",
    "cluster_sizes.png": "Cluster sizes",
    "confidence.png": "Confidence of the assignments",
    "embedding_map.png": "Map of the pretext embeddings, coloured by cluster",
    "confusion.png": "Confusion with the labels (where the lake has them)",
}


@dataclass
class GalleryData:
    """What a gallery shows of one run (read by :func:`gallery_data`)."""

    record: RunRecord
    assignments: pa.Table
    lineage: list[dict[str, Any]]
    duplicates: list[dict[str, Any]] | None
    plots: dict[str, bytes] = field(default_factory=dict)


def gallery_data(workspace: Storage, record: RunRecord) -> GalleryData:
    """Read the assignments, lineage, duplicate pairs and plots of a run."""
    assignments = read_assignments(workspace, record.assign)
    lineage = list(record.assign.summary.get("lineage", {}).get("clusters", []))
    duplicates = None
    if record.duplicates is not None:
        table = workspace.read_table(f"{record.duplicates.rel_dir}/{DUPLICATES_FILE}")
        wanted = ("kind", "uri", "duplicate_uri", "similarity")
        if all(name in table.column_names for name in wanted):
            duplicates = table.select(list(wanted)).to_pylist()
    plots = {}
    if record.evaluate is not None:
        folder = record.evaluate.rel_dir
        for info in workspace.list_objects(folder):
            name = info.key.rsplit("/", 1)[-1]
            if name.endswith(".png") and "/" not in info.key[len(folder) + 1 :]:
                plots[name] = workspace.read_bytes(info.key)
    return GalleryData(record, assignments, lineage, duplicates, plots)


def choose(
    rows: list[int], confidence: np.ndarray, seed: int, per_group: int = PER_GROUP
) -> dict[str, list[int]]:
    """The rows a cluster shows: ``most`` and ``least`` confident, and a ``random`` sample
    (seeded by ``seed``, so a gallery is the same every time it is made)."""
    order = sorted(rows, key=lambda r: (-float(confidence[r]), r))
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(rows), size=min(per_group, len(rows)), replace=False)
    return {
        "most": order[:per_group],
        "random": [rows[i] for i in sorted(sample.tolist())],
        "least": order[::-1][:per_group],
    }


def thumbnail(data: bytes) -> bytes:
    """A ``THUMB_SIZE`` square RGB PNG of image bytes (padded, never cropped).

    Raises:
        ImageDecodeError: the bytes are not an image.
    """
    config = ImageConfig(channels=3, size=THUMB_SIZE, resize="pad")
    return png_bytes(decode_image(data, config))


def _csv(header: list[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def gallery_files(lake: Storage, data: GalleryData) -> dict[str, bytes]:
    """Every file of the gallery, by path relative to its folder: ``index.html``, thumbnails,
    CSV lists and plots. Lake objects that are gone, unreadable or changed since the run are
    shown as such instead of a thumbnail."""
    table = data.assignments
    uris = table["uri"].to_pylist()
    ids = table["image_id"].to_pylist()
    clusters = np.asarray(table["cluster"].to_numpy(), dtype=np.int64)
    confidence = np.asarray(table["confidence"].to_numpy(), dtype=np.float64)
    cluster_ids = list(data.record.assign.summary.get("cluster_ids") or sorted(set(clusters)))
    members = {c: np.flatnonzero(clusters == c).tolist() for c in cluster_ids}
    groups = {c: choose(rows, confidence, seed=c) for c, rows in members.items() if rows}
    least = np.argsort(confidence, kind="stable")[:LEAST_LISTED].tolist()
    cluster_of = dict(zip(uris, clusters.tolist(), strict=True))
    pairs: dict[int, list[dict[str, Any]]] = {c: [] for c in cluster_ids}
    for pair in data.duplicates or []:
        for c in {cluster_of.get(pair["uri"]), cluster_of.get(pair["duplicate_uri"])}:
            if c is not None:
                pairs.setdefault(c, []).append(pair)

    shown = {r for g in groups.values() for rows in g.values() for r in rows} | set(
        least[:LEAST_SHOWN]
    )
    dup_uris = {
        u
        for ps in pairs.values()
        for p in ps[:DUPLICATE_PAIRS]
        for u in (p["uri"], p["duplicate_uri"])
    }
    row_of_uri = {u: r for r, u in enumerate(uris)}
    shown |= {row_of_uri[u] for u in dup_uris if u in row_of_uri}
    files: dict[str, bytes] = {}
    thumbs = _thumbnails(lake, [(uris[r], ids[r]) for r in sorted(shown)], files)

    for c, rows in members.items():
        ordered = sorted(rows, key=lambda r: (-confidence[r], r))
        files[f"clusters/cluster-{c}.csv"] = _csv(
            ["uri", "image_id", "confidence"],
            [[uris[r], ids[r], f"{confidence[r]:.6f}"] for r in ordered],
        )
    files["least_confident.csv"] = _csv(
        ["uri", "image_id", "cluster", "confidence"],
        [[uris[r], ids[r], int(clusters[r]), f"{confidence[r]:.6f}"] for r in least],
    )
    for name, png in data.plots.items():
        files[f"plots/{name}"] = png
    page = Page(
        record=data.record,
        uris=uris,
        clusters=clusters,
        confidence=confidence,
        cluster_ids=cluster_ids,
        members=members,
        groups=groups,
        least=least[:LEAST_SHOWN],
        lineage={int(r["cluster"]): r for r in data.lineage},
        pairs=pairs if data.duplicates is not None else None,
        thumbs=thumbs,
        plots=sorted(data.plots),
    )
    files[INDEX] = render(page).encode()
    return files


def _thumbnails(
    lake: Storage, wanted: list[tuple[str, str]], files: dict[str, bytes]
) -> dict[str, str]:
    """Thumbnails of the objects ``(uri, image_id)`` into ``files``; uri -> its file, or the
    reason it has none (a string starting with ``!``)."""
    prefix = lake.url.rstrip("/") + "/"
    out: dict[str, str] = {}
    keys: dict[str, tuple[str, str]] = {}
    for uri, expected in wanted:
        if uri.startswith(prefix):
            keys[uri[len(prefix) :]] = (uri, expected)
        else:
            out[uri] = "!not in this lake"
    for key, content in lake.read_many(sorted(keys), errors="return"):
        uri, expected = keys[key]
        if isinstance(content, OSError):
            out[uri] = "!gone" if isinstance(content, FileNotFoundError) else "!unreadable"
            continue
        if image_id(content) != expected:
            out[uri] = "!changed since the run"
            continue
        try:
            png = thumbnail(content)
        except ImageDecodeError:
            out[uri] = "!not an image"
            continue
        name = f"thumbs/{expected[:32]}.png"
        files[name] = png
        out[uri] = name
    return out


@dataclass
class Page:
    """Everything :func:`render` puts on the page (rows index the assignments)."""

    record: RunRecord
    uris: list[str]
    clusters: np.ndarray
    confidence: np.ndarray
    cluster_ids: list[int]
    members: dict[int, list[int]]
    groups: dict[int, dict[str, list[int]]]
    least: list[int]
    lineage: dict[int, dict[str, Any]]
    pairs: dict[int, list[dict[str, Any]]] | None
    thumbs: dict[str, str]
    plots: list[str]


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin: 0.8em 0 0.3em; }
nav a { margin-right: 0.6em; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; width: 100px; font-size: 0.7em; text-align: center; }
figure img { width: 96px; height: 96px; border: 1px solid #ddd; }
.missing { width: 96px; height: 96px; border: 1px dashed #bbb; display: flex;
  align-items: center; justify-content: center; color: #888; }
figcaption { overflow-wrap: anywhere; }
.plots figure { width: auto; }
.plots img { width: auto; height: auto; max-width: 380px; max-height: 380px; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
.note { color: #666; }
"""


def _e(value: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _tile(page: Page, row: int, caption: str) -> str:
    uri = page.uris[row]
    thumb = page.thumbs.get(uri, "!not read")
    title = f"{uri} (confidence {page.confidence[row]:.3f})"
    if thumb.startswith("!"):
        picture = f'<div class="missing" title="{_e(title)}">{_e(thumb[1:])}</div>'
    else:
        picture = f'<img src="{_e(thumb)}" alt="{_e(uri)}" title="{_e(title)}">'
    return f"<figure>{picture}<figcaption>{_e(caption)}</figcaption></figure>"


def _growth(row: dict[str, Any] | None, first_run: bool) -> str:
    if row is None:
        return ""
    if first_run:
        return "first run of this lake."
    return (
        f"{row['status']}: {row['previous_size']} -> {row['size']} images "
        f"({row['growth']:+d}; stayed {row['stayed']}, moved in {row['moved_in']}, moved out "
        f"{row['moved_out']}, new {row['new_images']}, removed {row['removed_images']})."
    )


def render(page: Page) -> str:
    """The HTML of the gallery (pure)."""
    record = page.record
    first_run = record.plan.relabel_from is None
    total = len(page.uris)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<link rel="icon" href="data:,">',
        f"<title>scan-lake gallery: {_e(record.lake)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Clusters of {_e(record.lake)}</h1>",
        f"<p>{total} objects in {len(page.cluster_ids)} clusters. Made by Prefect flow run "
        f"<code>{_e(record.flow_run_id)}</code> (MLflow run <code>{_e(record.mlflow_run_id)}"
        f"</code>), finished {_e(record.finished_at)}; {_e(record.plan.start)} start: "
        f"{_e(record.plan.reason)}.</p>",
        "<nav>"
        + "".join(f'<a href="#cluster-{c}">{c}</a>' for c in page.cluster_ids)
        + ('<a href="#plots">plots</a>' if page.plots else "")
        + '<a href="#least-confident">least confident</a></nav>',
    ]
    for c in page.cluster_ids:
        rows = page.members.get(c, [])
        share = f" ({100 * len(rows) / total:.1f}%)" if total else ""
        parts += [
            f'<section class="cluster" id="cluster-{c}">',
            f"<h2>Cluster {c}</h2>",
            f"<p>{len(rows)} object{'' if len(rows) == 1 else 's'}{share}. Growth since the "
            "previous run: "
            f"{_e(_growth(page.lineage.get(c), first_run))} "
            f'<a href="clusters/cluster-{c}.csv">All its objects (CSV)</a>.</p>',
        ]
        groups = page.groups.get(c)
        if groups is None:
            parts.append('<p class="note">Empty: no object is in this cluster.</p>')
        else:
            for name, title in (
                ("most", "Most confident"),
                ("random", "Random"),
                ("least", "Least confident"),
            ):
                tiles = "".join(_tile(page, r, f"{page.confidence[r]:.3f}") for r in groups[name])
                parts.append(f'<h3>{title}</h3><div class="grid">{tiles}</div>')
        parts.append(_duplicates_html(page, c))
        parts.append("</section>")
    vanished = [r for c, r in sorted(page.lineage.items()) if r.get("status") == "vanished"]
    if vanished:
        parts.append("<h2>Vanished clusters</h2><ul>")
        for r in vanished:
            parts.append(
                f"<li>Cluster {r['cluster']}: {r['previous_size']} images in the previous run, "
                f"none now ({r['moved_out']} moved to other clusters, {r['removed_images']} "
                "removed from the lake).</li>"
            )
        parts.append("</ul>")
    if page.plots:
        parts.append('<h2 id="plots">Plots</h2><div class="grid plots">')
        for name in page.plots:
            caption = PLOT_CAPTIONS.get(name, name)
            parts.append(
                f'<figure><img src="plots/{_e(name)}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    tiles = "".join(
        _tile(page, r, f"cluster {page.clusters[r]}, {page.confidence[r]:.3f}") for r in page.least
    )
    parts += [
        '<h2 id="least-confident">Least confident objects of the lake</h2>',
        f'<p>The {len(page.least)} least confident; <a href="least_confident.csv">the '
        f"{min(LEAST_LISTED, total)} least confident (CSV)</a>.</p>",
        f'<div class="grid">{tiles}</div>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _duplicates_html(page: Page, cluster: int) -> str:
    if page.pairs is None:
        return '<h3>Duplicates</h3><p class="note">This run has no duplicates report.</p>'
    pairs = page.pairs.get(cluster, [])
    if not pairs:
        return '<h3>Duplicates</h3><p class="note">None among its objects.</p>'
    row_of = {u: r for r, u in enumerate(page.uris)}
    lines = [
        f"<h3>Duplicates</h3><p>{len(pairs)} pairs with an object of this cluster; the first "
        f"{min(len(pairs), DUPLICATE_PAIRS)}:</p>",
        "<table><tr><th>kind</th><th>similarity</th><th>object</th><th>duplicate</th></tr>",
    ]
    for pair in pairs[:DUPLICATE_PAIRS]:
        cells = []
        for uri in (pair["uri"], pair["duplicate_uri"]):
            row = row_of.get(uri)
            tile = _tile(page, row, uri) if row is not None else _e(uri)
            cells.append(f"<td>{tile}</td>")
        lines.append(
            f"<tr><td>{_e(pair['kind'])}</td><td>{float(pair['similarity']):.3f}</td>"
            + "".join(cells)
            + "</tr>"
        )
    lines.append("</table>")
    return "".join(lines)


def write_gallery(out: Storage, files: dict[str, bytes]) -> str:
    """Write the gallery's files under ``out`` (index last); return the index URI."""
    for name in sorted(files):
        if name != INDEX:
            out.write_bytes(name, files[name])
    out.write_bytes(INDEX, files[INDEX])
    return out.uri(INDEX)


def export_gallery(lake_url: str, workspace_url: str, out_url: str, run_id: str | None) -> str:
    """``scan-lake export``: the gallery of the lake's latest run (or run ``run_id``) in
    ``out_url``; returns the index URI.

    Raises:
        ScanLakeError: no such run, an unreachable lake, workspace or output.
    """
    lake, workspace, out = Storage(lake_url), Storage(workspace_url), Storage(out_url)
    lake.check_reachable()
    workspace.check_reachable()
    out.check_reachable(create=True)
    record = find_record(workspace, lake.url, run_id)
    if not workspace.exists(f"{record.assign.rel_dir}/assignments.parquet"):
        raise ScanLakeError(
            f"The assignments of run {record.flow_run_id} are gone from {workspace.url}: rerun "
            "the pipeline on the lake, then export again."
        )
    return write_gallery(out, gallery_files(lake, gallery_data(workspace, record)))


def run_gallery_dir(record: RunRecord) -> str:
    """Workspace folder of a run's gallery: one per lake and set of stage outputs shown, so an
    unchanged rerun finds its gallery made."""
    shown = [record.assign.key]
    shown += [o.key if o is not None else "" for o in (record.evaluate, record.duplicates)]
    digest = hashlib.sha256("/".join(shown).encode()).hexdigest()[:24]
    return f"{GALLERY_DIR}/{history_dir(record.lake).rsplit('/', 1)[-1]}/{digest}"


def publish_run_gallery(
    lake: Storage, workspace: Storage, record: RunRecord, ref: TrackingRef | None
) -> str:
    """The flow's gallery of a finished run: written under :func:`run_gallery_dir` (unless an
    unchanged rerun finds it there) and logged as the ``gallery/`` artifacts of the MLflow
    parent run that made it; every parent run gets its URI in the ``gallery`` tag. Returns the
    index URI."""
    out = Storage(workspace.uri(run_gallery_dir(record)), workspace.settings)
    if not out.exists(INDEX):
        files = gallery_files(lake, gallery_data(workspace, record))
        write_gallery(out, files)
        if ref is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    path = Path(tmp) / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                ref.client().log_artifacts(ref.parent_run_id, tmp, GALLERY_DIR)
    if ref is not None:
        tracking.set_tags(ref, ref.parent_run_id, {"gallery": out.uri(INDEX)})
    return out.uri(INDEX)

"""The quality benchmark's --quick mode as a smoke test (bench/quality.py): real training on a few
hundred Fashion-MNIST images, rows in the issue's format, reruns of some methods merged."""

from __future__ import annotations

import json
from pathlib import Path

from bench.quality import main

#: 1,000 images (on 400 a 2-epoch SCAN model is still near uniform: nothing to self-label)
QUICK = ["--quick", "--images", "1000"]
ROW_KEYS = {"method", "dataset", "n_images", "acc", "nmi", "ari", "seconds", "seeds"}


def test_quick_run_writes_the_rows_and_merges_a_second_run(
    tmp_path: Path, one_thread: object
) -> None:
    assert main([*QUICK, "--methods", "table1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quality_quick.json").read_text())
    assert [r["method"] for r in rows] == ["kmeans_raw", "pretext_kmeans", "scan", "scan_selflabel"]
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["dataset"] == "fashion-mnist" and row["n_images"] == 1000 and row["seeds"] == [0]
        assert 0.1 <= row["acc"] <= 1 and row["seconds"] >= 0
        assert row["acc_per_seed"] == [row["acc"]]
    markdown = (tmp_path / "quality_quick.md").read_text()
    assert "| scan_selflabel |" in markdown and "Published numbers" in markdown
    # the scan row says which head was kept, and the held-out ACC of the heads beside it
    scan = rows[2]
    assert 0 <= scan["kept_head"] < scan["heads"]
    assert scan["worst_head_val_acc"] <= scan["kept_head_val_acc"] <= scan["best_head_val_acc"]
    assert "kept head 0 of 1 (lowest held-out SCAN loss)" in markdown

    # a run of one more method keeps the earlier rows and adds its own (a reused pretext model)
    args = [*QUICK, "--methods", "scan_overcluster", "--reuse-pretext"]
    assert main([*args, "--overcluster", "12", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "quality_quick.json").read_text())
    assert [r["method"] for r in merged] == [r["method"] for r in rows] + ["scan_overcluster"]
    assert merged[:4] == rows
    over = merged[-1]
    assert over["num_clusters"] == 12 and over["hungarian_acc"] <= over["acc"]
    assert "reused" in (tmp_path / "quality_quick.md").read_text()

    # another pretext method of the registry: its rows are prefixed with its name
    args = [*QUICK, "--methods", "pretext_kmeans", "--pretext", "byol", "--out", str(tmp_path)]
    assert main(args) == 0
    byol = json.loads((tmp_path / "quality_quick.json").read_text())[-1]
    assert byol["method"] == "byol_pretext_kmeans" and 0.1 <= byol["acc"] <= 1
    assert byol["run"]["pretext_methods"] == ["byol"]

    # two-stage as published runs Super-AND first; stage 2 on SimCLR is a row of its own; IIC
    # runs on its own recipe; their rows say how small their smallest cluster is
    args = [*QUICK, "--methods", "twostage,twostage_simclr,iic", "--reuse-pretext"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "quality_quick.json").read_text())}
    assert rows["twostage"]["pretext"] == rows["superand_pretext_kmeans"]["pretext"] == "superand"
    assert "pretext" not in rows["twostage_simclr"] and "pretext" not in rows["iic"]
    assert (
        rows["twostage"]["heads"] == rows["twostage_simclr"]["heads"] == rows["iic"]["heads"] == 5
    )
    for name in ("twostage", "twostage_simclr", "iic"):
        assert 0 <= rows[name]["smallest_cluster_share"] <= 0.1
    markdown = (tmp_path / "quality_quick.md").read_text()
    assert "(lowest held-out IIC loss)" in markdown
    assert "(lowest held-out IIC loss between the light and the heavy view)" in markdown
    assert "smallest cluster" in markdown
    assert rows["twostage"]["run"]["pretext_methods"] == ["simclr", "superand"]

    # a run's header names only the pretexts its rows were built on: none for pixels
    assert main([*QUICK, "--methods", "kmeans_raw", "--out", str(tmp_path)]) == 0
    pixels = json.loads((tmp_path / "quality_quick.json").read_text())[0]
    assert pixels["method"] == "kmeans_raw" and pixels["run"]["pretext_methods"] == []
    markdown = (tmp_path / "quality_quick.md").read_text()
    headers = [line for line in markdown.splitlines() if line.startswith("## Run ")]
    assert any(line.endswith(": kmeans_raw") for line in headers)
    assert "(pretext: )" not in markdown

"""The growth benchmark's schedule and its reading of the issue 5 targets (bench/growth.py)."""

from __future__ import annotations

import pytest

from bench.growth import STEP_KEYS, lake_sizes, markdown_report, targets_met


def test_lake_sizes_start_at_half_and_grow_by_a_tenth_five_times() -> None:
    assert lake_sizes(10_000) == [5000, 6000, 7000, 8000, 9000, 10_000]
    assert lake_sizes(600) == [300, 360, 420, 480, 540, 600]
    with pytest.raises(ValueError, match="too few"):
        lake_sizes(4)


def _step(seconds: float, acc: float, churn: float | None) -> dict[str, float | None]:
    return {
        "fraction": 0.6,
        "seconds": seconds,
        "scratch_seconds": 100.0,
        "embedded": 1000,
        "acc": acc,
        "scratch_acc": 0.60,
        "churn": churn,
    }


def test_targets_are_the_issue_bounds_inclusive() -> None:
    assert targets_met(_step(25.0, 0.58, 0.05)) == {"time": True, "acc": True, "churn": True}
    assert targets_met(_step(25.1, 0.579, 0.051)) == {"time": False, "acc": False, "churn": False}
    assert targets_met(_step(10.0, 0.70, None))["churn"] is False  # no churn measured: not met


def test_markdown_report_marks_each_target() -> None:
    steps = [_step(20.0, 0.59, 0.01), _step(30.0, 0.50, 0.10)]
    assert set(steps[0]) == set(STEP_KEYS)
    details = [
        {
            "images": 6000,
            "new_images": 1000,
            "backbone": "reused",
            "start": "warm",
            "stage_seconds": {"embed": 2.0, "scan": 8.0},
            "scratch_stage_seconds": {"pretext": 60.0, "embed": 5.0, "scan": 20.0},
        }
    ] * 2
    context = {
        "images": 10_000,
        "cpus": 2,
        "load": 1.0,
        "base": {"images": 5000, "seconds": 100.0, "acc": 0.6},
        "settings": {"growth.retrain_pretext_after": 1.0},
        "command": "uv run python bench/growth.py --images 10000",
    }
    rows = markdown_report(steps, details, context).splitlines()
    first = next(r for r in rows if r.startswith("| 60% | 6000 | 1000 | 1000 | 20.0 "))
    assert "20.0% yes" in first and "+1.0 yes" in first and "1.00% yes" in first
    second = rows[rows.index(first) + 1]
    assert "30.0% **no**" in second and "+10.0 **no**" in second and "10.00% **no**" in second
    assert "uv run python bench/growth.py --images 10000" in rows
    assert "| pretext | 0.0 | 60.0 |" in rows and "| scan | 8.0 | 20.0 |" in rows
    rest = next(r for r in rows if r.startswith("| rest of the flow run"))
    assert rest.endswith("| 20.0 | 15.0 |")  # 30 - 10 incremental, 100 - 85 scratch

"""The automatic settings of a run without a config file (:mod:`scan_core.auto`), as the flow
uses them: the budget parsed from ``--budget``, this machine's measured speed (cached in the
state dir so that reruns choose the same settings), the lake profile and the ``--set``
overrides applied on top.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Literal

import torch
from pydantic import ValidationError

from scan_core.auto import AutoSettings, LakeProfile, auto_config, choose_image, measure_speed
from scan_core.config import PipelineConfig, resolve_device
from tasks.errors import ScanLakeError
from tasks.settings import MachineSettings

logger = logging.getLogger(__name__)

Preset = Literal["auto", "paper"]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_budget(text: str | float | None) -> float | None:
    """``--budget``: seconds from ``90``, ``90s``, ``30m``, ``2h``, ``1h30m`` (None: no budget).

    Raises:
        ScanLakeError: anything else, or a budget under one minute.
    """
    if text is None or isinstance(text, int | float):
        seconds = None if text is None else float(text)
    else:
        value = text.strip().lower().replace(" ", "")
        parts = re.fullmatch(r"((\d+(\.\d+)?)([smhd]))+|\d+(\.\d+)?", value)
        if not value or parts is None:
            raise ScanLakeError(
                f"--budget {text!r} is not a duration: write e.g. --budget 30m, 2h or 1h30m."
            )
        if re.fullmatch(r"\d+(\.\d+)?", value):
            seconds = float(value)
        else:
            seconds = sum(
                float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smhd])", value)
            )
    if seconds is not None and seconds < 60:
        raise ScanLakeError(
            f"--budget {text!r} is under one minute, too short for a run: give at least 1m."
        )
    return seconds


def device_kind() -> Literal["cpu", "cuda"]:
    """The device the training stages will use (``auto``: a CUDA GPU when there is one)."""
    return "cuda" if resolve_device("auto") == "cuda" else "cpu"


def machine_speed(settings: MachineSettings | None = None) -> float:
    """This machine's speed against the reference (:func:`scan_core.auto.measure_speed`),
    measured once and kept in ``<state_dir>/machine-speed.json``, rounded to a power of
    ``2 ** 0.5`` so that noise in the measurement does not change the chosen settings."""
    settings = settings or MachineSettings()
    path = settings.state_dir / "machine-speed.json"
    threads = torch.get_num_threads()
    try:
        cached = json.loads(path.read_text())
        if cached.get("threads") == threads and float(cached["speed"]) > 0:
            return float(cached["speed"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or unreadable: measure again
    measured = measure_speed()
    speed = float(2 ** (round(2 * math.log2(measured)) / 2))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"speed": speed, "measured": measured, "threads": threads}))
    except OSError as exc:
        logger.warning("could not cache the machine speed in %s: %s", path, exc)
    return speed


def _apply(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    try:
        return config.with_overrides(overrides) if overrides else config
    except (ValidationError, ValueError) as exc:
        raise ScanLakeError(f"Invalid --set override ({exc}): fix the key or the value.") from exc


def image_section(
    profile: LakeProfile, overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``image`` section for the lake (overrides applied) and why."""
    image, reasons = choose_image(profile, device_kind())
    config = _apply(PipelineConfig.model_validate({"image": image}), overrides)
    return config.image.model_dump(mode="json"), reasons


def settings_for(
    profile: LakeProfile,
    num_images: int,
    budget_seconds: float | None,
    overrides: dict[str, Any],
) -> AutoSettings:
    """The whole automatic config for a lake of ``num_images`` usable images, with the
    ``--set`` overrides applied on top (they win over every automatic choice)."""
    speed = machine_speed() if budget_seconds is not None else 1.0
    chosen = auto_config(profile, num_images, device_kind(), budget_seconds, speed)
    if budget_seconds is not None:
        chosen.reasons["budget"] = (
            f"{budget_seconds / 60:.0f} min on a machine {speed:.2g}x the reference speed; "
            f"estimated {chosen.estimate['total'] / 60:.0f} min"
            + (f" ({chosen.reasons['budget']})" if "budget" in chosen.reasons else "")
        )
    if overrides:
        chosen.config = _apply(chosen.config, overrides)
        chosen.reasons["overrides"] = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return chosen

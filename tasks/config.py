"""Loading the science config: a YAML file plus ``--set key=value`` overrides, validated by
:class:`scan_core.config.PipelineConfig` into one clear sentence on error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from scan_core.config import PipelineConfig
from tasks.errors import ScanLakeError


def _sentence(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "config"
        parts.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(parts)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["scan.epochs=5", "pretext.backbone=small_cnn"]`` -> ``{"scan.epochs": 5, ...}``.

    Values are parsed as YAML scalars (``5`` is an int, ``true`` a bool, ``abc`` a string).

    Raises:
        ScanLakeError: a pair without ``=``.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ScanLakeError(f"--set '{pair}' is not key=value: write e.g. --set scan.epochs=5.")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def parse_clusters(value: str | int | None) -> int | Literal["auto"] | None:
    """``--clusters``: a number of clusters, ``auto`` (choose it without labels) or None.

    Raises:
        ScanLakeError: anything else.
    """
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ScanLakeError(
            f"--clusters {value!r} is neither a number nor 'auto': pass e.g. --clusters 10, or "
            "--clusters auto to choose it in cluster_count.k_min..k_max."
        ) from None


def build_config(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    clusters: int | Literal["auto"] | None = None,
) -> PipelineConfig:
    """The pipeline config from a YAML file, dotted overrides and the number of clusters
    (``"auto"``, like None, keeps ``scan.num_clusters``: the run's ``choose_k`` stage sets k).

    Raises:
        ScanLakeError: unreadable file, unknown keys, wrong types or values.
    """
    if clusters == "auto":
        clusters = None
    if clusters is not None and clusters < 2:
        raise ScanLakeError(
            f"--clusters {clusters} is invalid: scan.num_clusters must be greater than or equal to "
            "2 (clustering needs at least two clusters); pass --clusters 2 or more."
        )
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ScanLakeError(f"Config file '{path}' does not exist: check the --config path.")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ScanLakeError(
                f"Config file '{path}' is not valid YAML ({problem}{at}): fix it."
            ) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ScanLakeError(
                f"Config file '{path}' must hold a mapping of sections (image, pretext, "
                "neighbors, scan, selflabel): fix it."
            )
        data = loaded or {}
    try:
        config = PipelineConfig.model_validate(data)
        merged = dict(overrides or {})
        if clusters is not None:
            merged["scan.num_clusters"] = clusters
        return config.with_overrides(merged) if merged else config
    except ValidationError as exc:
        raise ScanLakeError(
            f"Invalid config: {_sentence(exc)}; fix the config file or the --set value."
        ) from exc
    except ValueError as exc:
        raise ScanLakeError(f"Invalid config: {exc} Fix the config file or --set key.") from exc


def as_config(value: PipelineConfig | dict[str, Any] | None) -> PipelineConfig:
    """A :class:`PipelineConfig` from a flow parameter (model, dict or None for defaults).

    Raises:
        ScanLakeError: invalid keys or values.
    """
    if isinstance(value, PipelineConfig):
        return value
    try:
        return PipelineConfig.model_validate(value or {})
    except ValidationError as exc:
        raise ScanLakeError(f"Invalid config: {_sentence(exc)}; fix the config.") from exc

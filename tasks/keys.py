"""Stage keys: content fingerprints that decide what a rerun must recompute (DESIGN.md §2).

A stage's key is the SHA-256 of its name, its config fingerprint, the keys of its inputs and the
version of its code (a hash of the source text of the ``scan_core`` modules it uses, plus a format
version of the task itself). The flow computes every key before calling a task; the task's Prefect
cache key *is* that key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import scan_core

_CORE = Path(scan_core.__file__).parent

#: Two-stage and IIC class assignment (scan_core.twostage and what it builds on).
_MUTUAL_INFORMATION = (
    "twostage.py",
    "clustering.py",
    "training.py",
    "transforms.py",
    "losses.py",
    "models",
)

#: The scan_core modules each stage runs (its code version hashes their source text). The config
#: module is left out: the config fingerprint already covers the values a stage uses.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "images": ("images.py",),
    "catalog": ("images.py",),
    "pretext": (
        "pretext.py",
        "training.py",
        "transforms.py",
        "losses.py",
        "models",
    ),
    "embed": ("inference.py", "transforms.py", "models"),
    "neighbors": ("neighbors.py",),
    "scan": ("clustering.py", "training.py", "transforms.py", "losses.py", "models"),
    "selflabel": (
        "selflabel.py",
        "guard.py",
        "training.py",
        "transforms.py",
        "losses.py",
        "inference.py",
        "models",
    ),
    "assign": ("inference.py", "transforms.py", "models"),
    "evaluate": ("evaluation.py", "plots.py", "neighbors.py"),
    "duplicates": (),
    # keys of the other methods (pretext.method, clustering.method) have names of their own, so
    # adding them left the keys of the stages above as they were
    "superand": (
        "superand.py",
        "pretext.py",
        "training.py",
        "transforms.py",
        "losses.py",
        "models",
    ),
    "twostage": _MUTUAL_INFORMATION,
    "iic": _MUTUAL_INFORMATION,
    "kmeans": ("kmeans.py", "twostage.py", "models"),
    "choose_k": ("model_selection.py", "losses.py", "training.py", "plots.py"),
    "guard": ("guard.py", "kmeans.py", "inference.py", "transforms.py", "models"),
}

#: Bumped when a task changes what it writes (the scan_core hash covers the science code).
TASK_FORMAT_VERSION: dict[str, int] = {
    "images": 1,
    "catalog": 1,
    "pretext": 1,
    "embed": 1,
    "neighbors": 1,
    "scan": 1,
    "selflabel": 1,
    "assign": 2,  # 2: stable cluster ids, lineage table, reordered checkpoint
    "evaluate": 2,  # 2: reads stable cluster ids
    "duplicates": 1,
    "superand": 1,
    "twostage": 1,
    "iic": 1,
    "kmeans": 1,
    "choose_k": 1,
    "guard": 1,
}


def digest(*parts: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def digest_lines(lines: Iterable[str]) -> str:
    """SHA-256 hex of newline-joined strings (for long sorted lists of ids)."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


@cache
def code_version(stage: str) -> str:
    """Hash of the source of the scan_core modules ``stage`` uses and its task format version."""
    h = hashlib.sha256(f"{stage}:{TASK_FORMAT_VERSION[stage]}".encode())
    for name in STAGE_MODULES[stage]:
        path = _CORE / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            h.update(str(file.relative_to(_CORE)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def stage_key(stage: str, config_fingerprint: str, inputs: dict[str, str]) -> str:
    """The key of ``stage``: its name, config, input keys and code version."""
    return digest(stage, config_fingerprint, inputs, code_version(stage))


def images_key(unique_ids: Iterable[str], image_config_fingerprint: str) -> str:
    """Fingerprint of the set of usable images (sorted content hashes) as decoded tensors."""
    return digest(
        "images", digest_lines(sorted(unique_ids)), image_config_fingerprint, code_version("images")
    )


def image_config_key(image_config_fingerprint: str) -> str:
    """Key of the pixel store: the decoded pixels depend only on the image config and code."""
    return digest("pixels", image_config_fingerprint, code_version("images"))[:32]

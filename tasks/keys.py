"""Stage keys: content fingerprints that decide what a rerun must recompute
(docs/architecture.md, 'Cache keys').

A stage's key is the SHA-256 of its name, its config fingerprint, the keys of its inputs and the
version of its code. The flow computes every key before calling a task; a stage whose key has a
committed manifest in the workspace is not computed again (:func:`tasks.stage.run_stage`).

**Code versions follow the imports.** Each stage names its *entry* modules
(:data:`STAGE_ENTRIES`): the ``scan_core`` modules its task calls, including those
``tasks/checkpoints.py`` uses to rebuild the models the stage loads. :func:`stage_modules` walks
the ``import`` statements of those modules with :mod:`ast` (``import scan_core.x``,
``from scan_core.x import y``, ``from . import y``, package ``__init__`` files included, imports
inside functions too), transitively within ``scan_core``, and :func:`code_version` hashes the
source text of every module reached, sorted by name, with the task's format version
(:data:`TASK_FORMAT_VERSION`). So a change to a function a stage calls, however indirectly, gives
the stage (and every stage downstream, whose keys hold its key) a new key, while a stage that does
not reach the changed module keeps its key. ``scan_core.config`` is not followed: the config
fingerprint in the key already covers the values a stage uses, and every stage imports it.
Comments count as source (hashing the text is stable across Python versions; hashing
``ast.dump`` is not).
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from scan_core.methods import CLUSTERING, PRETEXT

#: The repository root: ``scan_core`` is a package directly under it.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: The package whose modules count as a stage's code.
CODE_PACKAGE = "scan_core"

#: Modules never followed: the config (its values reach the key through the config fingerprint)
#: and the method registries (they name every method's modules; each method's key follows only
#: its own, :data:`STAGE_ENTRIES`).
NOT_FOLLOWED = frozenset({"scan_core.config", "scan_core.methods"})

#: What ``tasks/checkpoints.py`` uses to rebuild a pretext model (``load_pretext_model``).
_LOADS_PRETEXT_MODEL = ("scan_core.pretext", "scan_core.models")
#: What ``tasks/checkpoints.py`` uses to rebuild a clustering model (``load_clustering_model``).
_LOADS_CLUSTERING_MODEL = ("scan_core.models", "scan_core.twostage")

#: The keys of the pretext and clustering methods: their registry entries' names and modules
#: (the pretext stage of SimCLR and RotNet is ``pretext``, the clustering stage of SCAN ``scan``).
_METHOD_ENTRIES = {
    **{m.key_name: m.modules for m in PRETEXT.values()},
    **{m.name: m.modules for m in CLUSTERING.values()},
}

#: The scan_core modules each stage's task calls; :func:`stage_modules` adds what they import.
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "images": ("scan_core.images",),  # the lake scan: hash, inspect, decode
    "catalog": ("scan_core.images",),
    "embed": ("scan_core.inference", *_LOADS_PRETEXT_MODEL),
    "neighbors": ("scan_core.neighbors",),
    **_METHOD_ENTRIES,
    "selflabel": (
        "scan_core.selflabel",
        "scan_core.guard",
        "scan_core.inference",
        *_LOADS_CLUSTERING_MODEL,
    ),
    "assign": ("scan_core.inference", "scan_core.transforms", *_LOADS_CLUSTERING_MODEL),
    "evaluate": (
        "scan_core.evaluation",
        "scan_core.plots",
        "scan_core.neighbors",
        "scan_core.data",
    ),
    "duplicates": ("scan_core.duplicates",),
    "choose_k": ("scan_core.model_selection", "scan_core.plots"),
    "guard": (
        "scan_core.guard",
        "scan_core.kmeans",
        "scan_core.inference",
        *_LOADS_PRETEXT_MODEL,
        *_LOADS_CLUSTERING_MODEL,
    ),
}

#: Bumped when a task changes what it writes (the scan_core hash covers the science code).
TASK_FORMAT_VERSION: dict[str, int] = {
    "images": 1,
    "catalog": 1,
    "embed": 1,
    "neighbors": 1,
    **{m.key_name: m.format_version for m in PRETEXT.values()},
    **{m.name: m.format_version for m in CLUSTERING.values()},
    "selflabel": 1,
    "assign": 2,  # 2: stable cluster ids, lineage table, reordered checkpoint
    "evaluate": 2,  # 2: reads stable cluster ids
    "duplicates": 2,  # 2: near pairs from the pixels (hash, views, embeddings), new columns
    "choose_k": 1,
    "guard": 2,  # 2: num_clusters in the summary, the partitions table's schema checked
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


def module_file(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of ``module`` under ``root`` (a package's ``__init__.py``), or None when
    ``module`` is not a module of the project (a class or function imported from a package)."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(module: str, root: Path = PROJECT_ROOT) -> set[str]:
    """The project modules ``module`` imports (anywhere in its source), as dotted names: for
    ``from a.b import c`` both ``a.b`` and, when it is a module, ``a.b.c``; the packages above
    each (their ``__init__`` runs on import); relative imports resolved."""
    path = module_file(module, root)
    if path is None:
        return set()
    package = _package_of(module, path)
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            named.add(source)
            named.update(f"{source}.{alias.name}" for alias in node.names)
    return {
        candidate
        for name in named
        for candidate in _with_packages(name)
        if candidate.split(".")[0] == CODE_PACKAGE and module_file(candidate, root)
    }


def _with_packages(name: str) -> list[str]:
    """``name`` and the packages above it: ``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def stage_modules(stage: str, root: Path = PROJECT_ROOT) -> list[str]:
    """Every ``scan_core`` module ``stage`` runs: its entries and, transitively, what they
    import, with the packages above each (``scan_core.config`` aside), sorted.

    Raises:
        ValueError: an entry of :data:`STAGE_ENTRIES` has no source file under ``root``.
    """
    seen: set[str] = set()
    pending = [m for e in STAGE_ENTRIES[stage] for m in _with_packages(e) if m not in NOT_FOLLOWED]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        if module_file(module, root) is None:
            raise ValueError(f"stage {stage}: no source for module {module} under {root}")
        seen.add(module)
        pending.extend(imported_modules(module, root) - seen - NOT_FOLLOWED)
    return sorted(seen)


@cache
def code_version(stage: str, root: Path = PROJECT_ROOT) -> str:
    """Hash of the source of every module ``stage`` runs (:func:`stage_modules`) and of its task
    format version.

    Args:
        stage: A stage (or method) name of :data:`STAGE_ENTRIES`.
        root: The source tree (the repository root; a copy of it in tests).
    """
    h = hashlib.sha256(f"{stage}:{TASK_FORMAT_VERSION[stage]}".encode())
    for module in stage_modules(stage, root):
        source = module_file(module, root)
        assert source is not None  # stage_modules checked it
        h.update(module.encode() + b"\0")
        h.update(source.read_bytes())
    return h.hexdigest()


def stage_key(
    stage: str, config_fingerprint: str, inputs: dict[str, str], root: Path = PROJECT_ROOT
) -> str:
    """The key of ``stage``: its name, config, input keys and code version (of the source tree
    ``root``)."""
    return digest(stage, config_fingerprint, inputs, code_version(stage, root))


def images_key(unique_ids: Iterable[str], image_config_fingerprint: str) -> str:
    """Fingerprint of the set of usable images (sorted content hashes) as decoded tensors."""
    return digest(
        "images", digest_lines(sorted(unique_ids)), image_config_fingerprint, code_version("images")
    )


def image_config_key(image_config_fingerprint: str) -> str:
    """Key of the pixel store: the decoded pixels depend only on the image config and code."""
    return digest("pixels", image_config_fingerprint, code_version("images"))[:32]

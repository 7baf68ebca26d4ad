"""Stage keys follow the code: a stage's code version covers every scan_core module it imports,
transitively, so editing a function changes the keys of the stages that reach it and no other."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tasks import keys

#: Stages whose modules reach scan_core/clustering.py (through model_selection, twostage,
#: selflabel or the clustering model the guard loads), and stages that never do.
REACH_CLUSTERING = {
    "choose_k",
    "scan",
    "selflabel",
    "assign",
    "twostage",
    "iic",
    "kmeans",
    "guard",
}
NEVER_CLUSTERING = {
    "images",
    "catalog",
    "pretext",
    "superand",
    "byol",
    "embed",
    "neighbors",
    "evaluate",
}


def copy_tree(tmp_path: Path) -> Path:
    """A copy of the scan_core source under ``tmp_path`` (the root a key is computed from)."""
    shutil.copytree(
        keys.PROJECT_ROOT / "scan_core",
        tmp_path / "scan_core",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path


def append_statement(path: Path, function: str, statement: str) -> None:
    """Add ``statement`` as the last line of the body of ``function`` in ``path``."""
    source = path.read_text()
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    last = node.body[-1]
    assert last.end_lineno is not None
    lines = source.splitlines(keepends=True)
    indent = " " * last.col_offset
    lines.insert(last.end_lineno, f"{indent}{statement}\n")
    path.write_text("".join(lines))


def all_keys(root: Path) -> dict[str, str]:
    """Every stage's key for the same config and inputs, from the source tree ``root``."""
    return {s: keys.stage_key(s, "config", {"input": "key"}, root) for s in keys.STAGE_ENTRIES}


def test_the_groups_above_cover_every_stage_but_duplicates() -> None:
    assert REACH_CLUSTERING | NEVER_CLUSTERING | {"duplicates"} == set(keys.STAGE_ENTRIES)
    assert set(keys.STAGE_ENTRIES) == set(keys.TASK_FORMAT_VERSION)


def test_an_unchanged_copy_gives_the_same_keys(tmp_path: Path) -> None:
    assert all_keys(copy_tree(tmp_path)) == all_keys(keys.PROJECT_ROOT)


def test_editing_a_called_function_changes_exactly_the_stages_that_reach_it(
    tmp_path: Path,
) -> None:
    """choose_k calls model_selection, which calls clustering.heldout_consistency: a statement
    appended to that function changes choose_k's key and those of the stages whose modules import
    clustering.py, and no other."""
    root = copy_tree(tmp_path)
    before = all_keys(root)
    assert "scan_core.clustering" not in keys.STAGE_ENTRIES["choose_k"]  # reached, not listed
    append_statement(root / "scan_core" / "clustering.py", "heldout_consistency", "_ = None")
    keys.code_version.cache_clear()
    after = all_keys(root)
    changed = {s for s in before if before[s] != after[s]}
    assert changed == REACH_CLUSTERING
    assert {"neighbors", "catalog"} <= set(before) - changed
    for stage in REACH_CLUSTERING:
        assert "scan_core.clustering" in keys.stage_modules(stage, root)
    for stage in NEVER_CLUSTERING:
        assert "scan_core.clustering" not in keys.stage_modules(stage, root)


def test_a_new_method_changes_no_other_stage_key(tmp_path: Path) -> None:
    """The registries name every method's modules, but keys never follow the registry: editing
    BYOL's module changes the BYOL pretext key (and nothing else), as editing the registry
    changes no key at all."""
    root = copy_tree(tmp_path)
    before = all_keys(root)
    append_statement(root / "scan_core" / "byol.py", "byol_loss", "_ = None")
    keys.code_version.cache_clear()
    after_byol = all_keys(root)
    assert {s for s in before if before[s] != after_byol[s]} == {"byol"}
    append_statement(root / "scan_core" / "methods.py", "pretext_method", "_ = None")
    keys.code_version.cache_clear()
    assert all_keys(root) == after_byol


def test_imports_are_resolved_every_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``import a.b``, ``from a.b import c`` (module or name), relative imports, and imports
    inside functions are followed; third-party imports and the config module are not."""
    root = copy_tree(tmp_path)
    core = root / "scan_core"
    (core / "models" / "extra.py").write_text(
        "from . import heads\nfrom .backbones import Backbone\n"
    )
    (core / "probe.py").write_text(
        "import numpy as np\n"
        "from scan_core.config import ImageConfig\n"
        "from scan_core import losses\n"
        "def late():\n"
        "    import scan_core.models.extra\n"
    )
    found = set(keys.imported_modules("scan_core.probe", root))
    assert found == {
        "scan_core",
        "scan_core.config",
        "scan_core.losses",
        "scan_core.models",
        "scan_core.models.extra",
    }
    relative = keys.imported_modules("scan_core.models.extra", root)
    assert relative == {
        "scan_core",
        "scan_core.models",
        "scan_core.models.heads",
        "scan_core.models.backbones",
    }
    monkeypatch.setitem(keys.STAGE_ENTRIES, "probe-test", ("scan_core.probe",))
    reached = keys.stage_modules("probe-test", root)
    assert "scan_core.config" not in reached
    assert {"scan_core.models.extra", "scan_core.models.heads", "scan_core.losses"} <= set(reached)


def test_a_missing_entry_module_is_refused(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "scan_core" / "neighbors.py").unlink()
    with pytest.raises(ValueError, match="no source for module scan_core.neighbors"):
        keys.stage_modules("neighbors", root)

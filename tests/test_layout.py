"""The house rules of the layout, checked on the source: shared ground (actfleet/*.py) imports no wing;
the two wings import each other not (what both need, like the work-queue protocol, is shared ground); no
module or package is named like a standard-library module; the wings' folders are the package's
subpackages. Imports are read from the AST, so function-level (lazy) and relative imports count too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WINGS = ("actfleet.infra", "actfleet.worker", "actfleet.demo")


# Folder -> import package (pyproject's package-dir), to name a file's package and resolve relative imports.
PACKAGE_DIRS = {
    "actfleet": "actfleet",
    "infra": "actfleet.infra",
    "worker": "actfleet.worker",
    "bootstrap": "actfleet.bootstrap",
}


def package_of(path: Path) -> str:
    """The import package a source file belongs to (worker/commands/jobs.py -> actfleet.worker.commands)."""
    top, *rest = path.relative_to(REPO).parent.parts
    return ".".join([PACKAGE_DIRS[top], *rest])


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, anywhere in it (module level or inside functions), as absolute names;
    `from a import b` yields both a and a.b (b may be a submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package, `level - 1` packages up
                base = package_of(path).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def imports_of(path: Path, prefix: str) -> list[str]:
    return sorted(m for m in imported_modules(path) if m == prefix or m.startswith(prefix + "."))


@pytest.mark.parametrize("path", sorted((REPO / "actfleet").glob("*.py")), ids=lambda p: p.name)
def test_shared_ground_imports_no_wing(path):
    wings = sorted(m for m in imported_modules(path) if m.startswith(WINGS))
    assert wings == [], f"{path.name} imports {wings}: shared ground must not depend on a wing"


@pytest.mark.parametrize("path", sorted((REPO / "infra").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_infra_imports_nothing_of_the_worker_wing(path):
    found = imports_of(path, "actfleet.worker")
    assert found == [], (
        f"{path.relative_to(REPO)} imports {found}: the fleet wing must not depend on the worker "
        f"wing (move what both need to shared ground, as actfleet/work_queue.py)"
    )


@pytest.mark.parametrize("path", sorted((REPO / "worker").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_worker_imports_nothing_of_the_infra_wing(path):
    found = imports_of(path, "actfleet.infra")
    assert found == [], (
        f"{path.relative_to(REPO)} imports {found}: the worker wing must not depend on the fleet "
        f"wing (a TPU VM runs the worker without it)"
    )


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The rules above are only as good as imported_modules: a function-level import, a relative import
    and `from actfleet import worker` must all be seen (a checker that missed them would pass anything)."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    src = tmp_path / "infra" / "commands" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text(
        "def f():\n    from actfleet.worker.shards import Shard\n"
        "from ...worker import reader\nfrom actfleet import worker\nfrom .. import decide\n"
    )
    assert imports_of(src, "actfleet.worker") == [
        "actfleet.worker",
        "actfleet.worker.reader",
        "actfleet.worker.shards",
        "actfleet.worker.shards.Shard",
    ]
    assert "actfleet.infra.decide" in imported_modules(src)


def test_no_module_is_named_like_the_standard_library():
    """Neither a module nor a package: a folder on sys.path with a queue.py (or a queue/) in it shadows the
    standard library's queue for everything, concurrent.futures included."""
    product = [p for d in ("actfleet", "infra", "worker") for p in (REPO / d).rglob("*.py")]
    names = {p: p.parent.name if p.stem == "__init__" else p.stem for p in product}
    clashes = sorted(str(p.relative_to(REPO)) for p, name in names.items() if name in sys.stdlib_module_names)
    assert clashes == []


def test_the_fixed_folders_are_subpackages_of_actfleet():
    import actfleet.bootstrap
    import actfleet.infra
    import actfleet.worker

    assert Path(actfleet.infra.__file__).parent == REPO / "infra"
    assert Path(actfleet.worker.__file__).parent == REPO / "worker"
    assert Path(actfleet.bootstrap.__file__).parent == REPO / "bootstrap"


def test_every_command_in_the_cli_table_imports_and_is_a_click_command():
    import importlib

    import click

    from actfleet.cli import COMMANDS

    for name, (target, help_text) in COMMANDS.items():
        module, attr = target.split(":")
        assert isinstance(getattr(importlib.import_module(module), attr), click.Command), name
        assert help_text.endswith("."), name

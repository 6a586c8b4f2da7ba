"""The house rules of the layout, checked on the source: shared ground (actfleet/*.py) imports no wing;
no module is named like a standard-library module; the wings' folders are the package's subpackages."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WINGS = ("actfleet.infra", "actfleet.worker", "actfleet.demo")


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", sorted((REPO / "actfleet").glob("*.py")), ids=lambda p: p.name)
def test_shared_ground_imports_no_wing(path):
    wings = sorted(m for m in imported_modules(path) if m.startswith(WINGS))
    assert wings == [], f"{path.name} imports {wings}: shared ground must not depend on a wing"


def test_no_module_is_named_like_the_standard_library():
    product = [p for d in ("actfleet", "infra", "worker") for p in (REPO / d).rglob("*.py")]
    clashes = sorted(str(p.relative_to(REPO)) for p in product if p.stem in sys.stdlib_module_names)
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

"""The layout of SPEC §1, enforced: ``shared/core`` does no I/O and imports nothing that does, and
``shared`` depends on nothing built on top of it (the stream, the DAGs, the CLI)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "shared"
CORE = SHARED / "core"

#: Libraries that do I/O (databases, templates, Kafka, Airflow, the network): none may be
#: loaded by importing a module of the core, directly or through another module.
IO_LIBRARIES = (
    "psycopg",
    "sqlalchemy",
    "alembic",
    "jinja2",
    "aiokafka",
    "airflow",
    "websockets",
    "httpx",
    "aiohttp",
)
#: What is built on ``shared`` and so must never be imported by it.
ABOVE_SHARED = ("stream", "dags", "candlekeep")
#: What the core may import from ``shared``: itself and the base of user errors.
CORE_MAY_IMPORT = ("shared.core", "shared.errors")
MAX_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions too), as absolute names."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    return _imports(path.read_text(), package)


def _imports(source: str, package: list[str]) -> set[str]:
    """The modules (and ``module.name`` of each ``from`` import) ``source`` imports, relative
    imports resolved against ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing package
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


CORE_MODULES = sorted(_module_name(p) for p in CORE.glob("*.py"))


@pytest.mark.parametrize("module", CORE_MODULES)
def test_importing_a_core_module_loads_no_io_library(module):
    """In a fresh interpreter, so that nothing imported by another test hides the culprit."""
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {IO_LIBRARIES!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == [], f"importing {module} loads an I/O library"


def test_shared_imports_nothing_built_on_it():
    offending = {
        _module_name(path): sorted(n for n in _imported(path) if _within(n, ABOVE_SHARED))
        for path in SHARED.rglob("*.py")
    }
    assert {module: names for module, names in offending.items() if names} == {}


def test_the_core_imports_nothing_of_shared_but_itself():
    """Not shared.store or shared.batch (which do I/O), nor shared.config (the environment)."""
    offending = {
        _module_name(path): sorted(
            n
            for n in _imported(path)
            if _within(n, ("shared",)) and not _within(n, CORE_MAY_IMPORT)
        )
        for path in CORE.glob("*.py")
    }
    assert {module: names for module, names in offending.items() if names} == {}


def test_the_import_parser_finds_every_kind_of_import():
    """The checks above are only as good as ``_imports``: plain, from, relative and
    in-function imports must all be found."""
    source = (
        "import stream.worker\n"
        "from . import intervals\n"
        "from ..store import db\n"
        "def later():\n"
        "    from candlekeep.cli import main\n"
    )
    found = _imports(source, ["shared", "core"])
    assert {"stream.worker", "shared.core.intervals", "shared.store.db"} <= found
    assert "candlekeep.cli.main" in found
    assert "shared.store.redaction" in _imported(SHARED / "config.py")


def test_no_module_in_shared_is_over_400_lines():
    """A module that long holds more than one reason to change: split it by reason."""
    long = {
        str(path.relative_to(ROOT)): lines
        for path in SHARED.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}

"""The test tree's layout: shared code comes from helper modules, and every tests/test_*.py holds tests.

pytest imports each test module and conftest.py itself. Importing one of them again by module name
(``from conftest import ...``, ``from tests.test_x import ...``) runs the file a second time as another
module, with its own state beside pytest's copy, and makes a test module a library other tests depend
on. A helper module imported under two names (``x`` and ``tests.x``) is loaded twice the same way.
Shared code belongs in helper modules (tests/*.py not named test_*), shared fixtures in conftest.py
(taken as fixtures, never imported), and ``free_port`` comes from ``stack.processes``.

Each check is parametrized by file, so a failure names the file, and its message the line and import.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


def python_files(tests_dir: Path) -> list[Path]:
    """Every Python file of the test tree, caches left out."""
    return sorted(p for p in tests_dir.rglob("*.py") if "__pycache__" not in p.parts)


def collected_test_files(tests_dir: Path) -> list[Path]:
    """The files pytest collects as test modules (its default ``python_files``, which the project keeps)."""
    return [p for p in python_files(tests_dir) if p.name.startswith("test_")]


def imported_names(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything the file imports, at any depth (``from a import b`` gives ``a`` and
    ``a.b``, since ``b`` may be a module)."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return names


def _tree_module(name: str) -> str:
    """The test-tree file a dotted name starts with, by either spelling: ``tests.x.y`` and ``x.y`` both give ``x``."""
    parts = name.split(".")
    if parts[0] == "tests" and len(parts) > 1:
        parts = parts[1:]
    return parts[0]


def imports_of_tests_or_conftest(path: Path) -> list[str]:
    """Where ``path`` imports conftest or a test module by module name, as ``line N: name``."""
    found = {(line, name) for line, name in imported_names(path)
             if _tree_module(name) == "conftest" or _tree_module(name).startswith("test_")}  # fmt: skip
    return [f"line {line}: {name}" for line, name in sorted(found)]


def defines_a_test(path: Path) -> bool:
    """Whether the module holds a test pytest collects: a ``test*`` function or a ``Test*`` class with one."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            return True
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            if any(
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test")
                for item in node.body
            ):
                return True
    return False


def helper_modules(tests_dir: Path) -> list[str]:
    """The helper modules' names: tests/*.py that are neither conftest nor test modules."""
    return sorted(p.stem for p in tests_dir.glob("*.py") if p.stem != "conftest" and not p.name.startswith("test_"))


@functools.cache
def helper_spellings(tests_dir: Path) -> dict[str, dict[str, list[str]]]:
    """For each helper module, the spellings it is imported under (``x`` or ``tests.x``) and the files using each.

    A file that does not parse is left out here; its own import check reports it.
    """
    helpers = set(helper_modules(tests_dir))
    spellings: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in python_files(tests_dir):
        try:
            names = imported_names(path)
        except SyntaxError:
            continue
        for _, name in names:
            module = _tree_module(name)
            if module in helpers and name.split(".")[0] in (module, "tests"):
                spelling = "tests." + module if name.startswith("tests.") else module
                spellings[module][spelling].add(path.name)
    return {module: {s: sorted(files) for s, files in by.items()} for module, by in spellings.items()}


def _name(path: Path) -> str:
    return str(path.relative_to(TESTS_DIR))


@pytest.mark.parametrize("path", python_files(TESTS_DIR), ids=_name)
def test_no_file_imports_a_test_module_or_conftest(path: Path) -> None:
    found = imports_of_tests_or_conftest(path)
    assert not found, (
        f"tests/{_name(path)} imports a test module or conftest by module name ({'; '.join(found)}): import shared "
        "code from a helper module (tests/*.py not named test_*), take conftest's fixtures as fixtures, and "
        "free_port from stack.processes"
    )


@pytest.mark.parametrize("path", collected_test_files(TESTS_DIR), ids=_name)
def test_every_test_module_defines_a_test(path: Path) -> None:
    assert defines_a_test(path), (
        f"tests/{_name(path)} is named like a test module but defines no test: rename it (a helper module is "
        "not named test_*) or add its tests"
    )


@pytest.mark.parametrize("helper", helper_modules(TESTS_DIR))
def test_each_helper_module_is_imported_under_one_name(helper: str) -> None:
    spellings = helper_spellings(TESTS_DIR).get(helper, {})
    assert len(spellings) <= 1, f"tests/{helper}.py is imported as two modules, loaded twice: {spellings}"


def test_the_checks_see_the_layout_faults(tmp_path: Path) -> None:
    """The checks above on a small tree written here: each fault is found, and the fixed spellings pass."""
    (tmp_path / "conftest.py").write_text("import pytest\n")
    (tmp_path / "shared_things.py").write_text("VALUE = 1\n")
    (tmp_path / "test_holds_tests.py").write_text("def test_one():\n    assert True\n")
    (tmp_path / "test_holds_a_class.py").write_text("class TestThing:\n    def test_two(self):\n        pass\n")
    (tmp_path / "test_holds_none.py").write_text("def helper():\n    return 1\n\nclass TestEmpty:\n    pass\n")
    (tmp_path / "test_imports.py").write_text(
        "from conftest import free_port\n"
        "from tests.test_holds_tests import test_one\n"
        "from tests import conftest\n"
        "from shared_things import VALUE\n"
        "from mnist_client import contract\n"
        "def test_three():\n"
        "    import test_holds_a_class\n"
        "    from tests.shared_things import VALUE\n"
    )
    assert imports_of_tests_or_conftest(tmp_path / "test_imports.py") == [
        "line 1: conftest",
        "line 1: conftest.free_port",
        "line 2: tests.test_holds_tests",
        "line 2: tests.test_holds_tests.test_one",
        "line 3: tests.conftest",
        "line 7: test_holds_a_class",
    ]
    assert imports_of_tests_or_conftest(tmp_path / "test_holds_tests.py") == []
    assert [p.name for p in collected_test_files(tmp_path) if not defines_a_test(p)] == ["test_holds_none.py"]
    assert helper_spellings(tmp_path) == {
        "shared_things": {"shared_things": ["test_imports.py"], "tests.shared_things": ["test_imports.py"]}
    }

"""The shape of the code: layers, no cycles, small modules and functions, imports at the top.

The layer contracts live in ``.importlinter`` (import-linter); the rest are checked on the source text.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "cspml_flows"
CODE = [LIBRARY, ROOT / "benchmarks"]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# the one kind of import that may sit inside a function: an optional extra
OPTIONAL_EXTRAS = {"torch", "chgnet", "sevenn", "fireworks", "jobflow_remote", "mp_api", "mongomock"}
# and imports deferred on purpose, with the reason
DEFERRED = {
    "fcntl": "POSIX only: the file lock, so that importing the package works everywhere",
    "pymatgen.analysis.prototypes": "decodes the whole AFLOW prototype library on import; only labels need it",
}


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for folder in CODE:
        for path in sorted(folder.rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    return {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    return (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def test_import_linter_contracts_are_kept():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    exe = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(exe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_no_import_cycle_between_modules():
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("cspml_flows", "benchmarks")
    finally:
        sys.path.remove(str(ROOT))
    cycles = set()
    for a in graph.modules:
        for b in graph.find_modules_directly_imported_by(a) - {a}:
            back = graph.find_shortest_chain(importer=b, imported=a)
            if back:
                cycles.add(" -> ".join((a, *back)))
    assert not cycles, f"modules importing each other: {sorted(cycles)}"


def test_modules_and_functions_are_small():
    long_modules, long_functions = [], []
    for path, tree in _modules():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)} ({n})")
        for f in _functions(tree):
            length = f.end_lineno - f.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(ROOT)}:{f.lineno} {f.name} ({length})")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_imports_inside_functions_are_only_optional_extras():
    found = []
    for path, tree in _modules():
        skip = _type_checking_nodes(tree)
        for f in _functions(tree):
            for node in ast.walk(f):
                if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if (name or "").split(".")[0] not in OPTIONAL_EXTRAS and name not in DEFERRED:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, f"imports inside functions (only optional extras may be): {found}"


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"cspml_flows", "benchmarks"}:
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}: {private}")
    assert not found, f"private names imported across modules: {found}"


def _says_something(handler: ast.ExceptHandler) -> bool:
    """The handler re-raises, logs or warns."""
    for node in ast.walk(handler):
        if isinstance(node, ast.Raise):
            return True
        logs = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        if logs and node.func.attr in {"warning", "error", "exception", "warn", "info", "debug"}:
            return True
    return False


def test_no_silent_broad_except():
    """A broad except re-raises, logs, or says on its line why a failure there is an expected answer."""
    found = []
    for path, tree in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ExceptHandler):
                continue
            names = {ast.unparse(node.type)} if node.type is not None else {"bare"}
            explained = "#" in lines[node.lineno - 1]
            if names & {"Exception", "BaseException", "bare"} and not (_says_something(node) or explained):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"broad excepts that neither re-raise nor log: {found}"


@pytest.mark.parametrize("text", ["issue 1", "issue 2", "(issue "])
def test_no_tracker_numbers_in_code(text: str):
    found = [
        f"{p.relative_to(ROOT)}"
        for folder in CODE
        for p in folder.rglob("*.py")
        if any(f"{text}{d}" in p.read_text().lower() for d in "0123456789")
    ]
    assert not found, f"tracker numbers in code: {found}"


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(args: list[str]):
    exe = Path(sys.executable).parent / "ruff"
    if not exe.exists():
        pytest.skip("ruff is not installed (the test extra)")
    paths = ["src", "tests", "workflows", "benchmarks"]
    run = subprocess.run([str(exe), *args, *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

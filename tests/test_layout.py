"""The package's shape, read from the source with ast (nothing here imports neuslice):
no import cycles, the demo model zoo only behind the CLI, every package folder in pyproject.toml,
no spec citations in code."""
from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "neuslice"
# package name -> source folder, as pyproject.toml's package-dir maps them (neuslice/_triton is an untracked
# symlink to kernels/ in some checkouts; it is read through kernels/ only)
SOURCES = {"neuslice": PACKAGE, "neuslice._triton": ROOT / "kernels"}
# besides the CLI: the zoo itself and the deprecated shims that re-export it
MAY_IMPORT_MODELS = {"neuslice.models", "neuslice.data", "neuslice.datafiles"}
# compiled modules (setup.py's ext_modules, built from csrc/): imported by name, no Python source to walk
EXTENSIONS = {"neuslice._C"}


def _py_files(folder: Path):
    """Every .py file under ``folder``, not following symlinked folders (neuslice/_triton)."""
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or path.name == "__pycache__":
            continue
        if path.is_dir():
            yield from _py_files(path)
        elif path.suffix == ".py":
            yield path


def modules() -> Dict[str, Path]:
    """{dotted module name: file} for neuslice and neuslice._triton."""
    out = {}
    for pkg, folder in SOURCES.items():
        for path in _py_files(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _is_package(name: str, mods: Dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py" if name in mods else any(m.startswith(name + ".") for m in mods)


def _resolve(node: ast.ImportFrom, importer: str, mods: Dict[str, Path]) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer, mods):
        base = base[:-1]                                   # a module's relative imports start at its package
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _internal(name: str, mods: Dict[str, Path]) -> Optional[str]:
    """The module ``name`` names, or its closest enclosing module we have the source of; None if external."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in mods:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(mods: Optional[Dict[str, Path]] = None) -> Dict[str, Set[str]]:
    """{module: modules it imports}: every import statement anywhere in the file (inside functions too).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; importing a
    submodule does not count as importing its parent packages (Python runs their __init__ first, but that
    is not a dependency of the importer's making)."""
    mods = modules() if mods is None else mods
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name not in EXTENSIONS]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, mods)
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [sub if sub in mods else base for sub in subs if sub not in EXTENSIONS]
            else:
                continue
            deps |= {t for t in map(lambda t: _internal(t, mods), targets) if t and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}                             # 1: on the current path, 2: done
    path: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_module_walk_sees_the_package():
    mods = modules()
    assert {"neuslice", "neuslice.models", "neuslice.cli", "neuslice.ops._dispatch",
            "neuslice._triton.backend"} <= set(mods)
    graph = import_graph(mods)
    assert "neuslice.models" in graph["neuslice.cli.common"]          # `from .. import models`
    assert "neuslice._errors" in graph["neuslice._triton.backend"]    # through the package-dir mapping


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_imports_the_demo_models():
    graph = import_graph()
    bad = sorted(m for m, deps in graph.items() if "neuslice.models" in deps
                 and m not in MAY_IMPORT_MODELS and not (m == "neuslice.cli" or m.startswith("neuslice.cli.")))
    assert not bad, f"these modules import neuslice.models (the demo model zoo, for the CLI only): {bad}"


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    dirs = conf.get("package-dir", {})
    assert Path(dirs.get("neuslice._triton", "")) == Path("kernels"), "neuslice._triton must map to kernels/"
    assert (ROOT / "kernels" / "__init__.py").is_file()
    # every folder holding Python code (regular packages with __init__.py, and namespace folders too)
    folders = {".".join(("neuslice",) + p.parent.relative_to(PACKAGE).parts) for p in _py_files(PACKAGE)}
    missing = sorted(folders - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages does not name {missing}"
    for pkg in listed:                                    # and the list names no folder that is not there
        mapped = max((d for d in dirs if pkg == d or pkg.startswith(d + ".")), key=len, default=None)
        rest = pkg[len(mapped) + 1:].split(".") if mapped and pkg != mapped else []
        folder = ROOT.joinpath(dirs[mapped] if mapped else pkg.replace(".", "/"), *rest)
        assert folder.is_dir(), f"pyproject.toml names package {pkg!r} but {folder} is not a folder"


CITATION = re.compile(r"SPEC §|DESIGN\.md")


def _comments_and_docstrings(path: Path):
    """(line, text) of every comment and docstring (C/C++/CUDA: every // and /* */ comment)."""
    text = path.read_text(errors="replace")
    if path.suffix == ".py":
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                yield tok.start[0], tok.string
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield node.body[0].lineno, doc
    else:
        for m in re.finditer(r"//[^\n]*|/\*.*?\*/", text, re.S):
            yield text.count("\n", 0, m.start()) + 1, m.group()


def test_no_spec_citations_in_code():
    hits = []
    for folder in (PACKAGE, ROOT / "kernels", ROOT / "csrc"):
        for path in sorted(p for p in folder.rglob("*") if p.suffix in (".py", ".cpp", ".h", ".cu", ".cuh", ".hpp")
                           and "_triton" not in p.relative_to(ROOT).parts):
            hits += [f"{path.relative_to(ROOT)}:{line}" for line, text in _comments_and_docstrings(path)
                     if CITATION.search(text)]
    assert not hits, f"comments/docstrings cite SPEC § or DESIGN.md (cite docs/ instead): {hits}"


def _fenced_after(text: str, marker: str) -> str:
    """The first line of the first fenced code block after ``marker`` in ``text``."""
    rest = text[text.index(marker):]
    block = rest.split("```", 2)[1]
    return block.split("\n", 1)[1].strip()


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    head = readme[:readme.index("## Install")]      # both commands stand near the top
    test_cmd = _fenced_after(head, "Tests, from a clean clone")
    main_cmd = _fenced_after(head, "Main job, from a clean clone")
    assert "pytest" in test_cmd and "neuslice demo" in main_cmd
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    runs = [ln for ln in ci_lines if not ln.lstrip().startswith("#") and test_cmd in ln]
    assert runs and runs[0].startswith(test_cmd), (
        f".ci/run must run the README's test command verbatim:\n  README: {test_cmd}\n  .ci/run lines: "
        f"{[ln for ln in ci_lines if 'pytest' in ln]}")


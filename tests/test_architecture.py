"""The layout's rules (docs/architecture.md): no import cycles, ``sim`` below the apps,
generated files current, one declaration per key."""

from __future__ import annotations

import ast
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

from sim.compress import codec_names
from sim.config import SETTINGS, SplitConfig
from sim.config.tables import stale_files
from sim.run.cli import CLIENT_APP, SERVER_APP_MODULE, main

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sim", "strategies", "clients", "server_app", "experiments")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports at run time (any depth in the file, but not
    under ``if TYPE_CHECKING``), resolved to the most specific module that exists."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != me:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    resolve(a.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*up, base] if base else up)
                for a in child.names:
                    resolve(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def collapse(graph: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    """The graph between packages: every module named by its first ``depth`` parts."""
    out: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        ka = ".".join(a.split(".")[:depth])
        out[ka] |= {".".join(b.split(".")[:depth]) for b in targets} - {ka}
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert "sim.training.engine" in graph and "sim.wire.messages" in graph["sim.training.engine"]
    assert cycles(graph) == []


def test_packages_form_layers():
    """``sim.<package>`` depend on each other without cycles, and ``sim`` never on the
    apps, the strategy or the experiments (the CLI loads the Flower components by name)."""
    graph = import_graph()
    assert cycles(collapse(graph, 2)) == []
    sim_deps = {b for a, bs in graph.items() if a.startswith("sim") for b in bs}
    assert not {b for b in sim_deps if b.split(".")[0] in ("strategies", "clients", "server_app", "experiments")}


def test_generated_tables_are_current():
    """pyproject.toml's [tool.flwr.app.config], the README's and docs/compressors.md's
    tables are generated from the declarations: run ``python -m sim docs --write``."""
    assert stale_files() == []


def test_pyproject_holds_every_declared_key_with_its_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert list(table) == list(SETTINGS) and table == SplitConfig().to_run_config()
    assert SplitConfig.from_run_config(table) == SplitConfig()


def test_cli_names_the_components_pyproject_declares():
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components["clientapp"] == CLIENT_APP
    assert components["serverapp"].partition(":")[0] == SERVER_APP_MODULE


def test_cli_help_lists_every_key_and_codecs_lists_the_registry(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for key in SETTINGS:
        assert f"  {key} = " in help_text
    assert main(["codecs"]) == 0
    table = capsys.readouterr().out
    assert all(f"| `{name}` |" in table for name in codec_names()) and "| `none` | gradient |" in table
    assert main(["docs", "--check"]) == 0

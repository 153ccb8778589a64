"""Layers that only look down, modules without cycles, no private name across modules (checked on the AST).

The packages are layers, lowest first: ``rankers`` < ``envs`` < ``offline_data`` < ``agents`` < ``scripts``.
A module may import its own package and the layers below it, never a layer above (every import counts: at
module level, inside a function, under ``TYPE_CHECKING``, relative, or through ``importlib.import_module``).
Within the project no two modules import each other, directly or through others. No module imports a private
name (``_x``) of another module: what is shared has a public name in one home.

The registered gym entry points are strings that gymnasium resolves when an env is made (``envs`` names the
entry points of :mod:`offline_data.provision`, which provision the learned models before they build the env);
they are not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS: tuple[str, ...] = ("rankers", "envs", "offline_data", "agents", "scripts")
"""The packages, lowest layer first."""


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: path}`` of every module of the layers."""
    return {module_name(p, root): p for pkg in LAYERS for p in sorted((root / pkg).rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, str | None, int]]:
    """Every import of the module ``name`` at ``path``: ``(module, imported name or None, line)``; relative
    imports resolved, ``importlib.import_module("x")`` / ``__import__("x")`` with a literal counted."""
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([mod] if mod else [])])
            out += [(mod, a.name, node.lineno) for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")):
            out.append((node.args[0].value, None, node.lineno))
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: project modules it imports}`` (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for mod, what, _ in imports(path, name):
            target = f"{mod}.{what}" if what and f"{mod}.{what}" in mods else mod
            while target and target not in mods:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(mods: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in mods.items():
        layer = LAYERS.index(name.split(".")[0])
        for mod, what, line in imports(path, name):
            top = mod.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > layer:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}{'.' + what if what else ''} "
                           f"({top} is above {LAYERS[layer]})")
    return bad


def private_imports(mods: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in mods.items():
        for mod, what, line in imports(path, name):
            parts = [*mod.split("."), *([what] if what else [])]
            if mod.split(".")[0] in LAYERS and any(p.startswith("_") and not p.startswith("__") for p in parts):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the private {mod}{'.' + what if what else ''}")
    return bad


def test_layers_only_look_down() -> None:
    mods = project_modules()
    assert len(mods) > 40 and all(any(m.startswith(p + ".") for m in mods) for p in LAYERS)
    bad = upward_imports(mods)
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(import_graph(project_modules()))
    assert not found, f"modules that import each other (directly or through others): {found}"


def test_no_private_name_is_imported_from_another_module() -> None:
    bad = private_imports(project_modules())
    assert not bad, "private names imported across modules (give them a public name in one home):\n" + "\n".join(bad)


def test_the_checks_see_every_kind_of_import(tmp_path: Path) -> None:
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "rankers" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from envs.x import Y\n"
        "def f():\n    from . import b\n    import importlib\n    importlib.import_module('agents.z')\n")
    (tmp_path / "rankers" / "b.py").write_text("from rankers.a import _hidden\n")
    mods = project_modules(tmp_path)
    found = {(m, w) for m, w, _ in imports(mods["rankers.a"], "rankers.a")}
    assert {("envs.x", "Y"), ("rankers", "b"), ("agents.z", None)} <= found
    assert cycles(import_graph(mods)) == [["rankers.a", "rankers.b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize(("source", "words"), [("from envs.feed_env import FeedEnv", "envs is above rankers"),
                                               ("from rankers.types import _private", "imports the private")])
def test_the_checks_name_the_offence(source: str, words: str, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "rankers").mkdir()
    (tmp_path / "rankers" / "m.py").write_text(source + "\n")
    mods = {"rankers.m": tmp_path / "rankers" / "m.py"}
    assert any(words in line for line in [*upward_imports(mods), *private_imports(mods)])

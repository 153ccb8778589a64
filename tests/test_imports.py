"""The recommender cannot see the truth: no module in rankers/ imports envs (checked on the AST)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the rankers package
                mods.add("rankers" + ("." + node.module if node.module else ""))
            elif node.module:
                mods.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            mods.add(str(node.args[0].value))
    return mods


def test_rankers_never_import_envs() -> None:
    files = sorted((ROOT / "rankers").rglob("*.py"))
    assert len(files) >= 5
    offenders = {
        str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m == "envs" or m.startswith("envs."))
        for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"rankers/ must not import envs/: {offenders}"


def test_checker_sees_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import envs.world\nfrom envs import config\ndef g():\n    import envs\n")
    assert imported_modules(f) == {"envs.world", "envs"}

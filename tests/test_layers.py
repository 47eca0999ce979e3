"""Layer rules of DESIGN §2, checked two ways: an AST walk over every import statement
(including imports inside functions), and import-linter with the contracts in pyproject.toml.

- app/engine is a pure library: no web, DB or queue code, no other ``app.*`` package.
- app/client imports only app.schemas (and itself) from the project.
- workers never import the routes (app.api).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WEB_DB_QUEUE = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg",
                "celery", "kombu", "redis", "httpx", "boto3", "botocore", "prometheus_client")


def imports_of(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            yield node.lineno, base
            # ``from app import db`` imports the package app.db.
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def violations(package: str, allowed: Callable[[str], bool]) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, mod in imports_of(path):
            if not allowed(mod):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    return out


def _under(mod: str, roots: tuple[str, ...]) -> bool:
    return any(mod == r or mod.startswith(r + ".") for r in roots)


def _project(mod: str) -> bool:
    return _under(mod, ("app", "workers"))


def test_engine_is_pure() -> None:
    def ok(mod: str) -> bool:
        if _under(mod, WEB_DB_QUEUE):
            return False
        # Within the project only app.engine itself (``from app import engine`` is fine too).
        return not _project(mod) or mod in ("app", "app.engine") or _under(mod, ("app.engine",))

    assert violations("app/engine", ok) == []


def test_client_uses_only_schemas() -> None:
    def ok(mod: str) -> bool:
        if not _project(mod):
            return True
        return mod in ("app", "app.client", "app.schemas") or _under(
            mod, ("app.client", "app.schemas"))

    assert violations("app/client", ok) == []


def test_workers_never_import_routes() -> None:
    assert violations("workers", lambda m: not _under(m, ("app.api", "app.main"))) == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a function-level import and a relative import are both seen."""
    probe = tmp_path / "app" / "engine" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    import fastapi\n    from ..db import session\n")
    found = {m for _, m in imports_of(probe, tmp_path)}
    assert "fastapi" in found and "app.db.session" in found


def test_import_linter_contracts() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    try:
        res = subprocess.run([*cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    except FileNotFoundError:
        pytest.fail("lint-imports (import-linter) is not installed")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "broken" not in res.stdout.lower() or " 0 broken" in res.stdout.lower()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

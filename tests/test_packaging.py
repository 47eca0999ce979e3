"""The built wheel ships what the API serves from inside the package: the dashboard's page,
scripts and styles (``app/api/dashboard/static``, package-data in pyproject.toml). Without
them an installed (non-editable) server answers 404 at /ui."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "app" / "api" / "dashboard" / "static"


def test_wheel_ships_the_dashboard_assets(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy: no build/ or egg-info left in the checkout
    for name in ("app", "workers"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # No build isolation: setuptools from this environment, nothing downloaded.
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("modelpress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = sorted(p.relative_to(ROOT).as_posix() for p in STATIC.iterdir() if p.is_file())
    assert {"app/api/dashboard/static/index.html", "app/api/dashboard/static/app.js"} <= set(assets)
    missing = [a for a in assets if a not in names]
    assert not missing, f"not in {wheel.name}: {missing}"

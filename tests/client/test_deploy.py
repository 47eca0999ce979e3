"""Deployment files: docker-compose.yml, Dockerfile and the README's settings table.

No Docker engine runs here. ``docker compose config`` (or the v1 ``docker-compose config``)
only parses the file, so it runs when either is installed; the structural checks below run
everywhere and catch what a parse cannot: a misspelt MODELPRESS_ variable, a service that
would not wait for migrations, a worker that could not be scaled.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_VARS = {f"MODELPRESS_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def test_compose_config_parses() -> None:
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the "
                    "structural tests in this file still check the file")
    res = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_compose_services_and_ordering(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"api", "worker", "postgres", "redis", "migrate"} <= set(services)
    migrate = services["migrate"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
    # `--scale worker=N` needs no fixed name and no published port on the worker.
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["build"]["target"] == "worker" and services["migrate"]["build"]["target"] == "api"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]


def test_compose_env_names_are_real_settings(compose: dict[str, Any]) -> None:
    used = set()
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        used |= {k for k in env if k.startswith("MODELPRESS_")}
    assert used, "no MODELPRESS_ variables set"
    assert used <= SETTINGS_VARS, sorted(used - SETTINGS_VARS)
    env = compose["services"]["api"]["environment"]
    assert env["MODELPRESS_DATABASE_URL"].startswith("postgresql://")
    assert env["MODELPRESS_BROKER_URL"].startswith("redis://")
    s = Settings(database_url=env["MODELPRESS_DATABASE_URL"],
                 broker_url=env["MODELPRESS_BROKER_URL"])
    assert s.resolved_storage_backend == "postgres" and not s.resolved_dev_key_bootstrap


def test_dockerfile_targets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I)
    names = {name for _, name in stages}
    assert {"base", "api", "worker"} <= names, stages
    parents = dict((name, image) for image, name in stages)
    assert parents["worker"] == "deps-cuda" and parents["api"] == "deps-cpu"
    # torch is pinned exactly and installed before the lock in both dependency stages.
    assert len(re.findall(r"pip install [^\n]*torch==2\.13\.0", text)) == 2
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore and "var" in ignore


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(v for v in SETTINGS_VARS if f"`{v}`" not in readme)
    assert not missing, f"README's configuration table lacks {missing}"
    first, second = re.findall(r"^\s*make (\w+)\s*$", readme, re.M)[:2]
    assert (first, second) == ("run", "test")

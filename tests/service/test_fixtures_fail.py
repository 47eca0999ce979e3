"""The service fixtures FAIL, never skip, when Postgres or Redis cannot be reached (so CI
cannot pass green without them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("var", "value", "message"), [
    ("MODELPRESS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:1/postgres",
     "Postgres unreachable"),
    ("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:1", "Redis unreachable"),
])
def test_unreachable_server_is_an_error(var: str, value: str, message: str) -> None:
    env = {**os.environ, var: value}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
         "tests/service/test_health.py::test_healthz_readyz_metrics"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-2000:]
    assert message in out and "1 error" in out and "skipped" not in out, out[-2000:]

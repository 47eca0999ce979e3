"""``modelpress serve``, the embedded default: from an empty directory it migrates SQLite,
prints a development key (and the same key on the next start), serves the API and runs a
job through its own Celery worker on kombu's SQLAlchemy broker, then stops both children
on SIGTERM, leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.client.conftest import ROOT, Cli, free_port, wait_http

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

FAST_RECIPE = json.dumps({"prune_ratio": 0.0, "quant": "int8_static", "distill_epochs": 0})


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/pid/stat: ppid
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Serve:
    def __init__(self, cwd: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        self.log = cwd / f"serve-{port}.log"
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=cwd,
                env={**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}, stdout=f,
                stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self) -> None:
        wait_http(self.url + "/healthz", self.proc, self.log, timeout_s=120)
        deadline = time.monotonic() + 60
        while "ModelPress is up" not in self.output() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> tuple[int, float, list[int]]:
        kids = children_of(self.proc.pid)
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return rc, time.monotonic() - t0, kids


def test_serve_from_empty_directory(tmp_path: Path, mlp_files: dict[str, Path]) -> None:
    serve = Serve(tmp_path, free_port())
    try:
        serve.wait_up()
        key_file = tmp_path / "var" / "dev-api-key"
        key = key_file.read_text().strip()
        assert key.startswith("mp_") and key in serve.output()
        assert (key_file.stat().st_mode & 0o777) == 0o600
        assert (tmp_path / "var" / "modelpress.db").is_file()

        # The CLI finds the key in ./var/dev-api-key by itself (no --key, no env).
        cli = Cli(serve.url, "", tmp_path)
        env = {k: v for k, v in cli.env().items() if k != "MODELPRESS_API_KEY"}
        res = subprocess.run([sys.executable, "-m", "app.cli", "list"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr

        # A job through the embedded worker (same task code as production).
        up = cli("upload-model", str(mlp_files["pt2"]), "--key", key, "--json")
        assert up.rc == 0, up.err
        name = json.loads(up.out)["inputs"][0]["name"]
        x, y = np.load(mlp_files["x"])[:600], np.load(mlp_files["y"])[:600]
        np.savez(tmp_path / "data.npz", **{name: x, "labels": y})
        r = cli("submit", "--model", json.loads(up.out)["id"], "--data",
                str(tmp_path / "data.npz"), "--recipe", FAST_RECIPE, "--batch-size", "64",
                "--threads", "1", "--device", "cpu", "--wait", "--poll-s", "0.3",
                "--key", key)
        assert r.rc == 0, r.out + r.err + serve.output()[-3000:]
        assert "status     succeeded" in r.out
        assert list((tmp_path / "var" / "artifacts").rglob("model.onnx"))
    finally:
        rc, took, kids = serve.stop()
    assert rc == 0, serve.output()[-3000:]
    assert len(kids) == 2 and not any(alive(k) for k in kids), kids
    assert took < 30, took

    # Second start: same key printed again (read back from ./var/dev-api-key).
    again = Serve(tmp_path, free_port())
    try:
        again.wait_up()
        assert key in again.output()
    finally:
        rc, _, kids = again.stop()
    assert rc == 0 and not any(alive(k) for k in kids)

"""The ``modelpress`` CLI against a real server over HTTP, with a real worker and engine.

Each command runs as a subprocess, as a user runs it: exit codes, what lands on stdout and
stderr, and that no traceback ever reaches the user.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.client.sdk import Client
from tests.client.conftest import Cli

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

FAST_RECIPE = json.dumps({"prune_ratio": 0.0, "quant": "int8_static", "distill_epochs": 0})
JOB_ID = re.compile(r"job ([0-9a-zA-Z_-]{8,}) queued")


@pytest.fixture(scope="session")
def files(mlp_files: dict[str, Path], live_server: str, client_key: str,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The MLP's .pt2 and a data.npz keyed by its input name (learned by an SDK upload)."""
    with Client(live_server, client_key) as c:
        name = c.upload_model(mlp_files["pt2"]).inputs[0].name
    out = tmp_path_factory.mktemp("cli-files")
    x, y = np.load(mlp_files["x"]), np.load(mlp_files["y"])
    np.savez(out / "data.npz", **{name: x[:600], "labels": y[:600]})
    np.savez(out / "wrong.npz", **{"not_" + name: x[:600]})
    (out / "junk.pt2").write_bytes(b"this is not a torch.export archive\n" * 10)
    return {"pt2": mlp_files["pt2"], "data": out / "data.npz", "wrong": out / "wrong.npz",
            "junk": out / "junk.pt2"}


def no_traceback(*texts: str) -> None:
    for t in texts:
        assert "Traceback" not in t, t


def test_submit_wait_download_runs_in_onnxruntime(cli: Cli, files: dict[str, Path],
                                                  mlp_files: dict[str, Path],
                                                  pg_worker: object, tmp_path: Path) -> None:
    import onnxruntime as ort

    r = cli("submit", str(files["pt2"]), "--data", str(files["data"]), "--recipe", FAST_RECIPE,
            "--batch-size", "64", "--threads", "1", "--time-budget-s", "180",
            "--metric", "accuracy", "--device", "cpu", "--wait", "--poll-s", "0.2")
    no_traceback(r.out, r.err)
    assert r.rc == 0, r.out + r.err
    m = JOB_ID.search(r.err)
    assert m, r.err
    job_id = m.group(1)
    # The progress bar (stderr is not a terminal here: one line per stage) reached 100 %.
    bars = [ln for ln in r.err.splitlines() if ln.startswith("[")]
    assert bars and "100.0%" in bars[-1] and "succeeded" in bars[-1], r.err
    assert f"job        {job_id}" in r.out and "status     succeeded" in r.out
    assert re.search(r"^artifact   model\.onnx\s+\d+\.\d{3} MB  sha256 [0-9a-f]{64}$", r.out,
                     re.M), r.out
    assert re.search(r"^ratios     [\d.]+x smaller.*accuracy drop -?[\d.]+ \(95% interval "
                     r"[-+][\d.]+ to [-+][\d.]+\)$", r.out, re.M), r.out
    # 120 held-out samples (20 % of 600): the CLI shows the job's warning.
    assert re.search(r"^warning    the hold-out has only 120 samples.*eval_dataset_id", r.out,
                     re.M), r.out

    out_dir = tmp_path / "dl"
    d = cli("download", job_id, "--name", "model.onnx", "--out", str(out_dir))
    assert d.rc == 0 and "sha256 verified" in d.out, d.out + d.err
    onnx_path = out_dir / "model.onnx"
    assert not list(out_dir.glob(".*.part"))
    status = json.loads(cli("status", job_id, "--json").out)
    assert status["status"] == "succeeded" and status["progress"] == 1.0
    with Client(cli.url, cli.key) as c:
        arts = {a.name: a for a in c.artifacts(job_id).items}
    data = onnx_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == arts["model.onnx"].sha256
    assert len(data) == arts["model.onnx"].size_bytes == status["metrics"]["best"]["size_bytes"]

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.load(mlp_files["x"])[600:856]  # samples the job never saw
    y = np.load(mlp_files["y"])[600:856]
    ref = np.load(mlp_files["logits"])[600:856]
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert out.shape == (256, 10)
    assert float((out.argmax(1) == ref.argmax(1)).mean()) >= 0.95
    assert float((out.argmax(1) == y).mean()) >= float((ref.argmax(1) == y).mean()) - 0.05

    rep = cli("report", job_id)
    assert rep.rc == 0 and isinstance(json.loads(rep.out), dict) and json.loads(rep.out)
    listed = cli("list", "--status", "succeeded")
    assert listed.rc == 0 and job_id in listed.out

    every = cli("download", job_id, "--all", "--out", str(tmp_path / "all"))
    assert every.rc == 0
    assert {p.name for p in (tmp_path / "all").iterdir()} == set(arts)


def test_problems_are_printed_precisely(cli: Cli, files: dict[str, Path]) -> None:
    r = cli("status", "00000000-0000-0000-0000-000000000000")
    no_traceback(r.out, r.err)
    assert r.rc == 1 and r.out == ""
    assert "error: Not Found (HTTP 404, code not_found)" in r.err and "not found" in r.err

    r = cli("list", "--key", "mp_not_a_real_key")
    no_traceback(r.err)
    assert r.rc == 1 and "(HTTP 401, code unauthorized)" in r.err, r.err

    r = cli("upload-model", str(files["junk"]))
    no_traceback(r.err)
    assert r.rc == 1 and "HTTP 422, code invalid_model" in r.err, r.err

    model_id = cli("upload-model", str(files["pt2"])).out.strip()
    r = cli("upload-data", str(files["wrong"]), "--model", model_id)
    no_traceback(r.err)
    assert r.rc == 1 and "HTTP 422, code input_mismatch" in r.err, r.err
    assert "not_" in r.err  # the detail names the offending input

    r = cli("status", "x", "--url", "http://127.0.0.1:9")  # nothing listens on port 9
    no_traceback(r.err)
    assert r.rc == 1 and "code unreachable" in r.err, r.err

    r = cli("download", "00000000-0000-0000-0000-000000000000", "--out", str(cli.cwd / "o"))
    assert r.rc == 1 and "code not_found" in r.err and not list((cli.cwd / "o").glob("*"))


def test_invalid_requests_are_refused_before_uploading(cli: Cli, files: dict[str, Path]) -> None:
    before = Client(cli.url, cli.key).list_models(limit=100).items
    r = cli("submit", str(files["pt2"]), "--data", str(files["data"]), "--max-size-mb", "-1")
    no_traceback(r.err)
    assert r.rc == 2 and "code validation_error" in r.err and "max_size_mb" in r.err, r.err
    r = cli("submit", str(files["pt2"]), "--data", str(files["data"]))
    assert r.rc == 2 and "state at least one of" in r.err, r.err
    r = cli("submit", str(files["pt2"]), "--data", str(files["data"]),
            "--recipe", '{"prune_ratio": 0.5, "colour": "red"}')
    assert r.rc == 2 and "colour" in r.err, r.err
    after = Client(cli.url, cli.key).list_models(limit=100).items
    assert len(after) == len(before)  # nothing was uploaded for a request that cannot run


def test_cancel_a_running_job(cli: Cli, files: dict[str, Path], pg_worker: object) -> None:
    slow = json.dumps({"prune_ratio": 0.5, "quant": "int8_static", "distill_epochs": 500})
    r = cli("submit", str(files["pt2"]), "--data", str(files["data"]), "--recipe", slow,
            "--batch-size", "64", "--threads", "1", "--time-budget-s", "600", "--device", "cpu")
    assert r.rc == 0, r.err
    job_id = r.out.strip()
    with Client(cli.url, cli.key) as c:
        deadline = time.monotonic() + 180
        while c.get_job(job_id).status == "queued" and time.monotonic() < deadline:
            time.sleep(0.2)
        r = cli("cancel", job_id)
        assert r.rc == 0 and job_id in r.out, r.err
        job = c.wait(job_id, poll_s=0.2, timeout_s=180)
    assert job.status == "cancelled" and job.error is not None and job.error.code == "cancelled"
    r = cli("cancel", job_id)  # cancelling twice is harmless
    assert r.rc == 0 and "cancelled" in r.out
    s = cli("status", job_id)
    assert s.rc == 0 and "status     cancelled" in s.out and "error      cancelled" in s.out


def test_admin_create_key_isolates_tenants(cli: Cli, pg_env_vars: dict[str, str],
                                           files: dict[str, Path]) -> None:
    env = {"MODELPRESS_DATABASE_URL": pg_env_vars["MODELPRESS_DATABASE_URL"]}
    r = cli("admin", "create-key", "--tenant", "other-team", env=env)
    no_traceback(r.err)
    assert r.rc == 0, r.err
    other = r.out.strip()
    assert other.startswith("mp_") and other != cli.key
    mine = cli("upload-model", str(files["pt2"])).out.strip()
    r = cli("list", "--key", other)
    assert r.rc == 0 and len(r.out.strip().splitlines()) == 1  # the header, no jobs
    r = cli("upload-data", str(files["data"]), "--model", mine, "--key", other)
    assert r.rc == 1 and "code not_found" in r.err, r.err  # another tenant's id is a 404


def test_output_into_a_closed_pipe_is_quiet(cli: Cli) -> None:
    """``modelpress status ID | head -1`` printed a BrokenPipeError and exited 1. Here the
    reader is gone before the first byte (the read end closed), so every write fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, "-m", "app.cli", "list"], cwd=cli.cwd,
                             env=cli.env(), stdout=write, stderr=subprocess.PIPE, text=True,
                             timeout=120)
    finally:
        os.close(write)
    assert res.returncode == 0, res.stderr
    assert "BrokenPipe" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert res.stderr == ""


def test_admin_create_key_refuses_a_database_that_is_not_there(cli: Cli,
                                                               tmp_path: Path) -> None:
    """Run from another directory, the relative SQLite default used to create a new empty
    database there and print a key that the server (reading its own database) answered 401."""
    r = cli("admin", "create-key", "--tenant", "lost")  # no MODELPRESS_DATABASE_URL: default
    assert r.rc == 1 and r.out == "", r.out
    where = (cli.cwd / "var" / "modelpress.db").resolve()
    assert f"no database at {where}" in r.err and "MODELPRESS_DATABASE_URL" in r.err, r.err
    no_traceback(r.err)
    assert not (cli.cwd / "var").exists()  # nothing created


def test_compress_prints_no_library_import_noise(cli: Cli, files: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """torchao printed "Failed to load ..._C_mxfp8...so" (its CUDA kernels) on every run."""
    r = cli("compress", str(files["junk"]), "--data", str(files["data"]), "--out",
            str(tmp_path / "out"), "--max-size-mb", "1")
    assert r.rc != 0 and "invalid_model" in r.err, r.err
    for noise in ("Failed to load", "_C_mxfp8", "_pytree"):
        assert noise not in r.err, r.err

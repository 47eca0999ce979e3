"""``modelpress serve``: the embedded default, one command and no external server.

It creates ./var, migrates the database (SQLite by default) with Alembic, makes sure a
development API key exists and prints it, then runs two child processes:

- the API: ``uvicorn --factory app.main:create_app`` on 127.0.0.1:8000,
- one Celery worker (which also runs the reaper and reconciler) on the configured broker,
  kombu's SQLAlchemy transport over ./var/broker.db by default: the production task code.

SIGINT / SIGTERM are forwarded; both children are stopped (worker: warm, then cold shutdown;
a job cut short is redelivered and its lease reclaimed on the next start). If either child dies,
the other is stopped too and the exit status is non-zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from app.config import Settings, get_settings

STOP_GRACE_S = 10.0  # seconds a child gets after SIGTERM before the next, harder signal
READY_TIMEOUT_S = 60.0  # seconds to wait for /healthz before telling the user it is up


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


def ensure_dev_key(settings: Settings) -> str | None:
    """Create the dev key on first start (saved to ``settings.dev_key_file``); later starts
    read it back from that file. Returns the key, or None when neither works."""
    from app.main import bootstrap_dev_key

    if not settings.resolved_dev_key_bootstrap:
        return None
    key = bootstrap_dev_key(settings)  # prints it itself when it creates one
    if key is not None:
        return key
    try:
        key = settings.dev_key_file.read_text().strip() or None
    except OSError:
        key = None
    if key:
        print(f"ModelPress development API key (from {settings.dev_key_file}): {key}",
              file=sys.stderr)
    else:
        print(f"The development key exists but {settings.dev_key_file} is gone; make a new "
              "one with: modelpress admin create-key --tenant dev", file=sys.stderr)
    return key


def _spawn(name: str, cmd: list[str]) -> Child:
    # Own session: a terminal's Ctrl-C reaches only us, and we stop the children in order.
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    return Child(name, proc)


def _signal(child: Child, sig: signal.Signals, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(child.proc.pid, sig)
        else:
            child.proc.send_signal(sig)


def stop(children: list[Child]) -> None:
    """TERM (uvicorn: graceful; Celery: warm shutdown, finish the task), then QUIT (Celery:
    cold shutdown, the task is redelivered), then KILL whatever is left of each group."""
    for sig, group in ((signal.SIGTERM, False), (signal.SIGQUIT, False),
                       (signal.SIGKILL, True)):
        alive = [c for c in children if c.proc.poll() is None]
        if not alive:
            break
        for c in alive:
            # Only the leader: it stops its own pool / beat children in order.
            _signal(c, sig, group)
        deadline = time.monotonic() + STOP_GRACE_S
        for c in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    for c in children:  # stray grandchildren (a pool process that outlived its parent)
        _signal(c, signal.SIGKILL, group=True)


def _wait_ready(url: str, api: Child) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and api.proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def serve(host: str = "127.0.0.1", port: int = 8000, concurrency: int = 1,
          beat: bool = False) -> int:
    from app.db.migrate import upgrade

    settings = get_settings()
    Path("var").mkdir(exist_ok=True)
    for d in (settings.storage_dir, settings.tmp_dir):
        if d is not None and settings.resolved_storage_backend == "local":
            d.mkdir(parents=True, exist_ok=True)
    print(f"migrating {settings.database_url.split('@')[-1]}", file=sys.stderr)
    upgrade(settings.database_url)
    key = ensure_dev_key(settings)

    py = sys.executable
    api_cmd = [py, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", host,
               "--port", str(port), "--no-access-log"]
    worker_cmd = [py, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", "cpu,gpu",
                  "-c", str(concurrency), "--pool", "prefork", "-l", "INFO",
                  "-n", f"embedded-{os.getpid()}@%h",
                  # The SQLAlchemy transport has no broadcast: no gossip/mingle/heartbeat.
                  "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if beat:  # the worker runs the reaper itself (reaper_in_worker); beat only if asked
        worker_cmd += ["-B", "-s", str(Path("var") / "celerybeat-schedule")]

    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children = [_spawn("api", api_cmd), _spawn("worker", worker_cmd)]
    rc = 0
    try:
        url = f"http://{host}:{port}"
        if _wait_ready(url, children[0]):
            print(f"\nModelPress is up: API {url} (docs {url}/docs), one worker.",
                  file=sys.stderr)
            if key:
                print(f"  export MODELPRESS_API_KEY={key}", file=sys.stderr)
            print("  Ctrl-C stops both.", file=sys.stderr)
        while not stopping:
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                for c in dead:
                    print(f"modelpress serve: {c.name} exited with {c.proc.returncode}; "
                          "stopping", file=sys.stderr)
                rc = 1
                break
            time.sleep(0.2)
    finally:
        print("modelpress serve: stopping the API and the worker", file=sys.stderr)
        stop(children)
        for s, h in old.items():
            signal.signal(s, h)
    return rc

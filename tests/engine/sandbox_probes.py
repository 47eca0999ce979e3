"""Code that tests run inside the real sandbox child (``sandbox.run_in_sandbox`` targets).

Each probe has the signature of the production target, ``f(path, fmt, **options)``, and runs
after the child has set up its namespace, limits and (unless disabled) audit hook, exactly as
the loader does. Not a test module: nothing here is collected by pytest.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
from pathlib import Path
from typing import Any


def connect(path: Path, fmt: str, **options: object) -> dict[str, Any]:
    """Try a TCP connection to every ``[host, port]`` listed in the JSON file ``path``.

    Returns ``{"host:port": "connected" | "<ERRNO NAME>" | "<exception type>: ..."}``.
    """
    results: dict[str, str] = {}
    for host, port in json.loads(Path(path).read_text()):
        try:
            with socket.create_connection((host, int(port)), timeout=3):
                results[f"{host}:{port}"] = "connected"
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, "") if e.errno else ""
            results[f"{host}:{port}"] = name or f"{type(e).__name__}: {e}"
        except Exception as e:  # the audit hook's PermissionError is an OSError too
            results[f"{host}:{port}"] = f"{type(e).__name__}: {e}"
    return {"results": results, "netns": os.readlink("/proc/self/ns/net")}


def abort(path: Path, fmt: str, **options: object) -> dict[str, Any]:
    """A loader that dies of SIGABRT (like a failed C++ assertion in a native loader)."""
    os.abort()


def segfault(path: Path, fmt: str, **options: object) -> dict[str, Any]:
    """A loader that dies of SIGSEGV (a native parser reading a bad pointer)."""
    ctypes.string_at(0)
    return {}


def hog_memory(path: Path, fmt: str, **options: object) -> dict[str, Any]:
    """A loader that allocates without bound (a header claiming a huge tensor)."""
    blocks = []
    while True:
        blocks.append(bytearray(256 << 20))  # 256 MiB at a time, touched by bytearray()

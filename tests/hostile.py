"""Builders of hostile files shared by the engine and service attack tests.

Every payload here is live: loading it with the unsafe call it targets (``pickle.loads``,
``torch.load(weights_only=False)``, ``np.load(allow_pickle=True)``) creates its marker
directory, which the tests check for (see ``tests/service/test_attacks.py`` controls).
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np


class Touch:
    """A pickle payload that creates a marker directory when unpickled (proves nothing ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def rewrite_zip(src: Path, dst: Path, edit: dict[str, bytes | None] | None = None,
                add: dict[str, bytes] | None = None) -> Path:
    """Copy a zip member by member; ``edit`` maps a name suffix to new bytes (None = drop).

    ``add`` names may start with ``<root>`` (the archive's top-level folder).
    """
    edit = edit or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            hit = next((k for k in edit if info.filename.endswith(k)), None)
            new = zin.read(info) if hit is None else edit[hit]
            if new is not None:
                zout.writestr(info, new)
        root = zin.namelist()[0].split("/", 1)[0]
        for name, data in (add or {}).items():
            zout.writestr(name.replace("<root>", root), data)
    return dst


def read_member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


def add_symlink_member(path: Path, name: str, target: str) -> Path:
    """Append a member whose Unix mode says it is a symlink to ``target``."""
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, target)
    return path


def overlapping_zip(names: list[str], data: bytes) -> bytes:
    """A zip whose central directory lists every name at the same local header (the
    "non-recursive" zip bomb: N entries, one copy of the bytes). Stored, not deflated."""
    crc = zlib.crc32(data)
    first = names[0].encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data),
                        len(first), 0) + first + data
    central = b""
    for name in names:
        raw = name.encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc,
                               len(data), len(data), len(raw), 0, 0, 0, 0, 0, 0) + raw
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(names), len(names), len(central),
                      len(local), 0)
    return local + central + end


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def safetensors_bytes(header: Mapping[str, object], data: bytes = b"",
                      header_len: int | None = None) -> bytes:
    """A .safetensors file: 8-byte little-endian header length, JSON header, raw data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data

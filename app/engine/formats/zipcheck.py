"""Structural zip checks shared by ``.pt2`` and ``.npz``: traversal, symlinks, bomb sizes.

Only the central directory is read (no member is decompressed), and nothing heavy is imported,
so the data-file sandbox child can use it without torch.
"""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path, PurePosixPath

from app.engine.errors import InvalidModel, UnsafeModel

# Zip bomb guards. A .pt2 stores members uncompressed, so a real one has ratio ~1.
MAX_MEMBERS = 100_000
MAX_RATIO = 100.0  # uncompressed / compressed bytes, per member and overall
_RATIO_FLOOR_BYTES = 1 << 20  # ratios are only judged on members larger than 1 MiB


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why this zip member is unsafe by its name/attributes alone, or None."""
    name = info.filename
    if not name or "\x00" in name or "\\" in name:
        return "contains a NUL or backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..'"
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):
        return "is a symlink"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return None


def inspect_zip(
    path: Path, *, max_uncompressed_bytes: int, what: str = "archive"
) -> list[zipfile.ZipInfo]:
    """Structural zip checks shared by .pt2 and .npz: traversal, symlinks, bomb sizes.

    Returns the member list. Raises UnsafeModel for hostile structure and InvalidModel for a
    file that is not a readable zip (callers for data files translate the class).
    """
    try:
        size_on_disk = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise InvalidModel(
            f"{what} {path.name!r} is not a readable zip (truncated or corrupt): {e}",
            details={"file": path.name},
        ) from e
    if len(infos) > MAX_MEMBERS:
        raise UnsafeModel(f"{what} has {len(infos)} members (limit {MAX_MEMBERS})")
    seen: set[str] = set()
    total = 0
    total_compressed = 0
    for info in infos:
        problem = _member_problem(info)
        if problem:
            raise UnsafeModel(f"{what} member {info.filename!r} {problem}",
                              details={"member": info.filename})
        if info.filename in seen:
            raise UnsafeModel(f"{what} has a duplicate member {info.filename!r}")
        seen.add(info.filename)
        total += info.file_size
        total_compressed += info.compress_size
        if info.file_size > _RATIO_FLOOR_BYTES and (
            info.file_size > MAX_RATIO * max(info.compress_size, 1)
        ):
            raise UnsafeModel(
                f"{what} member {info.filename!r} expands {info.compress_size} -> "
                f"{info.file_size} bytes (ratio limit {MAX_RATIO:g}): zip bomb",
                details={"member": info.filename},
            )
    if total > max_uncompressed_bytes:
        raise UnsafeModel(
            f"{what} expands to {total} bytes, over the limit of {max_uncompressed_bytes}",
            details={"uncompressed_bytes": total},
        )
    if total > _RATIO_FLOOR_BYTES and total > MAX_RATIO * max(size_on_disk, 1):
        raise UnsafeModel(f"{what} expands {size_on_disk} -> {total} bytes: zip bomb")
    # Overlapping entries (the "non-recursive" bomb) claim more compressed bytes than exist.
    if total_compressed > size_on_disk:
        raise UnsafeModel(f"{what} members claim {total_compressed} bytes in a "
                          f"{size_on_disk}-byte file (overlapping entries)")
    return infos

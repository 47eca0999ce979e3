"""Safe reading of ``torch.export.save`` archives (``.pt2``).

``torch.export.load`` unpickles in several places (``use_pickle`` weights and constants,
custom/opaque object constants, legacy ``<model>.pt`` weight files, and sample inputs through a
``weights_only=False`` fallback) and ``data/aotinductor/`` members load shared libraries. So we
inspect the zip before anything is loaded and accept only the layout that ``torch.export.save``
(torch 2.13) writes for a plain program::

    <root>/archive_format, archive_version, byteorder, version, .data/version,
    .data/serialization_id, models/<name>.json, data/weights/<name>_weights_config.json,
    data/weights/weight_<i>, data/constants/<name>_constants_config.json,
    data/constants/tensor_<i>, data/sample_inputs/<name>.pt, extra/<anything>

Every other member is refused. The load itself should still run in a sandboxed child
(``formats.sandbox``) when the file is untrusted.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from app.engine.errors import InvalidModel, UnsafeModel
from app.engine.formats.zipcheck import inspect_zip

MAX_CONFIG_BYTES = 64 << 20  # JSON configs and model.json read into memory
MAX_SAMPLE_INPUT_BYTES = 256 << 20

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"
_NAME_RE = r"[A-Za-z0-9_.\-]+"
_ALLOWED = [
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"version",
        r"\.data/version",
        r"\.data/serialization_id",
        rf"models/{_NAME_RE}\.json",
        rf"data/weights/{_NAME_RE}_weights_config\.json",
        r"data/weights/weight_\d+",
        rf"data/constants/{_NAME_RE}_constants_config\.json",
        r"data/constants/tensor_\d+",
        rf"data/sample_inputs/{_NAME_RE}\.pt",
        r"extra/.+",
    )
]
_WEIGHT_FILE_RE = re.compile(r"weight_\d+")
_CONSTANT_FILE_RE = re.compile(r"tensor_\d+")


def _sniff_non_pt2(path: Path, names: list[str] | None) -> None:
    """Refuse pickles and TorchScript/torch.save zips with a clear message."""
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] in _PICKLE_MAGIC:
        raise UnsafeModel(
            f"{path.name!r} is a plain pickle (torch.save of a full model?): pickles execute code "
            "on load and are never accepted; export with torch.export.save(...) to a .pt2"
        )
    if not head.startswith(_ZIP_MAGIC) and names is None:
        raise InvalidModel(f"{path.name!r} is not a .pt2 archive (not a zip file)")
    if names is None:
        return
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        raise UnsafeModel(
            f"{path.name!r} is a TorchScript archive: TorchScript (code + pickles) is not "
            "accepted; export with torch.export.save(...) to a .pt2"
        )
    if "data.pkl" in tails:
        raise UnsafeModel(
            f"{path.name!r} is a torch.save pickle archive (.pt/.pth): pickles execute code on "
            "load and are never accepted; export with torch.export.save(...) to a .pt2"
        )


def _read_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_CONFIG_BYTES:
        raise UnsafeModel(f"{info.filename!r} is {info.file_size} bytes (limit {MAX_CONFIG_BYTES})")
    try:
        return json.loads(zf.read(info))
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise InvalidModel(f"{info.filename!r} is not valid JSON: {e}") from e


def _check_payload_config(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: str, kind: str, present: set[str]
) -> None:
    cfg = _read_json(zf, info)
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise InvalidModel(f"{info.filename!r} has no 'config' mapping")
    file_re = _WEIGHT_FILE_RE if kind == "weights" else _CONSTANT_FILE_RE
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise InvalidModel(f"{kind} entry {fqn!r} in {info.filename!r} is not an object")
        if meta.get("use_pickle", False) is not False:
            raise UnsafeModel(
                f"{kind} entry {fqn!r} is marked use_pickle: true in {info.filename!r}; "
                "pickled tensors execute code on load and are not accepted",
                details={"member": info.filename, "entry": fqn},
            )
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not file_re.fullmatch(path_name):
            # custom_obj_* / opaque_obj_* constants are pickles (torchbind or plain pickle).
            raise UnsafeModel(
                f"{kind} entry {fqn!r} points to {path_name!r}: only raw tensor payloads "
                "are accepted (custom/opaque objects are pickles)",
                details={"member": info.filename, "entry": fqn},
            )
        if meta.get("tensor_meta") is None:
            raise InvalidModel(f"{kind} entry {fqn!r} has no tensor_meta")
        if f"{root}data/{kind}/{path_name}" not in present:
            raise InvalidModel(f"{kind} entry {fqn!r} refers to missing member {path_name!r}")


def check_pt2_archive(path: Path, *, max_uncompressed_bytes: int = 4 << 30) -> None:
    """Inspect a .pt2 without loading it. Raises UnsafeModel / InvalidModel.

    Checks: it is a zip (not a pickle / TorchScript / torch.save archive), member names
    (no absolute paths, ``..``, symlinks, encryption), sizes (total cap, compression ratio),
    layout (whitelist above: no AOTInductor shared libraries, no legacy pickled weights), every
    weights/constants config entry a raw tensor with ``use_pickle: false``, and sample inputs
    loadable with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path.name!r} is not a file")
    try:
        zipfile_ok = zipfile.is_zipfile(path)
    except OSError as e:
        raise InvalidModel(f"cannot read {path.name!r}: {e}") from e
    if not zipfile_ok:
        _sniff_non_pt2(path, None)
        raise InvalidModel(f"{path.name!r} is not a .pt2 archive (truncated or not a zip)")
    infos = inspect_zip(path, max_uncompressed_bytes=max_uncompressed_bytes, what="pt2 archive")
    names = [i.filename for i in infos]
    _sniff_non_pt2(path, names)

    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise InvalidModel(f"{path.name!r}: members must share one top-level folder, got "
                           f"{sorted(roots)[:5]}")
    root = next(iter(roots)) + "/"
    by_tail = {i.filename[len(root):]: i for i in infos}
    for tail in by_tail:
        if not any(p.fullmatch(tail) for p in _ALLOWED):
            raise UnsafeModel(
                f"pt2 member {root + tail!r} is not part of a plain torch.export archive "
                "(AOTInductor libraries, legacy pickled weights and custom objects are refused)",
                details={"member": root + tail},
            )
    for required in ("archive_format", "archive_version"):
        if required not in by_tail:
            raise InvalidModel(f"{path.name!r} has no {required!r}: not a torch.export archive")

    present = set(names)
    try:
        with zipfile.ZipFile(path) as zf:
            if zf.read(by_tail["archive_format"]).strip() != b"pt2":
                raise InvalidModel(f"{path.name!r}: archive_format is not 'pt2'")
            models = [t[len("models/"):-len(".json")] for t in by_tail if t.startswith("models/")]
            if "model" not in models:
                raise InvalidModel(f"{path.name!r} has no models/model.json")
            for name in models:
                _read_json(zf, by_tail[f"models/{name}.json"])
                for kind in ("weights", "constants"):
                    cfg = by_tail.get(f"data/{kind}/{name}_{kind}_config.json")
                    if cfg is None:
                        raise InvalidModel(f"{path.name!r} has no {kind} config for {name!r}")
                    _check_payload_config(zf, cfg, root, kind, present)
                sample = by_tail.get(f"data/sample_inputs/{name}.pt")
                if sample is not None:
                    _check_sample_inputs(zf, sample)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise InvalidModel(f"{path.name!r} is truncated or corrupt: {e}") from e


def _check_sample_inputs(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    if info.file_size > MAX_SAMPLE_INPUT_BYTES:
        raise UnsafeModel(f"sample inputs {info.filename!r} are {info.file_size} bytes "
                          f"(limit {MAX_SAMPLE_INPUT_BYTES})")
    raw = zf.read(info)
    if not raw:
        return
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as e:  # weights_only refusal is an UnpicklingError; anything else is corrupt
        raise UnsafeModel(
            f"sample inputs {info.filename!r} do not load with weights_only=True "
            f"(they hold objects other than tensors): {type(e).__name__}",
            details={"member": info.filename},
        ) from e


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_torch_artifacts() -> Iterator[None]:
    """Make torch.export's deserializer refuse its ``weights_only=False`` pickle fallback.

    Defence in depth: check_pt2_archive already proved the sample inputs load with
    weights_only=True, but the file could be swapped between check and load.
    """
    from torch._export.serde import serialize

    original = serialize.deserialize_torch_artifact

    def strict(serialized: Any) -> Any:
        if isinstance(serialized, dict | tuple):
            return serialized
        if len(serialized) == 0:
            return {}
        artifact = torch.load(io.BytesIO(serialized), weights_only=True)
        if not isinstance(artifact, tuple | dict):
            raise InvalidModel(f"sample inputs hold a {type(artifact).__name__}, not a tuple")
        return artifact

    with _PATCH_LOCK:
        serialize.deserialize_torch_artifact = strict
        try:
            yield
        finally:
            serialize.deserialize_torch_artifact = original


def _register_ops_used(path: Path) -> None:
    """Import the (trusted, installed) libraries that define the custom ops the graph names.

    A fresh process knows only aten; PT2E-quantized programs (ours included) call
    ``quantized_decomposed`` ops and torchao programs ``torchao`` ops, which exist only after
    their Python modules are imported. Nothing from the archive is executed here.
    """
    with zipfile.ZipFile(path) as zf:
        graphs = b"".join(zf.read(n) for n in zf.namelist()
                          if re.search(r"/models/[^/]+\.json$", n))
    if b"torch.ops.quantized_decomposed." in graphs:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    if b"torch.ops.torchao." in graphs:
        import torchao  # noqa: F401


def load_pt2(path: Path) -> torch.export.ExportedProgram:
    """check_pt2_archive, then torch.export.load with strict (weights_only) sample inputs.

    In-process: callers facing untrusted input call this inside ``sandbox.inspect_model``'s
    child first (or only ever load files the sandbox accepted).
    """
    path = Path(path)
    check_pt2_archive(path)
    _register_ops_used(path)
    try:
        with _strict_torch_artifacts():
            ep = torch.export.load(path)
    except (InvalidModel, UnsafeModel):
        raise
    except Exception as e:
        raise InvalidModel(f"torch.export.load failed on {path.name!r}: "
                           f"{type(e).__name__}: {e}"[:2000]) from e
    if not isinstance(ep, torch.export.ExportedProgram):
        raise InvalidModel(f"{path.name!r} did not load as an ExportedProgram")
    return ep

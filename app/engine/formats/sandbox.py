"""Inspect an untrusted model file in a throwaway child process.

The parent never parses the model. It hashes the file, then starts
``python -I -c <child>`` in a new session with a fresh temporary cwd/HOME/TMPDIR, a minimal
environment and one thread. The child, before it imports anything heavy or reads the file:

1. leaves the host's network: ``unshare(CLONE_NEWNET)`` (root / CAP_SYS_ADMIN), else
   ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (an unprivileged user namespace). The new
   namespace has no interface up, not even loopback: ``connect()`` to 127.0.0.1 (Postgres,
   Redis, the API) fails with ENETUNREACH, whatever the code doing it (Python or native);
2. lowers its own resource limits (address space, CPU seconds, file size, core dumps; set in
   the child rather than with ``preexec_fn`` because ``preexec_fn`` is unsafe in threaded
   parents such as web or Celery workers);
3. installs an audit hook that refuses sockets and new processes (defence in depth: Python
   code only),

then runs the format checks and the load, and prints one JSON line. A child that dies, is
killed by a limit or exceeds ``timeout_s`` becomes ``LoaderCrashed``.

``network`` (``MODELPRESS_SANDBOX_NETWORK``) says what happens where no namespace can be made
(a container without CAP_SYS_ADMIN whose seccomp profile or sysctls also forbid user
namespaces): ``"isolate"`` (the default) fails the inspection closed with ``LoaderCrashed``
naming the setting; ``"hook_only"`` is the explicit, weaker opt-in: no namespace, only the audit
hook (which native code can bypass), with a warning logged on every inspection.

Limits of this sandbox (say so, do not oversell): no seccomp and no filesystem namespace; a
malicious payload that got past the checks could still read files the worker user can read.
The format checks are the first line of defence; the child bounds the damage of a loader bug
(network, memory, CPU, crash of the calling process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from app.engine.errors import (
    EngineError,
    InputMismatch,
    InvalidData,
    InvalidModel,
    LoaderCrashed,
    UnsafeModel,
)
from app.engine.types import DatasetInfo, ModelInfo, TensorSpec

_ROOT = str(Path(__file__).resolve().parents[3])  # the repo / site dir holding `app`
_RESULT_TAG = "MODELPRESS_SANDBOX_RESULT "
# What the child runs: "module:function" called as f(path, fmt, **options), returning a
# JSON-able dict.
# Production never changes them; tests point them at probes to run code in the real child.
INSPECT_TARGET = "app.engine.formats.sandbox:_inspect_in_child"
DATA_TARGET = "app.engine.formats.sandbox:_inspect_data_in_child"
# Trusted libraries imported before the audit hook is installed (per format).
_PRELOAD = {"pt2": ("torch",), "onnx": ("onnx", "onnxruntime"), "npz": ("numpy",),
            "safetensors": ("numpy", "safetensors.numpy")}
NetworkMode = Literal["isolate", "hook_only"]
NETWORK_MODES: tuple[NetworkMode, ...] = ("isolate", "hook_only")
_CLONE_NEWNET = 0x40000000  # <linux/sched.h>
_CLONE_NEWUSER = 0x10000000
_BLOCKED_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "pty.spawn",
})
_ERRORS: dict[str, type[EngineError]] = {
    InvalidModel.code: InvalidModel,
    UnsafeModel.code: UnsafeModel,
    InvalidData.code: InvalidData,
    InputMismatch.code: InputMismatch,
}

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def detect_format(path: Path) -> str:
    """'onnx' for .onnx files, else 'pt2' (its checks refuse pickles/TorchScript clearly)."""
    if Path(path).suffix.lower() == ".onnx":
        return "onnx"
    with Path(path).open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") or head[:1] == b"\x80" or Path(path).suffix.lower() in (
        ".pt2", ".pt", ".pth", ".pkl", ".bin", ".zip"
    ):
        return "pt2"
    return "onnx"


# ---------------------------------------------------------------- spec extraction (child side)


def _np_dtype_name(dtype: Any) -> str:
    import torch

    try:
        return str(torch.empty(0, dtype=dtype).numpy().dtype)
    except (TypeError, RuntimeError):  # bfloat16 and friends have no numpy dtype
        return str(dtype).removeprefix("torch.")


def _spec_from_val(name: str, val: Any) -> TensorSpec:
    import torch

    if not isinstance(val, torch.Tensor):
        raise InvalidModel(f"graph input/output {name!r} is a {type(val).__name__}, not a tensor: "
                           "only tensor inputs and outputs are supported")
    shape = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
    return TensorSpec(name, shape, _np_dtype_name(val.dtype))


def ep_specs(ep: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], int]:
    """(inputs, outputs, parameter count) of an ExportedProgram from its graph signature."""
    from torch.export.graph_signature import OutputKind

    nodes = {n.name: n for n in ep.graph.nodes}
    inputs = tuple(_spec_from_val(n, nodes[n].meta.get("val")) for n in
                   ep.graph_signature.user_inputs)
    outputs: list[TensorSpec] = []
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_vals = {getattr(a, "name", None): a for a in out_node.args[0]}
    for spec in ep.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            continue
        name = getattr(spec.arg, "name", None)
        node = out_vals.get(name)
        if name is None or node is None:
            raise InvalidModel("model returns a non-tensor output")
        outputs.append(_spec_from_val(name, node.meta.get("val")))
    params = sum(int(ep.state_dict[p].numel()) for p in ep.graph_signature.parameters)
    return inputs, tuple(outputs), params


def onnx_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) from the ONNX graph; dims without a static value are None."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise InvalidModel(f"ONNX input/output {v.name!r} is not a tensor")
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        return TensorSpec(v.name, shape, str(tensor_dtype_to_np_dtype(tt.elem_type)))

    ins = tuple(spec(v) for v in model.graph.input if v.name not in inits)
    outs = tuple(spec(v) for v in model.graph.output)
    return ins, outs


def _inspect_in_child(path: Path, fmt: str, *, onnx_external_data: bool = True
                      ) -> dict[str, Any]:
    if fmt == "onnx":
        from app.engine.formats.onnx_safe import check_onnx
        from app.engine.stages.evaluate import count_params, make_session

        check_onnx(path, external_data=onnx_external_data)
        ins, outs = onnx_specs(path)
        try:
            make_session(path, threads=1)  # ORT can build it (supported ops, valid weights)
        except Exception as e:
            raise InvalidModel(f"ONNX Runtime cannot load {path.name!r}: {e}"[:2000]) from e
        params = count_params(path)
    else:
        import torch

        from app.engine.formats.pt2 import load_pt2

        ep = load_pt2(path)
        ins, outs, params = ep_specs(ep)
        example = ep.example_inputs
        if example is not None:
            args, kwargs = example
            try:
                with torch.no_grad():
                    ep.module()(*args, **kwargs)
            except Exception as e:
                raise InvalidModel(f"model fails on its own example inputs: "
                                   f"{type(e).__name__}: {e}"[:2000]) from e
    return {"inputs": [s.__dict__ for s in ins], "outputs": [s.__dict__ for s in outs],
            "parameters": params}


def _inspect_data_in_child(path: Path, fmt: str, *, inputs: list[dict[str, Any]],
                           min_samples: int = 1) -> dict[str, Any]:
    from app.engine.formats.data import inspect_dataset

    specs = [TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in inputs]
    try:
        info = inspect_dataset(path, specs, min_samples=min_samples)
    except (EngineError, MemoryError):
        raise
    except Exception as e:  # a reader bug on this file: the file is what we cannot read
        raise InvalidData(f"cannot read {path.name!r}: {type(e).__name__}: {e}"[:2000]) from e
    return {"samples": info.samples, "inputs": [s.__dict__ for s in info.inputs],
            "has_labels": info.has_labels, "num_classes": info.num_classes}


def _netns() -> str:
    """Identity of this process's network namespace (``net:[inode]``), '' if unknown."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def _unshare_network() -> str | None:
    """Move this (single-threaded) process into a new, empty network namespace.

    Returns None on success, else why it failed. CLONE_NEWUSER must come before any thread is
    started, so the child calls this first of all.
    """
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unshare = libc.unshare
    except (OSError, AttributeError) as e:  # not Linux / no unshare(2)
        return f"unshare(2) is not available: {e}"
    failures = []
    for flags, name in ((_CLONE_NEWNET, "CLONE_NEWNET"),
                        (_CLONE_NEWUSER | _CLONE_NEWNET, "CLONE_NEWUSER|CLONE_NEWNET")):
        if unshare(flags) == 0:
            return None
        err = ctypes.get_errno()
        failures.append(f"unshare({name}): {errno.errorcode.get(err, err)} {os.strerror(err)}")
    return "; ".join(failures)


def _child_main() -> None:
    """Entry point of the child: network, limits, hook, then checks + load; one JSON line."""
    cfg = json.loads(sys.argv[1])
    netns_before = _netns()
    network: str = cfg["network"]
    if network == "isolate":
        problem = _unshare_network()
        if problem is None and netns_before and _netns() == netns_before:
            problem = "unshare reported success but the network namespace did not change"
        if problem is not None:
            _emit({"isolation_failed": problem})
            return

    import resource

    path, fmt = Path(cfg["path"]), cfg["fmt"]
    memory_mb, cpu_s = int(cfg["memory_mb"]), int(cfg["cpu_s"])
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))  # no big writes anywhere

    # Heavy imports happen before the audit hook so that only the untrusted work is watched.
    import importlib

    for module in _PRELOAD.get(fmt, ()):
        importlib.import_module(module)

    module_name, _, func_name = str(cfg["target"]).partition(":")
    target = getattr(importlib.import_module(module_name), func_name)

    def audit(event: str, _args: tuple[Any, ...]) -> None:
        # An audit hook cannot be removed: no sockets, no new processes from here on.
        if event in _BLOCKED_EVENTS or event.startswith("socket."):
            raise PermissionError(f"{event} is not allowed in the model sandbox")

    if cfg["audit_hook"]:
        sys.addaudithook(audit)
    try:
        result: dict[str, Any] = {"ok": target(path, fmt, **cfg["options"])}
    except EngineError as e:
        result = {"error": e.code, "message": e.message}
    except MemoryError:
        result = {"crash": f"loader ran out of memory (limit {memory_mb} MB)"}
    except Exception as e:  # a loader bug on this file: the file is what we cannot read
        result = {"error": InvalidModel.code,
                  "message": f"cannot read {path.name!r}: {type(e).__name__}: {e}"[:2000]}
    result["netns"] = _netns()
    _emit(result)


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write("\n" + _RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def _child_env(tmp: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": tmp,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TORCHINDUCTOR_CACHE_DIR": tmp,
        "no_proxy": "*",
    }
    return env


def inspect_model(path: Path, *, timeout_s: float = 120, memory_mb: int = 4096,
                  network: NetworkMode = "isolate", onnx_external_data: bool = True,
                  tmp_dir: Path | None = None) -> ModelInfo:
    """Validate and describe an untrusted .pt2 or .onnx in a sandboxed child.

    Returns ModelInfo (input/output specs, parameter count, sha256, size). Raises UnsafeModel /
    InvalidModel for what the checks refuse and LoaderCrashed when the child dies, hits a
    resource limit, exceeds ``timeout_s`` seconds (``memory_mb`` = address-space cap in MiB) or
    cannot leave the network (``network="isolate"``, see the module docstring).
    ``onnx_external_data=False`` refuses ONNX tensors stored outside the file (single-file
    uploads); ``tmp_dir`` holds the child's throwaway directory (None = system temp dir).

    >>> info = inspect_model(Path("mlp.pt2"))  # doctest: +SKIP
    >>> info.inputs[0].name, info.format       # doctest: +SKIP
    ('x', 'pt2')
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise InvalidModel(f"{path.name!r} is not a file")
    size = path.stat().st_size
    digest = sha256_file(path)
    fmt = detect_format(path)
    ok = run_in_sandbox(INSPECT_TARGET, path, fmt, timeout_s=timeout_s, memory_mb=memory_mb,
                        network=network, tmp_dir=tmp_dir,
                        options={"onnx_external_data": onnx_external_data})

    def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in items)

    return ModelInfo(format=fmt,  # type: ignore[arg-type]
                     inputs=specs(ok["inputs"]), outputs=specs(ok["outputs"]),
                     parameters=int(ok["parameters"]), size_bytes=size, sha256=digest)


def inspect_data_file(path: Path, model_inputs: Sequence[TensorSpec], *, timeout_s: float = 120,
                      memory_mb: int = 4096, network: NetworkMode = "isolate",
                      tmp_dir: Path | None = None) -> DatasetInfo:
    """``data.inspect_dataset`` of an untrusted .npz / .safetensors, in the sandboxed child.

    The same child as ``inspect_model`` (network namespace, limits, audit hook), so a hostile
    data file can exhaust only the child's ``memory_mb`` and ``timeout_s``, never the caller.
    Raises InvalidData / InputMismatch like ``inspect_dataset``, LoaderCrashed like
    ``inspect_model``.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise InvalidData(f"data file {path.name!r} does not exist")
    size = path.stat().st_size
    digest = sha256_file(path)
    suffix = path.suffix.lower().lstrip(".")
    ok = run_in_sandbox(DATA_TARGET, path, suffix if suffix in ("npz", "safetensors") else "data",
                        timeout_s=timeout_s, memory_mb=memory_mb, network=network,
                        tmp_dir=tmp_dir, what="data",
                        options={"inputs": [s.__dict__ for s in model_inputs]})
    return DatasetInfo(
        samples=int(ok["samples"]),
        inputs=tuple(TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in ok["inputs"]),
        has_labels=bool(ok["has_labels"]),
        num_classes=None if ok["num_classes"] is None else int(ok["num_classes"]),
        sha256=digest, size_bytes=size)


def run_in_sandbox(target: str, path: Path, fmt: str, *, timeout_s: float, memory_mb: int,
                   network: NetworkMode = "isolate", audit_hook: bool = True,
                   tmp_dir: Path | None = None, options: dict[str, Any] | None = None,
                   what: str = "model") -> dict[str, Any]:
    """Run ``target`` ("module:function", called as ``f(path, fmt, **options)``; JSON-able
    options) in the sandboxed child.

    Returns the function's dict; re-raises its EngineError; LoaderCrashed for a dead, killed,
    timed-out or un-isolated child (``what`` names the loader in messages).
    ``audit_hook=False`` exists for tests that prove the network namespace alone blocks
    connections; production always keeps the hook.
    """
    if network not in NETWORK_MODES:
        raise ValueError(f"network must be one of {NETWORK_MODES}, got {network!r}")
    if network == "hook_only":
        log.warning("model sandbox without a network namespace (MODELPRESS_SANDBOX_NETWORK="
                    "hook_only): only the Python audit hook blocks sockets in the loader")
    cfg = {"path": str(path), "fmt": fmt, "target": target, "memory_mb": memory_mb,
           # CPU seconds: a backstop a little above the wall-clock timeout.
           "cpu_s": max(1, int(timeout_s)) + 5, "network": network, "audit_hook": audit_hook,
           "options": options or {}}
    code = (f"import sys; sys.path.insert(0, {_ROOT!r}); "
            "from app.engine.formats.sandbox import _child_main; _child_main()")
    if tmp_dir is not None:
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mp-sandbox-", dir=tmp_dir) as tmp:
        # Output goes to files, not pipes: the child's RLIMIT_FSIZE bounds them, so a chatty
        # or hostile child cannot fill the parent's memory.
        out_path, err_path = Path(tmp) / ".stdout", Path(tmp) / ".stderr"
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", code, json.dumps(cfg)],
                cwd=tmp, env=_child_env(tmp), stdin=subprocess.DEVNULL, stdout=out_f,
                stderr=err_f, start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                raise LoaderCrashed(
                    f"{what} loader timed out after {timeout_s:g} s on {path.name!r}",
                    details={"timeout_s": timeout_s}) from None
            finally:
                if proc.poll() is None:
                    _kill_group(proc)
                    proc.wait()
        out, err = _tail(out_path), _tail(err_path)
    result = _parse_result(out)
    if result is None:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise LoaderCrashed(
            f"{what} loader {how} on {path.name!r} (memory limit {memory_mb} MB): "
            + " | ".join(tail)[-800:],
            details={"returncode": proc.returncode},
        )
    if "isolation_failed" in result:
        raise LoaderCrashed(
            f"the {what} sandbox cannot isolate the loader from the network "
            f"({result['isolation_failed']}); nothing was loaded. Give the API/worker "
            "CAP_SYS_ADMIN or allow user namespaces, or set MODELPRESS_SANDBOX_NETWORK="
            "hook_only to accept the weaker audit-hook-only sandbox (see SECURITY.md)",
            details={"reason": str(result["isolation_failed"])})
    parent_ns = _netns()
    if network == "isolate" and parent_ns and result.get("netns") == parent_ns:
        # The child checked this before loading anything; seeing it here means a bug.
        raise LoaderCrashed(f"{what} loader ran in the host's network namespace")
    if "crash" in result:
        raise LoaderCrashed(str(result["crash"]))
    if "error" in result:
        cls = _ERRORS.get(result["error"], InvalidModel)
        raise cls(str(result["message"]))
    ok: dict[str, Any] = result["ok"]
    return ok


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, limit: int = 1 << 20) -> bytes:
    """Last ``limit`` bytes of a file (the result line is the last line of stdout)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read()
    except OSError:
        return b""


def _parse_result(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith(_RESULT_TAG):
            try:
                parsed = json.loads(line[len(_RESULT_TAG):])
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None
    return None

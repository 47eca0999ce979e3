"""Inspect an untrusted model file in a throwaway child process.

The parent never parses the model. It hashes the file, then starts
``python -I -c <child>`` in a new session with a fresh temporary cwd/HOME/TMPDIR, a minimal
environment and one thread. The child first lowers its own resource limits (address space, CPU
seconds, file size, core dumps; set in the child rather than with ``preexec_fn`` because
``preexec_fn`` is unsafe in threaded parents such as web or Celery workers), disables socket
creation, then runs the format checks and the load, and prints one JSON line. A child that
dies, is killed by a limit or exceeds ``timeout_s`` becomes ``LoaderCrashed``.

Limits of this sandbox (say so, do not oversell): no network namespace or seccomp; a
malicious payload that got past the checks could still read files the worker user can read.
The format checks are the first line of defence; the child bounds the damage of a loader bug
(memory, CPU, crash of the worker process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.engine.errors import EngineError, InvalidModel, LoaderCrashed, UnsafeModel
from app.engine.types import ModelInfo, TensorSpec

_ROOT = str(Path(__file__).resolve().parents[3])  # the repo / site dir holding `app`
_RESULT_TAG = "MODELPRESS_SANDBOX_RESULT "
_BLOCKED_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "pty.spawn",
})
_ERRORS: dict[str, type[EngineError]] = {
    InvalidModel.code: InvalidModel,
    UnsafeModel.code: UnsafeModel,
}


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


def _inspect_in_child(path: Path, fmt: str) -> dict[str, Any]:
    if fmt == "onnx":
        from app.engine.formats.onnx_safe import check_onnx
        from app.engine.stages.evaluate import count_params, make_session

        check_onnx(path)
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


def _child_main() -> None:
    """Entry point of the child: limits first, then checks + load, one JSON result line."""
    import resource

    path, fmt, memory_mb, cpu_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))  # no big writes anywhere

    # Heavy imports happen before the audit hook so that only the untrusted work is watched.
    if fmt == "onnx":
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    else:
        import torch  # noqa: F401

    def audit(event: str, _args: tuple[Any, ...]) -> None:
        # An audit hook cannot be removed: no network, no new processes from here on.
        if event in _BLOCKED_EVENTS or event.startswith("socket."):
            raise PermissionError(f"{event} is not allowed in the model sandbox")

    sys.addaudithook(audit)
    try:
        result: dict[str, Any] = {"ok": _inspect_in_child(Path(path), fmt)}
    except EngineError as e:
        result = {"error": e.code, "message": e.message}
    except MemoryError:
        result = {"crash": f"loader ran out of memory (limit {memory_mb} MB)"}
    except Exception as e:  # a loader bug on this file: the file is what we cannot read
        result = {"error": InvalidModel.code,
                  "message": f"cannot read {Path(path).name!r}: {type(e).__name__}: {e}"[:2000]}
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


def inspect_model(path: Path, *, timeout_s: float = 120, memory_mb: int = 4096) -> ModelInfo:
    """Validate and describe an untrusted .pt2 or .onnx in a sandboxed child.

    Returns ModelInfo (input/output specs, parameter count, sha256, size). Raises UnsafeModel /
    InvalidModel for what the checks refuse and LoaderCrashed when the child dies, hits a
    resource limit or exceeds ``timeout_s`` seconds (``memory_mb`` = address-space cap in MiB).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise InvalidModel(f"{path.name!r} is not a file")
    size = path.stat().st_size
    digest = sha256_file(path)
    fmt = detect_format(path)
    code = (f"import sys; sys.path.insert(0, {_ROOT!r}); "
            "from app.engine.formats.sandbox import _child_main; _child_main()")
    with tempfile.TemporaryDirectory(prefix="mp-sandbox-") as tmp:
        # Output goes to files, not pipes: the child's RLIMIT_FSIZE bounds them, so a chatty
        # or hostile child cannot fill the parent's memory.
        out_path, err_path = Path(tmp) / ".stdout", Path(tmp) / ".stderr"
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", code, str(path), fmt, str(memory_mb),
                 str(max(1, int(timeout_s)) + 5)],
                cwd=tmp, env=_child_env(tmp), stdin=subprocess.DEVNULL, stdout=out_f,
                stderr=err_f, start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                raise LoaderCrashed(
                    f"model loader timed out after {timeout_s:g} s on {path.name!r}",
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
            f"model loader {how} on {path.name!r} (memory limit {memory_mb} MB): "
            + " | ".join(tail)[-800:],
            details={"returncode": proc.returncode},
        )
    if "crash" in result:
        raise LoaderCrashed(str(result["crash"]))
    if "error" in result:
        cls = _ERRORS.get(result["error"], InvalidModel)
        raise cls(str(result["message"]))
    ok = result["ok"]

    def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in items)

    return ModelInfo(format=fmt,  # type: ignore[arg-type]
                     inputs=specs(ok["inputs"]), outputs=specs(ok["outputs"]),
                     parameters=int(ok["parameters"]), size_bytes=size, sha256=digest)


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

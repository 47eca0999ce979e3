"""Attacks through the API: hostile model and data files, and the loader sandbox itself.

Every hostile upload must be answered 422 (``unsafe_model`` / ``invalid_model`` /
``invalid_data``) with nothing stored (no row, no artifact bytes, nothing left in
MODELPRESS_TMP_DIR), and no payload may run: each payload creates a marker directory when
unpickled, the marker lives at an absolute path the sandbox child could write to as well as
the API process, and ``test_payloads_are_live`` proves that loading each payload the unsafe way
really does create its marker. Engine-level variants (including ONNX external data through
hard links and symlinks, which a single-file upload cannot carry) are in
tests/engine/test_formats.py and tests/engine/test_data.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from sqlalchemy import func, select

from app.config import Settings
from app.db.models import ApiKey, BlobChunk, Dataset, Model
from app.db.session import session_factory
from app.engine.formats import sandbox
from app.main import create_app
from app.services.auth import hash_key
from examples.zoo import MLP
from tests.hostile import (
    Touch,
    add_symlink_member,
    npy_bytes,
    overlapping_zip,
    read_member,
    rewrite_zip,
    safetensors_bytes,
)
from tests.service.conftest import PG_ADMIN, REDIS_BASE

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
PROBES = "tests.engine.sandbox_probes"


@dataclass(frozen=True)
class Case:
    filename: str  # the name the client sends (?filename=)
    code: str  # the expected problem code
    match: str  # a fragment of the expected detail
    payload: bool = False  # carries a marker-writing pickle


def _stored(settings: Settings) -> tuple[int, int, int]:
    """(model rows, dataset rows, artifact-store chunks)."""
    with session_factory(settings)() as s:
        return (s.scalar(select(func.count()).select_from(Model)) or 0,
                s.scalar(select(func.count()).select_from(Dataset)) or 0,
                s.scalar(select(func.count()).select_from(BlobChunk)) or 0)


def _tmp_left(settings: Settings) -> list[str]:
    assert settings.tmp_dir is not None
    if not settings.tmp_dir.exists():
        return []
    return sorted(str(p.relative_to(settings.tmp_dir)) for p in settings.tmp_dir.rglob("*"))


# ------------------------------------------------------------------------------ hostile files


def _pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(Touch(marker), protocol=2)


def _torch_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save((Touch(marker),), buf)  # torch's zip format around a code-running pickle
    return buf.getvalue()


def _object_npz_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.array([Touch(marker)], dtype=object))
    return buf.getvalue()


def _tiny_onnx() -> onnx.ModelProto:
    """y = x @ w, x: (N, 4) float32, one 4x2 initializer: the smallest model ORT will run."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], [0.5] * 8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
    # IR 9: what ONNX Runtime 1.32 reads (onnx 1.23 would write 14 by default).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _onnx_external(location: str) -> bytes:
    """The tiny model with its weight moved to external data at ``location``."""
    model = _tiny_onnx()
    w = model.graph.initializer[0]
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        w.external_data.add(key=key, value=value)
    return model.SerializeToString()


MODEL_CASES: dict[str, Case] = {
    "pt2_use_pickle_weight": Case("model.pt2", "unsafe_model", "use_pickle", payload=True),
    "pt2_pickled_sample_inputs": Case("model.pt2", "unsafe_model", "weights_only", payload=True),
    "pt2_pickled_constant": Case("model.pt2", "unsafe_model", "custom_obj_0", payload=True),
    "pt2_aotinductor_library": Case("model.pt2", "unsafe_model", "not part of a plain"),
    "plain_pickle_as_pt2": Case("model.pt2", "unsafe_model", "plain pickle", payload=True),
    "plain_pickle_pt": Case("model.pt", "invalid_model", "unsupported model file",
                            payload=True),
    "torch_save_archive": Case("model.pt2", "unsafe_model", "torch.save pickle archive",
                               payload=True),
    "torchscript": Case("model.pt2", "unsafe_model", "TorchScript"),
    "torchscript_pt": Case("model.pt", "invalid_model", "unsupported model file"),
    "pt2_traversal_member": Case("model.pt2", "unsafe_model", "'..'"),
    "pt2_absolute_member": Case("model.pt2", "unsafe_model", "absolute"),
    "pt2_symlink_member": Case("model.pt2", "unsafe_model", "symlink"),
    "pt2_zip_bomb": Case("model.pt2", "unsafe_model", "zip bomb"),
    "pt2_overlapping_entries": Case("model.pt2", "unsafe_model", "overlapping"),
    "onnx_external_missing": Case("model.onnx", "invalid_model", "single file"),
    "onnx_external_self": Case("model.onnx", "invalid_model", "single file"),
    "onnx_external_traversal": Case("model.onnx", "unsafe_model", "'..'"),
    "onnx_external_absolute": Case("model.onnx", "unsafe_model", "absolute"),
}

DATA_CASES: dict[str, Case] = {
    "npz_object_array": Case("data.npz", "invalid_data", "object (pickled) array", payload=True),
    "npz_member_is_pickle": Case("data.npz", "invalid_data", "not a readable .npz",
                                 payload=True),
    "npz_zip_bomb": Case("data.npz", "invalid_data", "zip bomb"),
    "npz_overlapping_entries": Case("data.npz", "invalid_data", "overlapping"),
    "npz_traversal_member": Case("data.npz", "invalid_data", "'..'"),
    "npz_absolute_member": Case("data.npz", "invalid_data", "absolute"),
    "npz_symlink_member": Case("data.npz", "invalid_data", "symlink"),
    "safetensors_huge_header": Case("data.safetensors", "invalid_data", "header too large"),
    "safetensors_overlapping_offsets": Case("data.safetensors", "invalid_data",
                                            "invalid offset"),
    "safetensors_past_end": Case("data.safetensors", "invalid_data", "not fully covered"),
}


def _build_model(case: str, pt2: Path, work: Path, marker: Path) -> bytes:
    dst = work / f"{case}.bin"
    if case == "pt2_use_pickle_weight":
        cfg = json.loads(read_member(pt2, "data/weights/model_weights_config.json"))
        fqn = next(iter(cfg["config"]))
        cfg["config"][fqn]["use_pickle"] = True
        weight = cfg["config"][fqn]["path_name"]
        rewrite_zip(pt2, dst, {"data/weights/model_weights_config.json": json.dumps(cfg).encode(),
                               f"data/weights/{weight}": _torch_payload(marker)})
    elif case == "pt2_pickled_sample_inputs":
        rewrite_zip(pt2, dst, {"data/sample_inputs/model.pt": _torch_payload(marker)})
    elif case == "pt2_pickled_constant":
        cfg = {"config": {"evil": {"path_name": "custom_obj_0", "is_param": False,
                                   "use_pickle": False, "tensor_meta": None}}}
        rewrite_zip(pt2, dst,
                    {"data/constants/model_constants_config.json": json.dumps(cfg).encode()},
                    add={"<root>/data/constants/custom_obj_0": _pickle_payload(marker)})
    elif case == "pt2_aotinductor_library":
        rewrite_zip(pt2, dst, add={"<root>/data/aotinductor/model/model.so": b"\x7fELF" * 64})
    elif case in ("plain_pickle_as_pt2", "plain_pickle_pt"):
        torch.save(Touch(marker), dst, _use_new_zipfile_serialization=False)
    elif case == "torch_save_archive":
        torch.save({"model": Touch(marker)}, dst)  # a zip holding data.pkl
    elif case in ("torchscript", "torchscript_pt"):
        torch.jit.trace(MLP().eval(), torch.randn(1, 1, 8, 8)).save(str(dst))
    elif case == "pt2_traversal_member":
        rewrite_zip(pt2, dst, add={"<root>/../../evil.py": b"print('escaped')"})
    elif case == "pt2_absolute_member":
        rewrite_zip(pt2, dst, add={"/etc/cron.d/evil": b"* * * * * root true"})
    elif case == "pt2_symlink_member":
        shutil.copy(pt2, dst)
        root = zipfile.ZipFile(pt2).namelist()[0].split("/", 1)[0]
        add_symlink_member(dst, f"{root}/extra/link", "/etc/passwd")
    elif case == "pt2_zip_bomb":
        shutil.copy(pt2, dst)
        root = zipfile.ZipFile(pt2).namelist()[0].split("/", 1)[0]
        with zipfile.ZipFile(dst, "a", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{root}/extra/zeros", b"\0" * (16 << 20))  # 16 MiB -> ~16 KiB
    elif case == "pt2_overlapping_entries":
        dst.write_bytes(overlapping_zip([f"m/extra/e{i}" for i in range(64)],
                                        os.urandom(256 << 10)))
    elif case == "onnx_external_missing":
        dst.write_bytes(_onnx_external("weights.bin"))
    elif case == "onnx_external_self":
        dst.write_bytes(_onnx_external("model.onnx"))  # the upload's own name on the server
    elif case == "onnx_external_traversal":
        dst.write_bytes(_onnx_external("../../../../etc/passwd"))
    elif case == "onnx_external_absolute":
        dst.write_bytes(_onnx_external("/etc/passwd"))
    else:
        raise AssertionError(case)
    return dst.read_bytes()


def _build_data(case: str, marker: Path) -> bytes:
    x = np.zeros((16, 1, 8, 8), np.float32)
    buf = io.BytesIO()
    if case == "npz_object_array":
        return _object_npz_payload(marker)
    if case == "npz_member_is_pickle":
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("x.npy", _pickle_payload(marker))
        return buf.getvalue()
    if case == "npz_zip_bomb":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x.npy", npy_bytes(np.zeros((4096, 1, 8, 8), np.float32))[:128]
                       + b"\0" * (64 << 20))  # 64 MiB of zeros -> ~64 KiB
        return buf.getvalue()
    if case == "npz_overlapping_entries":
        return overlapping_zip([f"x{i}.npy" for i in range(64)], npy_bytes(
            np.random.default_rng(0).random((512, 1, 8, 8), dtype=np.float32)))
    if case in ("npz_traversal_member", "npz_absolute_member", "npz_symlink_member"):
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("x.npy", npy_bytes(x))
            if case == "npz_traversal_member":
                z.writestr("../../x.npy", npy_bytes(x))
            elif case == "npz_absolute_member":
                z.writestr("/tmp/x.npy", npy_bytes(x))
            else:
                link = zipfile.ZipInfo("labels.npy")
                link.create_system = 3  # Unix, so the mode bits below are honoured
                link.external_attr = (stat.S_IFLNK | 0o777) << 16
                z.writestr(link, "/etc/passwd")
        return buf.getvalue()
    header = {"x": {"dtype": "F32", "shape": [16, 1, 8, 8], "data_offsets": [0, 4096]}}
    if case == "safetensors_huge_header":
        return safetensors_bytes(header, bytes(4096), header_len=1 << 62)
    if case == "safetensors_overlapping_offsets":
        return safetensors_bytes(
            {**header, "labels": {"dtype": "I64", "shape": [16], "data_offsets": [0, 128]}},
            bytes(4096))
    if case == "safetensors_past_end":
        return safetensors_bytes(header, bytes(1024))
    raise AssertionError(case)


@pytest.fixture(scope="session")
def markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="session")
def hostile_models(mlp_files: dict[str, Path], markers: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    work = tmp_path_factory.mktemp("hostile-models")
    return {c: _build_model(c, mlp_files["pt2"], work, markers / c) for c in MODEL_CASES}


@pytest.fixture(scope="session")
def hostile_data(markers: Path) -> dict[str, bytes]:
    return {c: _build_data(c, markers / c) for c in DATA_CASES}


# ------------------------------------------------------------------------------ the matrix


def test_payloads_are_live(tmp_path: Path) -> None:
    """Control: each payload, loaded the unsafe way, does create its marker."""
    loaders: dict[str, Callable[[bytes], object]] = {
        "pickle": pickle.loads,
        "torch": lambda b: torch.load(io.BytesIO(b), weights_only=False),
        "npz": lambda b: np.load(io.BytesIO(b), allow_pickle=True)["x"],
    }
    builders = {"pickle": _pickle_payload, "torch": _torch_payload, "npz": _object_npz_payload}
    for name, build in builders.items():
        marker = tmp_path / name
        loaders[name](build(marker))
        assert marker.is_dir(), name


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_hostile_model_upload_refused(client: TestClient, auth: dict[str, str],
                                      settings: Settings, hostile_models: dict[str, bytes],
                                      markers: Path, case: str) -> None:
    expect = MODEL_CASES[case]
    r = client.post(f"/v1/models?filename={expect.filename}", content=hostile_models[case],
                    headers={**auth, "Content-Type": "application/octet-stream"})
    assert not (markers / case).exists(), f"the payload ran: {r.status_code} {r.text}"
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["code"] == expect.code, problem
    assert expect.match in problem["detail"], problem
    assert _stored(settings) == (0, 0, 0)
    assert _tmp_left(settings) == []


def _seed_model(settings: Settings, key: str) -> str:
    """A model row (no bytes) whose input is x: (N, 1, 8, 8) float32."""
    with session_factory(settings)() as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        m = Model(tenant_id=tenant_id, filename="m.pt2", format="pt2",
                  inputs=[{"name": "x", "shape": [None, 1, 8, 8], "dtype": "float32"}],
                  outputs=[], parameters=1, sha256="0" * 64, size_bytes=1,
                  storage_key="models/none/model.pt2")
        s.add(m)
        s.commit()
        return m.id


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_hostile_data_upload_refused(client: TestClient, auth: dict[str, str], key: str,
                                     settings: Settings, hostile_data: dict[str, bytes],
                                     markers: Path, case: str) -> None:
    expect = DATA_CASES[case]
    model_id = _seed_model(settings, key)
    r = client.post(f"/v1/datasets?model_id={model_id}&filename={expect.filename}",
                    content=hostile_data[case],
                    headers={**auth, "Content-Type": "application/octet-stream"})
    assert not (markers / case).exists(), f"the payload ran: {r.status_code} {r.text}"
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == expect.code, problem
    assert expect.match in problem["detail"], problem
    assert _stored(settings) == (1, 0, 0)  # the seeded model row only
    assert _tmp_left(settings) == []


def test_same_uploads_accepted_when_not_hostile(client: TestClient, auth: dict[str, str],
                                                settings: Settings, key: str) -> None:
    """Control for the ONNX and data cases: the untampered files are accepted, so each
    refusal above is caused by the hostile part, not by the carrier file."""
    r = client.post("/v1/models?filename=model.onnx", content=_tiny_onnx().SerializeToString(),
                    headers=auth)
    assert r.status_code == 201, r.text
    assert r.json()["inputs"] == [{"name": "x", "shape": [None, 4], "dtype": "float32"}]
    model_id = _seed_model(settings, key)
    x = np.zeros((16, 1, 8, 8), np.float32)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    r = client.post(f"/v1/datasets?model_id={model_id}&filename=data.npz",
                    content=buf.getvalue(), headers=auth)
    assert r.status_code == 201, r.text
    st = safetensors_bytes({"x": {"dtype": "F32", "shape": [16, 1, 8, 8],
                                  "data_offsets": [0, 4096]}}, bytes(4096))
    r = client.post(f"/v1/datasets?model_id={model_id}&filename=data.safetensors",
                    content=st, headers=auth)
    assert r.status_code == 201, r.text
    assert _tmp_left(settings) == []


# ------------------------------------------------------------------------------ the sandbox


def _local_servers() -> list[tuple[str, int]]:
    """Postgres and Redis of the test run (both listen on localhost)."""
    pg, rd = urlsplit(PG_ADMIN), urlsplit(REDIS_BASE)
    return [(pg.hostname or "localhost", pg.port or 5432),
            (rd.hostname or "localhost", rd.port or 6379)]


def test_sandbox_child_cannot_reach_postgres_or_redis(tmp_path: Path) -> None:
    """Real code in the real child (as launched for an upload), audit hook OFF, so the
    network namespace alone stops it; the same probe without the namespace connects."""
    targets = tmp_path / "targets.json"
    servers = _local_servers()
    targets.write_text(json.dumps(servers + [("127.0.0.1", p) for _, p in servers]))

    def probe(network: sandbox.NetworkMode, hook: bool) -> dict[str, Any]:
        return sandbox.run_in_sandbox(f"{PROBES}:connect", targets, "probe", timeout_s=60,
                                      memory_mb=1024, network=network, audit_hook=hook)

    isolated = probe("isolate", hook=False)
    assert isolated["results"], isolated
    for where, outcome in isolated["results"].items():
        assert outcome in {"ENETUNREACH", "EADDRNOTAVAIL", "ECONNREFUSED"}, (where, outcome)
    assert isolated["netns"] != os.readlink("/proc/self/ns/net")

    # Control: the probe does detect a reachable server (Postgres and Redis are up).
    open_ = probe("hook_only", hook=False)
    assert set(open_["results"].values()) == {"connected"}, open_
    # And the audit hook alone (hook_only, the explicit weaker mode) refuses Python sockets.
    hooked = probe("hook_only", hook=True)
    assert all("not allowed in the model sandbox" in v for v in hooked["results"].values())


def _sandbox_without_caps(tmp_path: Path, forbid_user_namespaces: bool) -> dict[str, Any]:
    """Run the connect probe (audit hook off) in both modes from a parent with NO
    capabilities (like a non-root container), inside a user namespace of our own; optionally
    with max_user_namespaces = 0 there, so that no namespace at all can be made below it."""
    script = tmp_path / "try.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "from app.engine.errors import LoaderCrashed\n"
        "from app.engine.formats.sandbox import run_in_sandbox\n"
        "out = {}\n"
        "for mode in ('isolate', 'hook_only'):\n"
        "    try:\n"
        f"        r = run_in_sandbox('{PROBES}:connect', Path(sys.argv[1]), 'probe',\n"
        "                           timeout_s=60, memory_mb=1024, network=mode,\n"
        "                           audit_hook=False)\n"
        "        out[mode] = {'ok': r['results']}\n"
        "    except LoaderCrashed as e:\n"
        "        out[mode] = {'loader_failed': e.message}\n"
        "print(json.dumps(out))\n")
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(_local_servers()[:1]))
    targets.chmod(0o600)  # like an upload: readable by its owner only
    forbid = "echo 0 > /proc/sys/user/max_user_namespaces && " if forbid_user_namespaces else ""
    inner = (f"{forbid}exec setpriv --bounding-set=-all --inh-caps=-all "
             f"{sys.executable} {script} {targets}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", inner],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_isolate_fails_closed_where_namespaces_are_forbidden(tmp_path: Path) -> None:
    """Where neither unshare(CLONE_NEWNET) nor an unprivileged user namespace is allowed,
    ``isolate`` refuses to load anything (loader_failed naming the setting) and only the
    explicit ``hook_only`` runs the loader."""
    out = _sandbox_without_caps(tmp_path, forbid_user_namespaces=True)
    failed = out["isolate"]["loader_failed"]
    assert "cannot isolate the loader from the network" in failed
    assert "MODELPRESS_SANDBOX_NETWORK" in failed and "EPERM" in failed, failed
    assert "ok" in out["hook_only"], out  # the weaker mode is a choice, and it does run


def test_isolate_without_privileges_uses_a_user_namespace(tmp_path: Path) -> None:
    """No CAP_SYS_ADMIN, but user namespaces allowed (a non-root deployment): the child
    still gets its own network (the unprivileged CLONE_NEWUSER | CLONE_NEWNET path) and can
    still read its owner-only input file."""
    out = _sandbox_without_caps(tmp_path, forbid_user_namespaces=False)
    assert set(out["isolate"]["ok"].values()) == {"ENETUNREACH"}, out
    assert set(out["hook_only"]["ok"].values()) == {"connected"}, out  # control


@pytest.fixture
def app_with(settings: Settings, clean_db: None) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        c = TestClient(create_app(settings.model_copy(update=overrides)),
                       raise_server_exceptions=False)
        clients.append(c.__enter__())
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _sandbox_children() -> list[int]:
    """Pids of live sandbox children of this process tree (there must be none left)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            fields = (d / "stat").read_text().split()
        except OSError:
            continue
        if b"_child_main" in cmd and fields[2] != "Z" and int(fields[3]) == os.getpid():
            pids.append(int(d.name))
    return pids


@pytest.mark.parametrize(("how", "overrides", "match"), [
    ("abort", {}, "killed by signal 6"),
    ("segfault", {}, "killed by signal 11"),
    ("hog_memory", {"inspect_memory_mb": 2048}, "ran out of memory (limit 2048 MB)"),
    ("timeout", {"inspect_timeout_s": 0.5}, "timed out after 0.5 s"),
    ("real_memory_limit", {"inspect_memory_mb": 64}, "memory limit 64 MB"),
])
def test_loader_failure_is_clear_and_api_survives(
        app_with: Callable[..., TestClient], key: str, settings: Settings,
        mlp_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, how: str,
        overrides: dict[str, object], match: str) -> None:
    if how in ("abort", "segfault", "hog_memory"):  # a loader bug, played by a probe
        monkeypatch.setattr(sandbox, "INSPECT_TARGET", f"{PROBES}:{how}")
    client = app_with(**overrides)
    auth = {"Authorization": f"Bearer {key}"}
    r = client.post("/v1/models?filename=mlp.pt2", content=mlp_files["pt2"].read_bytes(),
                    headers=auth)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "loader_failed", r.json()
    assert match in r.json()["detail"], r.json()
    assert _stored(settings) == (0, 0, 0)
    assert _tmp_left(settings) == []
    assert _sandbox_children() == []  # killed and reaped, even on timeout
    # The API process is alive and still serves (the same process: TestClient is in-process).
    assert client.get("/v1/models", headers=auth).status_code == 200
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("how", "overrides", "match"), [
    ("abort", {}, "data loader was killed by signal 6"),
    ("hog_memory", {"inspect_memory_mb": 1024}, "ran out of memory (limit 1024 MB)"),
])
def test_data_loader_failure_is_clear_and_api_survives(
        app_with: Callable[..., TestClient], key: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch, how: str, overrides: dict[str, object],
        match: str) -> None:
    """Data files are parsed in the same sandbox child: its death is the child's alone."""
    monkeypatch.setattr(sandbox, "DATA_TARGET", f"{PROBES}:{how}")
    client = app_with(**overrides)
    auth = {"Authorization": f"Bearer {key}"}
    model_id = _seed_model(settings, key)
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((16, 1, 8, 8), np.float32))
    r = client.post(f"/v1/datasets?model_id={model_id}&filename=data.npz",
                    content=buf.getvalue(), headers=auth)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "loader_failed" and match in r.json()["detail"], r.json()
    assert _stored(settings) == (1, 0, 0)
    assert _tmp_left(settings) == [] and _sandbox_children() == []
    assert client.get("/v1/datasets", headers=auth).status_code == 200

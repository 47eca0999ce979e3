"""Safe model loading: .pt2 archive checks, refusal of pickles/TorchScript, ONNX external data,
and the sandboxed inspector (real tiny models, real hostile files)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

from app.engine.errors import InvalidModel, LoaderCrashed, UnsafeModel
from app.engine.formats.onnx_safe import check_onnx
from app.engine.formats.pt2 import check_pt2_archive, load_pt2
from app.engine.formats.sandbox import inspect_model
from app.engine.types import TensorSpec
from examples.zoo import MLP, ResCNN
from tests.hostile import Touch, add_symlink_member, read_member, rewrite_zip

pytestmark = pytest.mark.engine


# ---------------------------------------------------------------------------------- good files


def test_sandbox_inspects_good_pt2(mlp_pt2: Path) -> None:
    info = inspect_model(mlp_pt2, timeout_s=60)
    assert info.format == "pt2"
    assert info.inputs == (TensorSpec("x", (None, 1, 8, 8), "float32"),)
    assert len(info.outputs) == 1
    assert info.outputs[0].shape == (None, 10) and info.outputs[0].dtype == "float32"
    assert info.parameters == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # 8970
    assert info.size_bytes == mlp_pt2.stat().st_size
    assert info.sha256 == hashlib.sha256(mlp_pt2.read_bytes()).hexdigest()


def test_load_pt2_rescnn_matches_eager(rescnn_pt2: Path) -> None:
    check_pt2_archive(rescnn_pt2)
    ep = load_pt2(rescnn_pt2)
    assert list(ep.graph_signature.user_inputs) == ["x"]
    torch.manual_seed(0)  # the fixture built ResCNN(width=8) right after this seed
    eager = ResCNN(width=8).eval()
    x = torch.randn(5, 1, 8, 8)  # batch 5 != example batch 4: the dim stayed dynamic
    out = ep.module()(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out, eager(x), rtol=0, atol=1e-6)
    assert ep.example_inputs is not None and ep.example_inputs[0][0].shape == (4, 1, 8, 8)


def test_sandbox_inspects_onnx(mlp_onnx: Path) -> None:
    info = inspect_model(mlp_onnx, timeout_s=60)
    assert info.format == "onnx"
    assert info.inputs[0].name == "x" and info.inputs[0].shape[1:] == (1, 8, 8)
    assert info.inputs[0].shape[0] is None and info.inputs[0].dtype == "float32"
    assert info.outputs[0].shape[1:] == (10,)
    assert info.parameters == 8970


# ---------------------------------------------------------------------------------- pt2 attacks


def test_use_pickle_weight_refused(mlp_pt2: Path, tmp_path: Path) -> None:
    cfg = json.loads(read_member(mlp_pt2, "data/weights/model_weights_config.json"))
    assert all(v["use_pickle"] is False for v in cfg["config"].values())  # what torch writes
    cfg["config"]["fc1.weight"]["use_pickle"] = True
    bad = rewrite_zip(mlp_pt2, tmp_path / "bad.pt2",
                      {"data/weights/model_weights_config.json": json.dumps(cfg).encode()})
    with pytest.raises(UnsafeModel, match=r"fc1\.weight.*use_pickle"):
        check_pt2_archive(bad)
    with pytest.raises(UnsafeModel, match="use_pickle"):  # the child reports it, class kept
        inspect_model(bad, timeout_s=60)


def test_pickled_constant_refused(mlp_pt2: Path, tmp_path: Path) -> None:
    cfg = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False,
                               "use_pickle": False, "tensor_meta": None}}}
    bad = rewrite_zip(mlp_pt2, tmp_path / "bad.pt2",
                      {"data/constants/model_constants_config.json": json.dumps(cfg).encode()},
                      add={"<root>/data/constants/opaque_obj_0": pickle.dumps(1)})
    with pytest.raises(UnsafeModel, match="opaque_obj_0"):
        check_pt2_archive(bad)


@pytest.mark.parametrize("member", ["data/aotinductor/model/model.so", "data/weights/model.pt"])
def test_unexpected_members_refused(mlp_pt2: Path, tmp_path: Path, member: str) -> None:
    bad = rewrite_zip(mlp_pt2, tmp_path / "bad.pt2", add={f"<root>/{member}": b"\x7fELF"})
    with pytest.raises(UnsafeModel, match=r"not part of a plain torch\.export archive"):
        check_pt2_archive(bad)


def test_pickled_sample_inputs_refused_and_not_run(mlp_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save((Touch(marker),), buf)  # a torch zip holding a code-running pickle
    bad = rewrite_zip(mlp_pt2, tmp_path / "bad.pt2",
                      {"data/sample_inputs/model.pt": buf.getvalue()})
    with pytest.raises(UnsafeModel, match="weights_only"):
        check_pt2_archive(bad)
    with pytest.raises(UnsafeModel):
        load_pt2(bad)
    assert not marker.exists()


def test_plain_pickle_pt_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    legacy = tmp_path / "model.pt"
    torch.save(Touch(marker), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeModel, match="plain pickle"):
        check_pt2_archive(legacy)
    full = tmp_path / "full.pth"
    torch.save(MLP(), full)  # torch.save of a whole module: a zip with data.pkl
    with pytest.raises(UnsafeModel, match=r"torch\.save pickle archive"):
        check_pt2_archive(full)
    assert not marker.exists()


def test_torchscript_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.trace(MLP().eval(), torch.randn(1, 1, 8, 8)).save(str(path))
    with pytest.raises(UnsafeModel, match="TorchScript"):
        check_pt2_archive(path)


def test_truncated_pt2_invalid(mlp_pt2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(mlp_pt2.read_bytes()[: mlp_pt2.stat().st_size // 2])
    with pytest.raises(InvalidModel, match="truncated"):
        check_pt2_archive(bad)
    empty = tmp_path / "empty.pt2"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModel):
        check_pt2_archive(empty)


@pytest.mark.parametrize("name", ["../evil", "mlp/../../evil", "/etc/evil", "C:/evil"])
def test_traversal_member_refused(mlp_pt2: Path, tmp_path: Path, name: str) -> None:
    bad = rewrite_zip(mlp_pt2, tmp_path / "bad.pt2", add={name: b"x"})
    with pytest.raises(UnsafeModel, match=r"'\.\.'|absolute"):
        check_pt2_archive(bad)


def test_symlink_member_refused(mlp_pt2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    shutil.copy(mlp_pt2, bad)
    add_symlink_member(bad, "mlp/extra/link", "/etc/passwd")
    with pytest.raises(UnsafeModel, match="symlink"):
        check_pt2_archive(bad)


def test_zip_bomb_refused(mlp_pt2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bomb.pt2"
    shutil.copy(mlp_pt2, bad)
    with zipfile.ZipFile(bad, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mlp/extra/zeros", b"\0" * (8 << 20))  # 8 MiB -> ~8 KiB
    with pytest.raises(UnsafeModel, match="zip bomb"):
        check_pt2_archive(bad)
    with pytest.raises(UnsafeModel, match="over the limit"):
        check_pt2_archive(mlp_pt2, max_uncompressed_bytes=10_000)


# ---------------------------------------------------------------------------------- sandbox


def test_sandbox_timeout_and_memory_limit(mlp_pt2: Path) -> None:
    with pytest.raises(LoaderCrashed, match="timed out"):
        inspect_model(mlp_pt2, timeout_s=0.2)
    with pytest.raises(LoaderCrashed, match="memory limit 64 MB"):
        inspect_model(mlp_pt2, memory_mb=64)


# ---------------------------------------------------------------------------------- ONNX


def onnx_with_location(src: Path, dst_dir: Path, location: str) -> Path:
    """Copy the ONNX + its data next to each other, then point one tensor at ``location``."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    for f in src.parent.iterdir():
        if f.name.startswith(src.name):
            shutil.copy(f, dst_dir / f.name)
    ext = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext, "the dynamo exporter wrote external data (DESIGN §6)"
    for e in ext[0].external_data:
        if e.key == "location":
            e.value = location
    out = dst_dir / src.name
    onnx.save(model, str(out))
    return out


def test_onnx_good_external_data_passes(mlp_onnx: Path) -> None:
    assert (mlp_onnx.parent / (mlp_onnx.name + ".data")).is_file()
    check_onnx(mlp_onnx)


@pytest.mark.parametrize(("location", "message"), [
    ("../mlp.onnx.data", r"'\.\.'"),
    ("sub/../../mlp.onnx.data", r"'\.\.'"),
    ("/etc/passwd", "absolute"),
])
def test_onnx_external_traversal_refused(mlp_onnx: Path, tmp_path: Path, location: str,
                                         message: str) -> None:
    shutil.copy(mlp_onnx.parent / (mlp_onnx.name + ".data"), tmp_path / "mlp.onnx.data")
    bad = onnx_with_location(mlp_onnx, tmp_path / "up", location)
    with pytest.raises(UnsafeModel, match=message):
        check_onnx(bad)


def test_onnx_external_symlink_and_range_refused(mlp_onnx: Path, tmp_path: Path) -> None:
    bad = onnx_with_location(mlp_onnx, tmp_path / "a", "link.data")
    (tmp_path / "a" / "link.data").symlink_to(tmp_path / "a" / "mlp.onnx.data")
    with pytest.raises(UnsafeModel, match="symlink"):
        check_onnx(bad)
    # A range past the end of the data file would read beyond the upload.
    model = onnx.load(str(mlp_onnx), load_external_data=False)
    d = tmp_path / "b"
    d.mkdir()
    shutil.copy(mlp_onnx.parent / (mlp_onnx.name + ".data"), d / "mlp.onnx.data")
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "offset":
            e.value = str(10**9)
    onnx.save(model, str(d / "mlp.onnx"))
    with pytest.raises(UnsafeModel, match="outside"):
        check_onnx(d / "mlp.onnx")


def _set_external(path: Path, **fields: str) -> None:
    """Rewrite the first external tensor's external_data fields (location/offset/length)."""
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e for e in t.external_data}
    for key, value in fields.items():
        if key in entries:
            entries[key].value = value
        else:
            t.external_data.add(key=key, value=value)
    onnx.save(model, str(path))


def test_onnx_external_hardlink_refused(mlp_onnx: Path, tmp_path: Path) -> None:
    # A hard link inside the upload folder to a file outside it: relative, no '..', no
    # symlink, a regular file inside the folder by every path test; only its link count shows.
    secret = tmp_path / "outside" / "secret.data"
    secret.parent.mkdir()
    shutil.copy(mlp_onnx.parent / (mlp_onnx.name + ".data"), secret)
    bad = onnx_with_location(mlp_onnx, tmp_path / "up", "w.data")
    os.link(secret, tmp_path / "up" / "w.data")
    with pytest.raises(UnsafeModel, match="hard link"):
        check_onnx(bad)
    with pytest.raises(UnsafeModel, match="hard link"):  # same verdict from the sandbox child
        inspect_model(bad, timeout_s=60)
    (tmp_path / "up" / "w.data").unlink()
    shutil.copy(secret, tmp_path / "up" / "w.data")  # the same bytes as its own file: fine
    check_onnx(bad)


def test_onnx_external_symlinked_folder_refused(mlp_onnx: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    shutil.copy(mlp_onnx.parent / (mlp_onnx.name + ".data"), tmp_path / "outside" / "w.data")
    bad = onnx_with_location(mlp_onnx, tmp_path / "up", "sub/w.data")
    (tmp_path / "up" / "sub").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafeModel, match="symlink"):
        check_onnx(bad)


@pytest.mark.parametrize(("fields", "message"), [
    ({"offset": "0", "length": "10000000"}, "outside"),  # length past the end
    ({"offset": "-8"}, "outside"),
    ({"offset": "many"}, "bad external data offset"),
])
def test_onnx_external_bad_range_refused(mlp_onnx: Path, tmp_path: Path,
                                         fields: dict[str, str], message: str) -> None:
    d = tmp_path / "up"
    bad = onnx_with_location(mlp_onnx, d, mlp_onnx.name + ".data")
    check_onnx(bad)  # untouched range: accepted
    _set_external(bad, **fields)
    with pytest.raises((UnsafeModel, InvalidModel), match=message):
        check_onnx(bad)


def test_onnx_single_file_refuses_external_data(mlp_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidModel, match="single file"):
        check_onnx(mlp_onnx, external_data=False)  # its own, valid .data file next to it
    with pytest.raises(InvalidModel, match="single file"):
        inspect_model(mlp_onnx, timeout_s=60, onnx_external_data=False)
    bad = onnx_with_location(mlp_onnx, tmp_path / "up", "../../etc/passwd")
    with pytest.raises(UnsafeModel, match=r"'\.\.'"):  # hostile stays unsafe, not just invalid
        check_onnx(bad, external_data=False)


def test_onnx_truncated_invalid(mlp_onnx: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(mlp_onnx.read_bytes()[:100])
    with pytest.raises(InvalidModel):
        check_onnx(bad)

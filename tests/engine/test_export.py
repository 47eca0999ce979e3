"""ONNX (single file, dynamic batch, parity), .pt2 round trips (fp32 and int8), manifest helpers."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from app.engine.stages.export import (
    OnnxCache,
    export_key,
    export_onnx,
    export_pt2,
    library_versions,
    onnx_outputs,
    onnx_parity,
    sha256_file,
)
from app.engine.stages.quantize import quantize_static
from examples.zoo import DWCNN, MLP, TinyEncoder, digits

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return digits(8)[0]


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running stats so a batch-norm export bug would show in the parity."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _uses_pickle(cfg: object) -> bool:
    if isinstance(cfg, dict):
        return cfg.get("use_pickle") is True or any(_uses_pickle(v) for v in cfg.values())
    if isinstance(cfg, list):
        return any(_uses_pickle(v) for v in cfg)
    return False


def test_export_onnx_single_file_dynamic_batch_parity(x: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(DWCNN(width=8))
    path = export_onnx(model, (x[:1],), tmp_path / "out" / "model.onnx")  # batch-1 example
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no .data side file
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces / paths
    for batch in (1, 5, 64):
        assert onnx_parity(model, path, (x[:batch],)) < 1e-4


def test_export_onnx_exported_module_and_encoder(x: torch.Tensor, tmp_path: Path) -> None:
    """``ExportedProgram.module()`` (refuses eval()) and attention both export."""
    torch.manual_seed(0)
    enc = TinyEncoder(seq=8, dim=32, ffn=64, layers=1).eval()
    ep_mod = torch.export.export(
        enc, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},)
    ).module()
    path = export_onnx(ep_mod, (x[:4],), tmp_path / "enc.onnx")
    with torch.no_grad():
        ref = enc(x[:9]).numpy()
    got = onnx_outputs(path, (x[:9],))[0]
    assert np.abs(got - ref).max() < 1e-4


def test_pt2_round_trip_fp32_and_int8(x: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(DWCNN(width=8))
    ex = (x[:4],)
    q = quantize_static(model, ex, [(x[:32],), (x[32:64],)])
    for name, m in (("fp32", model), ("int8", q)):
        path = export_pt2(m, ex, tmp_path / f"{name}.pt2")
        # what the safe loader (formats.pt2) insists on: no pickled weights or constants
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.endswith("_config.json"):
                    assert not _uses_pickle(json.loads(zf.read(member))), member
        loaded = torch.export.load(str(path)).module()
        with torch.no_grad():
            for batch in (2, 7):
                assert torch.equal(loaded(x[:batch]), m(x[:batch])), name
    # int8 weights really are int8 in the archive
    ep = torch.export.load(str(tmp_path / "int8.pt2"))
    int8 = [t for t in ep.constants.values() if isinstance(t, torch.Tensor)
            and t.dtype == torch.int8] + [t for t in ep.state_dict.values()
                                          if t.dtype == torch.int8]
    assert len(int8) == 11  # stem + 3 x (expand, depthwise, project) + head
    def weight_bytes(path: Path) -> int:
        with zipfile.ZipFile(path) as zf:
            return sum(i.file_size for i in zf.infolist()
                       if "/data/weights/weight_" in i.filename)

    assert weight_bytes(tmp_path / "int8.pt2") < 0.5 * weight_bytes(tmp_path / "fp32.pt2")
    # the example inputs stored in the archive are the 4-sample batch, not the whole data set
    assert (tmp_path / "int8.pt2").stat().st_size < 400_000


def test_sha256_and_versions(tmp_path: Path) -> None:
    p = tmp_path / "blob.bin"
    data = np.random.default_rng(0).bytes(3 << 20)  # spans several read chunks
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    v = library_versions()
    assert set(v) == {"torch", "torchao", "torch_pruning", "onnx", "onnxruntime", "onnxscript",
                      "numpy", "python"}
    assert v["torch"].startswith(torch.__version__.split("+")[0])
    assert v["onnx"] == onnx.__version__
    assert all(s and s != "not installed" for s in v.values())


def test_onnx_parity_detects_a_different_model(x: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = MLP().eval()
    b = MLP().eval()
    path = export_onnx(a, (x[:2],), tmp_path / "a.onnx")
    assert onnx_parity(a, path, (x[:16],)) < 1e-5
    assert onnx_parity(b, path, (x[:16],)) > 1e-2


def test_onnx_cache_gives_the_fresh_export_s_bytes_and_stays_bounded(
    x: torch.Tensor, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = MLP(hidden=32).eval()
    calls: list[Path] = []

    def export(path: Path) -> Path:
        calls.append(path)
        return export_onnx(model, (x[:2],), path)

    key = export_key("ab" * 32, (x[:2],))
    cache = OnnxCache(max_bytes=1 << 30)
    assert cache.export(key, tmp_path / "1.onnx", export) is False
    assert cache.export(key, tmp_path / "2.onnx", export) is True
    assert calls == [tmp_path / "1.onnx"]  # the hit did not export
    fresh = export_onnx(model, (x[:2],), tmp_path / "fresh.onnx")
    assert (tmp_path / "2.onnx").read_bytes() == fresh.read_bytes()

    # Another file or other input shapes: another key, a real export.
    assert export_key("cd" * 32, (x[:2],)) != key
    other = export_key("ab" * 32, (x[:2].double(),))
    assert other != key
    assert cache.export(None, tmp_path / "3.onnx", export) is False and len(cache) == 1

    # Bounded: room for one file only, the least recently used goes.
    size = fresh.stat().st_size
    small = OnnxCache(max_bytes=size + size // 2)
    small.export(key, tmp_path / "4.onnx", export)
    small.export(other, tmp_path / "5.onnx", export)
    assert len(small) == 1
    n = len(calls)
    assert small.export(key, tmp_path / "6.onnx", export) is False and len(calls) == n + 1

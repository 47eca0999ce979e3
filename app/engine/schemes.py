"""The quantization schemes: one registry, one small class per scheme.

A scheme says how it builds (``method``), whether it needs calibration batches, whether
distillation can train through it (quantization-aware: PT2E fake-quant), and which scheme the
planner tries instead when it fails on a model (``fallback``). The recipe's ``quant`` field in
the engine (``types.QuantScheme``) and in the API (``app.schemas.jobs.RecipeIn``) accept exactly
the names registered here; a new scheme is a new class with ``@register``.

- ``pt2e``: torchao PT2E on the torch graph (``quantize_torch`` returns the converted
  GraphModule, exported to a QDQ ONNX graph; ``prepare_qat`` gives the fake-quant student).
- ``onnx``: a step on the fp32 ONNX file (``quantize_onnx``); distillation trains the fp32
  model and the step runs after it.
- ``fp32``: no quantization.

This module imports only the standard library at import time (the API schema reads the
names); the stage code loads when a scheme builds.

>>> from app.engine import schemes
>>> schemes.get("int8_dynamic").needs_calibration
False
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from app.engine.errors import InvalidRecipe

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

Method = Literal["fp32", "pt2e", "onnx"]
Batches = Sequence[Sequence["torch.Tensor"]]  # calibration batches, model input order


class Scheme:
    """Base of every scheme; subclasses set the class attributes and one build method."""

    name: ClassVar[str]
    method: ClassVar[Method]
    summary: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    qat: ClassVar[bool] = False  # distillation can be quantization-aware (fake-quant student)
    fallback: ClassVar[str | None] = None  # tried by the planner when this one fails

    def to_onnx(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path,
                calib: Batches) -> tuple[nn.Module, Path]:
        """Write the candidate's ONNX file to ``path``; returns the torch model it came from
        (the converted int8 graph for ``pt2e``, else ``model``) and the path. ``calib``:
        calibration batches (may be empty when ``needs_calibration`` is False)."""
        raise NotImplementedError

    def prepare_qat(self, model: nn.Module,
                    example_inputs: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
        """With ``qat``: the fake-quant student (``quantize.convert`` finishes it)."""
        raise NotImplementedError(f"{self.name} has no quantization-aware training")

    def notes(self, path: Path) -> list[str]:
        """Warnings for the user about the built file (layers the scheme left in fp32)."""
        return []


SCHEMES: dict[str, Scheme] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: add one instance of ``cls`` to ``SCHEMES`` under ``cls.name``."""
    if cls.name in SCHEMES:
        raise ValueError(f"quantization scheme {cls.name!r} registered twice")
    SCHEMES[cls.name] = cls()
    return cls


def get(name: str) -> Scheme:
    """The registered scheme ``name``; ``InvalidRecipe`` naming the known ones otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise InvalidRecipe(f"unknown quantization scheme {name!r}; known: "
                            + ", ".join(SCHEMES)) from None


def fallback_for(name: str, exclude: set[str]) -> str | None:
    """First scheme along ``name``'s fallback chain that is not in ``exclude``."""
    seen = {name}
    nxt = get(name).fallback
    while nxt is not None and nxt in exclude:
        if nxt in seen:  # the chain loops back (int8_dynamic <-> int8_static_onnx)
            return None
        seen.add(nxt)
        nxt = get(nxt).fallback
    return None if nxt in seen else nxt


def _onnx_feeds(src: Path, calib: Batches) -> list[dict[str, np.ndarray]]:
    """Calibration batches as ONNX Runtime feeds (graph inputs in model-input order)."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    return [{n: t.detach().cpu().numpy() for n, t in zip(names, batch, strict=True)}
            for batch in calib]


class _Pt2eScheme(Scheme):
    """Quantizes the torch graph (torchao PT2E), then exports the converted graph."""

    method = "pt2e"

    def quantize_torch(self, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                       calib: Batches) -> torch.fx.GraphModule:
        raise NotImplementedError

    def to_onnx(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path,
                calib: Batches) -> tuple[nn.Module, Path]:
        from app.engine.stages.export import export_onnx

        q = self.quantize_torch(model, example_inputs, calib)
        return q, export_onnx(q, example_inputs, path)


class _OnnxScheme(Scheme):
    """Exports fp32, then quantizes the ONNX file."""

    method = "onnx"

    def quantize_onnx(self, src: Path, dst: Path, calib: Batches) -> Path:
        raise NotImplementedError

    def to_onnx(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path,
                calib: Batches) -> tuple[nn.Module, Path]:
        from app.engine.stages.export import export_onnx

        tmp = path.with_name(path.stem + ".fp32.tmp.onnx")
        try:
            export_onnx(model, example_inputs, tmp)
            return model, self.quantize_onnx(tmp, path, calib)
        finally:
            tmp.unlink(missing_ok=True)


@register
class Fp32(Scheme):
    name = "none"
    method = "fp32"
    summary = "no quantization (fp32)"

    def to_onnx(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path,
                calib: Batches) -> tuple[nn.Module, Path]:
        from app.engine.stages.export import export_onnx

        return model, export_onnx(model, example_inputs, path)


@register
class Int8Static(_Pt2eScheme):
    name = "int8_static"
    summary = ("int8 weights and activations, PT2E static with calibration (X86 recipe, "
               "per-channel weights); QDQ ONNX that ONNX Runtime runs with int8 kernels")
    needs_calibration = True
    qat = True
    fallback = "int8_static_onnx"
    skip_depthwise: ClassVar[bool] = False

    def quantize_torch(self, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                       calib: Batches) -> torch.fx.GraphModule:
        from app.engine.stages.quantize import quantize_static

        return quantize_static(model, example_inputs, calib, skip_depthwise=self.skip_depthwise)

    def prepare_qat(self, model: nn.Module,
                    example_inputs: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
        from app.engine.stages.quantize import prepare_qat

        return prepare_qat(model, example_inputs, skip_depthwise=self.skip_depthwise)


@register
class Int8StaticDepthwiseFp32(Int8Static):
    """Per-layer fallback: int8 except depthwise convs, which int8 can make slower on ONNX
    Runtime CPU (DESIGN §6); the planner measures it beside all-int8 and keeps the faster."""

    name = "int8_static_dw_fp32"
    summary = "int8_static with depthwise convolutions kept in fp32"
    skip_depthwise = True


@register
class Int8StaticOnnx(_OnnxScheme):
    """ONNX Runtime's own static quantization on the fp32 export: the route when the torch
    graph cannot go through PT2E. Distillation trains fp32 and quantizes after."""

    name = "int8_static_onnx"
    summary = "int8 static on the fp32 ONNX (onnxruntime quantize_static, QDQ, per-channel)"
    needs_calibration = True
    fallback = "int8_dynamic"

    def quantize_onnx(self, src: Path, dst: Path, calib: Batches) -> Path:
        from app.engine.stages.quantize import quantize_onnx_static

        return quantize_onnx_static(src, dst, _onnx_feeds(src, calib))


@register
class Int8Dynamic(_OnnxScheme):
    name = "int8_dynamic"
    summary = ("int8 weights, activations quantized at run time (onnxruntime quantize_dynamic, "
               "per-channel): Linear, embedding tables, LSTM, attention")
    # Nothing to quantize dynamically (a conv net without Linear layers): ORT static int8.
    fallback = "int8_static_onnx"

    def quantize_onnx(self, src: Path, dst: Path, calib: Batches) -> Path:
        from app.engine.stages.quantize import quantize_onnx_dynamic

        out = quantize_onnx_dynamic(src, dst)
        if not _has_int8_weights(out):
            raise ValueError("int8_dynamic found no layer it can quantize (MatMul, Gemm, "
                             "Gather, LSTM or Attention with constant weights)")
        return out

    def notes(self, path: Path) -> list[str]:
        from app.engine.stages.quantize import fp32_leftovers

        why = {"GRU": "ONNX Runtime has no int8 GRU kernel",
               "RNN": "ONNX Runtime has no int8 RNN kernel",
               "Conv": "int8 dynamic convs run slower than fp32 on CPU; the int8_static "
                       "schemes quantize convolutions"}
        return [f"int8_dynamic kept {n} {op} layer(s) in fp32: {why.get(op, 'not quantizable')}"
                for op, n in sorted(fp32_leftovers(path).items())]


@register
class Fp16(_OnnxScheme):
    name = "fp16"
    summary = "fp16 weight storage, fp32 compute (half the file, fp32 speed)"

    def quantize_onnx(self, src: Path, dst: Path, calib: Batches) -> Path:
        from app.engine.stages.quantize import quantize_onnx_fp16

        return quantize_onnx_fp16(src, dst)


def _has_int8_weights(path: Path) -> bool:
    import onnx

    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return any(i.data_type in eight_bit and len(i.dims) >= 2
               for i in onnx.load(str(path)).graph.initializer)


NAMES: tuple[str, ...] = tuple(SCHEMES)  # what ``Recipe.quant`` / the API's recipe accept

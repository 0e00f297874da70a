"""Ops of imported graphs whose arguments the file holds as constants, made static: ``Pad``
(and, where it only appends zero channels, prunable) and ``Resize``.

ONNX (opset 11 on) gives a Pad's amounts and a Resize's scales as tensors; onnx2torch reads them
with ``tolist()`` on every call, which torch.export treats as data-dependent: a BlazeFace student
took over ten minutes to export, and a YOLO-style student's export printed torch's partial graph
and fell back to the legacy exporter. Values held in the file as constants are read once.

BlazeFace-style shortcuts widen their input by appending zero channels before the residual add
(24 channels padded to the block's 28). torch-pruning takes that pad for an element-wise op and
couples the narrower input with the block's output, so both keep most of their channels (a
derived BlazeFace student kept 0.74 of the parameters). ``ZeroChannels`` names the op: its input
and output widths are pruned separately (``student/tp_adapter.py`` registers how).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.pad import OnnxPadDynamic, OnnxPadStatic
from onnx2torch.node_converters.resize import OnnxResize, OnnxResizeV10
from torch import fx, nn

from compress_toolbox.load.graph.shape_agnostic import record_shapes


class ZeroChannels(nn.Module):
    """Append ``out_channels - in_channels`` zero channels to an (N, C, ...) tensor."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = (0, 0) * (x.dim() - 2)
        return F.pad(x, (*spatial, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


def _attribute(module: nn.Module, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` node reads (a dotted path)."""
    return functools.reduce(getattr, target.split("."), module)


def _arguments(node: fx.Node, names: tuple[str, ...]) -> dict:
    """A call's arguments by name (onnx2torch passes constants by position or by name)."""
    return {**dict(zip(names, node.args)), **node.kwargs}


_PAD_ARGUMENTS = ("input_tensor", "pads", "constant_value")


def _torch_pads(module: fx.GraphModule, node: fx.Node, layer: nn.Module) -> list[int] | None:
    """The pad amounts in torch's order (last dimension first), when the file fixes them."""
    if isinstance(layer, OnnxPadStatic):
        return list(layer.pads)
    pads = _arguments(node, _PAD_ARGUMENTS).get("pads")
    if getattr(pads, "op", None) != "get_attr":
        return None
    onnx_pads = [int(v) for v in _attribute(module, pads.target).tolist()]
    half = len(onnx_pads) // 2
    pairs = zip(onnx_pads[:half][::-1], onnx_pads[half:][::-1])
    return [amount for pair in pairs for amount in pair]


def _constant_value(module: fx.GraphModule, node: fx.Node, layer: nn.Module) -> float | None:
    if isinstance(layer, OnnxPadStatic):
        return float(layer.constant_value)
    value = _arguments(node, _PAD_ARGUMENTS).get("constant_value")
    if value is None:
        return 0.0
    if getattr(value, "op", None) == "get_attr":
        return float(_attribute(module, value.target))
    return None


def _replacement(module: fx.GraphModule, node: fx.Node, layer: nn.Module,
                 channels: dict[str, int]) -> nn.Module | None:  # fmt: skip
    """A static equivalent of the Pad ``node``: ZeroChannels for zeros appended to the channels
    of a 3-D or wider tensor, else OnnxPadStatic; None when the amounts are not constants."""
    pads, value = _torch_pads(module, node, layer), _constant_value(module, node, layer)
    if pads is None or value is None:
        return None
    rank = len(pads) // 2
    channel_end = 2 * (rank - 2) + 1  # index of the channel dim's end amount (rank >= 3)
    only_channels = (rank >= 3 and layer.mode == "constant" and value == 0.0
                     and pads[channel_end] > 0 and node.target in channels
                     and all(a == 0 for i, a in enumerate(pads) if i != channel_end))  # fmt: skip
    if only_channels:
        width = channels[node.target]
        return ZeroChannels(width, width + pads[channel_end])
    return OnnxPadStatic(pads=pads, mode=layer.mode, constant_value=value)


def _input_channels(module: fx.GraphModule, targets: list[str],
                    input_shape: tuple[int, ...]) -> dict[str, int]:  # fmt: skip
    """Channels (dim 1) of each target layer's input of rank 3 or more, from one run at
    batch 2."""
    try:
        shapes = record_shapes(module.eval(), targets, torch.randn(2, *input_shape))
    except Exception:  # noqa: BLE001 - a graph that fails here fails verification, named there
        return {}
    return {name: shape[0][1] for name, shape in shapes.items() if len(shape[0]) >= 3}


def _install(module: fx.GraphModule, replacements: list[tuple[fx.Node, nn.Module]]) -> int:
    """Each node's layer swapped for its static replacement, the constant arguments it no
    longer reads dropped; how many."""
    for node, layer in replacements:
        module.add_submodule(node.target, layer)
        node.args, node.kwargs = node.args[:1], {}
    if replacements:
        module.graph.eliminate_dead_code()
        module.recompile()
    return len(replacements)


def static_pads(module: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Replace, in place, each Pad whose amounts are constants with a static module
    (``ZeroChannels`` where it only appends zero channels); return how many."""
    layers = {node: module.get_submodule(node.target) for node in module.graph.nodes
              if node.op == "call_module"}  # fmt: skip
    found = [(node, layer) for node, layer in layers.items()
             if isinstance(layer, (OnnxPadDynamic, OnnxPadStatic))]  # fmt: skip
    if not found:
        return 0
    channels = _input_channels(module, [node.target for node, _ in found], input_shape)
    replacements = [(node, _replacement(module, node, layer, channels)) for node, layer in found]
    return _install(module, [(node, new) for node, new in replacements if new is not None])


class StaticResize(nn.Module):
    """``F.interpolate`` by constant scale factors of the spatial dims (an ONNX Resize whose
    scales the file fixes)."""

    def __init__(self, scale_factor: tuple[float, ...], mode: str, align_corners: bool | None):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners)  # fmt: skip

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"


_TORCH_MODES = {("nearest", 1): "nearest", ("nearest", 2): "nearest", ("nearest", 3): "nearest",
                ("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear",
                ("cubic", 2): "bicubic"}  # fmt: skip


def _constant_scales(module: fx.GraphModule, node: fx.Node, layer: nn.Module) -> list | None:
    """The Resize's constant scales (batch and channel first), when it has them and no sizes
    (onnx2torch passes them by position or by name)."""
    names = ("x", "scales") if isinstance(layer, OnnxResizeV10) else ("x", "roi", "scales", "sizes")
    given = _arguments(node, names)
    scales, sizes = given.get("scales"), given.get("sizes")
    if getattr(scales, "op", None) != "get_attr":
        return None
    if sizes is not None and (getattr(sizes, "op", None) != "get_attr"
                              or _attribute(module, sizes.target).numel()):  # fmt: skip
        return None
    values = [float(v) for v in _attribute(module, scales.target).tolist()]
    return values if len(values) >= 3 and values[:2] == [1.0, 1.0] else None


def static_resizes(module: fx.GraphModule) -> int:
    """Replace, in place, each Resize by constant scales with ``StaticResize``; how many."""
    replacements = []
    for node in list(module.graph.nodes):
        layer = module.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(layer, (OnnxResize, OnnxResizeV10)):
            continue
        scales = _constant_scales(module, node, layer)
        inner = layer._resize if isinstance(layer, OnnxResizeV10) else layer
        mode = _TORCH_MODES.get((inner.onnx_mode, len(scales or ()) - 2))
        if scales is None or mode is None:
            continue
        align = inner.align_corners if mode != "nearest" else None
        replacements.append((node, StaticResize(tuple(scales[2:]), mode, align)))
    return _install(module, replacements)

"""Adaptive average pooling put back together in imported graphs.

``nn.AdaptiveAvgPool2d(7)`` on a feature map whose size 7 does not divide (VGG or AlexNet on small
inputs: 2x2 -> 7x7) cannot be written as one ONNX op. torch's default exporter decomposes it into
index tables: ``Transpose(2, 3, 0, 1) -> GatherND -> Transpose -> ReduceMean`` (or masked sums and a
division). torch-pruning cannot follow channels through those gathers: it maps every channel onto
stride-many indices and ran past a minute (and 8 GiB) on VGG. Here each such region is found by its
start (the channel-last transpose of a 4-D map) and end (the first node in it that gives back an
(N, C, h, w) map), checked numerically to be adaptive average pooling, and replaced by the layer.

The legacy exporter refuses such pooling outright, which stopped TorchScript teachers (rebuilt
through it) before they started. While we re-export one, ``legacy_adaptive_pools`` writes the op as
``dafl.AdaptiveAvgPool2d`` (our own domain, never in a file we write), converted back to the layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.onnx.symbolic_helper as symbolic_helper
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.node_converters.transpose import OnnxTranspose
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
from torch import fx, nn

_CHANNELS_LAST_FIRST = [2, 3, 0, 1]  # the exporter's first step: (N, C, H, W) -> (H, W, N, C)
DOMAIN = "dafl"


@symbolic_helper.parse_args("v", "is")
def _legacy_symbolic(g, x, output_size):
    return g.op(f"{DOMAIN}::AdaptiveAvgPool2d", x, output_size_i=output_size)


@contextmanager
def legacy_adaptive_pools(opset: int) -> Iterator[dict[str, int]]:
    """While active, the legacy exporter at ``opset`` writes every ``adaptive_avg_pool2d`` as
    our op; yields the ``custom_opsets`` argument the export needs."""
    torch.onnx.register_custom_op_symbolic("aten::adaptive_avg_pool2d", _legacy_symbolic, opset)
    try:
        yield {DOMAIN: 1}
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::adaptive_avg_pool2d", opset)


@add_converter(operation_type="AdaptiveAvgPool2d", version=1, domain=DOMAIN)
def _convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    size = tuple(node.attributes["output_size"])
    return OperationConverterResult(
        torch_module=nn.AdaptiveAvgPool2d(size), onnx_mapping=onnx_mapping_from_node(node)
    )


class _Values(fx.Interpreter):
    """Runs a GraphModule and keeps every node's output."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        self.values[node] = result
        return result


def _node_values(module: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, object]:
    interpreter = _Values(module)
    with torch.no_grad():
        interpreter.run(x)
    return interpreter.values


def _is_region_start(module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    layer = module.get_submodule(node.target)
    return isinstance(layer, OnnxTranspose) and list(layer.perm or []) == _CHANNELS_LAST_FIRST


def _region_ends(start: fx.Node, values: dict, order: list[fx.Node]) -> list[fx.Node]:
    """The nodes computed only from ``start`` (and constants) that are (N, C, h, w) again, in
    graph order: where the decomposition may end (a masked sum's first term is one too)."""
    source = values[start.args[0]]
    region, ends = {start}, []
    for node in order[order.index(start) + 1 :]:
        inputs = node.all_input_nodes
        if not inputs or not all(i in region or i.op == "get_attr" for i in inputs):
            continue
        region.add(node)
        value = values.get(node)
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            if value.shape[:2] == source.shape[:2]:
                ends.append(node)
    return ends


def _pools_like(source: torch.Tensor, pooled: torch.Tensor) -> bool:
    expected = nn.functional.adaptive_avg_pool2d(source, pooled.shape[2:])
    return expected.shape == pooled.shape and torch.allclose(expected, pooled, atol=1e-5, rtol=1e-4)


def fuse_adaptive_pools(module: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Replace exporters' decompositions of adaptive average pooling in ``module`` (in place) by
    ``nn.AdaptiveAvgPool2d``; returns how many. Each replacement is checked on two random
    batches to compute what the decomposition computed."""
    if len(input_shape) != 3 or not any(_is_region_start(module, n) for n in module.graph.nodes):
        return 0
    module.eval()
    runs = [_node_values(module, torch.randn(batch, *input_shape)) for batch in (2, 3)]
    order = list(module.graph.nodes)
    fused = 0
    for start in [n for n in order if _is_region_start(module, n)]:
        ends = [end for end in _region_ends(start, runs[0], order)
                if all(_pools_like(v[start.args[0]], v[end]) for v in runs)]  # fmt: skip
        if not ends:
            continue
        end = ends[0]
        name = f"adaptive_avg_pool_{fused}"
        module.add_submodule(name, nn.AdaptiveAvgPool2d(tuple(runs[0][end].shape[2:])))
        with module.graph.inserting_before(end):
            pooled = module.graph.call_module(name, (start.args[0],))
        end.replace_all_uses_with(pooled)
        fused += 1
    if fused:
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
        module.delete_all_unused_submodules()
    return fused

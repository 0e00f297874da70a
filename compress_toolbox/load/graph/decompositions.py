"""Ops that exporters write as index tables, put back together in imported graphs.

torch-pruning cannot follow channels through gathers with index tables: it maps every channel
onto stride-many indices, runs away in time or memory, or keeps a table that indexes channels
the student no longer has. Such decompositions are found and replaced by what they compute,
each replacement checked numerically on random batches (two, where the batch is not fixed):

* adaptive average pooling (below);
* ``as_strided`` that rebuilds a tensor from its own flattened elements (ConvNeXt's head in
  torch's default ONNX: ``Reshape(x, [-1]) -> Gather(index table)`` giving ``x`` back, its table
  sized for the teacher's 320 channels): replaced by ``x``;
* GroupNorm, which both exporters write as ``Reshape(N, G, -1) -> InstanceNormalization ->
  Reshape back`` (the affine follows as separate ops): torch-pruning mapped each channel onto
  C*H*W indices through the reshapes (PoolFormer ran out of memory); replaced by
  ``nn.GroupNorm(G, C, affine=False)``.

Adaptive average pooling: ``nn.AdaptiveAvgPool2d(7)`` on a feature map whose size
does not divide into 7 (VGG or AlexNet on small inputs: 2x2 -> 7x7) cannot be written as one ONNX
op. torch's default exporter decomposes it into ``Transpose(2, 3, 0, 1) -> GatherND -> Transpose ->
ReduceMean`` (or masked sums and a division); torch-pruning ran past a minute (and 8 GiB) on VGG.
Each such region is found by its start (the channel-last transpose of a 4-D map) and its end (a
node in it that gives back an (N, C, h, w) map equal to adaptive pooling of the start's input).

The legacy exporter refuses such pooling outright, which stopped TorchScript teachers (rebuilt
through it) before they started. While we re-export one, ``legacy_adaptive_pools`` writes the op as
``dafl.AdaptiveAvgPool2d`` (our own domain, never in a file we write), converted back to the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.onnx.symbolic_helper as symbolic_helper
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.node_converters.transpose import OnnxTranspose
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
from torch import fx, nn

_CHANNELS_LAST_FIRST = [2, 3, 0, 1]  # the exporter's first step: (N, C, H, W) -> (H, W, N, C)
DOMAIN = "dafl"


@symbolic_helper.parse_args("v", "is")
def _legacy_symbolic(g, x, output_size):
    pooled = g.op(f"{DOMAIN}::AdaptiveAvgPool2d", x, output_size_i=output_size)
    # the exporter infers later ops' types from this one's (else "Cannot determine scalar type")
    sizes = x.type().varyingSizes()
    if sizes is not None:
        pooled.setType(x.type().with_sizes([*sizes[:-2], *output_size]))
    else:
        pooled.setType(x.type())
    return pooled


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


def _runs(module: fx.GraphModule, input_shape: tuple[int, ...]) -> list[dict]:
    """Every node's value at batch 2 and, where the graph runs at another batch (sizes not
    fixed at export), at batch 3."""
    runs = [_node_values(module, torch.randn(2, *input_shape))]
    try:
        runs.append(_node_values(module, torch.randn(3, *input_shape)))
    except Exception:  # noqa: BLE001 - a batch fixed at export: one run must do
        pass
    return runs


def _transposes_channels_last(module: fx.GraphModule, node: fx.Node) -> bool:
    layer = module.get_submodule(node.target)
    return isinstance(layer, OnnxTranspose) and list(layer.perm or []) == _CHANNELS_LAST_FIRST


def _flattens_whole(module: fx.GraphModule, node: fx.Node) -> bool:
    """A reshape to a constant one-element shape (``[-1]``): a 1-D output."""
    shape = node.args[1] if len(node.args) > 1 else None
    if not isinstance(module.get_submodule(node.target), OnnxReshape):
        return False
    if not isinstance(shape, fx.Node) or shape.op != "get_attr":
        return False
    return attrgetter(shape.target)(module).numel() == 1


def _pools(source: torch.Tensor, value: object) -> bool:
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or source.dim() != 4:
        return False
    expected = nn.functional.adaptive_avg_pool2d(source, value.shape[2:])
    return expected.shape == value.shape and torch.allclose(expected, value, atol=1e-5, rtol=1e-4)


def _is_same(source: torch.Tensor, value: object) -> bool:
    return (source.dim() >= 2 and isinstance(value, torch.Tensor)
            and value.shape == source.shape and bool(torch.equal(value, source)))  # fmt: skip


def _add_layer(module: fx.GraphModule, source: fx.Node, prefix: str, layer: nn.Module) -> fx.Node:
    name = f"{prefix}_{sum(1 for _ in module.named_children())}"
    module.add_submodule(name, layer)
    return module.graph.call_module(name, (source,))


def _pool_layer(module: fx.GraphModule, source: fx.Node, _: torch.Tensor,
                value: torch.Tensor) -> fx.Node:  # fmt: skip
    return _add_layer(module, source, "adaptive_avg_pool",
                      nn.AdaptiveAvgPool2d(tuple(value.shape[2:])))  # fmt: skip


def _reshapes_to_groups(module: fx.GraphModule, node: fx.Node) -> bool:
    """A reshape whose only consumer is an instance norm: how exporters write GroupNorm
    (``Reshape(N, G, -1) -> InstanceNormalization -> Reshape back``, then the affine)."""
    if not isinstance(module.get_submodule(node.target), OnnxReshape):
        return False
    users = list(node.users)
    norm = nn.modules.instancenorm._InstanceNorm
    return (len(users) == 1 and users[0].op == "call_module"
            and isinstance(module.get_submodule(users[0].target), norm))  # fmt: skip


_GROUP_NORM_EPS = 1e-5  # torch's default; exporters keep the model's, checked numerically


def _group_count(source: torch.Tensor, value: object) -> int | None:
    """The G for which ``value`` is ``group_norm(source, G)`` without affine, else None."""
    if not isinstance(value, torch.Tensor) or source.dim() < 3 or value.shape != source.shape:
        return None
    channels = source.shape[1]
    for groups in (1, 2, 4, 8, 16, 32, channels):
        if channels % groups == 0:
            expected = nn.functional.group_norm(source, groups, eps=_GROUP_NORM_EPS)
            if torch.allclose(expected, value, atol=1e-4, rtol=1e-3):
                return groups
    return None


def _group_norm_layer(module: fx.GraphModule, source: fx.Node, source_value: torch.Tensor,
                      value: torch.Tensor) -> fx.Node:  # fmt: skip
    groups = _group_count(source_value, value)
    layer = nn.GroupNorm(groups, source_value.shape[1], eps=_GROUP_NORM_EPS, affine=False)
    return _add_layer(module, source, "group_norm", layer)


@dataclass(frozen=True)
class _Decomposition:
    starts: Callable[[fx.GraphModule, fx.Node], bool]  # the region's first node (structure)
    computes: Callable[[torch.Tensor, object], bool]  # (start's input, a node's value)
    # the replacement: (graph, start's input node, its value at batch 2, the end's value)
    rebuild: Callable[[fx.GraphModule, fx.Node, torch.Tensor, torch.Tensor], fx.Node]


_DECOMPOSITIONS = (
    _Decomposition(_transposes_channels_last, _pools, _pool_layer),
    _Decomposition(_flattens_whole, _is_same, lambda module, source, *_: source),
    _Decomposition(
        _reshapes_to_groups, lambda s, v: _group_count(s, v) is not None, _group_norm_layer
    ),  # fmt: skip
)


def _region(start: fx.Node, order: list[fx.Node]) -> list[fx.Node]:
    """``start`` and the nodes computed from it, in graph order (index tables may be
    computed from the input's batch size: other inputs are allowed)."""
    region = [start]
    members = {start}
    for node in order[order.index(start) + 1 :]:
        if any(i in members for i in node.all_input_nodes):
            region.append(node)
            members.add(node)
    return region


def _region_end(kind: _Decomposition, start: fx.Node, order: list[fx.Node],
                runs: list[dict]) -> fx.Node | None:  # fmt: skip
    """The first node of ``start``'s region computing what ``kind`` stands for, on every run."""
    source = start.args[0]
    for node in _region(start, order)[1:]:
        if all(kind.computes(values[source], values.get(node)) for values in runs):
            return node
    return None


def fuse_decompositions(module: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Replace exporters' index-table decompositions in ``module`` (in place) by what they
    compute; returns how many. The region's end is the first node in it that computes, on
    random batches, what the decomposition stands for."""
    order = list(module.graph.nodes)
    starts = [(node, kind) for node in order if node.op == "call_module"
              for kind in _DECOMPOSITIONS if kind.starts(module, node)]  # fmt: skip
    if not starts:  # the usual case: no run of the graph needed
        return 0
    module.eval()
    runs = _runs(module, input_shape)
    fused = 0
    for start, kind in starts:
        if not start.users:  # inside a region already replaced
            continue
        end = _region_end(kind, start, order, runs)
        if end is None:
            continue
        with module.graph.inserting_before(end):
            source = start.args[0]
            replacement = kind.rebuild(module, source, runs[0][source], runs[0][end])
        end.replace_all_uses_with(replacement)
        fused += 1
    if fused:
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
        module.delete_all_unused_submodules()
    return fused

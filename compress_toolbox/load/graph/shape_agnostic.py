"""Make imported graphs independent of the sizes they were exported with.

An exported graph often hard-codes sizes: ``Reshape(x, [-1, 512])`` after global pooling,
``Reshape(x, [-1, 2, 58, 28, 28])`` for a channel shuffle, ``Split(x, [58, 58])``. They are right
for the teacher at its export batch size, and wrong as soon as the batch or a channel count changes
(which is exactly what deriving a half-width student does). We record each such op's input and
output shapes once, then replace it with a module that recomputes the sizes from its actual input:
dimensions are matched between input and output by their products, so merged dimensions are
re-multiplied and a split dimension keeps its constant factors (the group count of a shuffle).
Reshapes whose target the legacy exporter computes from runtime sizes are treated alike, and
sibling slices that cut the channels into consecutive parts (its form of ``chunk``, a dual-path
block's residual and dense parts) become one split.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.node_converters.slice import OnnxSlice
from onnx2torch.node_converters.split import OnnxSplit13
from onnx2torch.node_converters.transpose import OnnxTranspose
from torch import fx, nn

from compress_toolbox.load.analysis import run_with_hooks

Groups = list[tuple[list[int], list[int]]]


def align_dims(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Groups | None:
    """Pair consecutive input dims with consecutive output dims of equal product.

    (2, 64, 1, 1) -> (2, 64) gives [([0], [0]), ([1], [1]), ([2], []), ([3], [])];
    (2, 116, 7, 7) -> (2, 2, 58, 7, 7) gives [([0], [0]), ([1], [1, 2]), ([2], [3]), ([3], [4])].
    None when the shapes do not factor that way.
    """
    groups: Groups = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if i >= len(in_shape):
            if out_shape[j] != 1:
                return None
            groups.append(([], [j]))
            j += 1
            continue
        if j >= len(out_shape):
            if in_shape[i] != 1:
                return None
            groups.append(([i], []))
            i += 1
            continue
        in_group, out_group = [i], [j]
        in_prod, out_prod = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while in_prod != out_prod:
            if in_prod < out_prod and i < len(in_shape):
                in_group.append(i)
                in_prod *= in_shape[i]
                i += 1
            elif out_prod < in_prod and j < len(out_shape):
                out_group.append(j)
                out_prod *= out_shape[j]
                j += 1
            else:
                return None
        groups.append((in_group, out_group))
    return groups


class FlexibleReshape(nn.Module):
    """A reshape whose target follows its input's actual sizes (see module docstring)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], groups: Groups):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.groups = groups
        # In a split group, the largest output dim absorbs size changes; the others (a shuffle's
        # group count, a head count) are structural constants.
        self.free_dim = {tuple(out_dims): max(out_dims, key=lambda d: (out_shape[d], d))
                         for _, out_dims in groups if len(out_dims) > 1}  # fmt: skip

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        return x.reshape(self.target_shape(x.shape))

    def target_shape(self, in_shape: tuple[int, ...]) -> list[int]:
        """The output shape for an input of ``in_shape``."""
        target: list = [0] * len(self.out_shape)
        for in_dims, out_dims in self.groups:
            size = math.prod(in_shape[d] for d in in_dims) if in_dims else 1
            if len(out_dims) == 1:
                target[out_dims[0]] = size
            elif out_dims:
                free = self.free_dim[tuple(out_dims)]
                fixed = math.prod(self.out_shape[d] for d in out_dims if d != free)
                for d in out_dims:
                    target[d] = size // fixed if d == free else self.out_shape[d]
        return target


class EqualSplit(nn.Module):
    """Split into ``parts`` equal chunks along ``axis``, whatever the size (was: fixed sizes).

    Pruning may leave the parts of a channel split unequal; ``sizes`` then holds them (set by
    ``tp_adapter.ChannelPartitions``)."""

    def __init__(self, axis: int, parts: int):
        super().__init__()
        self.axis, self.parts = axis, parts
        self.sizes: list[int] | None = None

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None):
        sizes = self.sizes or [x.shape[self.axis] // self.parts] * self.parts
        # Explicit sizes (not torch.chunk): torch-pruning reads them from the autograd node.
        return torch.split(x, sizes, dim=self.axis)


class SizedSplit(nn.Module):
    """Split the channels into consecutive parts of ``sizes`` (a dual-path block's residual
    and dense parts). Pruning changes the sizes: torch-pruning's split op counts what each
    part loses, and ``tp_adapter.ChannelPartitions`` copies that here."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor):
        # Explicit sizes: torch-pruning reads them from the autograd node.
        return torch.split(x, self.sizes, dim=1)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle for any channel count, as one channel permutation.

    Written as ``index_select`` so torch-pruning sees a channel-preserving op (its dependency graph
    cannot follow the reshape -> transpose -> reshape form) and shrinks both sides alike.
    """

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        order = torch.arange(channels, device=x.device)
        order = order.reshape(self.groups, channels // self.groups).t().reshape(-1)
        return x.index_select(1, order)


def _shuffle_groups(module: fx.GraphModule, split: fx.Node) -> int | None:
    """Groups of a channel shuffle starting at ``split`` (N,C,H,W -> N,g,C/g,H,W), else None."""
    layer = module.get_submodule(split.target)
    if not isinstance(layer, FlexibleReshape) or len(layer.out_shape) != 5:
        return None
    if ([1], [1, 2]) not in [(list(a), list(b)) for a, b in layer.groups]:
        return None
    return layer.out_shape[1]


def fuse_channel_shuffles(module: fx.GraphModule) -> int:
    """Replace reshape(g, C/g) -> transpose(1, 2) -> reshape(C) chains by ``ChannelShuffle``."""
    fused = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        groups = _shuffle_groups(module, node)
        transpose = next(iter(node.users))
        if groups is None or transpose.op != "call_module" or len(transpose.users) != 1:
            continue
        if not isinstance(module.get_submodule(transpose.target), OnnxTranspose):
            continue
        if list(module.get_submodule(transpose.target).perm or []) != [0, 2, 1, 3, 4]:
            continue
        merge = next(iter(transpose.users))
        merge_layer = module.get_submodule(merge.target) if merge.op == "call_module" else None
        if not isinstance(merge_layer, FlexibleReshape) or len(merge_layer.out_shape) != 4:
            continue
        module.add_submodule(node.target, ChannelShuffle(groups))
        merge.replace_all_uses_with(node)
        for dead in (merge, transpose):
            module.graph.erase_node(dead)
        fused += 1
    module.graph.lint()
    module.recompile()
    module.delete_all_unused_submodules()
    return fused


def _channel_range(args: tuple) -> tuple[int, int, int, int] | None:
    """(channels, start, stop, rank) of an ``OnnxSlice`` call cutting only axis 1, step 1."""
    x, starts, ends, *rest = args
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(starts) != 1:
        return None
    axes = rest[0] if rest and rest[0] is not None else torch.arange(len(starts))
    steps = rest[1] if len(rest) > 1 and rest[1] is not None else torch.ones(len(starts))
    if int(axes[0]) % x.dim() != 1 or int(steps[0]) != 1:
        return None
    channels = x.shape[1]
    start, stop, _ = slice(int(starts[0]), int(ends[0])).indices(channels)
    return channels, start, stop, x.dim()


def _partition_sizes(bounds: list[tuple[int, int]], channels: int) -> list[int] | None:
    """Part sizes where sorted ``(start, stop)`` bounds cut ``channels`` into consecutive,
    non-empty parts covering all of them; else None."""
    starts = [start for start, _ in bounds]
    stops = [stop for _, stop in bounds]
    if starts[0] != 0 or stops[-1] != channels or starts[1:] != stops[:-1]:
        return None
    sizes = [stop - start for start, stop in bounds]
    return sizes if min(sizes) > 0 else None


def fuse_channel_slices(module: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Replace sibling slices that cut a tensor's channels into consecutive parts covering
    all of them by one split: an ``EqualSplit`` where the parts are equal (the legacy
    exporter writes ``x.chunk(2, dim=1)`` as two Slice ops whose bounds are computed from the
    runtime shape), else a ``SizedSplit`` (a dual-path block's ``x[:, :r]``, ``x[:, r:]``).
    torch-pruning maps channels through a split, not through slices with fixed bounds.

    Slices are observed at batch 2 and 3 and must cut the same ranges at both, so a dimension 1
    that is really the batch (sequence-first tensors) is left alone.
    """
    targets = [node.target for node in module.graph.nodes if node.op == "call_module"
               and isinstance(module.get_submodule(node.target), OnnxSlice)]  # fmt: skip
    if not targets:
        return 0
    module.eval()  # observing must not touch BatchNorm running statistics
    observed: list[dict[str, tuple[int, int, int] | None]] = []
    for batch in (2, 3):
        ranges: dict[str, tuple[int, int, int] | None] = {}
        hooks = []
        for target in targets:

            def hook(_module, args, _output, target=target, ranges=ranges):
                ranges[target] = _channel_range(args)

            hooks.append((module.get_submodule(target), hook))
        run_with_hooks(module, torch.randn(batch, *input_shape), hooks)
        observed.append(ranges)
    ranges = {t: r for t, r in observed[0].items() if r is not None and observed[1].get(t) == r}
    siblings: dict[fx.Node, list[tuple[int, fx.Node]]] = defaultdict(list)
    for node in module.graph.nodes:
        if node.op == "call_module" and node.target in ranges:
            siblings[node.args[0]].append((ranges[node.target][1], node))
    fused = 0
    for source, parts in siblings.items():
        parts.sort(key=lambda part: part[0])
        channels, _, _, rank = ranges[parts[0][1].target]
        bounds = [ranges[node.target][1:3] for _, node in parts]
        sizes = _partition_sizes(bounds, channels)
        if len(parts) < 2 or sizes is None:
            continue
        equal = len(set(sizes)) == 1
        if not equal and rank != 4:
            continue  # axis 1 of a token sequence is not channels (a class token's slice)
        name = f"{parts[0][1].target}_split"
        module.add_submodule(name, EqualSplit(1, len(parts)) if equal else SizedSplit(sizes))
        with module.graph.inserting_after(source):
            split = module.graph.call_module(name, (source,))
        for index, (_, node) in enumerate(parts):
            with module.graph.inserting_after(split):
                item = module.graph.call_function(operator.getitem, (split, index))
            node.replace_all_uses_with(item)
            module.graph.erase_node(node)
        fused += 1
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    module.delete_all_unused_submodules()
    return fused


def _is_squeeze(layer: nn.Module) -> bool:
    name = type(layer).__name__
    return name.startswith("OnnxSqueeze")


def _unbind_parts(module: fx.GraphModule, input_shape: tuple[int, ...]) -> dict:
    """{squeeze node: (source node, index)} for each ``Squeeze(0)`` of one element of dim 0
    of ``source``, cut by a Slice [i:i+1] on axis 0 or by an equal Split of dim 0 into ones;
    observed in a forward pass at batch 2 (the element's index, the axes squeezed)."""
    calls = {node.target: node for node in module.graph.nodes if node.op == "call_module"}
    watched = {t: n for t, n in calls.items()
               if _is_squeeze(module.get_submodule(t))
               or isinstance(module.get_submodule(t), (OnnxSlice, EqualSplit))}  # fmt: skip
    seen: dict[str, object] = {}
    hooks = []
    for target in watched:

        def hook(layer, args, output, target=target):
            if isinstance(layer, OnnxSlice):
                x, starts, ends, *rest = args
                axes = rest[0] if rest and rest[0] is not None else None
                steps = rest[1] if len(rest) > 1 and rest[1] is not None else None
                single = (axes is not None and axes.numel() == 1 and int(axes[0]) == 0
                          and (steps is None or int(steps[0]) == 1)
                          and output.shape[0] == 1)  # fmt: skip
                seen[target] = int(starts[0]) % x.shape[0] if single else None
            elif isinstance(layer, EqualSplit):
                seen[target] = layer.axis == 0 and args[0].shape[0] == layer.parts
            else:
                x = args[0]
                seen[target] = x.dim() >= 1 and x.shape[0] == 1 and output.shape == x.shape[1:]

        hooks.append((module.get_submodule(target), hook))
    if not hooks:
        return {}
    module.eval()
    run_with_hooks(module, torch.randn(2, *input_shape), hooks)
    parts = {}
    for target, node in watched.items():
        if _is_squeeze(module.get_submodule(target)) and seen.get(target):
            element = _element_of(module, node.args[0], seen)
            if element is not None:
                parts[node] = element
    return parts


def _element_of(module: fx.GraphModule, cut: fx.Node, seen: dict) -> tuple | None:
    """(source, index) when ``cut`` is one element of dim 0 of ``source``, else None."""
    if cut.op == "call_module" and isinstance(module.get_submodule(cut.target), OnnxSlice):
        index = seen.get(cut.target)
        return None if index is None else (cut.args[0], index)
    if cut.op == "call_function" and cut.target is operator.getitem:
        split = cut.args[0]
        if split.op == "call_module" and seen.get(split.target) is True:
            return split.args[0], cut.args[1]
    return None


def fuse_unbinds(module: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Write ``x.unbind(0)`` as torch.unbind again: the exporters cut it into one Slice [i:i+1]
    (or one equal Split) along dim 0 and a Squeeze per element, which torch-pruning maps onto
    channels. Attention's q, k, v are cut this way from one qkv tensor; written as unbind,
    torch-pruning shrinks the heads' width consistently. Returns how many unbinds."""
    by_source: dict[fx.Node, dict[int, fx.Node]] = defaultdict(dict)
    for squeeze, (source, index) in _unbind_parts(module, input_shape).items():
        by_source[source][index] = squeeze
    for source, squeezes in by_source.items():
        with module.graph.inserting_after(source):
            unbind = module.graph.call_function(torch.unbind, (source, 0))
        for index, squeeze in squeezes.items():
            with module.graph.inserting_after(unbind):
                item = module.graph.call_function(operator.getitem, (unbind, index))
            squeeze.replace_all_uses_with(item)
            module.graph.erase_node(squeeze)
    if by_source:
        module.graph.eliminate_dead_code()
        module.graph.lint()
        module.recompile()
        module.delete_all_unused_submodules()
    return len(by_source)


def record_shapes(module: nn.Module, targets: list[str], example: torch.Tensor) -> dict:
    """(input shape, first output's shape, number of outputs) of each target layer on one run
    of ``example``."""
    shapes: dict[str, tuple] = {}
    hooks = []
    for target in targets:

        def hook(mod, args, output, target=target):
            first = output[0] if isinstance(output, (tuple, list)) else output
            shapes[target] = (tuple(args[0].shape), tuple(first.shape), len(output)
                              if isinstance(output, (tuple, list)) else 1)  # fmt: skip

        hooks.append((module.get_submodule(target), hook))
    run_with_hooks(module, example, hooks)
    return shapes


def _shapes_at_another_batch(module: nn.Module, targets: list[str],
                             input_shape: tuple[int, ...]) -> dict:  # fmt: skip
    """Shapes at batch 3 where the graph as exported runs there (a dynamic batch), else {}.

    Then every replacement must reproduce them too: a reshape that folds the batch into other
    dimensions (MobileViT's patch unfolding) matches its dimensions at batch 2 by chance and
    breaks at any other batch."""
    try:
        return record_shapes(module, targets, torch.randn(3, *input_shape))
    except Exception:  # noqa: BLE001 - sizes fixed at the export batch: nothing to learn
        return {}


def make_shape_agnostic(module: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Replace fixed-size Reshape/Split modules in ``module`` in place (and fuse shuffles and
    equal channel slices); returns how many were replaced or fused."""
    candidates = {}
    computed = set()  # reshapes whose target the graph computes from runtime sizes
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        layer = module.get_submodule(node.target)
        constant_arg = len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr"
        if isinstance(layer, OnnxSplit13) and len(node.args) == 1:
            constant_arg = True  # equal parts: rewritten for torch-pruning's sake
        if isinstance(layer, (OnnxReshape, OnnxSplit13)) and constant_arg:
            candidates[node.target] = node
        elif isinstance(layer, OnnxReshape) and len(node.args) > 1:
            # The legacy exporter's ``x.view(n, g, c // g, h, w)``: replaced only where the
            # dimension matching reproduces it at two batch sizes (not, e.g., a reshape that
            # folds the batch into the heads of an attention layer).
            candidates[node.target] = node
            computed.add(node.target)
    module.eval()  # recording shapes must not touch BatchNorm running statistics
    example = torch.randn(2, *input_shape)  # batch 2: a batch of 1 is ambiguous with unit dims
    if not candidates:
        return fuse_channel_slices(module, input_shape) + fuse_unbinds(module, input_shape)
    shapes = record_shapes(module, list(candidates), example)
    shapes_at_3 = _shapes_at_another_batch(module, list(candidates), input_shape)
    if computed and not shapes_at_3:
        shapes_at_3 = record_shapes(module, sorted(computed), torch.randn(3, *input_shape))
    checked = computed | set(shapes_at_3)
    replaced = 0
    for target, node in candidates.items():
        if target not in shapes:
            continue
        in_shape, out_shape, n_outputs = shapes[target]
        if isinstance(module.get_submodule(target), OnnxReshape):
            groups = align_dims(in_shape, out_shape)
            if groups is None:
                continue
            new_layer: nn.Module = FlexibleReshape(in_shape, out_shape, groups)
            if target in checked:
                in_3, out_3, _ = shapes_at_3.get(target, (None, None, None))
                if in_3 is None or tuple(new_layer.target_shape(in_3)) != out_3:
                    continue
        else:
            axis = module.get_submodule(target).axis % len(in_shape)
            if in_shape[axis] != out_shape[axis] * n_outputs:
                continue  # unequal parts: keep the original sizes
            new_layer = EqualSplit(axis, n_outputs)
        module.add_submodule(target, new_layer)
        node.args = node.args[:1]
        replaced += 1
    module.graph.eliminate_dead_code()
    module.recompile()
    fuse_channel_shuffles(module)
    return replaced + fuse_channel_slices(module, input_shape) + fuse_unbinds(module, input_shape)

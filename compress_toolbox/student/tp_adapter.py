"""The adapter to torch-pruning's dependency graph: what we need of it that its public API
does not give, in one place (tests/test_patterns.py fails loudly when a version moves it).

Index mappings around channel concatenations and splits, kept right:
torch-pruning maps a pruned channel index through a ``torch.cat`` or a split by fixed offsets
recorded when the graph was built; once an earlier layer loses channels those offsets are stale.
``ChannelPartitions`` records which part of each concatenation and split every edge carries and
rewrites the mappings (and the split sizes) as the parts shrink. Also: groups rooted at their
narrowest layer, groups whose mapping cannot be computed kept whole, and a group pruned or put
back as it was.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency.node import Node

from compress_toolbox.load.graph.constant_args import ZeroChannels
from compress_toolbox.load.graph.shape_agnostic import EqualSplit, SizedSplit


class _ZeroChannelsPruner(tp.pruner.BasePruningFunc):
    """``ZeroChannels``' input and output widths, pruned separately: torch-pruning couples a
    layer's input with its output only where one function prunes both."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        layer.out_channels -= len(idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        layer.in_channels -= len(idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


# Layers of ours that torch-pruning must be told how to prune (``customized_pruners``).
CUSTOM_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {ZeroChannels: _ZeroChannelsPruner()}


def _part_number(consumer: Node, split: Node) -> int:
    """Which output of ``split`` ``consumer`` reads (its autograd input's output number)."""
    for function, number in getattr(consumer.grad_fn, "next_functions", ()):
        if function is split.grad_fn:
            return number
    return 1 << 30  # not found: keep its place after the known ones


class _ConcatRecorder(TorchFunctionMode):
    """Records the channel count of every input of each ``torch.cat`` along the channels of
    (N, C), (N, C, H, W) or (N, C, D, H, W) tensors, by the autograd node of its output."""

    def __init__(self):
        super().__init__()
        self.sizes: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func in (torch.cat, torch.concat, torch.concatenate) and output.grad_fn is not None:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            # dim 1 of a (N, L, C) token sequence is not channels (a class token's concat)
            if output.dim() in (2, 4, 5) and dim % output.dim() == 1:
                self.sizes[output.grad_fn] = [t.shape[1] for t in tensors]
        return output


def _map_edge(node: Node, neighbour: Node, slot: int, kind: type, part: list[int],
              reverse_outward: bool) -> None:  # fmt: skip
    """Put a ``kind`` index mapping for the channel range ``part`` in ``slot`` of the
    dependency from ``node`` to ``neighbour`` (``reverse=reverse_outward``) and of the one
    back (the other direction)."""
    for source, target, reverse in ((node, neighbour, reverse_outward),
                                    (neighbour, node, not reverse_outward)):  # fmt: skip
        dep = next((dep for dep in source.dependencies if dep.target is target), None)
        if dep is not None:
            dep.index_mapping[slot] = kind(offset=part, reverse=reverse)


def _map_concat(node: Node) -> None:
    """Set the index mappings between a concatenation and its inputs from its known sizes.

    What torch-pruning's ``update_concat_index_mapping`` does, except that it first checks
    the sizes against its own recursive guess of the output width and, where the guess is
    wrong (long dual-path chains), leaves the mappings as they were."""
    offsets = [0, *itertools.accumulate(node.module.concat_sizes)]
    node.module.offsets = offsets
    mapping = tp.dependency.index_mapping._ConcatIndexMapping
    for i, source in enumerate(node.inputs):
        _map_edge(node, source, 1, mapping, offsets[i : i + 2], reverse_outward=True)


def _map_split(node: Node) -> None:
    """Set the index mappings between a channel split and each consumer from the part it
    reads, and stop torch-pruning from resetting them.

    torch-pruning maps its i-th consumer to its i-th part, which is wrong where a part has
    two consumers (a CSP stage's first block adds its input back): the third consumer of a
    two-part split got no part at all."""
    node.enable_index_mapping = False  # torch-pruning's update now leaves these mappings alone
    offsets = [0, *itertools.accumulate(node.module.split_sizes)]
    mapping = tp.dependency.index_mapping._SplitIndexMapping
    for consumer in node.outputs:
        number = _part_number(consumer, node)
        if number >= len(offsets) - 1:
            continue
        part = offsets[number : number + 2]
        _map_edge(node, consumer, 0, mapping, part, reverse_outward=False)


class _ConcatMappingFirst(list):
    """A dependency's two index mappings, applied concatenation first.

    torch-pruning keeps a split's mapping in slot 0 and a concatenation's in slot 1 and
    applies them in that order, which is right from a split into a concatenation but wrong
    back from the concatenation to the split (the part offset was added before the
    concatenation's range was cut out)."""

    def __iter__(self):
        return reversed(list(super().__iter__()))


@contextmanager
def _concat_mapping_that_gives_up() -> Iterator[None]:
    """torch-pruning's mapping of a concatenation while the graph is built, leaving the
    concatenation unmapped (for ``attach`` to map from the widths it recorded) where its
    recursive guess of the input widths fails.

    That guess takes a split's i-th consumer for its i-th part, so a split with more consumers
    than parts (YOLOv8's C2f: the second part feeds a bottleneck and the concatenation) raised
    inside ``build_dependency``, before ``attach`` could help: no student could be derived from
    any YOLOv8 export."""
    index_mapping = tp.dependency.index_mapping
    original = index_mapping.update_concat_index_mapping

    def gives_up(graph, cat_node):
        try:
            original(graph, cat_node)
        except (IndexError, TypeError):
            cat_node.module.concat_sizes = None  # half-guessed: not to be read back

    index_mapping.update_concat_index_mapping = gives_up
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original


class ChannelPartitions:
    """Keeps torch-pruning's view of channel splits and concatenations right.

    torch-pruning maps the i-th output of a split to the i-th part but lists the outputs in
    the order its trace met them (and a part may have two consumers); it infers a
    concatenation's input widths by a recursive search that gives up (or, misled by that
    order, answers wrongly) on long dual-path chains; and it maps indices from a
    concatenation back into a split in the wrong order: DPN's channel indices ran past a
    layer's width. Here the graph is traced under a
    recorder: concatenation widths are read from the tensors themselves, each consumer of a
    split is mapped to the part it reads, mappings from a concatenation into a split cut the
    range first.
    Each channel split (``SizedSplit``, ``EqualSplit``) is paired with its op and follows
    what each part loses as groups are pruned (a dual-path block's equal split does not
    stay equal).

    Build the dependency graph inside ``tracing()``, then ``attach(graph)``; call
    ``follow()`` after each pruned group.
    """

    def __init__(self, module: nn.Module):
        self.splits = [layer for layer in module.modules() if isinstance(layer, SizedSplit)
                       or isinstance(layer, EqualSplit) and layer.axis == 1]  # fmt: skip
        self._grad_fns: dict[nn.Module, list] = {layer: [] for layer in self.splits}
        self._concats = _ConcatRecorder()
        self._ops: list[tuple[nn.Module, nn.Module]] = []
        self._channel_concats: list[Node] = []  # concatenations whose widths were recorded
        self._channel_splits: list[Node] = []
        self.graph: tp.DependencyGraph | None = None

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """Record concatenation widths and each split's autograd node while tracing."""

        def record(layer: nn.Module, _args, outputs) -> None:
            self._grad_fns[layer].append(outputs[0].grad_fn)

        handles = [layer.register_forward_hook(record) for layer in self.splits]
        try:
            with self._concats, _concat_mapping_that_gives_up():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def attach(self, graph: tp.DependencyGraph) -> None:
        """Correct ``graph``'s split and concatenation bookkeeping; pair splits with ops."""
        split_ops = {}
        for node in graph.module2node.values():
            if node.type == tp.ops.OPTYPE.SPLIT:
                node.outputs.sort(key=lambda consumer: _part_number(consumer, node))
                split_ops[node.grad_fn] = node.module
                if node.module.split_sizes is not None:  # a split of the channels
                    self._channel_splits.append(node)
            elif node.type == tp.ops.OPTYPE.CONCAT:
                if node.grad_fn in self._concats.sizes:
                    node.module.concat_sizes = self._concats.sizes[node.grad_fn]
                    self._channel_concats.append(node)
                for dep in node.dependencies:
                    if dep.target.type == tp.ops.OPTYPE.SPLIT:
                        dep.index_mapping = _ConcatMappingFirst(dep.index_mapping)
        tp.dependency.index_mapping.update_index_mapping(graph)
        self._map()
        for layer, grad_fns in self._grad_fns.items():
            op = next((split_ops[g] for g in grad_fns if g in split_ops), None)
            if op is not None:
                self._ops.append((layer, op))
        # keep no autograd graph alive
        self._grad_fns = {layer: [] for layer in self.splits}
        self._concats.sizes = {}
        self.graph = graph

    def follow(self) -> None:
        """Copy the ops' current sizes into each split, and recompute the graph's split
        offsets, which the next group's channel mapping reads."""
        for layer, op in self._ops:
            if op.split_sizes is not None:
                layer.sizes = list(op.split_sizes)
        if self.graph is not None:
            refresh_split_offsets(self.graph)
            self._map()

    def _map(self) -> None:
        for node in self._channel_splits:
            _map_split(node)
        for node in self._channel_concats:
            _map_concat(node)


def refresh_split_offsets(graph: tp.DependencyGraph) -> None:
    """Recompute split offsets from the split sizes.

    torch-pruning's SplitPruner shrinks a split's sizes but stores the new offsets on itself instead
    of the split node, and the next group's index mapping would read stale offsets.
    """
    for node in graph.module2node.values():
        sizes = getattr(node.module, "split_sizes", None)
        if node.type == tp.ops.OPTYPE.SPLIT and sizes is not None:
            node.module.offsets = [0, *itertools.accumulate(sizes)]


def root_groups_at_narrowest_layer(graph: tp.DependencyGraph, module: nn.Module) -> None:
    """Make ``graph.get_all_groups`` root each group at its narrowest layer (fewest output
    channels; the first in ``module``'s definition order among equals), not at whichever layer
    tracing met first.

    Rooted at a wider layer, a group can prune nothing: in a GhostNet block, a 480-channel conv
    and its depthwise copy are concatenated into 960 channels, which a squeeze-excite (or a
    residual) sees; rooted at the SE's 960-channel conv, half of the 960 map onto nearly all of
    the 480, torch-pruning refuses to empty a layer and keeps the whole block (ratio 0.51
    instead of 0.26). Rooted at the 480-channel conv, half of it is pruned, its copy with it.
    A group is rooted at the first of its layers that ``get_all_groups`` meets, so sorting the
    layers it iterates by width does it.
    """
    position = {layer: index for index, layer in enumerate(module.modules())}

    def key(item) -> tuple[int, int]:
        layer, node = item
        pruner = graph.get_pruner_of_module(layer)
        channels = None
        if isinstance(layer, nn.Module) and pruner is not None:  # not a loose 0-d parameter
            channels = pruner.get_out_channels(layer)
        return (channels if channels is not None else 1 << 62,
                position.get(layer, len(position)))  # fmt: skip

    graph.module2node = dict(sorted(graph.module2node.items(), key=key))


def ignore_unmappable_groups(pruner: tp.pruner.BasePruner) -> int:
    """Keep whole (add to ``pruner``'s ignored layers) every group whose importance cannot be
    computed because its channel mapping points past a layer's channels; return how many.

    torch-pruning maps channels through reshapes by their strides, which goes wrong across an
    attention that splits each head into unequal key and value parts (EfficientFormer, LeViT):
    one such group used to fail the whole derivation; now it keeps its width and the rest of
    the network is pruned.
    """
    unmappable = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):  # fmt: skip
        try:
            pruner.importance(group)
        except (IndexError, RuntimeError):
            unmappable.append(group[0].dep.target.module)
    pruner.ignored_layers.extend(unmappable)
    return len(unmappable)


def _snapshot(layer: nn.Module) -> tuple[dict, dict, dict]:
    # torch-pruning replaces parameters and sizes, and edits some size lists in place
    public = {key: copy.copy(value) if isinstance(value, (list, dict)) else value
              for key, value in vars(layer).items() if not key.startswith("_")}  # fmt: skip
    return dict(layer._parameters), dict(layer._buffers), public


def _restore(layer: nn.Module, saved: tuple[dict, dict, dict]) -> None:
    parameters, buffers, public = saved
    layer._parameters.clear()
    layer._parameters.update(parameters)
    layer._buffers.clear()
    layer._buffers.update(buffers)
    layer.__dict__.update(public)


def _layers_changed_by(group: tp.dependency.Group, model: nn.Module) -> list[nn.Module]:
    """The modules ``group.prune()`` edits: its layers, and the owners of its unwrapped
    parameters (a layer scale, a class token: torch-pruning swaps them in their owner)."""
    layers = {dep.target.module: None for dep, _ in group}
    loose = {id(p) for p in layers if isinstance(p, nn.Parameter)}
    if loose:
        for module in model.modules():
            if any(id(p) in loose for p in module._parameters.values()):
                layers[module] = None
    return [layer for layer in layers if isinstance(layer, nn.Module)]


def prune_or_restore(group: tp.dependency.Group, model: nn.Module,
                     still_works: Callable[[], bool]) -> bool:  # fmt: skip
    """Prune ``group`` of ``model``; if that raises or ``still_works()`` is then false, put
    every module the group touched back as it was and return False."""
    saved = {layer: _snapshot(layer) for layer in _layers_changed_by(group, model)}
    try:
        group.prune()
        if still_works():
            return True
    except Exception:  # noqa: BLE001 - torch-pruning raises all sorts on graphs it maps wrong
        pass
    for layer, state in saved.items():
        _restore(layer, state)
    return False

"""Width pruning for graphs with channel shuffles and channel splits (ShuffleNetV2 and the like).

torch-pruning alone cannot shrink these consistently (VainF/Torch-Pruning issues #14 and #45): it
takes a channel shuffle for an element-wise op, so indices are not permuted across it, and it picks
every layer's kept channels independently, so the two halves of a later split come out unequal
(say 18 and 24 channels). Here we

* replace each ``ChannelShuffle`` by a ``ChannelPermutation`` that torch-pruning maps indices
  through; pruned, it becomes the teacher's permutation restricted to the kept channels, so every
  kept channel still reaches exactly the layers it reached in the teacher (a student that keeps the
  teacher's weights computes the teacher's kept channels, not a scrambled mix);
* choose every group's kept channels ourselves, largest group L1 norm first, in execution order,
  such that each part of every channel split keeps ``width`` of its channels. The last group
  feeding a split takes exactly what each part still needs. In a ShuffleNetV2 unit
  ``shuffle(cat(x1, branch(x2)))`` the pass-through half ``x1`` is fixed by earlier choices but the
  branch is free, and its channels land in both halves of the next split, so this always works.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency.node import Node

from compress_toolbox.errors import DaflError
from compress_toolbox.load.analysis import run_with_hooks
from compress_toolbox.load.graph.shape_agnostic import ChannelShuffle
from compress_toolbox.student.tp_adapter import CUSTOM_PRUNERS, ChannelPartitions

# (split node, part index): one part of a channel split
Part = tuple[Node, int]

# Neighbours whose own index mappings use the dependency slots our permutation mapping needs.
_CONFLICTING_NEIGHBOURS = (
    tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.RESHAPE,
    tp.ops.OPTYPE.SLICE,
    tp.ops.OPTYPE.EXPAND,
)


class BalancedPruningError(DaflError):
    """The graph cannot be pruned with balanced channel splits."""


class ChannelPermutation(nn.Module):
    """``x[:, order]``: a fixed channel permutation (a channel shuffle, possibly pruned)."""

    def __init__(self, order: torch.Tensor):
        super().__init__()
        self.register_buffer("order", order.long())

    @classmethod
    def shuffle(cls, channels: int, groups: int) -> ChannelPermutation:
        """The permutation ``ChannelShuffle(groups)`` applies to ``channels`` channels."""
        order = torch.arange(channels).reshape(groups, channels // groups).t().reshape(-1)
        return cls(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.order)

    def remove_inputs(self, idxs: list[int]) -> None:
        """Drop input channels ``idxs`` (and the outputs they fed), keeping the others' order."""
        removed = set(idxs)
        new_index = {}
        for old in range(len(self.order)):
            if old not in removed:
                new_index[old] = len(new_index)
        kept = [new_index[old] for old in self.order.tolist() if old in new_index]
        self.order = torch.tensor(kept, dtype=torch.long, device=self.order.device)


class _PermutationPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler for ``ChannelPermutation``: indices arrive in input coordinates."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        layer.remove_inputs(idxs)
        return layer

    prune_in_channels = prune_out_channels  # one function: the input and output are coupled

    def get_out_channels(self, layer: nn.Module) -> int:
        return len(layer.order)

    get_in_channels = get_out_channels


class _PermutationIndexMapping:
    """Map indices across a ``ChannelPermutation`` (input -> output or back).

    It reads the layer's current order on every call, so it stays right while groups are pruned.
    """

    def __init__(self, layer: ChannelPermutation, to_output: bool):
        self.layer, self.to_output = layer, to_output

    def __call__(self, idxs: list[_helpers._HybridIndex]) -> list[_helpers._HybridIndex]:
        order = self.layer.order.tolist()
        if self.to_output:
            where = {source: position for position, source in enumerate(order)}
        else:
            where = dict(enumerate(order))
        return [_helpers._HybridIndex(idx=where[i.idx], root_idx=i.root_idx) for i in idxs]


def needs_balanced_pruning(module: nn.Module) -> bool:
    """Whether ``module`` has a channel shuffle, which MagnitudePruner gets wrong."""
    kinds = (ChannelShuffle, ChannelPermutation)
    return any(isinstance(layer, kinds) for layer in module.modules())


def _replace_shuffles(module: nn.Module, example_input: torch.Tensor) -> None:
    """Swap every ``ChannelShuffle`` for the equivalent ``ChannelPermutation``, in place."""
    names = [name for name, layer in module.named_modules() if isinstance(layer, ChannelShuffle)]
    channels: dict[str, int] = {}

    def record(layer: nn.Module, args: tuple, name: str) -> None:
        channels[name] = args[0].shape[1]

    hooks = [(module.get_submodule(name), partial(record, name=name)) for name in names]
    run_with_hooks(module, example_input, hooks, pre=True)
    for name in names:
        if name not in channels:
            continue  # never run: nothing to prune through it
        parent, _, attr = name.rpartition(".")
        groups = module.get_submodule(name).groups
        permutation = ChannelPermutation.shuffle(channels[name], groups)
        setattr(module.get_submodule(parent), attr, permutation)


def _install_permutation_mappings(graph: tp.DependencyGraph) -> None:
    """Make the dependency graph permute indices across every ``ChannelPermutation``.

    torch-pruning numbers a permutation node's channels like its input; only the dependencies to
    and from its consumers need a mapping.
    """
    for node in graph.module2node.values():
        if not isinstance(node.module, ChannelPermutation):
            continue
        for consumer in node.outputs:
            if consumer.type in _CONFLICTING_NEIGHBOURS:
                raise BalancedPruningError(
                    f"a channel permutation feeding a {consumer.type.name} op is not supported"
                )
            for dep in node.dependencies:
                if dep.target is consumer:
                    dep.index_mapping[0] = _PermutationIndexMapping(node.module, to_output=True)
            for dep in consumer.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = _PermutationIndexMapping(node.module, to_output=False)


def _channel_splits(graph: tp.DependencyGraph) -> dict[Node, list[int]]:
    """Split nodes that cut the channel dimension, with their part sizes."""
    splits = {}
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or node.module.split_sizes is None:
            continue
        if getattr(node.grad_fn, "_saved_dim", 1) != 1:
            continue
        splits[node] = list(node.module.split_sizes)
    return splits


def _execution_order(module: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, int]:
    """Position of each submodule's first call in a forward pass."""
    order: dict[nn.Module, int] = {}

    def record(layer: nn.Module, _) -> None:  # a pre-hook returning a value replaces the inputs
        order.setdefault(layer, len(order))

    run_with_hooks(module, example_input, [(layer, record) for layer in module.modules()], pre=True)
    return order


@dataclass
class _GroupPlan:
    """One prunable group: its root layer's channels, their importance and the split parts they
    reach (a ShuffleNet channel may pass through several splits before a layer consumes it)."""

    group: tp.dependency.Group
    importance: torch.Tensor
    parts: list[set[Part]] = field(default_factory=list)  # per root channel
    keep: int = 0
    kept: list[int] = field(default_factory=list)

    @property
    def root(self) -> nn.Module:
        return self.group[0].dep.target.module

    @property
    def channels(self) -> int:
        return len(self.importance)


_OUT_FUNCTIONS = (
    tp.prune_conv_out_channels,
    tp.prune_depthwise_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_batchnorm_out_channels,
)
_IN_FUNCTIONS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


@torch.no_grad()
def _group_l1(group: tp.dependency.Group) -> torch.Tensor:
    """Each root channel's L1 norm over all the weights its group removes, averaged per layer.

    What MagnitudeImportance(p=1) computes, except that it sizes its result by the first layer it
    scores, which breaks when a depthwise conv (which it skips) roots the group.
    """
    total = torch.zeros(len(group[0].idxs))
    layers = 0
    for item in group:
        layer, function = item.dep.layer, item.dep.handler
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(layer, nn.Conv2d) and 1 < layer.groups < layer.in_channels:
            raise BalancedPruningError("grouped (not depthwise) convolutions are not supported")
        weight = weight.detach().cpu()
        if getattr(layer, "transposed", False):
            weight = weight.transpose(0, 1)
        if function in _OUT_FUNCTIONS:
            local = weight[item.idxs].reshape(len(item.idxs), -1).abs().sum(1)
        elif function in _IN_FUNCTIONS:
            local = weight.transpose(0, 1).flatten(1).abs().sum(1)[item.idxs]
        else:
            continue
        total.scatter_add_(0, torch.tensor(item.root_idxs), local.float())
        layers += 1
    return total / max(layers, 1)


def _plan(group: tp.dependency.Group, splits: dict[Node, list[int]], keep: int) -> _GroupPlan:
    plan = _GroupPlan(group, _group_l1(group), keep=keep)
    plan.parts = [set() for _ in range(plan.channels)]
    for item in group:
        node = item.dep.target
        if node not in splits:
            continue
        offsets = node.module.offsets
        for idx, root in zip(item.idxs, item.root_idxs):
            plan.parts[root].add((node, bisect.bisect_right(offsets, idx) - 1))
    return plan


def _choose(plans: list[_GroupPlan], splits: dict[Node, list[int]], width: float) -> None:
    """Fill every plan's ``kept`` so that each split part keeps ``width`` of its channels.

    ``plans`` must be in execution order: a group decides after every group upstream of it.
    """
    target = {(node, i): _scaled(size, width) for node, sizes in splits.items()
              for i, size in enumerate(sizes)}  # fmt: skip
    # Start from "all kept" and discount what groups may prune: channels that no group can prune
    # (the network input, ignored layers) stay.
    kept = {(node, i): size for node, sizes in splits.items() for i, size in enumerate(sizes)}
    undecided: dict[Node, set[int]] = {node: set() for node in splits}  # groups feeding a split
    for number, plan in enumerate(plans):
        for part in set().union(*plan.parts):
            undecided[part[0]].add(number)
        for channel_parts in plan.parts:
            for part in channel_parts:
                kept[part] -= 1
    for number, plan in enumerate(plans):
        for feeding in undecided.values():
            feeding.discard(number)
        # Earlier groups must not overfill a part; the last group feeding a split fills it exactly.
        room = {part: target[part] - kept[part] for part in set().union(*plan.parts)}
        exact = {part for part in room if not undecided[part[0]]}
        taken = _select(plan, room, exact)
        for part, count in taken.items():
            kept[part] += count


def _select(plan: _GroupPlan, room: dict[Part, int], exact: set[Part]) -> Counter[Part]:
    """Set ``plan.kept``: the most important channels that fit ``room``, filling ``exact`` parts.

    Returns how many kept channels went to each split part.
    """
    ranking = torch.argsort(plan.importance, descending=True, stable=True).tolist()
    taken: Counter[Part] = Counter()
    chosen: list[int] = []

    def take(channel: int) -> None:
        if channel not in chosen and all(taken[p] < room[p] for p in plan.parts[channel]):
            chosen.append(channel)
            taken.update(plan.parts[channel])

    for part in sorted(exact, key=lambda p: (p[0].module.id, p[1])):
        for channel in ranking:
            if taken[part] >= room[part] or len(chosen) >= plan.keep:
                break
            if part in plan.parts[channel]:
                take(channel)
    for channel in ranking:
        if len(chosen) >= plan.keep:
            break
        take(channel)
    if len(chosen) != plan.keep or any(taken[part] != room[part] for part in exact):
        raise BalancedPruningError(
            f"cannot keep {plan.keep} of {plan.channels} channels of "
            f"{type(plan.root).__name__} and keep the channel splits balanced"
        )
    plan.kept = sorted(chosen)
    return taken


def _scaled(channels: int, width: float) -> int:
    """Kept channels out of ``channels``: as torch-pruning rounds (down), at least one."""
    return max(1, math.floor(channels * width + 1e-9))


def prune_balanced(
    module: nn.Module,
    width: float,
    example_input: torch.Tensor,
    ignored_layers: list[nn.Module],
) -> nn.Module:
    """Shrink ``module`` in place to ``width`` of every layer's channels, splits kept balanced.

    Kept channels are the largest by group L1 norm (as MagnitudePruner) where the splits leave a
    choice. Channel shuffles become ``ChannelPermutation`` layers.
    """
    _replace_shuffles(module, example_input)
    graph = tp.DependencyGraph()
    partitions = ChannelPartitions(module)
    with warnings.catch_warnings(), partitions.tracing():
        warnings.simplefilter("ignore")
        graph.build_dependency(
            module,
            example_input,
            customized_pruners={**CUSTOM_PRUNERS, ChannelPermutation: _PermutationPruner()},
            verbose=False,
        )
    partitions.attach(graph)
    _install_permutation_mappings(graph)
    splits = _channel_splits(graph)
    order = _execution_order(module, example_input)
    plans = []
    for group in graph.get_all_groups(
        ignored_layers=ignored_layers, root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
    ):
        channels = len(group[0].idxs)
        plans.append(_plan(group, splits, _scaled(channels, width)))
    plans.sort(key=lambda plan: order.get(plan.root, len(order)))
    _choose(plans, splits, width)
    for plan in plans:
        removed = sorted(set(range(plan.channels)) - set(plan.kept))
        if removed:
            root = plan.group[0].dep
            graph.get_pruning_group(root.target.module, root.handler, removed).prune()
            partitions.follow()
    return module

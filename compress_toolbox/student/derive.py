"""Stage 3: derive a student from the teacher by shrinking every conv/linear width.

torch-pruning's DependencyGraph finds which layers are coupled (residual adds, concatenations,
depthwise convolutions, BatchNorm, flatten -> linear) and shrinks them together; we only decide the
ratio, protect the input and output layers, and re-initialise or keep the teacher's weights.
"""

from __future__ import annotations

import copy
import warnings
from functools import partial

import torch
import torch_pruning as tp
from onnx2torch.node_converters.flatten import OnnxFlatten
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.node_converters.transpose import OnnxTranspose
from torch import fx, nn

from compress_toolbox.errors import DaflError
from compress_toolbox.limits import LimitExceeded, bounded, is_out_of_memory, memory_cap
from compress_toolbox.load.analysis import analyse, run_with_hooks
from compress_toolbox.load.graph.shape_agnostic import FlexibleReshape
from compress_toolbox.student.shuffle_pruning import (
    BalancedPruningError,
    needs_balanced_pruning,
    prune_balanced,
)
from compress_toolbox.student.tp_adapter import (
    ChannelPartitions,
    ignore_unmappable_groups,
    prune_or_restore,
    root_groups_at_narrowest_layer,
)

INITS = ("fresh", "teacher")
DERIVE_SECONDS = 60.0  # torch-pruning can run away on some graphs: refuse rather than hang


class StudentError(DaflError):
    """No valid student can be derived from this teacher."""


class ChannelOrderError(StudentError):
    """The teacher's weights cannot be kept: its dense layer reads features in H,W,C order."""


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)

# Modules that only flatten or reshape between a transpose and a dense layer.
_FLATTENS = (nn.Flatten, OnnxFlatten, OnnxReshape, FlexibleReshape)


def channels_last_flatten(
    module: nn.Module, example_input: torch.Tensor | None = None
) -> str | None:
    """The dense layer fed by an H,W,C flatten (``Transpose(0, 2, 3, 1)`` then a reshape, as
    TensorFlow writes it) in an imported graph, else None. With ``example_input``, a
    transpose of a 1x1 map (a pooled head: H,W,C order is C order) does not count.

    torch-pruning maps a dense layer's input columns in C,H,W order: after such a flatten it
    drops the wrong columns, harmless for a fresh student but not for one that keeps the
    teacher's weights. onnx_cleanup rewrites the pattern away where the shapes are known.
    """
    if not isinstance(module, fx.GraphModule):
        return None
    pooled = _transposes_of_pooled_maps(module, example_input)
    for node in module.graph.nodes:
        layer = module.get_submodule(node.target) if node.op == "call_module" else None
        if not _to_channels_last(layer) or layer in pooled:
            continue
        while len(node.users) == 1:
            node = next(iter(node.users))
            layer = module.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(layer, nn.Linear):
                return str(node.target)
            if not isinstance(layer, _FLATTENS):
                break
    return None


def _to_channels_last(layer: nn.Module) -> bool:
    return isinstance(layer, OnnxTranspose) and list(layer.perm or []) == [0, 2, 3, 1]


def _transposes_of_pooled_maps(module: fx.GraphModule,
                               example_input: torch.Tensor | None) -> set[nn.Module]:  # fmt: skip
    """The (N, C, H, W) -> (N, H, W, C) transposes whose input has one spatial position
    (no forward pass where the graph has no such transpose)."""
    transposes = [layer for layer in module.modules() if _to_channels_last(layer)]
    if example_input is None or not transposes:
        return set()
    pooled: set[nn.Module] = set()

    def record(layer: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] * x.shape[3] == 1:
            pooled.add(layer)

    run_with_hooks(module, example_input, [(layer, record) for layer in transposes], pre=True)
    return pooled


def _output_layer_names(module: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The conv/linear layers whose widths are the model's output and must not change: the
    last one run, and in an imported graph every one from which the output is reached without
    another conv/linear (a detection head's box and class convolutions)."""
    final = analyse(module, tuple(example_input.shape[1:])).final_layer
    names = [] if final is None else [final]
    return names + [name for name in _sink_layers(module, example_input) if name not in names]


_FREE, _AFTER_ONE, _DEAD = 0, 1, 2  # _sink_layers' states, walking back from the output


def _sink_layers(module: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Conv/linear layers of an fx graph whose output channels are the model's output: they
    reach it through no other conv/linear, or through one output layer only after a reshape
    has cut their channels into new axes (YOLOv8's box convolutions: their 4 x 16 channels
    become coordinates and bins before the fixed DFL convolution)."""
    if not isinstance(module, fx.GraphModule):
        return []
    splitting = _channel_splitting_reshapes(module, example_input)

    def weighted(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(module.get_submodule(node.target),
                                                       _WEIGHTED)  # fmt: skip

    def through(user: fx.Node, state: int) -> int:  # the state of a node that ``user`` reads
        if state == _FREE:
            return _AFTER_ONE if weighted(user) else _FREE
        if state == _AFTER_ONE and not weighted(user):
            return _FREE if user.target in splitting else _AFTER_ONE
        return _DEAD

    states: dict[fx.Node, int] = {}
    for node in reversed(list(module.graph.nodes)):
        states[node] = _FREE if node.op == "output" else min(
            (through(user, states.get(user, _DEAD)) for user in node.users), default=_DEAD)
    return [str(node.target) for node in module.graph.nodes
            if weighted(node) and states[node] == _FREE]  # fmt: skip


def _channel_splitting_reshapes(module: nn.Module, example_input: torch.Tensor) -> set[str]:
    """Names of the reshape modules that cut the channel axis (axis 1) into several."""
    found: set[str] = set()
    handles = []
    for name, layer in module.named_modules():
        if isinstance(layer, (OnnxReshape, FlexibleReshape)):
            def hook(_layer, args, output, name=name):
                x = args[0]
                if isinstance(output, torch.Tensor) and min(x.dim(), output.dim()) >= 2 \
                        and output.shape[1] < x.shape[1]:  # fmt: skip
                    found.add(name)

            handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module.eval()(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _reinitialise(module: nn.Module) -> None:
    """DAFL's setting: the student learns only from the teacher's answers, not its weights."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters") and layer is not module:
            layer.reset_parameters()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()


# onnx2torch modules that apply a constant to a tensor element by element or join it to one
_APPLIES_CONSTANT = ("OnnxBinaryMathOperation", "OnnxConcat", "OnnxExpand")


def _constants_as_parameters(module: nn.Module) -> int:
    """Turn an imported graph's per-channel constants into parameters; return how many.

    Layer scales, BatchNorm left as Mul/Add, class tokens and position embeddings arrive as
    buffers that an Add/Mul/Concat applies to the activations. torch-pruning shrinks a
    parameter that no layer owns along its last non-singleton dimension, but leaves buffers
    alone, so the student would multiply 16 channels by 32 constants. Weight matrices
    (two dimensions above 1, e.g. of a MatMul) are left as they are.
    """
    if not isinstance(module, fx.GraphModule):
        return 0
    converted = 0
    for node in module.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        users_apply = all(
            user.op == "call_module"
            and type(module.get_submodule(user.target)).__name__ in _APPLIES_CONSTANT
            for user in node.users
        )
        holder_name, _, name = node.target.rpartition(".")
        holder = module.get_submodule(holder_name)
        tensor = holder._buffers.get(name)
        if not users_apply or tensor is None or not tensor.is_floating_point():
            continue
        per_channel = sum(size > 1 for size in tensor.shape) == 1
        token_table = tensor.dim() == 3 and tensor.shape[0] == 1  # (1, tokens, channels)
        if per_channel or token_table:
            del holder._buffers[name]
            holder.register_parameter(name, nn.Parameter(tensor.detach().clone()))
            converted += 1
    return converted


def _producing_linear(module: fx.GraphModule, node: fx.Node) -> nn.Linear | None:
    """The Linear whose output ``node`` is, through bias Adds."""
    while isinstance(node, fx.Node) and node.op == "call_module":
        layer = module.get_submodule(node.target)
        if isinstance(layer, nn.Linear):
            return layer
        if type(layer).__name__ != "OnnxBinaryMathOperation":
            return None
        node = next((a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"), None)
    return None


def attention_heads(module: nn.Module, example_input: torch.Tensor) -> dict[nn.Linear, int]:
    """{qkv layer: number of heads} of the multi-head attention in ``module``: a Python module
    with ``num_heads`` and a ``qkv`` Linear (timm's convention), or, in an imported graph, a
    Linear whose output is reshaped to (N, tokens, 3, heads, head_dim)."""
    if not isinstance(module, fx.GraphModule):
        return {layer.qkv: layer.num_heads for layer in module.modules()
                if isinstance(getattr(layer, "qkv", None), nn.Linear)
                and isinstance(getattr(layer, "num_heads", None), int)}  # fmt: skip
    reshapes = [
        node
        for node in module.graph.nodes
        if node.op == "call_module"
        and isinstance(module.get_submodule(node.target), (FlexibleReshape, OnnxReshape))
    ]
    shapes: dict[str, torch.Size] = {}

    def recorder(target):
        return lambda layer, args, output: shapes.__setitem__(target, output.shape)

    run_with_hooks(
        module,
        example_input,
        [(module.get_submodule(n.target), recorder(n.target)) for n in reshapes],
    )
    heads = {}
    for node in reshapes:
        shape = shapes.get(node.target)
        if shape is not None and len(shape) == 5 and shape[2] == 3:
            layer = _producing_linear(module, node.args[0])
            if layer is not None and layer.out_features == 3 * shape[3] * shape[4]:
                heads[layer] = int(shape[3])
    return heads


def _update_head_dims(module: nn.Module) -> None:
    """Python attention modules that keep their head size in ``head_dim`` (timm) read it in
    forward: set it to the pruned width."""
    for layer in module.modules():
        qkv, heads = getattr(layer, "qkv", None), getattr(layer, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int) and hasattr(layer, "head_dim"):
            layer.head_dim = qkv.out_features // (3 * heads)


def _magnitude_pruner(
    module: nn.Module, width: float, example_input: torch.Tensor, round_to, ignored: list[nn.Module]
) -> tuple[tp.pruner.MagnitudePruner, ChannelPartitions]:
    """torch-pruning's MagnitudePruner, every group keeping its largest-L1 channels, groups
    rooted at their narrowest layer, with the ``ChannelPartitions`` that keeps its view of
    channel splits and concatenations right while groups are pruned. Attention keeps its
    number of heads and halves each head's width with the embedding (every head still sees
    every token; fewer heads would change the attention pattern more)."""
    num_heads = attention_heads(module, example_input)
    partitions = ChannelPartitions(module)
    with partitions.tracing():
        pruner = tp.pruner.MagnitudePruner(
            module,
            example_input,
            importance=tp.importance.MagnitudeImportance(p=1),  # keep the largest-L1 channels
            pruning_ratio=1.0 - width,
            ignored_layers=ignored,
            round_to=round_to,
            num_heads=num_heads,
            prune_head_dims=True,
            prune_num_heads=False,
        )
    partitions.attach(pruner.DG)
    root_groups_at_narrowest_layer(pruner.DG, module)
    return pruner, partitions


def _prune_by_magnitude(module: nn.Module, width: float, example_input: torch.Tensor,
                        round_to, protected: list[str],
                        skip_unmappable: bool = False) -> nn.Module:  # fmt: skip
    """All groups at once (``_magnitude_pruner``); with ``skip_unmappable``, groups whose
    channel mapping cannot be scored keep their width (EfficientFormer's attention)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ignored = [module.get_submodule(name) for name in protected]
        pruner, partitions = _magnitude_pruner(module, width, example_input, round_to, ignored)
        if skip_unmappable:
            ignore_unmappable_groups(pruner)
        for group in pruner.step(interactive=True):
            group.prune()
            partitions.follow()
    _update_head_dims(module)
    return module


def _prune_group_by_group(module: nn.Module, width: float, example_input: torch.Tensor,
                          round_to, protected: list[str]) -> nn.Module:  # fmt: skip
    """The last resort: prune group by group, running the network after each, and keep at
    full width each group whose pruning breaks it (a channel mapping torch-pruning gets
    wrong: CSP's splits, LeViT's attention) or whose mapping cannot even be scored. The
    student may then keep more than ``width`` squared of the parameters; the caller compares."""

    def runs() -> bool:
        partitions.follow()
        with torch.no_grad():
            module.eval()(example_input)
        return True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ignored = [module.get_submodule(name) for name in protected]
        pruner, partitions = _magnitude_pruner(module, width, example_input, round_to, ignored)
        ignore_unmappable_groups(pruner)
        for group in pruner.step(interactive=True):
            prune_or_restore(group, module, runs)
            partitions.follow()  # as they were, where the group was restored
    _update_head_dims(module)
    return module


def _prune_balanced(module: nn.Module, width: float, example_input: torch.Tensor,
                    round_to, protected: list[str]) -> nn.Module:  # fmt: skip
    """Our balanced pruning (shuffle_pruning.py): every part of every channel split keeps
    ``width`` of its channels (channel shuffles, cross-stage partial chunks, ghost modules)."""
    if round_to is not None:
        raise BalancedPruningError("balanced pruning does not round widths")
    return prune_balanced(module, width, example_input,
                          [module.get_submodule(name) for name in protected])  # fmt: skip


def _strategies(module: nn.Module) -> list:
    """Pruning strategies in the order to try: balanced first where a channel shuffle makes
    MagnitudePruner wrong, else MagnitudePruner first and balanced pruning where it fails or
    hardly shrinks (its independent choices unbalance channel splits); last, MagnitudePruner
    keeping whole the groups it cannot score, then group by group, keeping whole the groups
    it gets wrong."""
    last_resorts = [partial(_prune_by_magnitude, skip_unmappable=True), _prune_group_by_group]
    if needs_balanced_pruning(module):
        return [_prune_balanced, _prune_by_magnitude, *last_resorts]
    return [_prune_by_magnitude, _prune_balanced, *last_resorts]


def _trunk(module: nn.Module, outputs: list[str]) -> fx.GraphModule | None:
    """For an imported graph with several output layers (a detection head's box and class
    convolutions), the graph up to those layers' outputs, sharing the module's layers; None
    otherwise. torch-pruning then never follows the decoding after them (its channel slices
    and concatenations of the box coordinates broke its shape inference)."""
    if not isinstance(module, fx.GraphModule) or len(outputs) < 2:
        return None
    graph, copied = fx.Graph(), {}
    graph.graph_copy(module.graph, copied)
    ends = [copied[n] for n in module.graph.nodes if n.op == "call_module" and n.target in outputs]
    graph.output(tuple(ends))
    trunk = fx.GraphModule(module, graph)
    trunk.graph.eliminate_dead_code()
    trunk.recompile()
    return trunk


def _prune_up_to_outputs(strategy, module: nn.Module, width: float, example_input: torch.Tensor,
                         round_to, protected: list[str]) -> nn.Module:  # fmt: skip
    """``strategy`` on the module, or on its trunk (``_trunk``) whose layers it shares."""
    trunk = _trunk(module, protected)
    student = strategy(trunk or module, width, example_input, round_to, protected)
    if trunk is None:
        return student
    if student is not trunk:
        raise StudentError("the pruning strategy rebuilt the graph of a multi-output head")
    return module


def _check_student(student: nn.Module, teacher: nn.Module, example_input: torch.Tensor) -> None:
    """The student must run at batch 1 and 5 and give the teacher's output shape."""
    student.eval()
    for batch in (1, 5):
        x = example_input[:1].expand(batch, *example_input.shape[1:]).contiguous()
        with torch.no_grad():
            got, expected = student(x), teacher(x)
        if got.shape != expected.shape:
            raise StudentError(
                f"student output {tuple(got.shape)} != teacher {tuple(expected.shape)}"
            )


def _via_onnx(module: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """Rebuild ``module`` as an imported graph, whose reshapes follow their inputs' sizes.

    Used when a Python model hard-codes sizes (``x.view(-1, 400)``) or uses ops torch-pruning
    cannot follow: the graph exported by torch's ONNX exporter is converted back by the same
    machinery that imports teachers.
    """
    from compress_toolbox.load.importers.torch_to_onnx import module_via_onnx

    return module_via_onnx(module, tuple(example_input.shape[1:]), "teacher", dynamo=True)


def _shrunk_enough(ratio: float, width: float) -> bool:
    """A parameter ratio near ``width`` squared (0.25 at half width) rather than a student
    whose coupled layers mostly stayed at full width (0.51 seen on GhostNet)."""
    return ratio <= width * width + 0.15


def _first_valid_student(attempts, teacher_module, width, example_input, round_to,
                         time_limit) -> nn.Module:  # fmt: skip
    """Prune a copy from each route (the module as given, then rebuilt through ONNX) with each
    strategy in turn; return the first student that runs and shrinks enough, else the smallest
    that runs. One bound on time and memory covers all tries."""
    teacher_params = sum(p.numel() for p in teacher_module.parameters())
    best: tuple[float, nn.Module] | None = None
    last_error: BaseException | None = None
    try:
        with bounded(time_limit, memory_cap()):
            for make_copy in attempts:
                try:
                    fresh_copy: nn.Module | None = make_copy()
                except Exception as error:  # e.g. the model cannot be exported to ONNX
                    if is_out_of_memory(error):
                        raise
                    last_error = error
                    continue
                for strategy in _strategies(fresh_copy):  # the copy: a route may add shuffles
                    try:
                        module = fresh_copy if fresh_copy is not None else make_copy()
                        fresh_copy = None
                        # torch-pruning leaves frozen parameters alone: the copy is made trainable
                        module.requires_grad_(True)
                        _constants_as_parameters(module)
                        protected = _output_layer_names(module, example_input)
                        student = _prune_up_to_outputs(strategy, module, width, example_input,
                                                       round_to, protected)  # fmt: skip
                        _check_student(student, teacher_module, example_input)
                    except Exception as error:  # torch-pruning raises all sorts: try the next
                        if is_out_of_memory(error):
                            raise  # bounded() makes it a LimitExceeded
                        last_error = error
                        continue
                    ratio = sum(p.numel() for p in student.parameters()) / teacher_params
                    if _shrunk_enough(ratio, width):
                        return student
                    if best is None or ratio < best[0]:
                        best = (ratio, student)
    except LimitExceeded as error:
        if best is not None:
            return best[1]
        raise StudentError(
            f"deriving a half-width student from this architecture {error} (torch-pruning's "
            "channel mapping runs away on some graphs) and was stopped"
        ) from error
    if best is not None:
        return best[1]
    raise StudentError(
        "cannot derive a consistent half-width student from this architecture "
        f"({type(last_error).__name__}: {str(last_error)[:200]})"
    ) from last_error


def make_student(
    teacher_module: nn.Module,
    *,
    width: float = 0.5,
    init: str = "fresh",
    example_input: torch.Tensor,
    round_to: int | None = None,
    add_missing_batchnorm: bool = True,
    time_limit: float | None = DERIVE_SECONDS,
) -> nn.Module:
    """Return a copy of ``teacher_module`` with every conv/linear width scaled by ``width``.

    The network's input channels and output size are kept; coupled layers stay consistent.
    ``init="fresh"`` re-initialises all weights (DAFL); ``init="teacher"`` keeps the teacher's
    weights of the kept channels (largest L1 norm). A fresh student without any BatchNorm
    layer (its teacher's were folded by the ONNX exporter) gets one after every convolution but
    the output layer, unless ``add_missing_batchnorm=False`` (see ``add_batchnorm``). The
    teacher is never modified. Derivation is bounded: past ``time_limit`` seconds or half of
    the free memory (at most 8 GiB more) it stops with a StudentError.
    """
    if not 0.0 < width < 1.0:
        raise StudentError(f"width must be between 0 and 1 (exclusive), got {width}")
    if init not in INITS:
        raise StudentError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    teacher_module.eval()
    dense = channels_last_flatten(teacher_module, example_input) if init == "teacher" else None
    if dense is not None:
        raise ChannelOrderError(
            f"the teacher flattens its features in H,W,C order before layer '{dense}' (as "
            "TensorFlow does) and its shapes are not fixed, so a student cannot keep the "
            "teacher's weights; use --init fresh"
        )
    example_input = example_input.detach()
    before = sum(p.numel() for p in teacher_module.parameters())
    attempts = [lambda: copy.deepcopy(teacher_module)]
    if not isinstance(teacher_module, fx.GraphModule):
        attempts.append(lambda: _via_onnx(copy.deepcopy(teacher_module), example_input))
    student = _first_valid_student(attempts, teacher_module, width, example_input, round_to,
                                   time_limit)  # fmt: skip
    after = sum(p.numel() for p in student.parameters())
    if after >= before:
        raise StudentError(
            "nothing to shrink: the teacher has no conv/linear layer besides its output layer"
        )
    if init == "fresh":
        _reinitialise(student)
        norm = nn.modules.batchnorm._BatchNorm
        if add_missing_batchnorm and not any(isinstance(m, norm) for m in student.modules()):
            output_layers = _output_layer_names(student, example_input)
            add_batchnorm(student, output_layers[0] if output_layers else None)
    return student.eval()


def add_batchnorm(student: nn.Module, skip: str | None) -> int:
    """Put a BatchNorm after every Conv2d except ``skip`` (the output layer); return how many.

    For students derived from a teacher whose BatchNorm layers the ONNX exporter folded into
    its convolutions: trained from scratch, such a network lacks the normalisation that made
    the teacher trainable. In eval mode each BatchNorm is an affine map that the ONNX export
    folds back into its convolution, so the exported student costs nothing more.
    """
    convs = [name for name, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    added = 0
    for name in convs:
        if name == skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        conv = getattr(parent, child)
        setattr(parent, child, nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels)))
        added += 1
    return added


def layer_widths(module: nn.Module, input_shape: tuple[int, ...]) -> list[int]:
    """Output widths of the conv/linear layers, in execution order."""
    return analyse(module, input_shape).widths

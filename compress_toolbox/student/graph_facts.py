"""What deriving a student must know about the teacher's graph before pruning it: the layers
whose widths are the model's output, a dense layer fed by an H,W,C flatten, the attention
heads of qkv layers, and the per-channel constants torch-pruning would otherwise miss."""

from __future__ import annotations

import torch
from onnx2torch.node_converters.flatten import OnnxFlatten
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.node_converters.transpose import OnnxTranspose
from torch import fx, nn

from compress_toolbox.load.analysis import analyse, run_with_hooks
from compress_toolbox.load.graph.shape_agnostic import FlexibleReshape

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


def output_layer_names(module: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The conv/linear layers whose widths are the model's output and must not change. In an
    imported graph, every one from which the output is reached without another conv/linear (a
    detection head's box and class convolutions), as the graph shows; else the last Linear or
    1x1 conv run (in a graph that could be an FPN's lateral conv before a head of 3x3 convs)."""
    return _output_layers(module, example_input, _probed_reshapes(module, example_input))


def layers_to_keep(module: nn.Module, example_input: torch.Tensor) -> tuple[list[str], list[str]]:
    """The output layers (``output_layer_names``), and every layer whose width pruning must
    keep: those and the layers around a reshape into attention heads (``_head_split_layers``).
    One forward pass finds the reshapes both read."""
    splitting = _probed_reshapes(module, example_input)
    outputs = _output_layers(module, example_input, splitting)
    return outputs, [*outputs, *_head_split_layers(module, splitting)]


def _output_layers(module: nn.Module, example_input: torch.Tensor,
                   splitting: set[str]) -> list[str]:  # fmt: skip
    sinks = _sink_layers(module, splitting, _size_reads(module, example_input))
    if sinks:
        return sinks
    final = analyse(module, tuple(example_input.shape[1:])).final_layer
    return [] if final is None else [final]


def _probed_reshapes(module: nn.Module, example_input: torch.Tensor) -> set[str]:
    """An imported graph's reshapes that cut the channels (``_channel_splitting_reshapes``);
    none for another module."""
    if not isinstance(module, fx.GraphModule):
        return set()
    return _channel_splitting_reshapes(module, example_input)


_FREE, _AFTER_ONE, _DEAD = 0, 1, 2  # _sink_layers' states, walking back from the output


def _sink_layers(module: nn.Module, splitting: set[str],
                 size_reads: frozenset[fx.Node] = frozenset()) -> list[str]:  # fmt: skip
    """Conv/linear layers of an fx graph whose output channels are the model's output: they
    reach it through no other conv/linear, or through one output layer only after a reshape
    has cut their channels into new axes (YOLOv8's box convolutions: their 4 x 16 channels
    become coordinates and bins before the fixed DFL convolution). Reaching it through one
    of the ``size_reads`` (``_size_reads``) does not count: the channels are not read."""
    if not isinstance(module, fx.GraphModule):
        return []

    def weighted(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(module.get_submodule(node.target),
                                                       _WEIGHTED)  # fmt: skip

    def through(user: fx.Node, state: int) -> int:  # the state of a node that ``user`` reads
        if user in size_reads:
            return _DEAD
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


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _size_reads(module: nn.Module, example_input: torch.Tensor) -> frozenset[fx.Node]:
    """The ``Shape`` nodes of an imported graph that read only a convolution output's batch
    and spatial sizes: the whole shape taken (as the probe shows), every user a ``Gather`` of
    constant indices other than 1, and only element-wise ops between the convolution and the
    read (its channels still on axis 1). A YOLOv8 exported with dynamic axes reads its neck
    outputs' sizes to lay out the grid; that does not make the neck an output layer."""
    if not isinstance(module, fx.GraphModule):
        return frozenset()
    shapes = [node for node in module.graph.nodes if _op_name(module, node) == "OnnxShape"]
    candidates = [node for node in shapes if node.users and all(
        _constant_indices_without_channels(module, user) for user in node.users)
        and _after_convolution(module, node.args[0])]  # fmt: skip
    if not candidates:
        return frozenset()
    whole: set[fx.Node] = set()

    def recorder(node: fx.Node):
        def record(_layer, args, output) -> None:
            if isinstance(output, torch.Tensor) and output.numel() == args[0].dim():
                whole.add(node)
        return record

    with torch.no_grad():
        run_with_hooks(module, example_input,
                       [(_layer(module, node), recorder(node)) for node in candidates])  # fmt: skip
    return frozenset(whole)


def _op_name(module: fx.GraphModule, node: fx.Node) -> str | None:
    """The class name of the module ``node`` calls (onnx2torch's ``OnnxShape``), else None."""
    layer = _layer(module, node)
    return None if layer is None else type(layer).__name__


def _constant_indices_without_channels(module: fx.GraphModule, gather: fx.Node) -> bool:
    """Whether ``gather`` takes constant, non-negative indices other than 1 from a shape."""
    if _op_name(module, gather) != "OnnxGather" or len(gather.args) != 2:
        return False
    indices = gather.args[1]
    if not isinstance(indices, fx.Node) or indices.op != "get_attr":
        return False
    holder_name, _, name = indices.target.rpartition(".")
    value = getattr(module.get_submodule(holder_name), name, None)
    return isinstance(value, torch.Tensor) and value.dim() <= 1 and bool(
        ((value >= 0) & (value != 1)).all())  # fmt: skip


def _after_convolution(module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is computed from convolution outputs by element-wise ops only
    (activations, BatchNorm, arithmetic), so that its axis 1 holds their channels."""
    todo, seen, convolutions = [node], set(), 0
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        layer = _layer(module, node)
        if isinstance(layer, _CONVOLUTIONS):
            convolutions += 1
        elif node.op == "get_attr":
            continue
        elif _element_wise(layer):
            todo.extend(node.all_input_nodes)
        else:
            return False
    return convolutions > 0


_ELEMENT_WISE = (nn.Sigmoid, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish,
                 nn.Hardsigmoid, nn.GELU, nn.Tanh, nn.modules.batchnorm._BatchNorm)


def _element_wise(layer: nn.Module | None) -> bool:
    return type(layer).__name__ == "OnnxBinaryMathOperation" or isinstance(layer, _ELEMENT_WISE)


def _head_split_layers(module: nn.Module, splitting: set[str]) -> list[str]:
    """The convolutions on either side of a reshape that cuts channels into heads for a
    matrix product in an imported graph (YOLO11's C2PSA attention): the one whose output the
    reshape cuts (the qkv convolution), and each depthwise convolution that the values reach
    (their positional encoding). torch-pruning's index mapping through such a reshape raises
    or grows without bound (past 8 GiB on YOLO11n), so these keep their width; the rest of
    the model is pruned. ``splitting``: the graph's reshapes that cut the channels."""
    if not isinstance(module, fx.GraphModule):
        return []
    cuts = [node for node in module.graph.nodes if node.op == "call_module"
            and node.target in splitting and _heads_to_qkv(module, node)]  # fmt: skip
    kept = set()
    for cut in cuts:
        # back from the data cut, not a layer before a transpose or reshape (Swin's windows)
        back = _first_weighted(module, [cut.args[0]], _inputs, (*_FLATTENS, OnnxTranspose))
        on = _first_weighted(module, list(cut.users), _users, (OnnxTranspose,))
        kept |= {node.target for node in back if isinstance(_layer(module, node), nn.Conv2d)}
        kept |= {node.target for node in on if _depthwise(_layer(module, node))}
    return sorted(kept)


def _layer(module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return module.get_submodule(node.target) if node.op == "call_module" else None


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def _depthwise(layer: nn.Module | None) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels > 1


def _first_weighted(module: fx.GraphModule, start: list[fx.Node], step,
                    stops: tuple[type, ...]) -> list[fx.Node]:  # fmt: skip
    """The conv/linear layers reached from the ``start`` nodes (themselves included), going
    ``step``'s way, through other ops than ``stops`` (which put the channels elsewhere)."""
    found, seen, todo = [], set(), list(start)
    while todo:
        node = todo.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        layer = _layer(module, node)
        if isinstance(layer, _WEIGHTED):
            found.append(node)
        elif not isinstance(layer, stops):
            todo.extend(step(node))
    return found


def _heads_to_qkv(module: fx.GraphModule, cut: fx.Node) -> bool:
    """Whether the reshape ``cut`` makes heads that are split into query, key and value for a
    matrix product before any conv/linear: attention, not a channel shuffle or MobileViT's
    unfolding into patches."""
    split = any(type(_layer(module, user)).__name__.startswith("OnnxSplit") for user in cut.users)
    reached, todo = set(), list(cut.users)
    while todo and split:
        node = todo.pop()
        if node in reached or isinstance(_layer(module, node), _WEIGHTED):
            continue
        reached.add(node)
        if type(_layer(module, node)).__name__ == "OnnxMatMul":
            return True
        todo.extend(node.users)
    return False


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


# onnx2torch modules that apply a constant to a tensor element by element or join it to one
_APPLIES_CONSTANT = ("OnnxBinaryMathOperation", "OnnxConcat", "OnnxExpand")


def constants_as_parameters(module: nn.Module) -> int:
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


def update_head_dims(module: nn.Module) -> None:
    """Python attention modules that keep their head size in ``head_dim`` (timm) read it in
    forward: set it to the pruned width."""
    for layer in module.modules():
        qkv, heads = getattr(layer, "qkv", None), getattr(layer, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int) and hasattr(layer, "head_dim"):
            layer.head_dim = qkv.out_features // (3 * heads)

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
import torch.nn.functional as F
import torch_pruning as tp
from torch import fx, nn

from compress_toolbox.errors import DaflError
from compress_toolbox.limits import LimitExceeded, bounded, is_out_of_memory, memory_cap
from compress_toolbox.load.analysis import analyse
from compress_toolbox.load.importers.torch_to_onnx import module_via_onnx
from compress_toolbox.student.graph_facts import (
    attention_heads,
    channels_last_flatten,
    constants_as_parameters,
    layers_to_keep,
    output_layer_names,
    update_head_dims,
)
from compress_toolbox.student.shuffle_pruning import (
    BalancedPruningError,
    needs_balanced_pruning,
    prune_balanced,
)
from compress_toolbox.student.tp_adapter import (
    CUSTOM_PRUNERS,
    ChannelPartitions,
    ignore_unmappable_groups,
    prune_or_restore,
    root_groups_at_narrowest_layer,
)
from compress_toolbox.tasks.outputs import JoinedOutputs

INITS = ("fresh", "teacher")
DERIVE_SECONDS = 60.0  # torch-pruning can run away on some graphs: refuse rather than hang


class StudentError(DaflError):
    """No valid student can be derived from this teacher."""


class ChannelOrderError(StudentError):
    """The teacher's weights cannot be kept: its dense layer reads features in H,W,C order."""


def _reinitialise(module: nn.Module) -> None:
    """DAFL's setting: the student learns only from the teacher's answers, not its weights."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters") and layer is not module:
            layer.reset_parameters()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()


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
            customized_pruners=CUSTOM_PRUNERS,
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
    update_head_dims(module)
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
    update_head_dims(module)
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
    convolutions = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if not all(isinstance(module.get_submodule(name), convolutions) for name in outputs):
        return None  # linear heads (EfficientFormer's head and head_dist, averaged) prune whole
    graph, copied = fx.Graph(), {}
    graph.graph_copy(module.graph, copied)
    ends = [copied[n] for n in module.graph.nodes if n.op == "call_module" and n.target in outputs]
    graph.output(tuple(ends))
    trunk = fx.GraphModule(module, graph)
    trunk.graph.eliminate_dead_code()
    trunk.recompile()
    return trunk


def _prune_up_to_outputs(strategy, module: nn.Module, width: float, example_input: torch.Tensor,
                         round_to, outputs: list[str],
                         kept: list[str] | None = None) -> nn.Module:  # fmt: skip
    """``strategy`` on the module, or on its trunk (``_trunk``) whose layers it shares, keeping
    the widths of the ``outputs`` layers and of the others ``kept`` (default: the outputs)."""
    trunk = _trunk(module, outputs)
    student = strategy(trunk or module, width, example_input, round_to, kept or outputs)
    if trunk is None:
        return student
    if student is not trunk:
        raise StudentError("the pruning strategy rebuilt the graph of a multi-output head")
    _adopt_constants(module, trunk)
    return module


def _adopt_constants(module: fx.GraphModule, trunk: fx.GraphModule) -> None:
    """Put the trunk's constants back into ``module``. The trunk shares the layers, which
    torch-pruning shrinks in place, but holds its constants (a GroupNorm's scale left as a Mul)
    in holders of its own, where torch-pruning swaps the shrunk ones in."""
    for node in trunk.graph.nodes:
        if node.op == "get_attr":
            holder_name, _, name = node.target.rpartition(".")
            setattr(module.get_submodule(holder_name), name,
                    getattr(trunk.get_submodule(holder_name), name))  # fmt: skip


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
    return module_via_onnx(module, tuple(example_input.shape[1:]), "teacher", dynamo=True)


def _count(module: nn.Module) -> int:
    """The number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def _shrunk_enough(ratio: float, width: float) -> bool:
    """A parameter ratio near ``width`` squared (0.25 at half width) rather than a student
    whose coupled layers mostly stayed at full width (0.51 seen on GhostNet)."""
    return ratio <= width * width + 0.15


def _first_valid_student(attempts, teacher_module, width, example_input, round_to,
                         time_limit) -> nn.Module:  # fmt: skip
    """Prune a copy from each route (the module as given, then rebuilt through ONNX) with each
    strategy in turn; return the first student that runs and shrinks enough, else the smallest
    that runs. One bound on time and memory covers all tries."""
    teacher_params = _count(teacher_module)
    best: tuple[int, nn.Module] | None = None
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
                        constants_as_parameters(module)
                        # the route's own count: a graph rebuilt through ONNX holds a head that
                        # the teacher shares between levels once per level
                        copy_params = _count(module)
                        outputs, kept = layers_to_keep(module, example_input)
                        student = _prune_up_to_outputs(strategy, module, width, example_input,
                                                       round_to, outputs, kept)  # fmt: skip
                        _check_student(student, teacher_module, example_input)
                    except Exception as error:  # torch-pruning raises all sorts: try the next
                        if is_out_of_memory(error):
                            raise  # bounded() makes it a LimitExceeded
                        last_error = error
                        continue
                    size = _count(student)
                    # smaller than the teacher too: a rebuilt graph's per-level heads can outgrow it
                    if size < teacher_params and _shrunk_enough(size / copy_params, width):
                        return student
                    if best is None or size < best[0]:
                        best = (size, student)
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
    before = _count(teacher_module)
    attempts = [lambda: copy.deepcopy(teacher_module)]
    if not isinstance(teacher_module, fx.GraphModule):
        rebuilt = lambda: _via_onnx(copy.deepcopy(teacher_module), example_input)  # noqa: E731
        # several outputs joined (a detection head's boxes and scores) are pruned on the graph
        # up to their layers (_trunk), which needs the rebuilt GraphModule: tried first
        # (torchvision's SSDlite ran past the time bound as given, derived in 1 s rebuilt)
        attempts.insert(0 if isinstance(teacher_module, JoinedOutputs) else 1, rebuilt)
    if isinstance(teacher_module, JoinedOutputs) and isinstance(teacher_module.model,
                                                                 fx.GraphModule):  # fmt: skip
        # an imported graph (TorchScript, .pt2) needs no rebuilding: its join is appended
        attempts.insert(0, lambda: copy.deepcopy(teacher_module).as_graph())
    student = _first_valid_student(attempts, teacher_module, width, example_input, round_to,
                                   time_limit)  # fmt: skip
    after = _count(student)
    if after >= before:
        raise StudentError(
            "nothing to shrink: the teacher has no conv/linear layer besides its output layer"
        )
    if init == "fresh":
        start_fresh(student, example_input, add_missing_batchnorm)
    return student.eval()


def start_fresh(student: nn.Module, example_input: torch.Tensor,
                add_missing_batchnorm: bool = True) -> None:  # fmt: skip
    """Re-initialise a derived student's weights in place (``make_student``'s ``init="fresh"``);
    without any BatchNorm layer it gets one after every convolution but the output layer,
    unless ``add_missing_batchnorm=False`` (see ``add_batchnorm``)."""
    _reinitialise(student)
    norm = nn.modules.batchnorm._BatchNorm
    if add_missing_batchnorm and not any(isinstance(m, norm) for m in student.modules()):
        output_layers = output_layer_names(student, example_input)
        add_batchnorm(student, output_layers[0] if output_layers else None)


@torch.no_grad()
def answers_kept(teacher_module: nn.Module, student: nn.Module, input_shape: tuple[int, ...],
                 samples: int = 64, seed: int = 0) -> float:  # fmt: skip
    """How much of the teacher's answers a student derived from its weights keeps, before any
    training, without data: the mean cosine similarity of their outputs, each centred over the
    batch, on ``samples`` standard-normal inputs (the same inputs for any call). 1 is the
    teacher's answers up to scale; about 0 is nothing of them."""
    inputs = torch.randn(samples, *input_shape, generator=torch.Generator().manual_seed(seed))
    teacher_module.eval()
    student.eval()
    similarities = []
    for chunk in inputs.split(16):
        t = teacher_module(chunk).flatten(1).float()
        s = student(chunk).flatten(1).float()
        similarities.append(F.cosine_similarity(t - t.mean(0), s - s.mean(0), dim=1))
    return float(torch.cat(similarities).mean())


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

"""Stage 3: derive a student from the teacher by shrinking every conv/linear width.

torch-pruning's DependencyGraph finds which layers are coupled (residual adds, concatenations,
depthwise convolutions, BatchNorm, flatten -> linear) and shrinks them together; we only decide the
ratio, protect the input and output layers, and re-initialise or keep the teacher's weights.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch_pruning as tp
from onnx2torch.node_converters.flatten import OnnxFlatten
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.node_converters.transpose import OnnxTranspose
from torch import fx, nn

from .analysis import analyse
from .errors import DaflError
from .shape_agnostic import FlexibleReshape
from .shuffle_pruning import BalancedPruningError, needs_balanced_pruning, prune_balanced

INITS = ("fresh", "teacher")


class StudentError(DaflError):
    """No valid student can be derived from this teacher."""


class ChannelOrderError(StudentError):
    """The teacher's weights cannot be kept: its dense layer reads features in H,W,C order."""


# Modules that only flatten or reshape between a transpose and a dense layer.
_FLATTENS = (nn.Flatten, OnnxFlatten, OnnxReshape, FlexibleReshape)


def channels_last_flatten(module: nn.Module) -> str | None:
    """The dense layer fed by an H,W,C flatten (``Transpose(0, 2, 3, 1)`` then a reshape, as
    TensorFlow writes it) in an imported graph, else None.

    torch-pruning maps a dense layer's input columns in C,H,W order: after such a flatten it
    drops the wrong columns, harmless for a fresh student but not for one that keeps the
    teacher's weights. onnx_cleanup rewrites the pattern away where the shapes are known.
    """
    if not isinstance(module, fx.GraphModule):
        return None
    for node in module.graph.nodes:
        layer = module.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(layer, OnnxTranspose):
            continue
        perm = list(layer.perm or [])
        if len(perm) != 4 or perm[1] == 1:
            continue
        while len(node.users) == 1:
            node = next(iter(node.users))
            layer = module.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(layer, nn.Linear):
                return str(node.target)
            if not isinstance(layer, _FLATTENS):
                break
    return None


def _output_layer_names(module: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The last conv/linear layer: its output width is the model's output and must not change."""
    final = analyse(module, tuple(example_input.shape[1:])).final_layer
    return [] if final is None else [final]


def _reinitialise(module: nn.Module) -> None:
    """DAFL's setting: the student learns only from the teacher's answers, not its weights."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters") and layer is not module:
            layer.reset_parameters()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()


def _prune(module: nn.Module, width: float, example_input: torch.Tensor, round_to) -> nn.Module:
    ignored = _output_layer_names(module, example_input)
    if needs_balanced_pruning(module) and round_to is None:
        # Channel shuffles: MagnitudePruner would leave the following splits unbalanced.
        trial = copy.deepcopy(module)  # pruned in place: a failure must not leave module half done
        try:
            protected = [trial.get_submodule(name) for name in ignored]
            return prune_balanced(trial, width, example_input, protected)
        except BalancedPruningError:
            pass  # a pattern it does not handle: MagnitudePruner may still give a valid student
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(
            module,
            example_input,
            importance=tp.importance.MagnitudeImportance(p=1),  # keep the largest-L1 channels
            pruning_ratio=1.0 - width,
            ignored_layers=[module.get_submodule(name) for name in ignored],
            round_to=round_to,
        )
        pruner.step()
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
    from .importers.torch_to_onnx import module_via_onnx

    return module_via_onnx(module, tuple(example_input.shape[1:]), "teacher", dynamo=True)


def make_student(
    teacher_module: nn.Module,
    *,
    width: float = 0.5,
    init: str = "fresh",
    example_input: torch.Tensor,
    round_to: int | None = None,
    add_missing_batchnorm: bool = True,
) -> nn.Module:
    """Return a copy of ``teacher_module`` with every conv/linear width scaled by ``width``.

    The network's input channels and output size are kept; coupled layers stay consistent.
    ``init="fresh"`` re-initialises all weights (DAFL); ``init="teacher"`` keeps the teacher's
    weights of the kept channels (largest L1 norm). A fresh student without any BatchNorm
    layer (its teacher's were folded by the ONNX exporter) gets one after every convolution but
    the output layer, unless ``add_missing_batchnorm=False`` (see ``add_batchnorm``). The
    teacher is never modified.
    """
    if not 0.0 < width < 1.0:
        raise StudentError(f"width must be between 0 and 1 (exclusive), got {width}")
    if init not in INITS:
        raise StudentError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    dense = channels_last_flatten(teacher_module) if init == "teacher" else None
    if dense is not None:
        raise ChannelOrderError(
            f"the teacher flattens its features in H,W,C order before layer '{dense}' (as "
            "TensorFlow does) and its shapes are not fixed, so a student cannot keep the "
            "teacher's weights; use --init fresh"
        )
    teacher_module.eval()
    example_input = example_input.detach()
    before = sum(p.numel() for p in teacher_module.parameters())
    attempts = [lambda: copy.deepcopy(teacher_module)]
    if not isinstance(teacher_module, fx.GraphModule):
        attempts.append(lambda: _via_onnx(copy.deepcopy(teacher_module), example_input))
    errors = []
    for make_copy in attempts:
        try:
            # torch-pruning leaves frozen parameters alone: the copy is made trainable first
            student = _prune(make_copy().requires_grad_(True), width, example_input, round_to)
            _check_student(student, teacher_module, example_input)
            break
        except Exception as error:  # torch-pruning raises all sorts; try the next route
            errors.append(f"{type(error).__name__}: {error}")
    else:
        raise StudentError(
            "cannot derive a consistent half-width student from this architecture "
            f"({errors[-1][:200]}); pick one from the zoo instead (--student zoo)"
        )
    after = sum(p.numel() for p in student.parameters())
    if after >= before:
        raise StudentError(
            "nothing to shrink: the teacher has no conv/linear layer besides its output layer; "
            "pick a student from the zoo instead (--student zoo)"
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

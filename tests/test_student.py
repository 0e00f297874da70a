"""Tests for make_student: widths, parameter ratio, teacher untouched, ONNX export, errors."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from models import (
    LENET_INPUT,
    ViewLeNet,
    build,
    example,
    export_dynamo,
    exported,
)
from torch import nn

from compress_toolbox import DaflError, load_teacher
from compress_toolbox.student import StudentError, layer_widths, make_student


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _teacher(name: str, source: str, tmp_path) -> tuple[nn.Module, tuple[int, ...]]:
    """The model itself, or the module load_teacher rebuilds from an exported file."""
    model, shape = build(name)
    if source == "python":
        return model, shape
    fmt = {"onnx": "dynamo", "ts": "torchscript", "pt2": "pt2"}[source]
    teacher = load_teacher(exported(name, fmt))
    assert teacher.input_shape == shape
    return teacher.module, shape


def _cases():
    default = [
        ("resnet18", "python"),
        ("mobilenet_v3_small", "python"),
        ("resnet18", "onnx"),
        ("lenet5", "ts"),
        ("lenet5", "pt2"),
    ]
    slow = [
        ("densenet121", "python"),
        ("efficientnet_b0", "python"),
        ("regnet_x_400mf", "python"),
        ("mobilenet_v3_small", "ts"),
        ("resnet18", "ts"),
        ("resnet18", "pt2"),
    ]
    for name, source in default:
        yield pytest.param(name, source, id=f"{name}-{source}")
    for name, source in slow:
        yield pytest.param(name, source, id=f"{name}-{source}", marks=pytest.mark.slow)


@pytest.mark.parametrize("name, source", list(_cases()))
def test_half_width_student(tmp_path, name, source):
    teacher, shape = _teacher(name, source, tmp_path)
    teacher.eval()
    before = _snapshot(teacher)
    x5 = example(shape, batch=5, seed=5)
    with torch.no_grad():
        out_before = teacher(x5)

    student = make_student(teacher, width=0.5, example_input=example(shape, batch=2))

    # The teacher is untouched: same tensors, same answers.
    after = teacher.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    with torch.no_grad():
        assert torch.equal(teacher(x5), out_before)
    assert not student.training

    for batch in (1, 5):
        x = example(shape, batch=batch, seed=batch)
        with torch.no_grad():
            assert student(x).shape == teacher(x).shape == (batch, 10)
    ratio = _params(student) / _params(teacher)
    assert 0.15 <= ratio <= 0.40, ratio

    path = export_dynamo(student, shape, tmp_path / "student.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x5.numpy()})[0]
    with torch.no_grad():
        expected = student(x5).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_lenet_half_widths():
    model, shape = build("lenet5")
    student = make_student(model, width=0.5, example_input=example(shape))
    assert layer_widths(model, shape) == [6, 16, 120, 84, 10]
    assert layer_widths(student, shape) == [3, 8, 60, 42, 10]
    with torch.no_grad():
        assert student(example(shape, batch=5)).shape == (5, 10)


def _matching_filters(student_weight: torch.Tensor, teacher_weight: torch.Tensor) -> list:
    """For each student filter, the index of the identical teacher filter (None if none)."""
    matches = []
    for filt in student_weight:
        same = [i for i, t in enumerate(teacher_weight) if torch.equal(filt, t)]
        matches.append(same[0] if same else None)
    return matches


def test_teacher_init_keeps_largest_l1_channels():
    model, shape = build("lenet5")
    student = make_student(model, width=0.5, init="teacher", example_input=example(shape))
    teacher_conv1 = model.features[0].weight.detach()
    student_conv1 = student.features[0].weight.detach()
    assert student_conv1.shape == (3, 1, 5, 5)
    matches = _matching_filters(student_conv1, teacher_conv1)
    assert None not in matches
    # torch-pruning ranks a channel by the L1 norm of its whole coupled group: conv1's filter and
    # the matching input slice of conv2 (not conv1's filter alone).
    conv2_in = model.features[3].weight.detach().abs().sum(dim=(0, 2, 3))
    group_l1 = teacher_conv1.abs().sum(dim=(1, 2, 3)) + conv2_in
    assert sorted(matches) == sorted(group_l1.topk(3).indices.tolist())
    assert matches == sorted(matches)  # kept in the teacher's order
    # the output layer keeps all 10 classes, with its input columns pruned consistently
    assert student.classifier[5].weight.shape == (10, 42)


def test_fresh_init_differs_from_teacher():
    model, shape = build("lenet5")
    student = make_student(model, width=0.5, init="fresh", example_input=example(shape))
    matches = _matching_filters(student.features[0].weight.detach(), model.features[0].weight)
    assert matches == [None, None, None]
    assert not torch.equal(student.classifier[5].bias, model.classifier[5].bias)


def test_nothing_to_prune():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(StudentError, match="nothing to shrink") as info:
        make_student(model, width=0.5, example_input=torch.randn(2, 1, 8, 8))
    assert isinstance(info.value, DaflError)


@pytest.mark.parametrize("width", [0.0, 1.0, 1.5, -0.25])
def test_bad_width(width):
    model, shape = build("lenet5")
    with pytest.raises(StudentError, match="width"):
        make_student(model, width=width, example_input=example(shape))


def test_bad_init():
    model, shape = build("lenet5")
    with pytest.raises(StudentError, match="init"):
        make_student(model, init="random", example_input=example(shape))


def test_hard_coded_view_falls_back_to_onnx():
    model = ViewLeNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = make_student(model, width=0.5, example_input=example(LENET_INPUT))
    with torch.no_grad():
        out = student(example(LENET_INPUT, batch=5))
    assert out.shape == (5, 10)
    assert layer_widths(student, LENET_INPUT) == [3, 8, 60, 42, 10]
    with torch.no_grad():  # the teacher still runs: its hard-coded view was not touched
        assert model(example(LENET_INPUT, batch=5)).shape == (5, 10)


def test_shufflenet_is_a_known_limitation():
    """torch-pruning cannot prune ShuffleNetV2's channel split consistently."""
    model, shape = build("shufflenet_v2_x0_5")
    with pytest.raises(StudentError, match="--student zoo"):
        make_student(model, width=0.5, example_input=example(shape))

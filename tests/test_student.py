"""Tests for make_student: widths, parameter ratio, teacher untouched, ONNX export, errors."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

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
    export_legacy,
    exported,
)
from torch import fx, nn

from compress_toolbox import CompressConfig, DaflError, load_teacher, plan_student
from compress_toolbox.export.writer import export_onnx, verify_onnx
from compress_toolbox.load.analysis import analyse
from compress_toolbox.load.graph.shape_agnostic import ChannelShuffle, EqualSplit
from compress_toolbox.load.importers.torch_to_onnx import module_via_onnx
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.student.derive import (
    StudentError,
    answers_kept,
    layer_widths,
    make_student,
)
from compress_toolbox.student.graph_facts import layers_to_keep
from compress_toolbox.student.shuffle_pruning import ChannelPermutation
from compress_toolbox.tasks import get_task


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
        ("shufflenet_v2_x0_5", "python"),  # its graph: test_shufflenet_half_width
    ]
    slow = [
        ("densenet121", "python"),
        ("efficientnet_b0", "python"),
        ("regnet_x_400mf", "python"),
        ("mobilenet_v3_small", "ts"),
        ("resnet18", "ts"),
        ("resnet18", "pt2"),
        ("shufflenet_v2_x0_5", "pt2"),
        ("shufflenet_v2_x0_5", "onnx"),
        ("shufflenet_v2_x0_5", "ts"),
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
    first = next(m for m in student.modules() if isinstance(m, nn.Conv2d))
    matches = _matching_filters(first.weight.detach(), model.features[0].weight)
    assert matches == [None, None, None]
    assert not torch.equal(student.classifier[5].bias, model.classifier[5].bias)


class _Rescaled(nn.Module):
    """The teacher's answers times 3, shifted: all of them kept, up to scale."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x):
        return 3.0 * self.teacher(x) + 1.0


def test_answers_kept_is_one_for_the_teacher_and_near_zero_for_a_fresh_student():
    model, shape = build("lenet5")
    assert answers_kept(model, copy.deepcopy(model), shape) == pytest.approx(1.0, abs=1e-5)
    assert answers_kept(model, _Rescaled(model), shape) == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    fresh = make_student(model, width=0.5, init="fresh", example_input=example(shape),
                         add_missing_batchnorm=False)  # fmt: skip
    kept_fresh = answers_kept(model, fresh, shape)
    kept = make_student(model, width=0.5, init="teacher", example_input=example(shape))
    kept_teacher = answers_kept(model, kept, shape)
    # fresh weights keep nothing; the teacher's largest channels keep something even of this
    # untrained teacher (measured -0.04 and 0.15)
    assert abs(kept_fresh) < 0.1 and kept_teacher > kept_fresh + 0.1, (kept_fresh, kept_teacher)


@pytest.mark.parametrize(("threshold", "expected"), [(1.01, "fresh"), (-1.01, "teacher")])
def test_auto_init_starts_fresh_when_the_teachers_weights_keep_too_little(threshold, expected):
    """--init auto: a student without BatchNorm whose teacher's weights keep less of the
    teacher's answers than the threshold starts fresh (with BatchNorm), and its kind says why;
    the user's own --init teacher is never overridden."""
    model, shape = build("lenet5")
    teacher = Teacher.from_module(model, shape)
    task = replace(get_task("classification"), min_answers_kept=threshold)
    chosen = plan_student(teacher, CompressConfig(task=task))
    assert f"init {expected}" in chosen.kind and chosen.from_teacher == (expected == "teacher")
    assert chosen.source == "derived"
    if expected == "fresh":
        assert "not from the teacher's weights: they keep" in chosen.kind
        assert "BatchNorm layers added" in chosen.kind
    asked = plan_student(teacher, CompressConfig.from_options(task=task, init="teacher"))
    assert "init teacher" in asked.kind and asked.from_teacher


def test_a_student_with_batchnorm_keeps_the_teachers_weights():
    """The check is for students without BatchNorm (folded teachers) only, and for the tasks
    that set a minimum (classification; detection's raw heads do not)."""
    model, shape = build("resnet18")
    task = replace(get_task("classification"), min_answers_kept=1.01)
    chosen = plan_student(Teacher.from_module(model, shape), CompressConfig(task=task))
    assert "init teacher" in chosen.kind and chosen.from_teacher
    lenet, lenet_shape = build("lenet5")
    unchecked = replace(get_task("classification"), min_answers_kept=None)
    kept = plan_student(Teacher.from_module(lenet, lenet_shape), CompressConfig(task=unchecked))
    assert "init teacher" in kept.kind


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


@pytest.fixture(scope="module")
def shufflenet_graph() -> tuple[nn.Module, fx.GraphModule, tuple[int, ...]]:
    """torchvision's ShuffleNetV2 and its ONNX-imported graph (ChannelShuffle, EqualSplit)."""
    model, shape = build("shufflenet_v2_x0_5")
    graph = module_via_onnx(model, shape, "shufflenet", dynamo=True)
    kinds = {type(layer) for layer in graph.modules()}
    assert {ChannelShuffle, EqualSplit} <= kinds
    return model, graph, shape


def test_legacy_export_shuffle_and_chunk_become_shape_agnostic(tmp_path):
    """TorchScript imports go through the legacy exporter, which computes the shuffle's reshape
    and the chunk's slice bounds from runtime shapes; they must still become a ChannelShuffle
    and an EqualSplit, or torch-pruning cannot halve the network."""
    teacher, _ = _teacher("shufflenet_v2_x0_5", "ts", tmp_path)
    kinds = [type(layer) for layer in teacher.modules()]
    assert kinds.count(ChannelShuffle) == 16 and kinds.count(EqualSplit) == 13


def _conv_widths(module: nn.Module, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(layer.in_width, layer.out_width) for layer in analyse(module, shape).layers]


@pytest.mark.parametrize(
    "source, init",
    [
        ("graph", "fresh"),
        ("graph", "teacher"),
        ("python", "teacher"),  # python/fresh: test_half_width_student
        pytest.param("python", "fresh", marks=pytest.mark.slow),
    ],
)
def test_shufflenet_half_width(shufflenet_graph, tmp_path, source, init):
    """Every conv halved (input channels and classes kept), balanced splits, ONNX export."""
    model, graph, shape = shufflenet_graph
    teacher = model if source == "python" else graph
    student = make_student(teacher, width=0.5, init=init, example_input=example(shape))
    teacher_widths = _conv_widths(teacher, shape)
    expected = [(round(0.5 * i), round(0.5 * o)) for i, o in teacher_widths]
    expected[0] = (3, expected[0][1])
    expected[-1] = (expected[-1][0], 10)
    assert _conv_widths(student, shape) == expected
    for layer in student.modules():  # the channel shuffles became pruned permutations
        assert not isinstance(layer, ChannelShuffle)
    assert any(isinstance(layer, ChannelPermutation) for layer in student.modules())
    ratio = _params(student) / _params(teacher)
    assert 0.15 <= ratio <= 0.40, ratio
    for batch in (1, 5):
        with torch.no_grad():
            assert student(example(shape, batch=batch)).shape == (batch, 10)
    path = export_onnx(student, shape, tmp_path / "student.onnx")
    max_abs, _ = verify_onnx(student, path, shape)
    assert max_abs < 1e-3


def _mask_removed_channels(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """A copy of ``teacher`` whose channels the student dropped output exactly zero.

    The student's layers keep the teacher's names. A kept channel is found by its BatchNorm
    running mean, or, in a network without BatchNorm, by its conv bias (both distinct per
    channel); a dropped one is zeroed by its BatchNorm's scale and shift, or its conv's filter
    and bias.
    """
    masked = copy.deepcopy(teacher)
    norms = any(isinstance(m, nn.BatchNorm2d) for m in masked.modules())
    for name, layer in masked.named_modules():
        if norms and isinstance(layer, nn.BatchNorm2d):
            values, zeroed = layer.running_mean, (layer.weight, layer.bias)
            kept_values = student.get_submodule(name).running_mean
        elif not norms and isinstance(layer, nn.Conv2d) and layer.out_channels != 10:
            values, zeroed = layer.bias, (layer.weight, layer.bias)
            kept_values = student.get_submodule(name).bias
        else:
            continue
        kept = [values.tolist().index(value) for value in kept_values.tolist()]
        removed = sorted(set(range(len(values))) - set(kept))
        with torch.no_grad():
            for tensor in zeroed:
                tensor[removed] = 0.0
    return masked


def test_shufflenet_teacher_init_is_the_teachers_subnetwork(shufflenet_graph):
    """With the teacher's weights, the student computes the teacher minus the dropped channels.

    So every kept channel still reaches the layers it reached in the teacher: the channel shuffle
    was pruned as the teacher's permutation, not re-applied to the remaining channels.
    """
    _, graph, shape = shufflenet_graph
    student = make_student(graph, width=0.5, init="teacher", example_input=example(shape))
    masked = _mask_removed_channels(graph, student)
    x = example(shape, batch=5, seed=3)
    with torch.no_grad():
        got, expected, full = student(x), masked(x), graph(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, full, atol=1e-3)  # channels were really dropped


def test_shufflenet_fresh_init_differs_from_teacher(shufflenet_graph):
    _, graph, shape = shufflenet_graph
    torch.manual_seed(1234)  # not the seed the (untrained) teacher was built with
    student = make_student(graph, width=0.5, init="fresh", example_input=example(shape))
    first = next(m for m in student.modules() if isinstance(m, nn.Conv2d))
    teacher_first = next(m for m in graph.modules() if isinstance(m, nn.Conv2d))
    assert _matching_filters(first.weight.detach(), teacher_first.weight) == [None] * len(
        first.weight
    )
    for module in student.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics reset, not the teacher's
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))


def test_channel_permutation_drops_inputs_in_place():
    """Pruning a permutation keeps the remaining channels' relative routing."""
    shuffle = ChannelPermutation.shuffle(8, 2)
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert torch.equal(shuffle(x), ChannelShuffle(2)(x))
    shuffle.remove_inputs([1, 4, 6])
    kept = torch.tensor([0.0, 2, 3, 5, 7]).reshape(1, 5, 1, 1)
    assert shuffle(kept).flatten().tolist() == [0.0, 5, 2, 3, 7]  # teacher: 0 4 1 5 2 6 3 7


class _TinyShuffleNet(nn.Module):
    """Two ShuffleNetV2-style units written with the shape-agnostic modules (no ONNX)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
            for _ in range(3)
        )
        self.splits = nn.ModuleList(EqualSplit(1, 2) for _ in range(3))
        self.shuffles = nn.ModuleList(ChannelShuffle(2) for _ in range(3))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for split, branch, shuffle in zip(self.splits, self.branches, self.shuffles):
            x1, x2 = split(x)
            x = shuffle(torch.cat([x1, torch.relu(branch(x2))], dim=1))
        return self.head(x.mean(dim=(2, 3)))


def test_balanced_pruning_of_a_plain_module():
    """Not tied to ONNX graphs or torchvision: any module with these layers is pruned balanced."""
    torch.manual_seed(0)
    model = _TinyShuffleNet().eval()
    x = torch.randn(2, 3, 8, 8)
    student = make_student(model, width=0.5, init="teacher", example_input=x)
    assert student.stem.out_channels == 8
    assert [branch[0].in_channels for branch in student.branches] == [4, 4, 4]
    assert [branch[2].out_channels for branch in student.branches] == [4, 4, 4]
    assert student.head.weight.shape == (10, 8)
    x5 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(x5), _mask_removed_channels(model, student)(x5))


def _refused_derivation(monkeypatch) -> str:
    """The message of a run whose student cannot be derived (torch-pruning failing as on a
    real YOLOv8 graph), for the LeNet-5 teacher."""
    import compress_toolbox.student.plan as plan_module
    from compress_toolbox import CompressConfig, plan_student

    def fails(*args, **kwargs):
        raise StudentError("cannot derive a consistent half-width student from this "
                           "architecture (IndexError: list index out of range)")  # fmt: skip

    monkeypatch.setattr(plan_module, "make_student", fails)
    teacher = load_teacher(exported("lenet5", "dynamo"))
    with pytest.raises(StudentError) as refused:
        plan_student(teacher, CompressConfig.from_options(task="classification"))
    return str(refused.value)


def test_a_refused_derivation_names_the_zoo_model_that_fits(monkeypatch):
    message = _refused_derivation(monkeypatch)
    assert "IndexError" in message and "--student zoo would take" in message


def test_a_refused_derivation_never_suggests_a_zoo_that_cannot_serve(monkeypatch):
    """A detector's derivation failed with 'pick one from the zoo instead', which no zoo
    model of its task could follow."""
    import model_zoo

    def no_fit(task, teacher, **kwargs):
        raise ValueError("no zoo model fits")

    monkeypatch.setattr(model_zoo, "pick_student", no_fit)
    message = _refused_derivation(monkeypatch)
    assert "--student zoo" not in message and "no classification model of the zoo" in message


class _DflHead(nn.Module):
    """YOLOv8's head in miniature: box convolutions give 4 x 8 distribution bins, which a
    reshape cuts into coordinates and bins before the fixed DFL convolution; the class
    convolution goes straight to the output."""

    def __init__(self, bins: int = 8, classes: int = 3):
        super().__init__()
        self.bins = bins
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1),
                                  nn.ReLU())  # fmt: skip
        self.box = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 4 * bins, 1))
        self.cls = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, classes, 1))
        self.dfl = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1)

    def forward(self, x):
        features = self.stem(x)
        box, cls = self.box(features), self.cls(features)
        n, _, h, w = box.shape
        bins = box.view(n, 4, self.bins, h * w).transpose(2, 1).softmax(1)
        distances = self.dfl(bins).view(n, 4, h * w)
        return torch.cat([distances, cls.view(n, -1, h * w).sigmoid()], 1)


def test_a_yolov8_style_head_keeps_its_box_bins(tmp_path):
    """Derivation failed on every YOLOv8 export: the box convolutions were pruned through the
    reshape into bins (only the DFL and class convolutions were kept whole)."""
    path = tmp_path / "dfl.onnx"
    torch.onnx.export(_DflHead().eval(), (torch.randn(2, 3, 32, 32),), path, dynamo=False,
                      input_names=["images"], dynamic_axes={"images": {0: "batch"}})  # fmt: skip
    teacher = load_teacher(path)
    student = make_student(teacher.module, example_input=torch.randn(2, 3, 32, 32))
    convs = {name: layer.out_channels for name, layer in student.named_modules()
             if isinstance(layer, nn.Conv2d)}  # fmt: skip
    assert sorted(convs.values()).count(32) == 1  # the box convolution: 4 x 8 bins
    with torch.no_grad():
        assert student(torch.randn(3, 3, 32, 32)).shape == (3, 7, 256)
    assert _params(student) < 0.5 * _params(teacher.module)


class _ConvAttention(nn.Module):
    """YOLO11's C2PSA attention in small: a qkv 1x1 convolution whose channels a reshape cuts
    into heads of unequal query, key and value parts, a depthwise positional convolution on
    the values, a proj 1x1 convolution; residual."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim, self.key_dim = heads, dim // heads, dim // heads // 2
        self.stem = nn.Conv2d(3, dim, 3, stride=2, padding=1)
        self.qkv = nn.Conv2d(dim, dim + 2 * self.key_dim * heads, 1)
        self.pe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        b, c, h, w = x.shape
        parts = self.qkv(x).view(b, self.heads, 2 * self.key_dim + self.head_dim, h * w)
        q, k, v = parts.split([self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.key_dim**-0.5).softmax(dim=-1)
        out = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.head((x + self.proj(out)).mean((2, 3)))


def test_a_convolutional_attention_keeps_the_layers_around_its_head_reshape(tmp_path):
    """YOLO11's attention: torch-pruning's index mapping through the reshape into heads grew
    past the memory bound (no student from any YOLO11 export); its qkv and positional
    convolutions now keep their width and the rest is pruned."""
    path = export_legacy(_ConvAttention(), (3, 32, 32), tmp_path / "attention.onnx", 17)
    teacher = load_teacher(path)
    x = torch.randn(2, 3, 32, 32)
    outputs, kept = layers_to_keep(teacher.module, x)
    kept = [name for name in kept if name not in outputs]  # the layers around the reshape
    assert sorted(teacher.module.get_submodule(name).out_channels for name in kept) == [32, 64]
    student = make_student(teacher.module, example_input=x, init="teacher")
    widths = {name: layer.out_channels for name, layer in student.named_modules()
              if isinstance(layer, nn.Conv2d)}  # fmt: skip
    assert sorted(widths[name] for name in kept) == [32, 64]
    assert widths[next(name for name in widths if "stem" in name)] == 16
    with torch.no_grad():
        assert student(x).shape == (2, 4)
    assert _params(student) < 0.6 * _params(teacher.module)


class _GridFromSizes(nn.Module):
    """A YOLOv8-style head that lays out its grid from its neck output's sizes, as
    ultralytics' dynamic exports do: (N, 4 + 3, h * w). With ``read_channels`` it also divides
    the boxes by that output's channel count, read from its shape."""

    def __init__(self, read_channels: bool = False) -> None:
        super().__init__()
        self.neck = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())  # fmt: skip
        self.box, self.cls = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 3, 1)
        self.read_channels = read_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.neck(x)
        _, channels, rows, cols = features.shape
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        grid = torch.stack([xs, ys]).reshape(1, 2, -1).float() * 4
        box = self.box(features).flatten(2)
        if self.read_channels:
            box = box / channels
        return torch.cat([box[:, :2] + grid, box[:, 2:], self.cls(features).flatten(2)], 1)


@pytest.mark.parametrize("read_channels", [False, True])
def test_a_neck_whose_sizes_the_head_reads_is_pruned_unless_its_channels_are_read(
        tmp_path, read_channels):  # fmt: skip
    """A YOLOv8n exported with dynamic axes reads its neck outputs' shapes for the grid: they
    kept their whole width (0.331 of the parameters against 0.263 for the batch-1 export).
    Reading the batch and spatial sizes no longer protects a layer; reading the channels does."""
    import onnx

    path = export_legacy(_GridFromSizes(read_channels), (3, 32, 32), tmp_path / "grid.onnx", 17)
    assert "Shape" in {node.op_type for node in onnx.load(path).graph.node}
    teacher = load_teacher(path)
    x = torch.randn(2, 3, 32, 32)
    student = make_student(teacher.module, example_input=x, init="teacher")
    convolutions = [layer for layer in student.modules() if isinstance(layer, nn.Conv2d)]
    neck_width = next(layer.in_channels for layer in convolutions if layer.out_channels == 4)
    assert neck_width == (32 if read_channels else 16)
    with torch.no_grad():
        assert student(x).shape == teacher.module(x).shape == (2, 7, 64)


def test_a_failed_student_is_pointed_to_the_other_kind_of_student():
    """And a derived one started fresh to the teacher's weights, where they fit."""
    from compress_toolbox.pipeline import _what_else
    from compress_toolbox.student.plan import StudentPlan

    def plan(source: str = "derived", from_teacher: bool = False) -> StudentPlan:
        return StudentPlan("kind", nn.Identity(), None, source, from_teacher=from_teacher)

    tried = "a longer --time-budget, another --method"
    assert _what_else(plan(from_teacher=True), True, "lenet5") == f"{tried} or --student zoo"
    assert _what_else(plan(), True, "lenet5") == f"{tried}, --init teacher or --student zoo"
    assert _what_else(plan(), False, "lenet5") == f"{tried} or --student zoo"  # cannot fit
    assert _what_else(plan(), True, None) == f"{tried} or --init teacher"  # no zoo model fits
    assert _what_else(plan(), False, None) == "a longer --time-budget or another --method"
    assert _what_else(plan("zoo"), True, "lenet5") == f"{tried} or --student auto"

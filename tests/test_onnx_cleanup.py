"""ONNX graphs as other producers write them (tf2onnx, hand-written) import as prunable teachers.

The graphs are built node by node with onnx.helper: dense layers as MatMul (+ Add), BatchNorm
as per-channel Mul/Add, explicit Pad nodes, TensorFlow's H,W,C flatten.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compress_toolbox import CompressConfig, load_teacher, plan_student
from compress_toolbox.export.writer import export_onnx, verify_onnx
from compress_toolbox.load.analysis import analyse, count_params
from compress_toolbox.load.graph.onnx_cleanup import clean_up
from compress_toolbox.student.derive import ChannelOrderError, make_student
from compress_toolbox.student.plan import teacher_weights_fit


class _Graph:
    """Collects nodes and random float initializers of a single-input, single-output graph."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, array: np.ndarray) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def random(self, *shape: int, scale: float = 0.3, offset: float = 0.0) -> str:
        array = self.rng.standard_normal(shape) * scale + offset
        return self.const(array.astype(np.float32))

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        self.count += 1
        output = f"t{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def conv(self, x: str, cin: int, cout: int, k: int = 3, bias: bool = True, **attrs) -> str:
        groups = attrs.get("group", 1)
        inputs = [x, self.random(cout, cin // groups, k, k)]
        if bias:
            inputs.append(self.random(cout, scale=0.1))
        return self.op("Conv", *inputs, **attrs)

    def mul_add(self, x: str, channels: int) -> str:
        """BatchNorm as tf2onnx leaves it after a depthwise conv: per-channel Mul then Add."""
        scaled = self.op("Mul", x, self.random(1, channels, 1, 1, scale=0.2, offset=1.0))
        return self.op("Add", scaled, self.random(1, channels, 1, 1, scale=0.1))

    def dense(self, x: str, n_in: int, n_out: int, bias: bool = True) -> str:
        y = self.op("MatMul", x, self.random(n_in, n_out, scale=1 / np.sqrt(n_in)))
        return self.op("Add", y, self.random(n_out, scale=0.1)) if bias else y

    def save(self, path, output: str, shape: tuple) -> str:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 10])],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
        return str(path)


def _ratio(student: nn.Module, teacher: nn.Module) -> float:
    return count_params(student) / count_params(teacher)


def _ops(path) -> list[str]:
    return [node.op_type for node in clean_up(onnx.load(str(path))).graph.node]


def _mlp(path) -> str:
    """Flatten -> 3 hidden dense layers of 128 (MatMul+Add; one without bias) -> 10."""
    g = _Graph()
    x = g.op("Flatten", "x", axis=1)
    for n_in, bias in ((64, True), (128, False), (128, True)):
        x = g.op("Relu", g.dense(x, n_in, 128, bias=bias))
    return g.save(path, g.dense(x, 128, 10), (1, 8, 8))


def test_mlp_written_as_matmul_add_gives_a_student(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    assert _ops(path) == ["Flatten", "Gemm", "Relu", "Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    teacher = load_teacher(path)  # verified against the original file in onnxruntime
    assert [layer.type for layer in teacher.analysis.layers] == ["Linear"] * 4
    assert count_params(teacher.module) == 64 * 128 + 128 * 128 * 2 + 128 * 10 + 128 * 2 + 10
    student = make_student(teacher.module, width=0.5, example_input=torch.randn(2, 1, 8, 8))
    assert [layer.out_width for layer in analyse(student, (1, 8, 8)).layers] == [64, 64, 64, 10]
    assert 0.15 <= _ratio(student, teacher.module) <= 0.40
    exported = export_onnx(student, (1, 8, 8), tmp_path / "student.onnx")
    max_abs, _ = verify_onnx(student, exported, (1, 8, 8))
    assert max_abs < 1e-4


def _mobilenet_block(path) -> str:
    """Conv+BN(Mul/Add) -> Pad -> depthwise conv (stride 2)+BN -> 1x1 convs+BN -> pool -> dense."""
    g = _Graph(1)
    x = g.op("Relu", g.mul_add(g.conv("x", 3, 16, bias=False, pads=[1, 1, 1, 1]), 16))
    x = g.op("Pad", x, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)))
    x = g.op("Relu", g.mul_add(g.conv(x, 16, 16, bias=False, group=16, strides=[2, 2]), 16))
    x = g.op("Relu", g.mul_add(g.conv(x, 16, 32, k=1, bias=False), 32))
    x = g.op("Relu", g.mul_add(g.conv(x, 32, 64, k=1, bias=False), 64))
    x = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    return g.save(path, g.dense(x, 64, 10), (3, 8, 8))


def test_batchnorm_as_mul_add_and_explicit_pad_fold_into_the_convs(tmp_path):
    path = _mobilenet_block(tmp_path / "mobile.onnx")
    ops = _ops(path)
    assert "Mul" not in ops and "Add" not in ops and "Pad" not in ops, ops
    assert ops.count("Conv") == 4 and "Gemm" in ops
    cleaned = clean_up(onnx.load(path))
    assert {node.domain for node in cleaned.graph.node} <= {"", "ai.onnx"}
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    original = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    folded = ort.InferenceSession(cleaned.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        folded.run(None, {"x": x})[0], original.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5
    )

    teacher = load_teacher(path)
    student = make_student(teacher.module, width=0.5, example_input=torch.randn(2, 3, 8, 8))
    widths = [layer.out_width for layer in analyse(student, (3, 8, 8)).layers]
    assert widths == [8, 8, 16, 32, 10]
    assert 0.15 <= _ratio(student, teacher.module) <= 0.40


def _preactivation_block(path) -> str:
    """A residual block followed by BatchNorm (Mul/Add) on the sum: no conv to fold it into."""
    g = _Graph(6)
    stem = g.conv("x", 3, 16, pads=[1, 1, 1, 1])
    h = g.op("Relu", g.mul_add(g.conv(stem, 16, 16, pads=[1, 1, 1, 1]), 16))
    x = g.op("Relu", g.mul_add(g.op("Add", stem, g.conv(h, 16, 16, pads=[1, 1, 1, 1])), 16))
    x = g.op("Relu", g.conv(x, 16, 32, pads=[1, 1, 1, 1], strides=[2, 2]))
    x = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    return g.save(path, g.dense(x, 32, 10), (3, 8, 8))


def test_batchnorm_after_a_residual_add_becomes_a_depthwise_conv(tmp_path):
    path = _preactivation_block(tmp_path / "preact.onnx")
    cleaned = clean_up(onnx.load(path))
    assert [node.op_type for node in cleaned.graph.node].count("Mul") == 0
    groups = [a.i for n in cleaned.graph.node for a in n.attribute if a.name == "group"]
    assert 16 in groups  # the Mul/Add pair after the residual Add
    teacher = load_teacher(path).module
    x = torch.randn(2, 3, 8, 8)
    student = make_student(teacher, width=0.5, init="teacher", example_input=x)
    assert 0.15 <= _ratio(student, teacher) <= 0.40
    x5 = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        got, expected = student(x5), _mask_dropped_units(teacher, student)(x5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _resnet_block(path) -> str:
    """Stem, a residual block whose shortcut is a strided 1x1 conv (run last), dense output."""
    g = _Graph(2)
    stem = g.op("Relu", g.conv("x", 3, 16, pads=[1, 1, 1, 1]))
    main = g.op("Relu", g.conv(stem, 16, 32, pads=[1, 1, 1, 1], strides=[2, 2]))
    main = g.conv(main, 32, 32, pads=[1, 1, 1, 1])
    shortcut = g.conv(stem, 16, 32, k=1, strides=[2, 2])
    x = g.op("Relu", g.op("Add", main, shortcut))
    x = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    return g.save(path, g.dense(x, 32, 10), (3, 8, 8))


def test_final_layer_is_the_dense_not_the_shortcut_conv(tmp_path):
    teacher = load_teacher(_resnet_block(tmp_path / "resnet.onnx"))
    final = teacher.module.get_submodule(teacher.analysis.final_layer)
    assert isinstance(final, nn.Linear) and final.out_features == 10
    student = make_student(teacher.module, width=0.5, example_input=torch.randn(2, 3, 8, 8))
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [8, 16, 16, 16]  # the last stage halved
    assert 0.20 <= _ratio(student, teacher.module) <= 0.30


def test_final_layer_is_never_a_depthwise_conv():
    """A per-channel scale after the classifier (a depthwise 1x1 conv) is not the classifier."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 5, 1, groups=5))
    assert analyse(model, (3, 8, 8)).final_layer == "1"


def _nhwc_lenet(path, dynamic_size: bool = False, computed_shape: bool = False) -> str:
    """Two convs, then TensorFlow's flatten: Transpose(0, 2, 3, 1), Reshape, dense layers.
    ``computed_shape``: the reshape target is [batch, -1] computed from the input's shape, as
    tf2onnx writes it for Keras' Flatten."""
    g = _Graph(3)
    x = g.op("Relu", g.conv("x", 3, 8, pads=[1, 1, 1, 1]))
    features = g.op("Relu", g.conv(x, 8, 16, pads=[1, 1, 1, 1]))
    x = g.op("Transpose", features, perm=[0, 2, 3, 1])
    if computed_shape:
        ends = [g.const(np.array([i], np.int64)) for i in (0, 1)]
        batch = g.op("Slice", g.op("Shape", features), *ends)
        target = g.op("Concat", batch, g.const(np.array([-1], np.int64)), axis=0)
    else:
        target = g.const(np.array([-1, 4 * 4 * 16], np.int64))
    x = g.op("Reshape", x, target)
    x = g.op("Relu", g.dense(x, 4 * 4 * 16, 32))
    path = g.save(path, g.dense(x, 32, 10), (3, 4, 4))
    if dynamic_size:  # H and W unknown: shape inference cannot size the flatten
        model = onnx.load(path)
        for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_param = "size"
        onnx.save(model, path)
    return path


def _mask_dropped_units(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """A copy of ``teacher`` whose conv channels and hidden dense units that the student
    dropped output exactly zero (kept ones are found by their distinct biases)."""
    masked = copy.deepcopy(teacher)
    for name, layer in masked.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or layer.bias.numel() == 10:
            continue
        kept = [layer.bias.tolist().index(v) for v in student.get_submodule(name).bias.tolist()]
        dropped = sorted(set(range(layer.bias.numel())) - set(kept))
        with torch.no_grad():
            layer.weight[dropped] = 0.0
            layer.bias[dropped] = 0.0
    return masked


@pytest.mark.parametrize("computed_shape", [False, True], ids=["constant", "computed"])
def test_hwc_flatten_teacher_init_is_the_masked_teacher(tmp_path, computed_shape):
    path = _nhwc_lenet(tmp_path / "nhwc.onnx", computed_shape=computed_shape)
    assert "Transpose" not in _ops(path)  # the dense weight's rows were permuted instead
    teacher = load_teacher(path).module
    student = make_student(
        teacher, width=0.5, init="teacher", example_input=torch.randn(2, 3, 4, 4)
    )
    x = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        got, expected = student(x), _mask_dropped_units(teacher, student)(x)
        full = teacher(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # channels were really dropped


def test_hwc_flatten_of_unknown_size_refuses_teacher_init(tmp_path):
    path = _nhwc_lenet(tmp_path / "nhwc.onnx", dynamic_size=True)
    teacher = load_teacher(path, input_shape=(3, 4, 4)).module
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ChannelOrderError, match="H,W,C order .* use --init fresh"):
        make_student(teacher, width=0.5, init="teacher", example_input=x)
    student = make_student(teacher, width=0.5, init="fresh", example_input=x)
    assert student(x).shape == (2, 10)


def test_hwc_flatten_of_unknown_size_falls_back_to_fresh_init_when_auto(tmp_path):
    teacher = load_teacher(_nhwc_lenet(tmp_path / "nhwc.onnx", True), input_shape=(3, 4, 4))
    with pytest.raises(ChannelOrderError):  # asked for by the user: refused
        plan_student(teacher, CompressConfig.from_options(init="teacher"))
    plan = plan_student(teacher, CompressConfig())  # --init auto: the preset's choice
    assert not plan.from_teacher
    assert "init fresh, not from the teacher's weights: H,W,C flatten" in plan.kind
    # so a failed run does not suggest --init teacher, nor does one asked to start fresh
    fresh = CompressConfig.from_options(init="fresh")
    assert not teacher_weights_fit(teacher)
    assert not plan_student(teacher, fresh).from_teacher
    plain = load_teacher(_nhwc_lenet(tmp_path / "fixed.onnx"))  # its weights fit
    assert teacher_weights_fit(plain) and not plan_student(plain, fresh).from_teacher


def test_onnxruntime_keeps_batchnorm_statistics(tmp_path):
    """The bn-prior method needs BatchNorm statistics: onnxruntime must not fold them (an
    optimiser renamed in a new onnxruntime would be silently ignored: this test fails then)."""
    g = _Graph(4)
    x = g.conv("x", 3, 8, pads=[1, 1, 1, 1])
    stats = [g.random(8, offset=1.0), g.random(8), g.random(8), g.random(8, scale=0.1, offset=1.0)]
    x = g.op("Relu", g.op("BatchNormalization", x, *stats))
    x = g.mul_add(g.conv(x, 8, 8, pads=[1, 1, 1, 1]), 8)  # something to fold: onnxruntime runs
    x = g.op("Flatten", g.op("GlobalAveragePool", g.conv(x, 8, 10, k=1)), axis=1)
    ops = _ops(g.save(tmp_path / "bn.onnx", x, (3, 8, 8)))
    assert "BatchNormalization" in ops and "Mul" not in ops, ops


def test_matmul_over_tokens_is_left_alone():
    """Gemm takes 2-D inputs only: a MatMul on (N, T, D) stays a MatMul."""
    g = _Graph(5)
    y = g.dense("x", 4, 10)
    graph = helper.make_graph(
        g.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 3, 10])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [node.op_type for node in clean_up(model).graph.node] == ["MatMul", "Add"]

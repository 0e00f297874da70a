"""INT8 quantisation (compress_toolbox.export.quantize): a small digits CNN trained here,
exported to ONNX with a dynamic batch axis, quantised from random inputs (what a data-free run
has before its generator is good), then checked in onnxruntime."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli
from torch import nn

from compress_toolbox.errors import DaflError, QuantizeError
from compress_toolbox.export.onnx_compare import compare_onnx, latency_ms
from compress_toolbox.export.quantize import quantize_onnx


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]  # 1x8x8 in [0, 1]
    labels = data.target.astype(np.int64)
    return images[:1400], labels[:1400], images[1400:], labels[1400:]


def _cnn(middle: nn.Module | None = None) -> nn.Module:
    """2 convs + BN + linear; ``middle`` goes between the convs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        middle or nn.Identity(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 60) -> nn.Module:
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(xt), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(xt[pick]), yt[pick])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def _export(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    return path


def _random_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def float_model(tmp_path_factory, digits) -> Path:
    torch.manual_seed(0)
    x, y, _, _ = digits
    return _export(_train(_cnn(), x, y), tmp_path_factory.mktemp("cnn") / "student.onnx")


@pytest.fixture(scope="module")
def quantised(float_model):
    out = float_model.with_name("student.int8.onnx")
    return quantize_onnx(float_model, out, _random_inputs(256), samples=256)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_int8_runs_at_batch_1_and_7_and_is_smaller(float_model, quantised):
    assert quantised.path.is_file() and quantised.samples == 256
    for n in (1, 7):
        assert _run(quantised.path, _random_inputs(n, seed=n)).shape == (n, 10)
    assert quantised.size_bytes == quantised.path.stat().st_size
    assert quantised.size_ratio < 0.5, quantised
    assert quantised.float_ops == (), quantised.float_ops  # everything here has an int8 form
    assert not [p for p in float_model.parent.iterdir() if p.name.startswith(".")]


def test_int8_agrees_with_float_on_digits(float_model, quantised, digits):
    _, _, x_test, y_test = digits
    float_accuracy = np.mean(_run(float_model, x_test).argmax(1) == y_test)
    int8_accuracy = np.mean(_run(quantised.path, x_test).argmax(1) == y_test)
    assert float_accuracy >= 0.85  # the model learned something, so agreement means something
    agreement = compare_onnx(float_model, quantised.path, x_test, batch=50)
    assert agreement.samples == len(x_test)
    assert agreement.top1 is not None and agreement.top1 >= 0.9, agreement
    assert int8_accuracy >= float_accuracy - 0.05, (float_accuracy, int8_accuracy)
    assert 0 < agreement.mean_abs_diff <= agreement.max_abs_diff


def test_the_int8_file_is_compacted_and_computes_the_same(float_model, quantised,
                                                           monkeypatch, tmp_path):  # fmt: skip
    """onnxruntime's QDQ file of a small student was 0.35-0.48 of the float file, mostly all-zero
    zero points and long names; the compacted one computes exactly what it computed."""
    import onnx

    from compress_toolbox.export import quantize

    monkeypatch.setattr(quantize, "compact", lambda model, keep_nodes: False)
    as_written = quantize_onnx(float_model, tmp_path / "plain.int8.onnx", _random_inputs(256),
                               samples=256)  # fmt: skip
    assert quantised.size_bytes < 0.85 * as_written.size_bytes, (quantised, as_written)
    x = _random_inputs(9, seed=3)
    assert np.array_equal(_run(quantised.path, x), _run(as_written.path, x))
    model = onnx.load(str(quantised.path))
    assert [v.name for v in model.graph.input] == ["input"]
    assert [v.name for v in model.graph.output] == ["logits"]
    zero_points = {node.input[2] for node in model.graph.node
                   if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(node.input) == 3}  # fmt: skip
    assert all(onnx.numpy_helper.to_array(init).any() for init in model.graph.initializer
               if init.name in zero_points)  # only the ones that are not all zeros are left
    assert {opset.domain for opset in model.opset_import} <= {node.domain for node in
                                                              model.graph.node} | {""}
    assert not any(attr.name == "group" and attr.i == 1 for node in model.graph.node
                   for attr in node.attribute)  # Conv's default group  # fmt: skip


def _optimised_ops(path: Path, tmp_path: Path) -> dict[str, int]:
    """The op counts of ``path`` as onnxruntime's CPU EP runs it (its fusions applied)."""
    import collections

    import onnx

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimised.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    return dict(collections.Counter(node.op_type for node in nodes))


def test_float_biases_run_as_int32_ones(float_model, quantised, monkeypatch, tmp_path):
    """No int32 bias (its scale and DequantizeLinear cost file size): the CPU EP runs the same
    integer ops as it does for onnxruntime's default int32 biases."""
    import onnx

    from compress_toolbox.export import quantize

    model = onnx.load(str(quantised.path))
    assert not any(init.data_type == onnx.TensorProto.INT32 for init in model.graph.initializer)
    monkeypatch.setitem(quantize._CALIB_OPTIONS, "QuantizeBias", True)
    int32_biases = quantize_onnx(float_model, tmp_path / "int32.int8.onnx", _random_inputs(256),
                                 samples=256)  # fmt: skip
    assert int32_biases.size_bytes > quantised.size_bytes
    ops = _optimised_ops(quantised.path, tmp_path)
    assert ops == _optimised_ops(int32_biases.path, tmp_path) and "QLinearConv" in ops, ops


def test_latency_is_a_positive_median(quantised):
    assert latency_ms(quantised.path, _random_inputs(1), runs=5, warmup=1) > 0


class Sin(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


# GELU is one Gelu op or Div/Erf/Add/Mul depending on the exporter's opset.
@pytest.mark.parametrize(("middle", "ops"), [(Sin(), {"Sin"}), (nn.GELU(), {"Gelu", "Erf"})])
def test_an_op_without_int8_form_stays_float_and_is_named(tmp_path, digits, middle, ops):
    # Between two quantised convs the op is surrounded by Q/DQ, yet computes in float.
    x, y, x_test, _ = digits
    model = _export(_train(_cnn(middle), x, y, steps=10), tmp_path / "odd.onnx")
    result = quantize_onnx(model, tmp_path / "odd.int8.onnx", lambda n: _random_inputs(n),
                           method="MinMax", samples=64, batch=16)  # fmt: skip
    assert ops & set(result.float_op_types), result.float_ops
    assert not {"Conv", "Gemm", "MaxPool"} & set(result.float_op_types), result.float_ops
    assert result.samples == 64
    assert _run(result.path, x_test[:7]).shape == (7, 10)


def test_narrow_convolutions_stay_float_and_are_named_apart(tmp_path, digits, capsys):
    from compress_toolbox.export.int8 import kept_float_reason
    from compress_toolbox.report.render import _int8_verdict

    torch.manual_seed(0)
    x, y, test_x, _ = digits
    narrow = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 16, 3, padding=1),
                           nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))  # fmt: skip
    model = _export(_train(narrow, x, y), tmp_path / "narrow.onnx")
    kept = quantize_onnx(model, tmp_path / "kept.onnx", _random_inputs(256), samples=256)
    assert kept.float_ops == () and [op for _, op in kept.kept_float] == ["Conv", "Relu"]
    assert np.mean(_run(kept.path, test_x).argmax(1) == _run(model, test_x).argmax(1)) >= 0.9
    written = onnx.load(str(kept.path))  # the float convolution's weight is stored int8
    float_weights = [t.dims for t in written.graph.initializer  # (scales and biases: one axis)
                     if t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims)[-2:-1] > [1]]
    assert not float_weights and "Cast" in [node.op_type for node in written.graph.node]
    entry = {"status": "ok", "calibration_method": "MinMax", "calibration_samples": 256,
             "activations": "uint8", "size_ratio": kept.size_ratio, "verified_batches": [1, 7],
             "float_op_types": [], "kept_float_ops": kept.kept_float,
             "kept_float_reason": kept_float_reason(kept)}  # fmt: skip
    assert "1 convolution(s) with fewer than 16 output channels kept float" in _int8_verdict(entry)
    every = quantize_onnx(model, tmp_path / "all.onnx", _random_inputs(256), samples=256,
                          min_conv_channels=0)  # fmt: skip
    assert every.kept_float == () and every.float_ops == ()
    assert abs(kept.size_bytes - every.size_bytes) < 0.05 * every.size_bytes
    unnamed = onnx.load(str(model))
    for node in unnamed.graph.node:
        node.name = ""
    onnx.save(unnamed, str(tmp_path / "unnamed.onnx"))
    named_here = quantize_onnx(tmp_path / "unnamed.onnx", tmp_path / "unnamed.int8.onnx",
                               _random_inputs(256), samples=256)  # fmt: skip
    assert "Conv" in [op for _, op in named_here.kept_float]
    as_given = onnx.load(str(tmp_path / "unnamed.onnx"))
    assert not [node.name for node in as_given.graph.node if node.name]  # the user's file as it was

    np.savez(tmp_path / "calib.npz", x=_random_inputs(64))
    assert run_cli("quantize", model, "--calibration-data", tmp_path / "calib.npz") == 0
    assert "1 convolution(s) with fewer than 16 output channels kept float" in (
        capsys.readouterr().out)  # fmt: skip


def test_calibration_from_an_iterable_of_batches_stops_at_samples(tmp_path, float_model, capsys):
    batches = (_random_inputs(30, seed=i) for i in range(10))
    result = quantize_onnx(float_model, tmp_path / "it.int8.onnx", batches, method="entropy",
                           samples=70, batch=16)  # fmt: skip
    # whole batches of 16 across the 30-sample items (histogram calibrators need equal ones)
    assert result.samples == 64 and result.method == "Entropy"
    assert capsys.readouterr().out == ""  # onnxruntime's calibrator progress is not printed


@pytest.mark.parametrize(("option", "needle"), [({"method": "KL"}, "'KL'"),
                                               ({"mode": "int4"}, "'int4'")])  # fmt: skip
def test_bad_options_raise_one_line_naming_the_file(tmp_path, float_model, option, needle):
    out = tmp_path / "bad.int8.onnx"
    with pytest.raises(QuantizeError) as raised:
        quantize_onnx(float_model, out, _random_inputs(8), **option)
    message = str(raised.value)
    assert isinstance(raised.value, DaflError) and raised.value.exit_code == 2
    assert "\n" not in message and str(float_model) in message and needle in message
    assert list(tmp_path.iterdir()) == []


def test_a_failing_quantiser_is_one_line_and_leaves_nothing(tmp_path, float_model):
    out = tmp_path / "wrong.int8.onnx"
    wrong_shape = np.zeros((8, 3, 8, 8), np.float32)  # 3 channels for a 1-channel model
    with pytest.raises(QuantizeError) as raised:
        quantize_onnx(float_model, out, wrong_shape, method="MinMax")
    message = str(raised.value)
    assert "\n" not in message and str(float_model) in message and "could not quantise" in message
    assert list(tmp_path.iterdir()) == []


def test_an_op_onnxruntime_cannot_run_fails_in_one_line_without_litter(
    tmp_path, float_model, monkeypatch
):
    # onnxruntime's symbolic shape inference saves a partial model in the current folder when
    # it meets an op it does not know: that must not land in the user's folder.
    import onnx

    graph = onnx.load(str(float_model))
    relu = next(node for node in graph.graph.node if node.op_type == "Relu")
    relu.op_type, relu.domain = "MyRelu", "my.ops"
    graph.opset_import.append(onnx.helper.make_opsetid("my.ops", 1))
    custom = tmp_path / "model" / "custom.onnx"
    custom.parent.mkdir()
    onnx.save(graph, str(custom))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(QuantizeError) as raised:
        quantize_onnx(custom, custom.with_name("custom.int8.onnx"), _random_inputs(32))
    assert "\n" not in str(raised.value) and str(custom) in str(raised.value)
    assert list(work.iterdir()) == [] and list(custom.parent.iterdir()) == [custom]


def test_compact_names_never_take_an_input_or_output_name(tmp_path):
    """A teacher exported without output names has outputs named like short ids ("1", "a");
    the teacher's INT8 file failed to load ("Duplicate definition")."""
    import onnx

    torch.manual_seed(0)
    path = _export(_cnn().eval(), tmp_path / "numbered.onnx")
    model = onnx.load(str(path))
    renamed = {"input": "1", "logits": "5"}
    for value in (*model.graph.input, *model.graph.output):
        value.name = renamed[value.name]
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    onnx.save(model, str(path))
    result = quantize_onnx(path, tmp_path / "numbered.int8.onnx", _random_inputs(64), samples=64)
    assert _run(result.path, _random_inputs(3)).shape == (3, 10)


def test_int8_weights_keep_the_convolution_float_and_close():
    from compress_toolbox.export.quantize import int8_weights

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(4, 2, 8, 8)
    buffer = io.BytesIO()
    torch.onnx.export(conv, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"])
    model = onnx.load_from_string(buffer.getvalue())
    name = model.graph.node[0].name
    assert int8_weights(model, ["not-a-node"]) == 0
    assert int8_weights(model, [name]) == 1
    assert [node.op_type for node in model.graph.node] == ["Cast", "Mul", "Conv"]
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    want = conv(x).detach().numpy()
    step = conv.weight.detach().abs().amax(dim=(1, 2, 3)).numpy() / 127  # one int8 step
    assert np.abs(got - want).max() <= 18 * step.max() * np.abs(x.numpy()).max()
    assert np.abs(got - want).max() > 0  # really rounded to int8
    weight_as_input = onnx.load_from_string(buffer.getvalue())  # IR < 4 exports list weights
    weight = weight_as_input.graph.node[0].input[1]
    weight_as_input.graph.input.append(onnx.helper.make_tensor_value_info(
        weight, onnx.TensorProto.FLOAT, list(conv.weight.shape)))  # fmt: skip
    assert int8_weights(weight_as_input, [name]) == 0
    clash = onnx.load_from_string(buffer.getvalue())  # a tensor already named as ours would be
    clash.graph.node[0].output[0] = f"{weight}_int8"
    clash.graph.output[0].name = f"{weight}_int8"
    assert int8_weights(clash, [name]) == 1
    onnx.checker.check_model(clash, full_check=True)

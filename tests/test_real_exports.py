"""Teachers as users hold them: per-channel normalisation (three values for an RGB teacher),
outputs too small for a relative tolerance alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import one_error_line, run_cli
from torch import nn

from compress_toolbox import CompressConfig, compress, load_teacher
from compress_toolbox.errors import DaflError, ImportFailed, VerificationFailed
from compress_toolbox.export.onnx_inspect import fixed_batch
from compress_toolbox.export.verification import compare
from compress_toolbox.load.graph.fixed_batch import _batch_copied


@pytest.fixture(scope="module")
def rgb_teacher(tmp_path_factory):
    """A 3x16x16 conv classifier exported as ONNX, and labelled images for it."""
    root = tmp_path_factory.mktemp("rgb")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))  # fmt: skip
    path = root / "rgb.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), path, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    rng = np.random.default_rng(0)
    np.savez(root / "eval.npz", x=rng.integers(0, 256, (20, 3, 16, 16), dtype=np.uint8),
             y=rng.integers(0, 4, 20))  # fmt: skip
    return path, root / "eval.npz"


def test_three_channel_mean_and_std_are_accepted(rgb_teacher, tmp_path):
    """`--mean 0.5,0.5,0.5 --std 0.5,0.5,0.5` on an RGB teacher was refused before the teacher
    was loaded ("the teacher's input has 1 channel(s)")."""
    path, data = rgb_teacher
    result = compress(
        path,
        CompressConfig.from_options(
            out=tmp_path / "out",
            dry_run=True,
            eval_data=data,
            mean=[0.485, 0.456, 0.406],
            std=[0.229, 0.224, 0.225],
        ),
    )
    assert result.teacher.input_shape == (3, 16, 16)


def test_a_wrong_number_of_channel_values_is_still_refused(rgb_teacher, tmp_path):
    path, data = rgb_teacher
    with pytest.raises(DaflError, match="--mean has 2 values; the teacher's input has 3"):
        compress(
            path,
            CompressConfig.from_options(
                out=tmp_path / "out", dry_run=True, mean=[0.5, 0.5], std=[0.5]
            ),
        )


def test_tiny_outputs_that_agree_to_float_rounding_verify():
    """A sigmoid map of ~1e-6 whose copy differs by 4e-9 is 4e-3 off relatively: float32
    rounding, not a disagreement (DBNet's student was refused for it); a real difference still
    fails."""
    reference = np.full((1, 1, 4, 4), 1e-6)

    def close(x):
        return reference + 4e-9

    assert compare(close, lambda x: reference, (1, 4, 4), source="m.onnx", what="copy")[1] > 1e-4

    def far(x):
        return reference + 1e-3

    with pytest.raises(VerificationFailed, match="m.onnx: the copy differs"):
        compare(far, lambda x: reference, (1, 4, 4), source="m.onnx", what="copy")


@pytest.fixture(scope="module")
def softmax_teacher(tmp_path_factory):
    """A 2-class classifier whose ONNX file ends in Softmax (as Paddle2ONNX writes them)."""
    root = tmp_path_factory.mktemp("softmax")
    torch.manual_seed(0)
    logits = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )
    path = root / "probabilities.onnx"
    torch.onnx.export(nn.Sequential(logits, nn.Softmax(dim=1)), (torch.randn(2, 3, 12, 12),),
                      path, dynamo=False, input_names=["x"], output_names=["probs"],
                      dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    return path, logits


def test_a_softmax_ended_teacher_is_distilled_on_its_logits(softmax_teacher):
    path, logits = softmax_teacher
    loaded = load_teacher(path)
    assert loaded.details["distilled_output"] == "logits before its Softmax"
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), logits(x), atol=1e-5)  # logits, not probabilities


def test_the_student_of_a_softmax_ended_teacher_answers_probabilities(softmax_teacher, tmp_path):
    """student.onnx keeps the teacher file's signature: probabilities, like the teacher."""
    import onnxruntime as ort

    from compress_toolbox.distillation.health import StudentFailed

    path, _ = softmax_teacher
    try:
        compress(
            path,
            CompressConfig.from_options(
                out=tmp_path / "out", iters=3, batch_size=16, progress=False
            ),
        )
    except StudentFailed:  # three iterations: the verdict is not what this test checks
        pass
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"))
    probabilities = session.run(
        None, {session.get_inputs()[0].name: np.random.rand(5, 3, 12, 12).astype(np.float32)}
    )[0]
    assert probabilities.shape == (5, 2) and (probabilities >= 0).all()
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)


def _export_at_batch_one(model: nn.Module, path, batch: int = 1):
    torch.onnx.export(model.eval(), (torch.randn(batch, 3, 8, 8),), path, dynamo=False,
                      input_names=["x"])  # fmt: skip
    return path


class _ReshapesToBatchOne(nn.Module):
    def __init__(self, batch: int = 1):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)
        self.batch = batch

    def forward(self, x):
        return self.head(self.conv(x).reshape(self.batch, -1))


class _MixesTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):  # at batch 1 the sum over the batch is the identity
        return self.head(self.conv(x).flatten(1).sum(0, keepdim=True))


def test_a_file_whose_graph_fixes_its_batch_is_refused_with_one_line(tmp_path):
    path = _export_at_batch_one(_MixesTheBatch(), tmp_path / "fixed.onnx")
    with pytest.raises(ImportFailed, match="fixed.onnx: the file fixes batch 1 "):
        load_teacher(path)
    at_four = _export_at_batch_one(_MixesTheBatch(), tmp_path / "four.onnx", 4)  # (1, 5) out
    with pytest.raises(ImportFailed, match="four.onnx: the file fixes batch 4 "):
        load_teacher(at_four)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_a_file_that_reshapes_to_its_fixed_batch_is_freed_and_verified(tmp_path, batch):
    """ultralytics' default export (batch 1, reshapes to [1, ...] in the head) was refused;
    so was any file exported at a fixed batch of 4 (a batch of 1 did not run)."""
    net = _ReshapesToBatchOne(batch).eval()
    teacher = load_teacher(_export_at_batch_one(net, tmp_path / "yolo_like.onnx", batch))
    assert teacher.details["batch_freed"] == f"1 reshape(s) of the batch-{batch} file rewritten"
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        expected = torch.cat([net.head(net.conv(x[i : i + 1]).reshape(1, -1)) for i in range(7)])
        assert torch.allclose(teacher.module(x), expected, atol=1e-5)


@pytest.mark.parametrize("as_file, batch", [("onnx", 1), ("pt2", 1), ("pt2", 2)])
def test_torch_export_at_a_static_batch_is_freed_and_verified(tmp_path, as_file, batch):
    """torch's dynamo exporter (the default) writes a flatten at batch 1 as a Reshape to
    [1, C] with ``allowzero=1``, where a 0 is a literal 0: the file was refused, and a .pt2
    saved by ``torch.export`` at a static batch stopped with an unexpected RuntimeError."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5)).eval()  # fmt: skip
    example = (torch.randn(batch, 3, 8, 8),)  # checked at batch 3: in runs of 2, one padded
    if as_file == "onnx":
        path = tmp_path / "dynamo.onnx"
        torch.onnx.export(net, example, path, dynamo=True)
        reshapes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Reshape"]
        assert any(a.name == "allowzero" and a.i == 1 for n in reshapes for a in n.attribute)
    else:
        path = tmp_path / "static.pt2"
        torch.export.save(torch.export.export(net, example), path)
    teacher = load_teacher(path)
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(teacher.module(x), net(x), atol=1e-5)


def test_a_reshape_keeping_a_literal_zero_is_not_rewritten():
    """With ``allowzero=1`` a 0 in the target is an empty axis: the batch's 0 would be one too,
    and -1 beside a literal 0 is invalid ONNX."""
    node = onnx.helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    assert _batch_copied(node, np.array([1, 0, 4])) is None
    assert _batch_copied(node, np.array([1, 576])).tolist() == [0, 576]
    assert node.attribute[0].i == 0  # the 0 now copies the input's batch


def test_the_fixed_batch_is_read_from_the_data_input_not_a_listed_weight(tmp_path):
    """Files of IR version 3 list their weights as graph inputs: a weight's first axis (8
    filters here) is not the batch of a file whose data input has a free batch."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    path = tmp_path / "free.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), path, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    model = onnx.load(str(path))
    model.graph.input.extend(onnx.helper.make_tensor_value_info(
        init.name, init.data_type, init.dims) for init in model.graph.initializer)  # fmt: skip
    assert fixed_batch(model) is None
    at_four = _export_at_batch_one(net, tmp_path / "four.onnx", 4)
    assert fixed_batch(onnx.load(str(at_four))) == 4


def test_a_batch_declared_as_minus_one_is_dynamic(rgb_teacher, tmp_path):
    """Paddle2ONNX declares a dynamic batch as -1 (and height and width as '?'): PaddleOCR's
    text-direction classifier stopped with an IndexError, read as a file fixed at batch -1."""
    model = onnx.load(str(rgb_teacher[0]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = -1
    for dim in dims[2:]:
        dim.dim_param = "?"
    path = tmp_path / "paddle_like.onnx"
    onnx.save(model, str(path))
    assert fixed_batch(model) is None
    teacher = load_teacher(path, input_shape=(3, 16, 16))
    assert "batch_freed" not in teacher.details
    assert teacher.module(torch.randn(5, 3, 16, 16)).shape == (5, 4)


def test_a_file_that_only_declares_batch_one_imports(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    loaded = load_teacher(_export_at_batch_one(net, tmp_path / "declared.onnx"))
    assert loaded.module(torch.randn(7, 3, 8, 8)).shape == (7, 5)


def test_a_classifier_fixed_at_batch_four_is_distilled_scored_and_timed(tmp_path):
    """The whole run on a classifier exported at a fixed batch of 4: its student (dynamic
    batch) is scored on 10 samples and both are timed at the teacher file's batch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    path = _export_at_batch_one(net, tmp_path / "c4.onnx", 4)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8),
             y=rng.integers(0, 5, 10))  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(path, "--iters", 3, "--threads", 1, "--eval-data", tmp_path / "eval.npz",
                   "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["latency_batch"] == 4 and report["teacher"]["latency_ms"] > 0
    assert report["teacher"]["accuracy"] is not None and report["student"]["accuracy"] is not None


def test_a_file_fixed_at_a_batch_of_four_is_run_on_samples_that_are_not_a_multiple(tmp_path):
    """A student keeps its teacher's fixed batch; scoring it on 10 samples used to fail on
    the last 2 (onnxruntime: invalid dimensions)."""
    from compress_toolbox.export.onnx_compare import compare_onnx
    from compress_toolbox.export.writer import onnx_predictions, onnx_session, run_batched

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    path = tmp_path / "fixed4.onnx"
    torch.onnx.export(net.eval(), (torch.randn(4, 3, 8, 8),), path, dynamo=False,
                      input_names=["x"])  # fmt: skip
    x = torch.randn(10, 3, 8, 8)
    chunks = run_batched(onnx_session(path), {"x": x.numpy()}, batch=256)
    assert [len(outputs[0]) for outputs in chunks] == [4, 4, 2]
    with torch.no_grad():
        expected = net(x)
    got = torch.from_numpy(np.concatenate([outputs[0] for outputs in chunks]))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(onnx_predictions(path, x), expected.argmax(1))
    assert compare_onnx(path, path, x.numpy()).samples == 10


def test_a_failed_student_check_names_the_user_s_file_not_a_temporary_one(tmp_path):
    from compress_toolbox.export.writer import export_onnx, verify_onnx

    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    partial = tmp_path / ".s.partial-123.onnx"
    export_onnx(net, (12,), partial)
    with torch.no_grad():
        net[1].bias += 1.0  # the module no longer computes what the file does
    with pytest.raises(VerificationFailed, match=r"^s\.onnx: ") as info:
        verify_onnx(net, partial, (12,), source="s.onnx")
    assert "partial" not in str(info.value)


@pytest.fixture(scope="module")
def sigmoid_map_teacher(tmp_path_factory):
    """A DBNet-like text map: (N, 1, H, W) after a Sigmoid, with 0/1 masks to score it."""
    root = tmp_path_factory.mktemp("sigmoid")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 1, 1), nn.Sigmoid())  # fmt: skip
    path = root / "text_map.onnx"
    torch.onnx.export(net.eval(), (torch.randn(2, 3, 16, 16),), path, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    rng = np.random.default_rng(0)
    np.savez(root / "masks.npz", x=rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8),
             y=rng.integers(0, 2, (6, 16, 16)))  # fmt: skip
    return path, root / "masks.npz"


def test_a_sigmoid_map_is_distilled_as_two_classes_and_shipped_as_a_map(sigmoid_map_teacher,
                                                                        tmp_path):  # fmt: skip
    import json

    import onnxruntime as ort

    from compress_toolbox.distillation.health import StudentFailed

    path, masks = sigmoid_map_teacher
    loaded = load_teacher(path)
    assert loaded.num_outputs == 2  # seen as two classes
    try:
        compress(
            path,
            CompressConfig.from_options(
                task="segmentation",
                out=tmp_path / "out",
                eval_data=masks,
                iters=3,
                batch_size=4,
                progress=False,
            ),
        )
    except StudentFailed:  # three iterations: the verdict is not what this test checks
        pass
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["teacher"]["mean_iou"] is not None
    assert report["teacher"]["distilled_output"] == "the logit before its Sigmoid, as two classes"
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"))
    x = np.random.rand(3, 3, 16, 16).astype(np.float32)
    probability = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert probability.shape == (3, 1, 16, 16)
    assert (probability >= 0).all() and (probability <= 1).all()


class _DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export refuses it (as it refuses onnx2torch's
    Resize reading its scales) and prints the partial graph it traced on stderr."""

    def forward(self, x):
        y = x * 2
        return y if y.sum().item() > 0 else -y


def test_an_untraceable_student_is_written_without_torch_s_graph_dump(tmp_path, capfd):
    """A text detector's student printed ~1,200 lines of graph before it was written."""
    from compress_toolbox.export.writer import export_onnx

    with pytest.warns(RuntimeWarning, match="torch.export cannot trace"):
        export_onnx(_DataDependent(), (3,), tmp_path / "student.onnx")
    assert (tmp_path / "student.onnx").is_file()
    assert "def forward" not in capfd.readouterr().err


def test_a_model_that_fails_on_the_given_shape_says_so_in_one_line(tmp_path, capfd):
    """onnxruntime's own log line (in colour, before our message) made it two."""
    from onnx import TensorProto, helper, numpy_helper

    bias = numpy_helper.from_array(np.zeros((1, 3, 4, 4), np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])], "fixed_map",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 4, 4])], [bias])
    path = tmp_path / "map.onnx"
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    assert run_cli("inspect", path, "--input-shape", "3,5,5") == 2
    one_error_line(capfd, "map.onnx", "does not run on inputs of shape (3, 5, 5)")


def test_agreement_on_generated_inputs_is_measured_within_its_time():
    """512 generated inputs through a large teacher took 197 s after a 60 s budget; now the
    measurement stops at its share of the budget (but never below 64 inputs)."""
    import time

    from compress_toolbox.pipeline import _generated_with_answers, _measuring_seconds

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    start = time.perf_counter()
    x, answers = _generated_with_answers(Slow(), lambda n: torch.randn(n, 4), seconds=0.0)
    assert len(x) == len(answers) == 64
    assert time.perf_counter() - start < 1.0
    x, _ = _generated_with_answers(nn.Identity(), lambda n: torch.randn(n, 4), seconds=60.0)
    assert len(x) == 512
    assert _measuring_seconds(60) == 4.0 and _measuring_seconds(600) == 30.0


def _paddle_style(path, output_name: str = "probs") -> None:
    """Rewrite an exported ONNX file as Paddle2ONNX writes one: each conv's bias added after it
    as ``Add(conv, Reshape(bias, [1, C, 1, 1]))``, and an Identity after the final Softmax."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Conv" or len(node.input) < 3:
            continue
        bias, conv_out = node.input[2], node.output[0]
        del node.input[2]
        node.output[0] = conv_out + "_nobias"
        shape = numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), bias + "_shape")
        graph.initializer.append(shape)
        nodes.append(helper.make_node("Reshape", [bias, shape.name], [bias + "_4d"]))
        nodes.append(helper.make_node("Add", [node.output[0], bias + "_4d"], [conv_out]))
    nodes.append(helper.make_node("Identity", [output_name], [output_name + "_out"]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output[0].name = output_name + "_out"
    onnx.save(model, path)


class _SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-and-excite block, as PaddleOCR's text-direction classifier has."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        scale = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * nn.functional.hardsigmoid(scale)


def test_a_paddle_style_classifier_is_distilled_on_logits_and_shrinks(tmp_path):
    """PaddleOCR's classifier (Paddle2ONNX) was distilled on its probabilities (an Identity
    after the Softmax hid it) and its student kept 0.79 of the parameters (the biases added
    through a Reshape coupled the squeeze-and-excite convs wrongly)."""
    from compress_toolbox import make_student

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), _SqueezeExcite(16), nn.Conv2d(16, 32, 3),
                        nn.ReLU(), _SqueezeExcite(32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 2), nn.Softmax(dim=1))  # fmt: skip
    path = tmp_path / "paddle_cls.onnx"
    torch.onnx.export(net.eval(), (torch.randn(2, 3, 12, 24),), path, dynamo=False,
                      input_names=["x"], output_names=["probs"],
                      dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    _paddle_style(path)
    teacher = load_teacher(path)
    assert teacher.details["distilled_output"] == "logits before its Softmax"
    x = torch.randn(4, 3, 12, 24)
    with torch.no_grad():
        assert torch.allclose(teacher.module(x), net[:-1](x), atol=1e-5)
    student = make_student(teacher.module, example_input=x[:2])
    ratio = sum(p.numel() for p in student.parameters()) / sum(
        p.numel() for p in teacher.module.parameters())
    assert ratio <= 0.4, ratio


class _PaddedShortcuts(nn.Module):
    """BlazeFace's blocks: the shortcut appends zero channels to reach the block's width."""

    def __init__(self, widths=(8, 12, 16, 24)):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                    for a, b in zip(widths, widths[1:]))  # fmt: skip
        self.head = nn.Conv2d(widths[-1], 6, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            grow = block.out_channels - block.in_channels
            x = torch.relu(block(x) + nn.functional.pad(x, (0, 0, 0, 0, 0, grow)))
        return self.head(x)


def test_zero_padded_shortcuts_are_pruned_and_the_student_exports(tmp_path):
    """BlazeFace's student kept 0.74 of the parameters (the pad coupled each block's input with
    its output) and took over ten minutes to write (the pad's amounts read on every call)."""
    import time

    from compress_toolbox import make_student
    from compress_toolbox.export.writer import export_onnx, verify_onnx
    from compress_toolbox.load.graph.constant_args import ZeroChannels

    torch.manual_seed(0)
    path = tmp_path / "blaze.onnx"
    torch.onnx.export(_PaddedShortcuts().eval(), (torch.randn(2, 3, 16, 16),), path,
                      dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    teacher = load_teacher(path)
    assert sum(isinstance(m, ZeroChannels) for m in teacher.module.modules()) == 3
    student = make_student(teacher.module, example_input=torch.randn(2, 3, 16, 16))
    ratio = sum(p.numel() for p in student.parameters()) / sum(
        p.numel() for p in teacher.module.parameters())
    assert ratio <= 0.4, ratio
    start = time.perf_counter()
    export_onnx(student, (3, 16, 16), tmp_path / "student.onnx")
    verify_onnx(student, tmp_path / "student.onnx", (3, 16, 16), source="student.onnx")
    assert time.perf_counter() - start < 120


def test_a_dynamic_image_size_comes_from_ultralytics_imgsz_metadata(tmp_path):
    """A YOLOv8 export with dynamic height and width was refused without --input-shape,
    although the file says its size (``imgsz`` in its metadata)."""
    import onnx

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1))
    path = tmp_path / "dynamic.onnx"
    torch.onnx.export(net.eval(), (torch.randn(1, 3, 32, 32),), path, dynamo=False,
                      input_names=["images"],
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})  # fmt: skip
    with pytest.raises(ImportFailed, match="no fixed shape beyond the batch"):
        load_teacher(path)
    model = onnx.load(path)
    onnx.helper.set_model_props(model, {"imgsz": "[24, 40]", "task": "detect"})
    onnx.save(model, path)
    assert load_teacher(path).input_shape == (3, 24, 40)
    assert load_teacher(path, input_shape=(3, 16, 16)).input_shape == (3, 16, 16)


class _TwoHeads(nn.Module):
    """BlazeFace's outputs: box regressors and scores, two tensors, neither a probability."""

    def __init__(self):
        super().__init__()
        self.body, self.boxes = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1)
        self.scores = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        features = torch.relu(self.body(x))
        return self.boxes(features).flatten(2), self.scores(features).flatten(2)


def test_a_second_head_that_the_student_will_lack_is_named(tmp_path, capsys):
    """BlazeFace's scores output was dropped without a word; the student had its boxes only."""
    path = tmp_path / "two_heads.onnx"
    torch.onnx.export(_TwoHeads().eval(), (torch.randn(2, 3, 12, 12),), path, dynamo=False,
                      input_names=["x"], output_names=["regressors", "classificators"],
                      dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    teacher = load_teacher(path)
    assert teacher.details["output"] == "regressors"
    assert teacher.details["outputs_not_distilled"] == ["classificators"]
    assert run_cli("inspect", path) == 0
    assert "outputs_not_distilled': ['classificators']" in capsys.readouterr().out


class _Upsampling(nn.Module):
    """A YOLO neck's step: a coarse map upsampled (Resize by constant scales) and concatenated."""

    def __init__(self):
        super().__init__()
        self.fine, self.coarse = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1)
        self.up, self.head = nn.Upsample(scale_factor=2.0), nn.Conv2d(16, 5, 1)

    def forward(self, x):
        fine = torch.relu(self.fine(x))
        return self.head(torch.cat([fine, self.up(torch.relu(self.coarse(fine)))], 1))


def test_constant_resize_scales_are_static_and_the_student_exports_quietly(tmp_path, capfd):
    """onnx2torch read a Resize's scales with tolist() on every call: torch.export printed its
    partial graph to stderr while writing the detection benchmark's student."""
    from compress_toolbox import make_student
    from compress_toolbox.export.writer import export_onnx
    from compress_toolbox.load.graph.constant_args import StaticResize

    path = tmp_path / "neck.onnx"
    torch.onnx.export(_Upsampling().eval(), (torch.randn(2, 3, 16, 16),), path, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    teacher = load_teacher(path)
    assert sum(isinstance(m, StaticResize) for m in teacher.module.modules()) == 1
    student = make_student(teacher.module, example_input=torch.randn(2, 3, 16, 16))
    capfd.readouterr()
    export_onnx(student, (3, 16, 16), tmp_path / "student.onnx")
    assert "Sym(" not in capfd.readouterr().err

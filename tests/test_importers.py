"""Tests for load_teacher: every importer on several architectures, bad files, and analysis."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from models import (
    LENET_INPUT,
    MLP_INPUT,
    TORCHVISION_INPUT,
    SmallMLP,
    TinyDense,
    build,
    example,
    export_legacy,
    exported,
    save_state_dict,
    shared_model,
)
from onnx import TensorProto, helper
from torch import nn

import model_zoo
from compress_toolbox import DaflError, ImportFailed, VerificationFailed, load_teacher
from compress_toolbox.load.analysis import analyse, count_params
from compress_toolbox.load.teacher import Teacher

SMALL = ("lenet5", "mlp")
TORCHVISION = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121")
FORMATS = (
    "dynamo",
    "dynamo_external",
    "legacy11",
    "legacy13",
    "legacy17",
    "torchscript",
    "pt2",
    "state_dict",
)
DEFAULT_TORCHVISION_FORMATS = ("dynamo", "legacy17")
DETECTED = {
    "dynamo": "onnx",
    "dynamo_external": "onnx",
    "legacy11": "onnx",
    "legacy13": "onnx",
    "legacy17": "onnx",
    "torchscript": "torchscript",
    "pt2": "torch.export",
    "state_dict": "pytorch-checkpoint",
}
MLP_SOURCE = """
from torch import nn


class FileMLP(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x):
        return self.net(x)
"""


class Exports:
    """Each model built once and each of its files written once (shared with test_student)."""

    @staticmethod
    def model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
        return shared_model(name)

    @staticmethod
    def file(name: str, fmt: str) -> Path:
        torch.set_num_threads(1)
        return exported(name, fmt)


@pytest.fixture(scope="module")
def exports() -> Exports:
    return Exports()


def _state_dict_options(name: str, tmp_path: Path) -> dict:
    if name == "lenet5":
        return {"model_class": "lenet5", "model_kwargs": {"num_classes": 10, "in_channels": 1}}
    if name == "mlp":
        source = tmp_path / "user_mlp.py"
        source.write_text(MLP_SOURCE)
        return {"model_class": f"{source}:FileMLP", "input_shape": MLP_INPUT}
    # "resnet18" names the model_zoo's CIFAR ResNet (the zoo is searched first), so torchvision's
    # is spelled as a module path; see test_torchvision_name_shadowed_by_zoo.
    spec = f"torchvision.models:{name}" if name in model_zoo.list_models() else name
    return {
        "model_class": spec,
        "model_kwargs": {"num_classes": 10},
        "input_shape": TORCHVISION_INPUT,
    }


# Library bug: make_shape_agnostic (compress_toolbox/shape_agnostic.py, _record_shapes) runs the
# freshly converted GraphModule in training mode, so every BatchNorm that the exporter could not
# fold into a conv has its running statistics overwritten by one random batch; verification then
# fails. DenseNet's pre-activation BatchNorms after each concatenation hit it.
SLOW_EXTRA = {("densenet121", "dynamo"),  # a minute to export; test_batchnorm_* covers the bug
              ("mobilenet_v3_small", "dynamo"), ("shufflenet_v2_x0_5", "dynamo")}  # suite time


def _matrix():
    for name in SMALL + TORCHVISION:
        for fmt in FORMATS:
            slow = name in TORCHVISION and fmt not in DEFAULT_TORCHVISION_FORMATS
            marks = [pytest.mark.slow] if slow or (name, fmt) in SLOW_EXTRA else []
            yield pytest.param(name, fmt, id=f"{name}-{fmt}", marks=marks)


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(layer, kind) for layer in module.modules())


@pytest.mark.parametrize("name, fmt", list(_matrix()))
def test_import_matrix(exports, tmp_path, name, fmt):
    model, shape = exports.model(name)
    path = exports.file(name, fmt)
    if fmt == "dynamo_external":
        data = Path(f"{path}.data")
        assert data.is_file() and data.stat().st_size > 0, list(path.parent.iterdir())
    options = _state_dict_options(name, tmp_path) if fmt == "state_dict" else {}

    teacher = load_teacher(path, **options)

    assert teacher.format == DETECTED[fmt]
    assert teacher.input_shape == shape
    assert teacher.num_outputs == 10
    assert teacher.max_rel_diff <= 1e-4
    assert teacher.source == path
    assert not teacher.module.training
    if fmt != "state_dict":  # rebuilt as ordinary, editable layers
        assert _count(teacher.module, nn.Conv2d) == _count(model, nn.Conv2d)
        assert _count(teacher.module, nn.Linear) >= 1
    x = example(shape, batch=7, seed=7)
    with torch.no_grad():
        got, expected = teacher.module(x), model(x)
    assert got.shape == (7, 10)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize(
    "fmt, name",
    [("dynamo", "model.bin"), ("legacy17", "weights.pt"), ("torchscript", "model.onnx"),
     ("pt2", "model.onnx"), ("state_dict", "model.onnx"), ("dynamo", "model")],
)  # fmt: skip
def test_format_detected_from_content_not_suffix(exports, tmp_path, fmt, name):
    path = tmp_path / name
    shutil.copy(exports.file("lenet5", fmt), path)
    options = _state_dict_options("lenet5", tmp_path) if fmt == "state_dict" else {}
    teacher = load_teacher(path, **options)
    assert teacher.format == DETECTED[fmt]
    assert teacher.input_shape == LENET_INPUT
    assert teacher.num_outputs == 10


# --- PyTorch checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "net"])
@pytest.mark.parametrize("prefix", [False, True], ids=["plain", "module-prefix"])
def test_state_dict_wrappers(tmp_path, wrap, prefix):
    model, shape = build("mlp")
    path = save_state_dict(model, tmp_path / "ckpt.pt", wrap=wrap, dataparallel_prefix=prefix)
    source = tmp_path / "user_mlp.py"
    source.write_text(MLP_SOURCE)
    teacher = load_teacher(path, model_class=f"{source}:FileMLP", input_shape=shape)
    assert teacher.format == "pytorch-checkpoint"
    assert teacher.num_outputs == 10
    x = example(shape, batch=7)
    with torch.no_grad():
        torch.testing.assert_close(teacher.module(x), model(x))


def test_state_dict_with_package_module_class(tmp_path, monkeypatch):
    package = tmp_path / "user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(MLP_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, shape = build("mlp")
    path = save_state_dict(model, tmp_path / "weights.pth")
    teacher = load_teacher(
        path, model_class="user_pkg.nets:FileMLP", model_kwargs='{"num_classes": 10}',
        input_shape="1,8,8",
    )  # fmt: skip
    assert teacher.input_shape == MLP_INPUT
    assert teacher.details["model_class"] == "user_pkg.nets:FileMLP"
    with torch.no_grad():
        x = example(shape, batch=3)
        torch.testing.assert_close(teacher.module(x), model(x))


def test_state_dict_with_tests_models_class(tmp_path):
    """``tests.models:SmallMLP`` resolves when the repository root is importable."""
    pytest.importorskip("tests.models")
    model, shape = build("mlp")
    path = save_state_dict(model, tmp_path / "weights.pth")
    teacher = load_teacher(path, model_class="tests.models:SmallMLP", input_shape=shape)
    assert teacher.num_outputs == 10


def test_bare_torchvision_name_wins_over_zoo(exports):
    teacher = load_teacher(
        exports.file("resnet18", "state_dict"),
        model_class="resnet18",
        model_kwargs={"num_classes": 10},
        input_shape=TORCHVISION_INPUT,
    )
    assert teacher.num_outputs == 10


def test_zoo_prefix_picks_the_zoo_model(tmp_path):
    from model_zoo import get_model

    model = get_model("resnet18", num_classes=10, in_channels=3)
    path = tmp_path / "cifar_resnet18.pth"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(path, model_class="zoo:resnet18", model_kwargs={"num_classes": 10})
    assert teacher.input_shape == (3, 32, 32) and teacher.num_outputs == 10


def test_state_dict_without_model_class(tmp_path):
    model, _ = build("mlp")
    path = save_state_dict(model, tmp_path / "weights.pth")
    with pytest.raises(ImportFailed, match="--model-class") as info:
        load_teacher(path)
    assert str(path) in str(info.value)


def test_state_dict_of_another_class(tmp_path):
    model, _ = build("lenet5")
    path = save_state_dict(model, tmp_path / "lenet.pth")
    source = tmp_path / "user_mlp.py"
    source.write_text(MLP_SOURCE)
    with pytest.raises(ImportFailed) as info:
        load_teacher(path, model_class=f"{source}:FileMLP", input_shape=MLP_INPUT)
    message = str(info.value)
    assert str(path) in message
    assert "missing" in message and "unexpected" in message


def test_state_dict_shape_mismatch(tmp_path):
    model, _ = build("lenet5")
    path = save_state_dict(model, tmp_path / "lenet.pth")
    with pytest.raises(ImportFailed, match="shape") as info:
        load_teacher(path, model_class="lenet5", model_kwargs={"num_classes": 7, "in_channels": 1})
    assert str(path) in str(info.value)


def test_whole_pickled_model_needs_trust_pickle(tmp_path):
    model, shape = build("mlp")
    path = tmp_path / "whole.pt"
    torch.save(model, str(path))
    with pytest.raises(ImportFailed, match="--trust-pickle") as info:
        load_teacher(path, input_shape=shape)
    assert str(path) in str(info.value)

    teacher = load_teacher(path, input_shape=shape, trust_pickle=True)
    assert isinstance(teacher.module, SmallMLP)
    assert teacher.format == "pytorch-checkpoint"
    assert teacher.num_outputs == 10


def test_checkpoint_without_input_shape(tmp_path):
    model, _ = build("mlp")
    path = save_state_dict(model, tmp_path / "weights.pth")
    source = tmp_path / "user_mlp.py"
    source.write_text(MLP_SOURCE)
    with pytest.raises(ImportFailed, match="--input-shape") as info:
        load_teacher(path, model_class=f"{source}:FileMLP")
    assert str(path) in str(info.value)


# --- bad files -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.onnx"
    with pytest.raises(ImportFailed, match="no such file") as info:
        load_teacher(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ImportFailed, match="empty") as info:
        load_teacher(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(ImportFailed, match="directory"):
        load_teacher(tmp_path)


def test_truncated_onnx(exports, tmp_path):
    data = exports.file("lenet5", "legacy17").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImportFailed, match="truncated or corrupt") as info:
        load_teacher(path)
    assert str(path) in str(info.value)


def _random_bytes(size: int = 4096) -> bytes:
    data = bytearray(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
    data[:2] = b"\x17\x42"  # neither a torch.save pickle nor a zip (PK)
    return bytes(data)


def test_random_bytes_with_onnx_suffix(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(_random_bytes())
    with pytest.raises(ImportFailed, match="not a valid ONNX model") as info:
        load_teacher(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["noise", "noise.bin"])
def test_random_bytes_without_onnx_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_random_bytes())
    with pytest.raises(ImportFailed, match="not a model file") as info:
        load_teacher(path)
    assert str(path) in str(info.value)


def _onnx_without_its_data(exports, tmp_path) -> Path:
    path = tmp_path / "alone.onnx"
    shutil.copy(exports.file("lenet5", "dynamo_external"), path)
    return path


def test_onnx_missing_external_data(exports, tmp_path):
    path = _onnx_without_its_data(exports, tmp_path)
    with pytest.raises(ImportFailed) as info:
        load_teacher(path)
    assert str(path) in str(info.value)


def test_onnx_missing_external_data_is_named(exports, tmp_path):
    path = _onnx_without_its_data(exports, tmp_path)
    with pytest.raises(ImportFailed) as info:
        load_teacher(path)
    assert "external data" in str(info.value)
    assert "model_ext.onnx.data" in str(info.value)


def _onnx_with_op(path: Path, op_type: str, domain: str = "") -> Path:
    relu = helper.make_node("Relu", ["x"], ["r"], name="relu0")
    odd = helper.make_node(op_type, ["r"], ["y"], name="odd_node", domain=domain)
    graph = helper.make_graph(
        [relu, odd],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )
    opsets = [helper.make_opsetid("", 17)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_onnx_unsupported_standard_op(tmp_path):
    path = _onnx_with_op(tmp_path / "det.onnx", "Det")
    with pytest.raises(ImportFailed) as info:
        load_teacher(path)
    message = str(info.value)
    assert str(path) in message
    assert "unsupported ONNX op Det" in message
    assert "opset 17" in message and "odd_node" in message


def test_onnx_unsupported_custom_domain_op(tmp_path):
    path = _onnx_with_op(tmp_path / "custom.bin", "Mystery", domain="com.example")
    with pytest.raises(ImportFailed) as info:
        load_teacher(path)
    message = str(info.value)
    assert str(path) in message
    assert "Mystery" in message and "com.example" in message and "odd_node" in message


def test_onnx_without_input_shape(tmp_path):
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu0")
    graph = helper.make_graph(
        [relu],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C"])],
    )
    path = tmp_path / "dynamic.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ImportFailed, match="--input-shape") as info:
        load_teacher(path)
    assert str(path) in str(info.value)
    assert load_teacher(path, input_shape="5").input_shape == (5,)


def test_an_input_shape_that_does_not_fit_the_file_is_refused_naming_what_it_takes(tmp_path):
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu0")
    graph = helper.make_graph(
        [relu],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    )
    path = tmp_path / "image.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    for given in ("3,64", "1,64,64"):
        with pytest.raises(ImportFailed) as info:
            load_teacher(path, input_shape=given)
        assert str(info.value) == (f"{path}: --input-shape {given} does not fit input 'x', "
                                   "which takes (3,?,?) after the batch; give C,H,W")  # fmt: skip
    assert load_teacher(path, input_shape="3,16,24").input_shape == (3, 16, 24)


def test_onnx_that_disagrees_with_onnxruntime(tmp_path, monkeypatch):
    model, shape = build("mlp")
    path = export_legacy(model, shape, tmp_path / "mlp.onnx", opset=17)
    import compress_toolbox.load.importers.onnx_file as onnx_file

    real = onnx_file.onnx_to_torch

    def off_by_one(*args):
        module = real(*args)
        return nn.Sequential(module, _AddOne())

    monkeypatch.setattr(onnx_file, "onnx_to_torch", off_by_one)
    with pytest.raises(VerificationFailed, match="differs from the original") as info:
        load_teacher(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, DaflError)


class _AddOne(nn.Module):
    def forward(self, x):
        return x + 1


def test_batchnorm_statistics_survive_onnx_import(exports):
    """conv -> +1 -> BatchNorm -> flatten -> fc: the unfolded BatchNorm must keep its statistics."""
    model, _ = exports.model("bn_after_add")
    teacher = load_teacher(exports.file("bn_after_add", "dynamo"))
    assert teacher.max_rel_diff <= 1e-4
    bn = next(m for m in teacher.module.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, model.bn.running_mean)


def test_batchnorm_statistics_after_shape_agnostic_rewrite():
    """The same bug, one level down: onnx_to_torch must not change the BatchNorm buffers."""
    from compress_toolbox.load.graph.onnx_compat import onnx_to_torch, prepare_onnx_model

    model, shape = shared_model("bn_after_add")
    proto = onnx.load(str(exported("bn_after_add", "dynamo")))
    module = onnx_to_torch(prepare_onnx_model(proto), "bn", shape)
    bn = next(m for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, model.bn.running_mean)
    torch.testing.assert_close(bn.running_var, model.bn.running_var)


def test_scripted_torchscript_needs_input_shape(tmp_path):
    model, shape = build("lenet5")
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    with pytest.raises(ImportFailed, match="--input-shape") as info:
        load_teacher(path)
    assert str(path) in str(info.value)

    teacher = load_teacher(path, input_shape=shape)
    assert teacher.format == "torchscript"
    assert teacher.input_shape == LENET_INPUT
    assert teacher.num_outputs == 10
    assert _count(teacher.module, nn.Conv2d) == 2


def test_bad_input_shape_text(tmp_path):
    model, _ = build("mlp")
    path = save_state_dict(model, tmp_path / "weights.pth")
    with pytest.raises(DaflError, match="input shape"):
        load_teacher(path, model_class="lenet5", input_shape="a,b")


def test_bad_model_kwargs_json(tmp_path):
    model, _ = build("mlp")
    path = save_state_dict(model, tmp_path / "weights.pth")
    with pytest.raises(ImportFailed, match="--model-kwargs"):
        load_teacher(path, model_class="lenet5", model_kwargs="{not json")


# --- analysis --------------------------------------------------------------------------------


def test_analysis_of_lenet():
    model, shape = build("lenet5")
    analysis = analyse(model, shape)
    assert analysis.params == sum(p.numel() for p in model.parameters()) == count_params(model)
    # conv1 6*28*28*25 + conv2 16*10*10*150 + fc 400*120 + 120*84 + 84*10
    assert analysis.macs == 117600 + 240000 + 48000 + 10080 + 840
    assert analysis.task == "classification"
    assert analysis.output_shape == (10,)
    assert analysis.num_outputs == 10
    assert analysis.widths == [6, 16, 120, 84, 10]
    assert [layer.type for layer in analysis.layers] == ["Conv2d"] * 2 + ["Linear"] * 3
    assert analysis.final_layer == "classifier.5"


def test_analysis_of_imported_lenet(exports):
    model, _ = exports.model("lenet5")
    teacher = load_teacher(exports.file("lenet5", "legacy17"))
    assert teacher.analysis.widths == [6, 16, 120, 84, 10]
    assert teacher.analysis.params == sum(p.numel() for p in teacher.module.parameters())
    assert teacher.analysis.params == count_params(model)
    assert teacher.analysis.macs == analyse(model, LENET_INPUT).macs
    assert teacher.analysis.task == "classification"


def test_analysis_of_dense_output():
    model = TinyDense(num_classes=4).eval()
    teacher = Teacher.from_module(model, (3, 16, 16))
    assert teacher.analysis.task == "segmentation"
    assert teacher.analysis.output_shape == (4, 16, 16)
    assert teacher.num_outputs == 4
    assert teacher.analysis.macs == 8 * 16 * 16 * 27 + 4 * 16 * 16 * 8
    assert teacher.analysis.params == sum(p.numel() for p in model.parameters())


def test_analysis_of_resnet(exports):
    model, shape = exports.model("resnet18")
    analysis = analyse(model, shape)
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert analysis.macs > 0
    assert analysis.task == "classification"
    assert analysis.widths[0] == 64 and analysis.widths[-1] == 10
    assert analysis.final_layer == "fc"


class _Attention(nn.Module):
    """Multi-head attention: its reshape folds the batch into the heads (N * heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0].mean(1))


def test_legacy_export_reshape_with_batch_folded_in_stays_correct():
    """Reshapes the legacy exporter computes from runtime sizes are made shape-agnostic only
    where that reproduces them at another batch size; attention's (L, N*heads, d) is not."""
    from compress_toolbox.load.importers.torch_to_onnx import module_via_onnx

    torch.manual_seed(0)
    model = _Attention().eval()
    module = module_via_onnx(model, (4, 16), "attention", dynamo=False)
    for batch in (1, 3, 5):
        x = torch.randn(batch, 4, 16)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), rtol=1e-4, atol=1e-5)


def test_onnx_exported_without_folding_keeps_batchnorm_for_the_bn_prior(tmp_path):
    """The README's advice: ONNX exported with do_constant_folding=False keeps BatchNorm
    statistics, so --method auto can use them."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10)).eval()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), str(tmp_path / "bn.onnx"),
                      dynamo=False, do_constant_folding=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})  # fmt: skip
    teacher = load_teacher(tmp_path / "bn.onnx")
    norms = [m for m in teacher.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1
    assert torch.allclose(norms[0].running_mean, model[1].running_mean)


def test_a_file_named_by_two_options_runs_once(tmp_path):
    """--model-class and --decode naming one file share one run of it (one set of globals);
    the file edited since runs again, and two files of one name stay apart."""
    from compress_toolbox.load.user_code import load_object

    file = tmp_path / "user.py"
    code = "import pathlib\npathlib.Path(__file__ + '.runs').open('a').write('x')\nVALUE = {}\n"
    file.write_text(code)
    model = load_object(f"{file}:VALUE", "--model-class")
    decode = load_object(f"{file}:VALUE", "--decode")
    assert model is decode and (tmp_path / "user.py.runs").read_text() == "x"
    file.write_text(code + "OTHER = 1\n")
    assert load_object(f"{file}:OTHER", "--decode") == 1
    assert (tmp_path / "user.py.runs").read_text() == "xx"
    other = tmp_path / "elsewhere" / "user.py"
    other.parent.mkdir()
    other.write_text("VALUE = 'other'\n")
    assert load_object(f"{other}:VALUE", "--decode") == "other"
    assert load_object(f"{file}:VALUE", "--decode") == {}


def test_a_model_file_imports_its_own_modules_from_beside_it(tmp_path, monkeypatch):
    """As ``python FILE`` runs it: the file's folder importable while it runs, and afterwards
    (last on the path) for imports its code makes later."""
    import sys

    from compress_toolbox.load.user_code import load_object

    monkeypatch.setattr(sys, "path", list(sys.path))  # the folder stays on this copy only
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_layers_beside.py").write_text("WIDTH = 7\n")
    (folder / "my_late_beside.py").write_text("DEPTH = 3\n")
    (folder / "model.py").write_text("from my_layers_beside import WIDTH\nVALUE = WIDTH\n"
                                     "def later():\n    import my_late_beside\n"
                                     "    return my_late_beside.DEPTH\n")  # fmt: skip
    assert load_object(f"{folder / 'model.py'}:VALUE", "--model-class") == 7
    assert load_object(f"{folder / 'model.py'}:later", "--decode")() == 3
    assert sys.path[-1] == str(folder) and sys.path.count(str(folder)) == 1

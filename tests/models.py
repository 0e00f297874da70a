"""Small model builders and exporters shared by the importer and student tests."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
import torchvision
from torch import nn

from model_zoo import get_model

TORCHVISION_INPUT = (3, 32, 32)
LENET_INPUT = (1, 32, 32)
MLP_INPUT = (1, 8, 8)


class SmallMLP(nn.Module):
    """1x8x8 -> Flatten -> 32 -> ReLU -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x):
        return self.net(x)


class ViewLeNet(nn.Module):
    """LeNet-5 with a hard-coded ``x.view(-1, 16 * 5 * 5)`` (breaks once channels shrink)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyDense(nn.Module):
    """A small conv net with a (N, K, H, W) output, like a segmentation head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1)
        )

    def forward(self, x):
        return self.body(x)


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights; non-trivial BatchNorm statistics so eval mode is exercised."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150,
        lr: float = 1e-2) -> nn.Module:  # fmt: skip
    """Full-batch Adam on (x, y) from seed 0 (tiny digits teachers train in seconds); eval mode."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def lenet5() -> nn.Module:
    return _init(get_model("lenet5", num_classes=10, in_channels=1))


def small_mlp() -> nn.Module:
    return _init(SmallMLP())


def torchvision_model(name: str, num_classes: int = 10) -> nn.Module:
    return _init(torchvision.models.get_model(name, weights=None, num_classes=num_classes))


BUILDERS = {
    "lenet5": (lenet5, LENET_INPUT),
    "mlp": (small_mlp, MLP_INPUT),
    "resnet18": (lambda: torchvision_model("resnet18"), TORCHVISION_INPUT),
    "mobilenet_v3_small": (lambda: torchvision_model("mobilenet_v3_small"), TORCHVISION_INPUT),
    "shufflenet_v2_x0_5": (lambda: torchvision_model("shufflenet_v2_x0_5"), TORCHVISION_INPUT),
    "densenet121": (lambda: torchvision_model("densenet121"), TORCHVISION_INPUT),
    "efficientnet_b0": (lambda: torchvision_model("efficientnet_b0"), TORCHVISION_INPUT),
    "regnet_x_400mf": (lambda: torchvision_model("regnet_x_400mf"), TORCHVISION_INPUT),
}


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    builder, shape = BUILDERS[name]
    return builder(), shape


def example(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def export_dynamo(
    model: nn.Module, shape: tuple[int, ...], path: Path, external_data: bool = False
) -> Path:
    """torch.onnx.export(dynamo=True) with a dynamic batch (example batch 2: 1 specialises)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (example(shape),),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        program.save(str(path), external_data=external_data)
    return Path(path)


def export_legacy(model: nn.Module, shape: tuple[int, ...], path: Path, opset: int) -> Path:
    """The TorchScript-based exporter at ``opset`` with a dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example(shape),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return Path(path)


def save_torchscript(model: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), example(shape))
    torch.jit.save(traced, str(path))
    return Path(path)


def save_pt2(model: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model.eval(), (example(shape),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return Path(path)


def save_state_dict(
    model: nn.Module, path: Path, wrap: str | None = None, dataparallel_prefix: bool = False
) -> Path:
    """torch.save of the state_dict, optionally as {wrap: state_dict} and/or 'module.'-prefixed."""
    state = model.state_dict()
    if dataparallel_prefix:
        state = {f"module.{key}": value for key, value in state.items()}
    torch.save({wrap: state, "epoch": 3} if wrap else state, str(path))
    return Path(path)


class BatchNormAfterAdd(nn.Module):
    """conv -> +1 -> BatchNorm -> flatten -> linear: the BatchNorm cannot be folded on export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x) + 1)), 1))


def batchnorm_after_add() -> nn.Module:
    model = _init(BatchNormAfterAdd())
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


BUILDERS["bn_after_add"] = (batchnorm_after_add, (3, 8, 8))


# --- one export per (model, format) per test process, shared by the test files ---------------

FILE_NAMES = {
    "dynamo": "model.onnx",
    "dynamo_external": "model_ext.onnx",
    "legacy11": "model11.onnx",
    "legacy13": "model13.onnx",
    "legacy17": "model17.onnx",
    "torchscript": "model.ts",
    "pt2": "model.pt2",
    "state_dict": "weights.pth",
}


@cache
def _export_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dafl-test-exports-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@cache
def shared_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """One instance per process: callers must not modify it."""
    return build(name)


@cache
def exported(name: str, fmt: str) -> Path:
    """``shared_model(name)`` written once as ``fmt`` (a key of FILE_NAMES)."""
    model, shape = shared_model(name)
    folder = _export_root() / name / fmt
    folder.mkdir(parents=True)
    path = folder / FILE_NAMES[fmt]
    if fmt == "dynamo":
        export_dynamo(model, shape, path)
    elif fmt == "dynamo_external":
        export_dynamo(model, shape, path, external_data=True)
    elif fmt.startswith("legacy"):
        export_legacy(model, shape, path, opset=int(fmt.removeprefix("legacy")))
    elif fmt == "torchscript":
        save_torchscript(model, shape, path)
    elif fmt == "pt2":
        save_pt2(model, shape, path)
    elif fmt == "state_dict":
        save_state_dict(model, path)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return path

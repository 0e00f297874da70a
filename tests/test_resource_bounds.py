"""Hostile files that ask for unbounded memory or time, or that are malformed, are refused with
one line (exit 2) before they are expanded or run: ONNX graphs with a cycle, a declared 64 GiB
weight, a ConstantOfShape of a terabyte; evaluation files that expand far beyond their size;
an image of 30000x30000 pixels. Half-precision teachers are distilled in float32."""

from __future__ import annotations

import gzip
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh
from torch import nn

from compress_toolbox import load_teacher
from compress_toolbox.errors import ImportFailed
from compress_toolbox.load import teacher
from compress_toolbox.tasks.evaldata import EvalDataError, load_eval_data

REPO = Path(__file__).resolve().parent.parent


def _model(nodes, initializers=()) -> onnx.ModelProto:
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers),
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cyclic(path: Path) -> Path:
    nodes = [oh.make_node("Add", ["x", "b"], ["a"]), oh.make_node("Relu", ["a"], ["b"]),
             oh.make_node("Relu", ["a"], ["y"])]  # fmt: skip
    onnx.save(_model(nodes), path)
    return path


def declared_64_gib(path: Path) -> Path:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 2**32],
                         raw_data=b"\0" * 16)
    onnx.save(_model([oh.make_node("MatMul", ["x", "w"], ["y"])], [weight]), path)
    return path


def constant_of_a_terabyte(path: Path) -> Path:
    shape = oh.make_tensor("s", TensorProto.INT64, [2], [2**28, 2**10])
    one = oh.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [oh.make_node("ConstantOfShape", ["s"], ["c"], value=one),
             oh.make_node("ReduceSum", ["c"], ["r"], keepdims=0),
             oh.make_node("Add", ["x", "r"], ["y"])]  # fmt: skip
    onnx.save(_model(nodes, [shape]), path)
    return path


HOSTILE_ONNX = {
    "cyclic": (cyclic, "no node computes before it (a cycle"),
    "declared": (declared_64_gib, "declares [4, 4294967296] (64.0 GiB) but holds 16 bytes"),
    "terabyte": (constant_of_a_terabyte, "ConstantOfShape node"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ONNX))
def test_hostile_onnx_is_refused_before_it_runs(case, tmp_path):
    make, message = HOSTILE_ONNX[case]
    with pytest.raises(ImportFailed, match=re.escape(message)):
        load_teacher(make(tmp_path / f"{case}.onnx"))


def test_hostile_onnx_gives_one_line_and_exit_2(tmp_path):
    path = declared_64_gib(tmp_path / "big.onnx")
    done = subprocess.run([sys.executable, "-m", "cli", "inspect", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "64.0 GiB" in lines[0], done.stderr


def test_an_import_that_never_ends_is_stopped(tmp_path, monkeypatch):
    path = cyclic(tmp_path / "any.onnx")

    def spin(*args, **kwargs):
        while True:
            pass

    monkeypatch.setattr(teacher, "IMPORT_TIME_LIMIT_S", 1)
    monkeypatch.setattr(teacher, "get_importer", lambda name: spin)
    with pytest.raises(ImportFailed, match="took over 1 s"):
        load_teacher(path)


def test_float16_teacher_computes_in_float32(tmp_path):
    """A float16 network behind float32 casts (what fp16 converters write) loads as a float32
    module: trained in half precision, the first KD loss was NaN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net.half()

        def forward(self, x):
            return self.net(x.half()).float()

    path = tmp_path / "fp16.onnx"
    torch.onnx.export(Half().eval(), (torch.randn(2, 1, 8, 8),), path, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    loaded = load_teacher(path)
    assert loaded.details["weights"] == "float16"
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
    x = (torch.randn(5, 1, 8, 8) * 1e3).requires_grad_()  # would overflow float16's 65504
    out = loaded.module(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def _idx_gz(path: Path, dims: tuple[int, ...], payload: bytes = b"") -> Path:
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as handle:
        handle.write(header + payload)
    return path


def test_idx_declaring_more_samples_than_memory_is_refused_before_expanding(tmp_path):
    """900,000 labels (a 1 KB file) for a 3x224x224 teacher: 540 GB as float32. Refused after
    the labels, before the images' payload is read."""
    folder = tmp_path / "idx"
    folder.mkdir()
    _idx_gz(folder / "t10k-labels-idx1-ubyte.gz", (900_000,), bytes(900_000))
    _idx_gz(folder / "t10k-images-idx3-ubyte.gz", (900_000, 224, 224))  # payload missing
    with pytest.raises(EvalDataError, match="900,000 samples of 3x224x224 take"):
        load_eval_data(folder, (3, 224, 224))


def test_idx_declaring_millions_of_samples_is_refused(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    _idx_gz(folder / "t10k-labels-idx1-ubyte.gz", (256 * 2**20,))
    _idx_gz(folder / "t10k-images-idx3-ubyte.gz", (256 * 2**20, 1, 1))
    with pytest.raises(EvalDataError, match="labels-idx1-ubyte.gz: declares 268,435,456 samples"):
        load_eval_data(folder, (1, 8, 8))


def test_npz_whose_header_declares_a_huge_array_is_refused_before_loading(tmp_path):
    path = tmp_path / "eval.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, shape in (("x", (900_000, 3, 224, 224)), ("y", (900_000,))):
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array_header_1_0(member, header)
                member.write(b"\0" * 64)
    with pytest.raises(EvalDataError, match="eval.npz: 900,000 samples of 3x224x224"):
        load_eval_data(path, (3, 224, 224), num_classes=10)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` grey pixels (its data is never reached)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def test_a_30000_pixel_wide_image_is_refused_naming_the_image(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "eval" / name).mkdir(parents=True)
    Image = pytest.importorskip("PIL.Image")
    Image.new("L", (8, 8)).save(tmp_path / "eval" / "a" / "ok.png")
    bomb = _png_header_only(tmp_path / "eval" / "b" / "huge.png", 30000, 30000)
    with pytest.raises(EvalDataError, match=r"huge.png: .*900000000 pixels"):
        load_eval_data(tmp_path / "eval", (1, 8, 8))
    assert bomb.exists()

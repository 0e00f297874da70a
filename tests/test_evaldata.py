"""Evaluation data loaders: .npz, MNIST idx folders (gz and plain), ImageFolder, errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError
from compress_toolbox.tasks.evaldata import (
    EvalData,
    describe_preprocessing,
    evaluate,
    load_eval_data,
    read_idx,
)

RNG = np.random.default_rng(0)


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def test_npz_uint8_nhw(tmp_path):
    x = RNG.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    data = load_eval_data(tmp_path / "d.npz", (1, 8, 8))
    assert data.x.shape == (5, 1, 8, 8) and data.x.dtype == torch.float32
    assert data.y.dtype == torch.long and data.y.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(data.x[:, 0], torch.tensor(x).float() / 255)


def test_npz_float_nchw_with_per_channel_norm(tmp_path):
    x = RNG.random((4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(4, dtype=np.int64))
    domain = InputDomain.from_options([0.1, 0.2, 0.3], [1, 2, 4], (3, 8, 8))
    data = load_eval_data(tmp_path / "d.npz", (3, 8, 8), domain)
    expected = (torch.tensor(x) - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [1.0, 2.0, 4.0]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(data.x, expected)


def test_float_pixels_in_0_255_are_warned_about(tmp_path):
    from compress_toolbox.errors import DaflWarning

    x = RNG.integers(0, 256, (4, 8, 8)).astype(np.float32)  # 0-255 saved as float: a mistake
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(4, dtype=np.int64))
    with pytest.warns(DaflWarning, match=r"up to 2\d\d\b.*divide by 255"):
        load_eval_data(tmp_path / "d.npz", (1, 8, 8))
    np.savez(tmp_path / "ok.npz", x=x / 255, y=np.zeros(4, dtype=np.int64))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DaflWarning)
        load_eval_data(tmp_path / "ok.npz", (1, 8, 8))


def test_resize_and_gray_to_rgb(tmp_path):
    x = RNG.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(3))
    data = load_eval_data(tmp_path / "d.npz", (3, 8, 8), InputDomain.from_options(0.5, 0.25))
    assert data.x.shape == (3, 3, 8, 8)
    small = F.interpolate(torch.tensor(x).float()[:, None] / 255, size=(8, 8), mode="bilinear",
                          align_corners=False)  # fmt: skip
    torch.testing.assert_close(data.x[:, 2:3], (small - 0.5) / 0.25)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_prefers_test_files(tmp_path, compress):
    test_x = RNG.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    test_y = np.arange(6, dtype=np.uint8)
    train_x = np.zeros((2, 28, 28), np.uint8)
    write = (lambda p, b: p.write_bytes(gzip.compress(b))) if compress else (
        lambda p, b: p.write_bytes(b))  # fmt: skip
    suffix = ".gz" if compress else ""
    write(tmp_path / f"t10k-images-idx3-ubyte{suffix}", idx_bytes(test_x))
    write(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", idx_bytes(test_y))
    write(tmp_path / f"train-images-idx3-ubyte{suffix}", idx_bytes(train_x))
    write(tmp_path / f"train-labels-idx1-ubyte{suffix}", idx_bytes(np.zeros(2, np.uint8)))
    data = load_eval_data(tmp_path, (1, 28, 28))
    assert data.x.shape == (6, 1, 28, 28) and data.y.tolist() == list(range(6))
    torch.testing.assert_close(data.x[:, 0], torch.tensor(test_x).float() / 255)
    assert read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}").tolist() == list(range(6))


def test_image_folder(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cat", "ant"]):  # classes are sorted: ant=0, cat=1
        (tmp_path / name).mkdir()
        for i in range(2):
            value = 50 * (label + 1) + i
            Image.fromarray(np.full((10, 10), value, np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_eval_data(tmp_path, (3, 8, 8))
    assert data.x.shape == (4, 3, 8, 8)
    assert data.y.tolist() == [0, 0, 1, 1]
    assert data.x[0].mean().item() == pytest.approx(100 / 255, abs=1e-3)  # "ant" = 100
    assert data.x[2].mean().item() == pytest.approx(50 / 255, abs=1e-3)


def test_image_folder_mixed_sizes(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a" / "0.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a" / "1.jpg")
    assert load_eval_data(tmp_path, (3, 8, 8)).x.shape == (2, 3, 8, 8)


def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.npz", "no such file"),
        (lambda p: _npz(p, x=np.zeros((2, 8, 8))), "must contain arrays 'x' and 'y'"),
        (lambda p: _npz(p, x=np.zeros((2, 8, 8)), y=np.zeros(3, int)), "2 images but 3 labels"),
        (lambda p: _npz(p, x=np.zeros((0, 8, 8)), y=np.zeros(0, int)), "no samples"),
        (lambda p: _npz(p, x=np.zeros((2, 8)), y=np.zeros(2, int)), "expected"),
        (lambda p: _npz(p, x=np.zeros((2, 8, 8)), y=np.zeros(2)), "integer"),
        (lambda p: _npz(p, x=np.zeros((2, 2, 8, 8)), y=np.zeros(2, int)), "2 channels"),
    ],
)
def test_bad_npz(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DaflError, match=message) as error:
        load_eval_data(path, (1, 8, 8))
    assert str(path) in str(error.value)


def test_bad_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DaflError, match="junk.npz: cannot read"):
        load_eval_data(tmp_path / "junk.npz", (1, 8, 8))
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DaflError, match="unsupported"):
        load_eval_data(tmp_path / "data.csv", (1, 8, 8))
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 4)
    (idx / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DaflError, match="truncated|idx"):
        load_eval_data(idx, (1, 8, 8))
    (idx / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DaflError, match="no labels idx file"):
        load_eval_data(idx, (1, 8, 8))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DaflError, match="no class sub-folders"):
        load_eval_data(empty, (1, 8, 8))
    (empty / "a").mkdir()
    (empty / "a" / "x.png").write_bytes(b"broken")
    with pytest.raises(DaflError, match="x.png: cannot read image"):
        load_eval_data(empty, (1, 8, 8))
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 8, 8)), y=np.zeros(2, int))
    with pytest.raises(DaflError, match="--std has 2 values"):
        InputDomain.from_options(0.0, [1.0, 2.0], (1, 8, 8))


def test_evaluate_and_description():
    x = torch.randn(10, 4)
    y = torch.tensor([0, 1] * 5)
    model = nn.Linear(4, 2)
    expected = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    assert evaluate(model, EvalData(x, y), batch_size=3) == pytest.approx(expected)
    assert model.training  # mode restored
    assert "bilinear" in describe_preprocessing()

"""TensorFlow graphs are programs: one that writes (or reads) files is refused before TensorFlow
loads, traces or runs it, unless the user trusts the file; the converter runs in an empty
working folder of its own.

The frozen graphs are written here byte by byte (a GraphDef is a small protobuf), so the fast
tests need no TensorFlow process to build them; the SavedModel, TF1 and TFLite files come from
tests/tf_models.py (--hostile) in a subprocess, and their tests are ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress_toolbox import ImportFailed, load_teacher

HERE = Path(__file__).parent
REPO = HERE.parent
HAS_TF = all(importlib.util.find_spec(name) for name in ("tensorflow", "tf2onnx"))
needs_tf = pytest.mark.skipif(not HAS_TF, reason='needs the tf extra: pip install -e ".[tf]"')
DT_FLOAT, DT_STRING = 1, 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    """A length-delimited protobuf field."""
    payload = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)


def _node(name: str, op: str, inputs=(), **attrs: bytes) -> bytes:
    """A GraphDef ``node`` field: NodeDef name=1, op=2, input=3, attr=5 (map of AttrValue)."""
    body = _field(1, name) + _field(2, op) + b"".join(_field(3, i) for i in inputs)
    body += b"".join(_field(5, _field(1, key) + _field(2, value)) for key, value in attrs.items())
    return _field(1, body)


def _dtype(dtype: int) -> bytes:
    return _int(6, dtype)  # AttrValue.type


def _string_const(name: str, text: str) -> bytes:
    tensor = _int(1, DT_STRING) + _field(2, b"") + _field(8, text)  # dtype, scalar, string_val
    return _node(name, "Const", dtype=_dtype(DT_STRING), value=_field(8, tensor))


def _graph_writing(marker: str) -> bytes:
    """input [N,4,4,1] -> output = Identity(input), run after a WriteFile of ``marker``."""
    shape = b"".join(_field(2, _int(1, dim)) for dim in (-1, 4, 4, 1))
    return b"".join([
        _node("input", "Placeholder", dtype=_dtype(DT_FLOAT), shape=_field(7, shape)),
        _string_const("path", marker),
        _string_const("contents", "written by the graph"),
        _node("write", "WriteFile", ["path", "contents"]),
        _node("output", "Identity", ["input", "^write"], T=_dtype(DT_FLOAT)),
    ])  # fmt: skip


@needs_tf
def test_cli_refuses_a_frozen_graph_that_writes_a_file(tmp_path):
    marker = tmp_path / "marker"
    model = tmp_path / "m.pb"
    model.write_bytes(_graph_writing(str(marker)))
    done = subprocess.run(
        [sys.executable, "-m", "cli", "inspect", str(model)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, lines
    assert f"{model}: the graph contains op WriteFile (node 'write'), which can touch files; " \
           "pass --trust-model-code" in lines[0]  # fmt: skip
    assert not marker.exists()


@needs_tf
def test_trusted_graph_runs_in_an_empty_working_folder(tmp_path, monkeypatch):
    """With consent the flagged graph converts and runs; the file it writes by a relative path
    lands in the converter's own (deleted) folder, not in the user's working folder."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.pb"
    model.write_bytes(_graph_writing("written-here"))
    teacher = load_teacher(model, trust_pickle=True)
    assert teacher.format == "tensorflow" and teacher.input_shape == (1, 4, 4)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.pb"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{case: path} of tests/tf_models.py's hostile files, and the folder they write into."""
    if not HAS_TF:
        pytest.skip('needs the tf extra: pip install -e ".[tf]"')
    root = tmp_path_factory.mktemp("hostile")
    markers = root / "markers"
    markers.mkdir()
    done = subprocess.run(
        [sys.executable, str(HERE / "tf_models.py"), str(root / "files"), "--hostile",
         str(markers)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(markers.iterdir())  # building them ran nothing
    return json.loads((root / "files" / "manifest.json").read_text()), markers


CASES = {  # case: what the refusal names
    "savedmodel_serving": "the SavedModel's function '__inference___call___",
    "savedmodel_initialiser": "the SavedModel's function '__inference__initializer_",
    "tf1_restore": "the checkpoint's graph contains op WriteFile (node 'write')",
    "tf1_savedmodel_restore": "the SavedModel contains op WriteFile (node 'write')",
    "tflite_flex": "the TFLite model contains op FlexWriteFile (operator 0, running "
                   "TensorFlow's WriteFile)",  # fmt: skip
}


@needs_tf
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_hostile_files_are_refused_before_they_run(hostile, case):
    files, markers = hostile
    with pytest.raises(ImportFailed) as info:
        load_teacher(files[case], input_shape=(1, 4, 4))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{files[case]}: {CASES[case]}"), message
    assert "WriteFile" in message and "--trust-model-code" in message
    assert not list(markers.iterdir())


@needs_tf
@pytest.mark.slow
@pytest.mark.parametrize("case", ["tf1_restore", "tf1_savedmodel_restore"])
def test_trusted_tf1_graph_is_restored_without_running_its_restore_op(hostile, case):
    """Variables come from the checkpoint by name: the file's restore op (a WriteFile here)
    does not run even with consent, and the weights are the saved ones (a 1x1 conv of ones)."""
    files, markers = hostile
    teacher = load_teacher(files[case], input_shape=(1, 4, 4), trust_pickle=True)
    assert not list(markers.iterdir())
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():  # the output stays NHWC: two copies of the input's one channel
        expected = x.permute(0, 2, 3, 1).repeat(1, 1, 1, 2)
        assert torch.allclose(teacher.module(x), expected, atol=1e-6)

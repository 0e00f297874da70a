"""Model files that carry code: TorchScript archives, torch.export (.pt2) archives and the zip
container both share. Each hostile file is built here; each must be refused in one line (exit 2
from the CLI) before any of its code runs, unless the user passes --trust-model-code.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, run_cli
from torch import nn

from compress_toolbox import load_teacher
from compress_toolbox.errors import ImportFailed

SHAPE = (1, 8, 8)
TRUST = "--trust-model-code"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class SetStateWritesFile(nn.Module):
    """Its scripted __setstate__ runs inside torch.jit.load and writes ``marker``."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 3))
        self.marker = marker

    def forward(self, x):
        return x.mean((2, 3)) * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]
        torch.save(torch.zeros(1), self.marker)


class ForwardWritesFile(nn.Module):
    """Its forward calls torch.save (aten::save), which the import check runs."""

    def __init__(self, marker: str):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.marker = marker

    def forward(self, x):
        torch.save(x, self.marker)
        return self.conv(x).mean((2, 3))


class Evil:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))





def _save_script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _rewrite(source: Path, target: Path, *, first=(), extra=(), drop=(), change=None) -> Path:
    """Copy the zip ``source`` to ``target``: ``first`` members before the original ones,
    ``extra`` after, ``drop`` left out, ``change(name, data)`` applied to the rest."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we want
            for name, data in first:
                zout.writestr(name, data)
            for item in zin.infolist():
                if item.filename not in drop:
                    data = zin.read(item.filename)
                    zout.writestr(copy.copy(item), change(item.filename, data) if change else data)
            for name, data in extra:
                zout.writestr(name, data)
    return target


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    example = torch.zeros(2, *SHAPE)
    program = torch.export.export(
        Tiny().eval(), (example,), dynamic_shapes=({0: torch.export.Dim("b")},)
    )
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Path:
    return _save_script(Tiny().eval(), tmp_path_factory.mktemp("ts") / "scripted.pt")


# -- TorchScript code ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["setstate", "forward"])
def test_torchscript_code_that_writes_files_is_refused(tmp_path, capfd, kind):
    marker = tmp_path / f"marker-{kind}"
    module = (SetStateWritesFile if kind == "setstate" else ForwardWritesFile)(str(marker))
    path = _save_script(module, tmp_path / f"{kind}.pt")
    assert not marker.exists()
    capfd.readouterr()
    with pytest.raises(ImportFailed, match=TRUST) as info:
        load_teacher(path, input_shape=SHAPE)
    assert str(path) in str(info.value)
    assert ("__setstate__" if kind == "setstate" else "aten::save") in str(info.value)
    assert run_cli("inspect", path, "--input-shape", "1,8,8") == 2
    one_error_line(capfd, path.name, TRUST)
    assert not marker.exists()


@pytest.mark.parametrize("flag", [TRUST, "--trust-pickle"])
@pytest.mark.parametrize("kind", ["setstate", "forward"])
def test_trusted_torchscript_code_runs(tmp_path, capfd, kind, flag):
    marker = tmp_path / f"marker-{kind}"
    module = (SetStateWritesFile if kind == "setstate" else ForwardWritesFile)(str(marker))
    path = _save_script(module, tmp_path / f"{kind}.pt")
    assert run_cli("inspect", path, "--input-shape", "1,8,8", flag) == 0
    assert marker.exists()  # the user consented: its code ran


FORWARD = "    x: Tensor) -> Tensor:\n"  # the end of Tiny.forward's signature, as torch prints it


def _with_lines(code: bytes, lines: str) -> bytes:
    """Tiny's printed code with ``lines`` at the start of its forward's body."""
    text = code.decode()
    assert "class Tiny(Module)" in text and FORWARD in text
    return text.replace(FORWARD, f"{FORWARD}    {lines}\n", 1).encode()


def _inject(scripted: Path, target: Path, lines: str) -> Path:
    def change(name: str, data: bytes) -> bytes:
        return _with_lines(data, lines) if b"class Tiny(Module)" in data else data

    return _rewrite(scripted, target, change=change)


DISGUISED = {  # MARK: the marker file's path
    "spaced": 'torch . save (x, "MARK")',
    "continued": 'torch.\\\n    save(x, "MARK")',
    "autograd": 'torch.autograd.save(x, "MARK")',
    "ops_aten": 'ops.aten.save(x, "MARK")',
    "ops_autograd": 'ops.foo.autograd.save(x, "MARK")',
    "alias": 't = torch\n    t.save(x, "MARK")',
    "alias_ops": 'a = ops.aten\n    a.save(x, "MARK")',
    "getattr_module": 'getattr(torch, "save")(x, "MARK")',
    "getattr_split": 'getattr(x, "sa" "ve")',
    "getattr_method": 'getattr(x, "save")',
    "comment_between": 'y = (x.#\n    save)',
    "from_file": 'y = torch.from_file("/etc/passwd")',
    "c10d": "ops.c10d.barrier()",
    "profiler": 'ops.profiler._record_function_enter("x")',
    "rpc": 'ops.prim.rpc_async("w", x)',
    "custom_class": "y = __torch__.torch.classes.quantized.LinearPackedParamsBase",
    "custom_class_string": 'y = annotate("torch.classes.quantized.LinearPackedParamsBase", x)',
}


@pytest.mark.parametrize("name", sorted(DISGUISED))
def test_disguised_side_effects_are_refused(scripted, tmp_path, name):
    marker = tmp_path / "marker"
    path = _inject(scripted, tmp_path / f"{name}.pt", DISGUISED[name].replace("MARK", str(marker)))
    with pytest.raises(ImportFailed, match=TRUST) as info:
        load_teacher(path, input_shape=SHAPE)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_custom_class_in_the_pickled_state_is_refused(scripted, tmp_path):
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("/data.pkl"):  # the module's own class becomes a C++ class
            return data.replace(b"c__torch__.", b"c__torch__.torch.classes.", 1)
        return data

    path = _rewrite(scripted, tmp_path / "custom.pt", change=change)
    with pytest.raises(ImportFailed, match="C\\+\\+ class") as info:
        load_teacher(path, input_shape=SHAPE)
    assert TRUST in str(info.value)


def test_legacy_torchscript_layout_is_refused(scripted, tmp_path):
    path = _rewrite(scripted, tmp_path / "legacy.pt", extra=[("scripted/model.json", b"{}")])
    with pytest.raises(ImportFailed, match="legacy format"):
        load_teacher(path, input_shape=SHAPE)


def test_every_operator_that_names_a_file_or_machine_is_refused():
    """The names refused in any namespace cover every aten/prim operator of the installed torch
    that takes a file name or calls another machine (a new torch adding one fails here)."""
    from compress_toolbox.load.importers.torchscript import OUTSIDE_WORLD

    reaching = set()
    for schema in torch._C._jit_get_all_schemas():
        namespace, _, name = schema.name.partition("::")
        takes_file = any(
            str(arg.type).startswith("str") and arg.name in ("filename", "file", "fname", "path")
            for arg in schema.arguments
        )
        if namespace in ("aten", "prim") and (takes_file or "rpc" in name):
            reaching.add(name)
    assert {"save", "from_file", "rpc_async"} <= reaching <= set(OUTSIDE_WORLD)


def test_ordinary_traced_and_scripted_models_import_quietly(tmp_path, capfd):
    """Ordinary archives pass the check, and torch's C++ warnings stay off stderr."""
    traced_path = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Tiny().eval(), torch.zeros(2, *SHAPE)), str(traced_path))
    scripted_path = _save_script(Tiny().eval(), tmp_path / "scripted.pt")
    capfd.readouterr()
    assert run_cli("inspect", traced_path) == 0
    assert run_cli("inspect", scripted_path, "--input-shape", "1,8,8") == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    assert "torchscript" in captured.out


def test_torchvision_archives_pass_the_code_check(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from compress_toolbox.load.importers.torchscript import code_problem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resnet = torchvision.models.resnet18(weights=None).eval()
        torch.jit.save(torch.jit.trace(resnet, torch.zeros(1, 3, 32, 32)), tmp_path / "r.pt")
        mobile = torchvision.models.mobilenet_v3_small(weights=None).eval()
        torch.jit.save(torch.jit.script(mobile), tmp_path / "m.pt")
    assert code_problem(tmp_path / "r.pt") is None
    assert code_problem(tmp_path / "m.pt") is None


def test_torch_output_is_held_back_and_reissued(capfd):
    from compress_toolbox.load.importers.base import torch_output_as_warning

    capfd.readouterr()
    with pytest.warns(RuntimeWarning, match="native words(.|\\n)*python words"):
        with torch_output_as_warning(Path("model.pt")) as said:
            os.write(2, b"native words\n")
            print("python words", file=sys.stderr)
    assert "native words" in said[0]
    assert capfd.readouterr().err == ""


# -- the zip container -----------------------------------------------------------------------
def _duplicate_pickle(pt2: Path, tmp_path: Path, marker: Path) -> Path:
    """torch reads the first of two same-named members, zipfile the last."""
    evil = ("tiny/data/sample_inputs/model.pt", _pickled(Evil(marker)))
    return _rewrite(pt2, tmp_path / "duplicate.pt2", first=[evil])


def _case_pickle(pt2: Path, tmp_path: Path, marker: Path) -> Path:
    """torch's reader finds data/sample_inputs/model.pt under any case."""
    evil = ("tiny/DATA/SAMPLE_INPUTS/model.pt", _pickled(Evil(marker)))
    drop = ["tiny/data/sample_inputs/model.pt"]
    return _rewrite(pt2, tmp_path / "case.pt2", extra=[evil], drop=drop)


def _legacy_weights(pt2: Path, tmp_path: Path, marker: Path) -> Path:
    """torch.export.load unpickles data/weights/model.pt in full when weights-only fails."""
    evil = ("tiny/data/weights/model.pt", _pickled(Evil(marker)))
    return _rewrite(pt2, tmp_path / "legacy.pt2", extra=[evil])


def _duplicate_code(scripted: Path, tmp_path: Path, marker: Path) -> Path:
    """A TorchScript archive whose first copy of its code (the one torch reads) saves a file."""
    with zipfile.ZipFile(scripted) as archive:
        name = next(n for n in archive.namelist() if b"class Tiny(Module)" in archive.read(n))
        evil = _with_lines(archive.read(name), f'torch.save(x, "{marker}")')
    return _rewrite(scripted, tmp_path / "duplicate.pt", first=[(name, evil)])


HIDDEN = [_duplicate_pickle, _case_pickle, _legacy_weights, _duplicate_code]


@pytest.mark.parametrize("make", HIDDEN)
def test_pickles_hidden_from_the_check_are_refused(pt2, scripted, tmp_path, capfd, make):
    marker = tmp_path / "marker"
    path = make(scripted if make is _duplicate_code else pt2, tmp_path, marker)
    capfd.readouterr()
    with pytest.raises(ImportFailed) as info:
        load_teacher(path, input_shape=SHAPE)
    assert str(path) in str(info.value)
    assert run_cli("inspect", path, "--input-shape", "1,8,8") == 2
    one_error_line(capfd, path.name)
    assert not marker.exists()


def test_compiled_code_in_a_pt2_is_refused(pt2, tmp_path, capfd):
    """AOTInductor's compiled library in a .pt2 is loaded (dlopen) by torch.export.load."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the library")
    marker = tmp_path / "marker"
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) {\n"
        f'  FILE *f = fopen("{marker}", "w"); if (f) fclose(f);\n}}\n'
    )
    library = tmp_path / "evil.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, source], check=True)
    folder = "tiny/data/aotinductor/model"
    extra = [(f"{folder}/x.wrapper.so", library.read_bytes()),
             (f"{folder}/x.wrapper_metadata.json", b'{"AOTI_DEVICE_KEY": "cpu"}')]  # fmt: skip
    path = _rewrite(pt2, tmp_path / "compiled.pt2", extra=extra)
    capfd.readouterr()
    assert run_cli("inspect", path) == 2
    one_error_line(capfd, path.name, "compiled code", TRUST)
    assert not marker.exists()


def _declare_size(path: Path, name: str, size: int) -> None:
    """Rewrite the sizes ``name`` declares (local and central headers) without its data."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            name_at = at + (30 if offset == 22 else 46)
            if data[name_at : name_at + len(encoded)] == encoded:
                data[at + offset : at + offset + 4] = size.to_bytes(4, "little")
            at = data.find(signature, at + 1)
    path.write_bytes(bytes(data))


def _bomb(pt2: Path, tmp_path: Path) -> Path:
    info = zipfile.ZipInfo("tiny/extra/notes.txt")
    info.compress_type = zipfile.ZIP_DEFLATED
    return _rewrite(pt2, tmp_path / "bomb.pt2", extra=[(info, b"\0" * (64 << 20))])


def _declared_bomb(pt2: Path, tmp_path: Path) -> Path:
    path = _rewrite(pt2, tmp_path / "declared.pt2", extra=[("tiny/docs/notes.txt", b"x" * 64)])
    _declare_size(path, "tiny/docs/notes.txt", 0xFFFFFF00)
    return path


def _unsafe(name: str):
    def make(pt2: Path, tmp_path: Path) -> Path:
        path = _rewrite(pt2, tmp_path / "unsafe.pt2", extra=[(name.replace("\0", "!"), b"x")])
        if "\0" in name:  # zipfile cuts names at NUL: write the byte in place afterwards
            data = path.read_bytes()
            path.write_bytes(data.replace(name.replace("\0", "!").encode(), name.encode()))
        return path

    make.__name__ = f"unsafe {name!r}"
    return make


def _bzip2(pt2: Path, tmp_path: Path) -> Path:
    info = zipfile.ZipInfo("tiny/extra/notes.txt")
    info.compress_type = zipfile.ZIP_BZIP2
    return _rewrite(pt2, tmp_path / "bzip2.pt2", extra=[(info, b"notes")])


ARCHIVES = [_bomb, _declared_bomb, _bzip2] + [
    _unsafe(name) for name in ("tiny/../../escape", "/tmp/escape", "tiny\\..\\escape",
                               "tiny/extra/a\0b")  # fmt: skip
]


@pytest.mark.parametrize("make", ARCHIVES, ids=lambda make: make.__name__)
def test_hostile_archives_are_refused_even_when_trusted(pt2, tmp_path, capfd, make):
    path = make(pt2, tmp_path)
    capfd.readouterr()
    with pytest.raises(ImportFailed, match="refused zip archive") as info:
        load_teacher(path, trust_pickle=True)
    assert str(path) in str(info.value)
    assert run_cli("inspect", path, TRUST) == 2
    one_error_line(capfd, path.name, "refused zip archive")


def test_archive_larger_than_memory_is_refused(pt2, monkeypatch):
    from compress_toolbox.load.importers import archive_safety

    monkeypatch.setattr(archive_safety, "available_memory", lambda device: 4096)
    with pytest.raises(ImportFailed, match="more than the 4.0 KiB of memory free"):
        load_teacher(pt2)


def test_failed_pt2_load_is_one_line(pt2, tmp_path, capfd):
    """torch logs a 40-line traceback when a .pt2 does not deserialise: kept off stderr."""

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.nope.default"
            return json.dumps(program).encode()
        return data

    path = _rewrite(pt2, tmp_path / "unknown_op.pt2", change=change)
    capfd.readouterr()
    assert run_cli("inspect", path) == 2
    one_error_line(capfd, path.name, "aten.nope")

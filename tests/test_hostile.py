"""A hostile corpus: files that try to run code, folders that must not be lost, false figures,
bad options and signals. Every case asserts the exit code, one stderr line naming the problem,
no traceback, no marker from a malicious pickle, nothing left behind and nothing lost.

The files are built here from tiny models; runs train for a few iterations only.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ctrl_c_as_at_a_terminal, one_error_line, run_cli
from torch import nn

from compress_toolbox.outdir import OutputFolder, default_out_dir

REPO = Path(__file__).resolve().parent.parent
FAST = ["--iters", "4", "--batch-size", "16", "--no-progress", "--threads", "1"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Evil:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _onnx(model: nn.Module, path: Path, shape=(1, 8, 8), **kwargs) -> Path:
    kwargs.setdefault("dynamic_axes", {"x": {0: "n"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, *shape),), str(path), dynamo=False,
                          input_names=["x"], **kwargs)  # fmt: skip
    return path


def _trained_tiny() -> nn.Module:
    """Tiny trained on sklearn's 8x8 digits for a few seconds (a working classifier: an
    untrained one answers one class everywhere, which the collapse guard rightly refuses)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good and bad files shared by the cases (built once)."""
    root = tmp_path_factory.mktemp("hostile")
    model = _trained_tiny()
    files = {"model": model, "root": root}
    files["onnx"] = _onnx(model, root / "tiny.onnx")
    example = torch.zeros(2, 1, 8, 8)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, root / "tiny.pt2")
    files["pt2"] = root / "tiny.pt2"
    rng = np.random.default_rng(0)
    np.savez(root / "eval.npz", x=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8),
             y=rng.integers(0, 10, 20))  # fmt: skip
    files["eval"] = root / "eval.npz"
    return files


@pytest.fixture
def verdict_aside(monkeypatch):
    """For tests of the output folder: four iterations give a student far from its teacher,
    which the verdict rightly fails (exit 3); what these tests check must not hang on it."""
    from compress_toolbox.report import build

    monkeypatch.setattr(build, "judge_student", lambda *args, **kwargs: [])


def nothing_left(folder: Path, name: str = "out") -> None:
    assert not folder.joinpath(name).exists()
    assert not list(folder.glob(f".{name}.partial-*")) and not list(folder.glob(f".{name}.old-*"))
    assert not folder.joinpath(f".{name}.lock").exists()


# -- code runs without consent -------------------------------------------------------------------
def _rewrite_zip(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            data = replace.get(item.filename.split("/", 1)[1], zin.read(item.filename))
            zout.writestr(item, data)
    return target


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _evil_pt2_weights(corpus, tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "marker-weights"
    with zipfile.ZipFile(corpus["pt2"]) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    path_name = config["config"][first]["path_name"]
    replace = {"data/weights/model_weights_config.json": json.dumps(config).encode(),
               f"data/weights/{path_name}": _pickled(Evil(marker))}  # fmt: skip
    return _rewrite_zip(corpus["pt2"], tmp_path / "evil_weights.pt2", replace), marker


def _evil_pt2_inputs(corpus, tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "marker-inputs"
    replace = {"data/sample_inputs/model.pt": _pickled(Evil(marker))}
    return _rewrite_zip(corpus["pt2"], tmp_path / "evil_inputs.pt2", replace), marker


@pytest.mark.parametrize("make", [_evil_pt2_weights, _evil_pt2_inputs])
@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_malicious_pt2_runs_no_code(corpus, tmp_path, capsys, make, command):
    path, marker = make(corpus, tmp_path)
    extra = [] if command else ["--out", tmp_path / "out", *FAST]
    assert run_cli(*command, path, *extra) == 2
    one_error_line(capsys, path.name, "--trust-pickle")
    assert not marker.exists()
    nothing_left(tmp_path)


def test_clean_pt2_still_loads(corpus, capsys):
    assert run_cli("inspect", corpus["pt2"]) == 0


@pytest.mark.parametrize("legacy, protocol", [(False, 2), (True, 2), (True, 4)])
def test_pickled_model_checkpoint_needs_trust(corpus, tmp_path, capsys, legacy, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save({"model": Evil(marker)}, path, _use_new_zipfile_serialization=not legacy,
               pickle_protocol=protocol)  # fmt: skip
    assert run_cli(path, "--out", tmp_path / "out", *FAST) == 2
    one_error_line(capsys, "model.pt", "--trust-pickle")
    assert not marker.exists()


def test_planted_checkpoint_runs_no_code_and_is_kept(corpus, tmp_path, capsys):
    marker = tmp_path / "marker"
    checkpoint = tmp_path / "out.checkpoint" / "dafl_checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"format": "dafl-compress-checkpoint-v2", "x": Evil(marker)}, checkpoint)
    assert run_cli(corpus["onnx"], "--out", tmp_path / "out", "--resume", *FAST) == 2
    one_error_line(capsys, "dafl_checkpoint.pt", "safely")
    assert not marker.exists() and checkpoint.exists()
    nothing_left(tmp_path)


def test_checkpoint_with_missing_keys_or_from_another_teacher(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    checkpoint = tmp_path / "out.checkpoint" / "dafl_checkpoint.pt"
    checkpoint.parent.mkdir()
    torch.save({"format": "dafl-compress-checkpoint-v2", "method": "dafl"}, checkpoint)
    assert run_cli(corpus["onnx"], "--out", out, "--resume", *FAST) == 2
    one_error_line(capsys, "lacks")
    other_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    other = _onnx(other_model, tmp_path / "other.onnx")
    checkpoint.unlink()
    # interrupt a run of another teacher to leave its checkpoint, then resume with ours
    from compress_toolbox import load_teacher
    from compress_toolbox.distillation import distill
    from compress_toolbox.student.derive import make_student

    teacher = load_teacher(other)
    student = make_student(teacher.module, example_input=torch.zeros(2, 1, 8, 8))
    distill(teacher, student, iters=2, checkpoint_dir=checkpoint.parent, progress=False,
            threads=1, method="dafl", batch_size=16)  # fmt: skip
    assert run_cli(corpus["onnx"], "--out", out, "--resume", "--method", "dafl", *FAST) == 2
    one_error_line(capsys, "for teacher")


# -- output folders ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", [".", "..", "/", "HOME", "CWD_PARENT"])
def test_dangerous_out_folders_are_refused(corpus, tmp_path, capsys, monkeypatch, target):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    out = {"HOME": str(work), "CWD_PARENT": str(tmp_path / "a")}.get(target, target)
    assert run_cli(corpus["onnx"], "--out", out, "--force", *FAST) == 2
    one_error_line(capsys, "refusing")
    assert (work / "precious.txt").read_text() == "mine"


def test_hidden_teacher_name_gets_a_safe_default_folder(corpus, tmp_path, monkeypatch):
    assert default_out_dir(".hidden.onnx") == Path("dafl-out/hidden")
    assert default_out_dir("we ird$name.onnx") == Path("dafl-out/we_ird_name")
    assert default_out_dir("....onnx") == Path("dafl-out/onnx")
    assert default_out_dir("...") == Path("dafl-out/teacher")


def test_out_that_is_a_file_or_holds_the_teacher(corpus, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    assert run_cli(corpus["onnx"], "--out", tmp_path / "file.txt", "--force", *FAST) == 2
    one_error_line(capsys, "is a file")
    inside = tmp_path / "models"
    inside.mkdir()
    teacher = shutil.copy(corpus["onnx"], inside / "t.onnx")
    assert run_cli(teacher, "--out", inside, "--force", *FAST) == 2
    one_error_line(capsys, "holds the input")
    assert Path(teacher).exists() and (tmp_path / "file.txt").read_text() == "mine"


def test_out_whose_parent_cannot_be_created(corpus, tmp_path, capsys):
    (tmp_path / "plainfile").write_text("x")
    assert run_cli(corpus["onnx"], "--out", tmp_path / "plainfile" / "out", *FAST) == 2
    one_error_line(capsys, "cannot write")


def test_second_run_on_the_same_out_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    with OutputFolder(out):  # another run holds the folder
        assert run_cli(corpus["onnx"], "--out", out, *FAST) == 2
        one_error_line(capsys, "another dafl-compress run", str(os.getpid()))
    assert not out.exists()


def test_files_added_during_the_run_are_kept(corpus, tmp_path, capsys):
    out = tmp_path / "out"

    def intruder(iteration):
        if iteration == 2:
            out.mkdir(exist_ok=True)
            (out / "theirs.txt").write_text("keep me")

    from compress_toolbox import CompressConfig, compress

    with pytest.raises(Exception, match="left alone") as error:
        compress(
            corpus["onnx"],
            CompressConfig.from_options(out=out, iters=4, batch_size=16, progress=False, threads=1),
            on_iteration=intruder,
        )
    assert "out-1" in str(error.value)
    assert (out / "theirs.txt").read_text() == "keep me"
    assert (tmp_path / "out-1" / "student.onnx").is_file()


def test_the_report_names_a_changed_preset(corpus, tmp_path, verdict_aside):
    from compress_toolbox import CompressConfig, compress
    from compress_toolbox.distillation.presets import PRESETS

    preset = PRESETS["fast"].with_options(student_steps=3, **{"dafl.oh": 2})
    out = tmp_path / "out"
    compress(corpus["onnx"], CompressConfig.from_options(
        out=out, iters=4, batch_size=16, progress=False, threads=1, method="dafl",
        preset=preset))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "fast"
    assert report["preset_changes"] == {"student_steps": 3, "dafl.oh": 2.0}
    assert "preset fast (changed: student_steps=3, dafl.oh=2.0)," in (out / "report.md").read_text()


def test_force_replaces_and_a_killed_swap_is_undone(corpus, tmp_path, capsys, verdict_aside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert run_cli(corpus["onnx"], "--out", out, "--force", *FAST) == 0
    assert (out / "student.onnx").exists() and not (out / "old.txt").exists()
    assert not list(tmp_path.glob(".out.*"))
    # killed between "old aside" and "new in": the old output is put back, stale work removed
    os.replace(out, tmp_path / ".out.old-99999")
    (tmp_path / ".out.partial-99999").mkdir()
    with OutputFolder(out, force=True):
        assert (out / "student.onnx").exists()
        assert not (tmp_path / ".out.partial-99999").exists()


# -- false figures ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_teacher_is_never_verified(corpus, tmp_path, capsys, value):
    model = Tiny()
    with torch.no_grad():
        model.fc.weight[0, 0] = value
    path = _onnx(model, tmp_path / "bad.onnx")
    assert run_cli("inspect", path) == 2
    one_error_line(capsys, "bad.onnx", "NaN or infinity")


@pytest.mark.parametrize(
    ("x", "y", "needle"),
    [
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 99]), "label 99 is outside"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, -1, 2, 3]), "label -1 is outside"),
        (np.full((4, 8, 8), np.nan, np.float32), np.array([0, 1, 2, 3]), "NaN or infinite"),
    ],
)
def test_impossible_eval_data_is_refused_before_training(corpus, tmp_path, capsys, x, y, needle):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    start = time.perf_counter()
    assert run_cli(corpus["onnx"], "--eval-data", tmp_path / "bad.npz", "--out",
                   tmp_path / "out", "--time-budget", "60", "--no-progress") == 2  # fmt: skip
    assert time.perf_counter() - start < 30  # refused before the 60 s of training
    one_error_line(capsys, "bad.npz", needle)
    nothing_left(tmp_path)


def test_gzip_bomb_idx_is_refused_without_expanding(corpus, tmp_path, capsys):
    folder = tmp_path / "idx"
    folder.mkdir()
    labels = struct.pack(">BBBBI", 0, 0, 8, 1, 20) + bytes(20)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 2_000_000, 28, 28))
        handle.write(bytes(10_000_000))  # would be 1.5 GB if the header were believed
    assert run_cli(corpus["onnx"], "--eval-data", folder, "--out", tmp_path / "out", *FAST) == 2
    one_error_line(capsys, "2000000 images but 20 labels")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_as_eval_data_does_not_hang(corpus, tmp_path, capsys):
    os.mkfifo(tmp_path / "x.npz")
    assert run_cli(corpus["onnx"], "--eval-data", tmp_path / "x.npz", "--out",
                   tmp_path / "out", *FAST) == 2  # fmt: skip
    one_error_line(capsys, "x.npz", "not a regular file")
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    os.mkfifo(folder / "cat" / "a.png")  # an ImageFolder with a FIFO inside
    assert run_cli(corpus["onnx"], "--eval-data", folder, "--out", tmp_path / "out", *FAST) == 2
    one_error_line(capsys, "a.png", "not a regular file")


# -- teachers that used to end in exit 1 ------------------------------------------------------
def test_all_fp16_onnx_is_a_clear_refusal(corpus, tmp_path, capsys):
    model = onnx.load(str(corpus["onnx"]))
    from onnx import numpy_helper

    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                              init.name))  # fmt: skip
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(model, tmp_path / "fp16.onnx")
    assert run_cli("inspect", tmp_path / "fp16.onnx") == 2
    one_error_line(capsys, "fp16.onnx", "float16")


def test_fp16_weights_with_fp32_io_verify_at_fp16_tolerance(corpus, tmp_path, capsys):
    model = Tiny().eval().half()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x.half()).float()

    path = _onnx(Wrapper(), tmp_path / "half.onnx")
    assert run_cli("inspect", path, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["details"]["weights"] == "float16"


def test_two_output_classifier_distils_its_logits(corpus, tmp_path, capsys):
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Tiny()

        def forward(self, x):
            logits = self.inner(x)
            return logits, torch.softmax(logits, 1)

    path = _onnx(Both(), tmp_path / "both.onnx", output_names=["logits", "probs"])
    assert run_cli("inspect", path, "--json") == 0
    assert json.loads(capsys.readouterr().out)["details"]["output"] == "logits"


def test_huge_declared_input_is_refused_before_allocating(corpus, tmp_path, capsys, monkeypatch):
    """Refused on the teacher's activations alone, before a student is derived for it (which
    ran the teacher at 1024x1024 for 20 s before the refusal)."""
    import compress_toolbox.distillation.environment as environment
    import compress_toolbox.pipeline as pipeline

    monkeypatch.setattr(environment, "available_memory", lambda device: 64 * 2**20)
    monkeypatch.setattr(pipeline, "plan_student", None)  # never reached
    any_size = _onnx(Tiny(), tmp_path / "any_size.onnx",
                     dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})  # fmt: skip
    assert run_cli(any_size, "--input-shape", "1,1024,1024", "--out", tmp_path / "out",
                   *FAST) == 2  # fmt: skip
    one_error_line(capsys, "GiB per generated sample")
    nothing_left(tmp_path)


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--time-budget", "nan"], "time budget must be a positive number"),
        (["--time-budget", "-5"], "time budget must be a positive number"),
        (["--iters", "0"], "iters must be a positive number"),
        (["--batch-size", "1"], "at least 2"),
        (["--threads", "0"], "threads must be a positive number"),
        (["--opset", "5"], "--opset 5 is not supported"),
        (["--dry-run", "--preset", "turbo"], "unknown preset"),
        (["--preset", "turbo"], "unknown preset"),
        (["--std", "0"], "--std must not be zero"),
        (["--mean", "0.1,0.2"], "--mean has 2 values"),
        (["--device", "tpu"], "device"),
        (["--method", "magic"], "invalid choice"),
        (["--iters", "abc"], "invalid int value"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--task", "poetry"], "unknown task"),
    ],
)
def test_bad_options_are_one_line_before_any_work(corpus, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    budget_given = any(a in args for a in ("--iters", "--time-budget"))
    base = [a for a in FAST if a not in ("--iters", "4")] if budget_given else FAST
    start = time.perf_counter()
    assert run_cli(corpus["onnx"], "--out", out, *base, *args) == 2
    assert time.perf_counter() - start < 20
    one_error_line(capsys, needle)
    nothing_left(tmp_path)
    assert not (tmp_path / "out.checkpoint").exists()


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "missing.onnx", "no such file"),
        (lambda p: _written(p / "empty.onnx", b""), "empty"),
        (lambda p: _written(p / "t.onnx", b"corrupt" + os.urandom(493)), "not a valid"),
        (lambda p: p, "is a directory"),
    ],
)
def test_bad_teacher_files(corpus, tmp_path, capsys, make, needle):
    folder = tmp_path / "teachers"
    folder.mkdir()
    assert run_cli(make(folder), "--out", tmp_path / "out", *FAST) == 2
    one_error_line(capsys, needle)


def test_truncated_onnx_and_foreign_zip(corpus, tmp_path, capsys):
    data = corpus["onnx"].read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert run_cli("inspect", tmp_path / "cut.onnx") == 2
    one_error_line(capsys, "cut.onnx")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("a.txt", "hello")
    assert run_cli("inspect", tmp_path / "photos.zip") == 2
    one_error_line(capsys, "photos.zip", "not a model file")


def test_model_class_from_the_working_folder(corpus, tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\nimport torch\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 8, 3, padding=1)\n        self.fc = nn.Linear(8, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))\n"
    )
    torch.save(corpus["model"].state_dict(), tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert run_cli("inspect", "w.pth", "--model-class", "mymodel:Net",
                   "--input-shape", "1,8,8") == 0  # fmt: skip


def test_out_holding_the_model_class_file_is_refused_even_with_force(corpus, tmp_path, capsys):
    code = tmp_path / "models"
    code.mkdir()
    (code / "net.py").write_text("from torch import nn\nclass Net(nn.Module):\n    pass\n")
    torch.save(corpus["model"].state_dict(), tmp_path / "w.pth")
    assert run_cli(tmp_path / "w.pth", "--model-class", f"{code / 'net.py'}:Net", "--out", code,
                   "--force", *FAST) == 2  # fmt: skip
    one_error_line(capsys, "holds the input", "net.py")
    assert (code / "net.py").is_file()


def test_successful_run_removes_only_its_own_checkpoint(corpus, tmp_path, verdict_aside):
    mine = tmp_path / "out.checkpoint" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("keep me")
    assert run_cli(corpus["onnx"], "--out", tmp_path / "out", *FAST) == 0
    assert mine.read_text() == "keep me"
    assert list(mine.parent.iterdir()) == [mine]  # the run's checkpoint is gone


def test_make_student_is_part_of_the_public_api():
    import compress_toolbox

    assert callable(compress_toolbox.make_student)


# -- signals ------------------------------------------------------------------------------------
def _command(corpus, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", str(corpus["onnx"]), "--out", str(out),
            "--batch-size", "16", "--no-progress", "--threads", "1", *extra]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def assert_resume_finished(resumed: subprocess.CompletedProcess, tmp_path: Path) -> None:
    """The resumed run trained to its end and wrote the output. Its verdict depends on how many
    iterations the machine's load allowed before the signal: exit 3 (student failed) keeps the
    checkpoint for another --resume, by design; exit 0 removes it."""
    assert resumed.returncode in (0, 3), resumed.stderr
    assert (tmp_path / "out" / "student.onnx").is_file(), resumed.stderr
    if resumed.returncode == 3:
        assert "the student failed" in resumed.stderr
    assert (tmp_path / "out.checkpoint").exists() == (resumed.returncode == 3)


@pytest.mark.parametrize(("sig", "code"), [
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),  # test_cli's sigint test too
    pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])  # fmt: skip
def test_signal_saves_a_checkpoint_then_resume_finishes(corpus, tmp_path, sig, code):
    out = tmp_path / "out"
    command = _command(corpus, out, "--time-budget", "40")
    process = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_as_at_a_terminal)  # fmt: skip
    _wait_for(lambda: (tmp_path / "out.checkpoint" / "dafl_checkpoint.pt").exists())
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    nothing_left(tmp_path)
    resumed = subprocess.run(command + ["--resume", "--time-budget", "5"], env=_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_resume_finished(resumed, tmp_path)


def test_sigkill_then_resume_from_the_early_checkpoint(corpus, tmp_path):
    out = tmp_path / "out"
    command = _command(corpus, out, "--time-budget", "60")
    process = subprocess.Popen(command, env=_env(), stderr=subprocess.DEVNULL)
    _wait_for(lambda: (tmp_path / "out.checkpoint" / "dafl_checkpoint.pt").exists())
    process.kill()
    process.wait(timeout=60)
    assert list(tmp_path.glob(".out.partial-*"))  # what a kill leaves ...
    resumed = subprocess.run(command + ["--resume", "--time-budget", "5"], env=_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_resume_finished(resumed, tmp_path)
    assert not list(tmp_path.glob(".out.*"))  # ... is swept by the next run


@pytest.mark.parametrize("delay", [pytest.param(1.0, marks=pytest.mark.slow), 1.5,
                                   pytest.param(2.0, marks=pytest.mark.slow)])  # fmt: skip
def test_ctrl_c_during_start_up_is_one_line(corpus, tmp_path, delay):
    """Exit 130 wherever the signal lands in the imports (one landing inside a C extension's
    import used to end as a death by SIGINT, status -2, after our message)."""
    process = subprocess.Popen(_command(corpus, tmp_path / "out", "--iters", "5"), env=_env(),
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_as_at_a_terminal)  # fmt: skip
    time.sleep(delay)  # still importing torch and friends
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


# -- failures are never reported as success ---------------------------------------------------
class SaturatedNet(nn.Module):
    """Answers class 3 whatever the input: a broken teacher that makes generation collapse."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        hidden = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        return hidden * 0.0 + torch.eye(10)[3] * 20.0


def test_collapse_ends_with_exit_3_and_no_output(tmp_path, capsys):
    path = _onnx(SaturatedNet(), tmp_path / "saturated.onnx")
    code = run_cli(path, "--out", tmp_path / "out", "--method", "dafl", "--iters", "400",
                   "--batch-size", "16", "--no-progress", "--threads", "1")  # fmt: skip
    assert code == 3
    err = capsys.readouterr().err
    assert "collapsed onto 1 of the teacher's 10 classes" in err and "Traceback" not in err
    assert "restarting the generator" in err  # recovery was tried first
    nothing_left(tmp_path)


def test_student_far_below_its_teacher_is_a_failure_not_a_success(corpus, tmp_path, capsys):
    """One iteration cannot make a usable student: exit 3, folder kept, report says FAILED."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (200, 8, 8), dtype=np.uint8)
    with torch.no_grad():
        y = corpus["model"](torch.tensor(x / 255.0, dtype=torch.float32)[:, None]).argmax(1)
    np.savez(tmp_path / "agree.npz", x=x, y=y.numpy())  # the teacher is 100% right on these
    out = tmp_path / "out"
    command = [corpus["onnx"], "--eval-data", tmp_path / "agree.npz", "--out", out, "--init",
               "fresh", "--batch-size", "16", "--no-progress", "--threads", "1"]  # fmt: skip
    assert run_cli(*command, "--iters", "1") == 3
    err = capsys.readouterr().err
    assert "less than half of the teacher's" in err and "kept for inspection" in err
    assert "--init teacher" in err  # a fresh derived student: the teacher's weights would fit
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "FAILED" in (out / "report.md").read_text()
    assert (tmp_path / "out.checkpoint" / "dafl_checkpoint.pt").is_file()  # --resume can go on
    # README: the same command with --resume goes on and replaces the failed run's folder
    def losses(history: str) -> list[str]:  # iteration 1's time and losses, not its health
        return history.splitlines()[1].split(",")[:7]

    first = losses((out / "history.csv").read_text())
    assert run_cli(*command, "--iters", "3", "--resume") in (0, 3)  # without it: exit 2
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["iterations"] == 3 and resumed["seed"] == report["seed"]
    history = (out / "history.csv").read_text()
    assert losses(history) == first and len(history.splitlines()) == 4  # 2 and 3 added
    assert not list(tmp_path.glob("out-*"))  # replaced, not moved aside

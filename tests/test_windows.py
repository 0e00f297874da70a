"""What a run on Windows relies on, checked here by standing in for Windows where the code asks
which platform it is on: text files in UTF-8 whatever the code page, free memory from
GlobalMemoryStatusEx, its allocator's words for out of memory, Ctrl-Break as Ctrl-C, cmd.exe's
quoting, a console that cannot spell every file name, an output folder held open for a moment,
and more ranks than GPUs refused."""

from __future__ import annotations

import ast
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cli.main import command_line
from compress_toolbox import limits, outdir
from compress_toolbox.distillation import distributed, local_launch
from compress_toolbox.errors import DaflError

REPO = Path(__file__).resolve().parents[1]
PRODUCT = [path for package in ("compress_toolbox", "cli")
           for path in sorted((REPO / package).rglob("*.py"))]  # fmt: skip


OPENERS = ("open", "io.open", "codecs.open")  # text mode unless the mode says "b"
TEMPORARY = ("NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile")  # binary by default


def _text_io_without_encoding(tree: ast.AST) -> list[int]:
    """Lines of calls that read or write text without naming an encoding (Windows would use
    its code page): ``read_text``/``write_text``, ``open`` in text mode, temporary files opened
    in text mode, and subprocesses whose output is decoded as text."""
    lines = []
    for node in ast.walk(tree):
        keywords = {k.arg: k.value for k in node.keywords} if isinstance(node, ast.Call) else {}
        if not isinstance(node, ast.Call) or "encoding" in keywords:
            continue
        name = ast.unparse(node.func)
        mode = keywords.get("mode")
        if name in OPENERS and mode is None and len(node.args) > 1:
            mode = node.args[1]
        text_mode = not (isinstance(mode, ast.Constant) and "b" in str(mode.value))
        if (name.endswith((".read_text", ".write_text"))
                or (name in OPENERS and text_mode)
                or (name.endswith(TEMPORARY) and mode is not None and text_mode)
                or any(isinstance(keywords.get(k), ast.Constant) and keywords[k].value is True
                       for k in ("text", "universal_newlines"))):  # fmt: skip
            lines.append(node.lineno)
    return lines


def test_every_text_file_the_product_opens_names_its_encoding():
    found = {
        f"{path.relative_to(REPO)}:{line}"
        for path in PRODUCT
        for line in _text_io_without_encoding(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert not found, f"text I/O in the locale's encoding: {sorted(found)}"


def test_the_encoding_check_finds_what_it_looks_for():
    source = ("p.write_text(s)\nopen(f)\nopen(f, 'rb')\nopen(f, 'w', encoding='utf-8')\n"
              "q.read_text(encoding='utf-8')\nio.open(f, mode='w')\n"
              "tempfile.TemporaryFile()\ntempfile.NamedTemporaryFile(mode='w')\n"
              "subprocess.run(c, text=True)\n"
              "subprocess.run(c, capture_output=True, encoding='utf-8', errors='replace')\n"
              "Image.open(f)\n")  # fmt: skip
    assert _text_io_without_encoding(ast.parse(source)) == [1, 2, 6, 8, 9]


def test_free_memory_on_windows_comes_from_global_memory_status(monkeypatch):
    seen = {}

    def global_memory_status_ex(pointer) -> int:
        status = pointer._obj
        seen["length"] = status.dwLength
        status.ullAvailPhys = 3 * 2**30
        return 1

    kernel32 = type("Kernel32", (), {"GlobalMemoryStatusEx": staticmethod(global_memory_status_ex)})
    monkeypatch.setattr(ctypes, "windll", type("WinDLL", (), {"kernel32": kernel32}), raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    assert limits._free_system_memory() == 3 * 2**30
    assert seen["length"] == 64  # sizeof(MEMORYSTATUSEX), as Windows checks it


def test_a_failed_memory_status_call_means_unknown(monkeypatch):
    kernel32 = type("Kernel32", (), {"GlobalMemoryStatusEx": staticmethod(lambda pointer: 0)})
    monkeypatch.setattr(ctypes, "windll", type("WinDLL", (), {"kernel32": kernel32}), raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    assert limits._free_system_memory() is None


@pytest.mark.parametrize("message", [
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
    "tried to allocate 8589934592 bytes.",  # Windows
    "[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)",  # Linux
])  # fmt: skip
def test_torch_running_out_of_memory_is_recognised_on_either_system(message):
    assert limits.is_out_of_memory(RuntimeError(message))
    assert not limits.is_out_of_memory(RuntimeError("shape mismatch"))


def _launcher_stopped_by_ctrl_break(monkeypatch) -> tuple[int, int | None, list[int]]:
    """The --nproc launcher waiting on two ranks (processes that sleep) gets Ctrl-Break (here
    SIGUSR1 stands in for it): its exit code, the rank it saw fail first, how each ended."""
    monkeypatch.setattr(local_launch, "CTRL_BREAK", signal.SIGUSR1)
    monkeypatch.setattr(local_launch, "STOP_SIGNALS", (signal.SIGINT, signal.SIGUSR1))
    monkeypatch.setattr(local_launch, "STOP_GRACE_S", 1)
    ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(2)]  # fmt: skip
    # never SIGUSR1's default (the end of pytest) should it come before _wait listens
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        code, failed = local_launch._wait(ranks)
    finally:
        signal.signal(signal.SIGUSR1, before)
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
            rank.wait()
    return code, failed, [rank.returncode for rank in ranks]


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 stands in for Ctrl-Break")
def test_ctrl_break_stops_the_launcher_as_ctrl_c_and_is_passed_on_where_the_console_does_not(
        monkeypatch):  # fmt: skip
    code, failed, ends = _launcher_stopped_by_ctrl_break(monkeypatch)
    assert ends == [-signal.SIGUSR1] * 2  # passed on to the ranks
    # the ranks die of it at once: the launcher may see that before its own stop
    assert (code, failed) in ((130, None), (128 + signal.SIGUSR1, 0))


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 stands in for Ctrl-Break")
def test_on_windows_the_launcher_leaves_ctrl_break_to_the_console(monkeypatch):
    monkeypatch.setattr(os, "name", "nt")
    code, failed, ends = _launcher_stopped_by_ctrl_break(monkeypatch)
    monkeypatch.undo()
    assert ends == [-signal.SIGKILL] * 2  # not passed on: killed after the grace
    assert (code, failed) == (130, None)


def test_the_reported_command_is_quoted_for_the_shell_it_runs_in(monkeypatch):
    argv = [r"C:\Users\Ana Lee\teacher.onnx", "--out", "out dir"]
    monkeypatch.setattr(os, "name", "posix")
    assert command_line(argv) == r"""'C:\Users\Ana Lee\teacher.onnx' --out 'out dir'"""
    monkeypatch.setattr(os, "name", "nt")
    assert command_line(argv) == r'"C:\Users\Ana Lee\teacher.onnx" --out "out dir"'


def test_a_name_the_console_cannot_spell_is_escaped_not_an_error(tmp_path):
    """Windows with output redirected writes stdout in its code page (cp1252), strictly."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    path = tmp_path / "модель.onnx"
    torch.onnx.export(model, (torch.zeros(2, 4),), str(path), dynamo=False,
                      dynamic_axes={"input": {0: "batch"}}, input_names=["input"])  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "cli", "inspect", str(path)], env=env,
                          capture_output=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"\\u043c\\u043e\\u0434" in done.stdout  # the name, escaped


def _rank_of_two_with_gpus(rank: int, gpus: int, monkeypatch, nccl: bool = True) -> None:
    """This process as rank ``rank`` of two on a machine with ``gpus`` GPUs."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)


def test_more_ranks_than_gpus_is_refused_in_one_line(monkeypatch):
    _rank_of_two_with_gpus(1, 1, monkeypatch)
    with pytest.raises(DaflError, match="rank 1 has no GPU of its own: this machine has 1"):
        distributed.init_from_env("auto")


def _renames_refused(work: Path, times: int, monkeypatch) -> list[Path]:
    """os.replace refuses the first ``times`` renames of ``work`` as Windows does for a folder
    with a file held open; the targets it was asked for."""
    calls, real = [], os.replace

    def replace(source, target):
        if Path(source) != work:
            return real(source, target)
        calls.append(Path(target))
        if len(calls) <= times:
            raise PermissionError(13, "The process cannot access the file because it is being "
                                      "used by another process")  # fmt: skip
        real(source, target)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(outdir, "RENAME_WAIT_S", 0.01)
    return calls


def test_an_output_folder_held_open_for_a_moment_is_still_moved_into_place(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(outdir, "WINDOWS", True)
    folder = outdir.OutputFolder(tmp_path / "out")
    calls = _renames_refused(folder.work, 3, monkeypatch)
    with folder:
        (folder.work / "student.onnx").write_bytes(b"x")
        assert folder.commit() == tmp_path / "out"
    assert (tmp_path / "out" / "student.onnx").read_bytes() == b"x" and len(calls) == 4


def test_an_output_folder_held_open_for_good_is_kept_where_it_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "WINDOWS", True)
    folder = outdir.OutputFolder(tmp_path / "out")
    calls = _renames_refused(folder.work, outdir.RENAME_TRIES, monkeypatch)
    with folder:
        (folder.work / "student.onnx").write_bytes(b"x")
        with pytest.raises(DaflError, match="cannot move the finished output into place"):
            folder.commit()
    assert len(calls) == outdir.RENAME_TRIES and (folder.work / "student.onnx").is_file()
    assert not (tmp_path / "out").exists()


def test_gpu_ranks_without_nccl_are_refused_in_one_line(monkeypatch):
    """Windows' torch has no NCCL, and gloo's CUDA all-reduce crashes there."""
    _rank_of_two_with_gpus(0, 2, monkeypatch, nccl=False)
    with pytest.raises(DaflError, match="several ranks on GPUs need NCCL.*--device cpu"):
        distributed.init_from_env("auto")

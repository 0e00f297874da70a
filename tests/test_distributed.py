"""Several processes (issue 13), on this CPU with gloo over loopback: torchrun on one machine,
two rendezvoused "nodes", the --nproc shortcut, gradient equivalence of N ranks x B with one
process x N*B, interruption and resume across a change of world size, a killed rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import ctrl_c_as_at_a_terminal
from models import fit
from sklearn.datasets import load_digits
from torch import nn

from compress_toolbox.distillation import distributed
from compress_toolbox.distillation.losses import kd_loss
from compress_toolbox.distillation.methods import get_method
from compress_toolbox.distillation.methods.base import MethodContext
from compress_toolbox.distillation.presets import PRESETS
from compress_toolbox.domain import InputDomain

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> dict[str, Path]:
    """A digits MLP (8x8 -> 64 -> 10) saved as .pt2, and its evaluation data."""
    root = tmp_path_factory.mktemp("dist")
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    np.savez(root / "eval.npz", x=x[1200:].numpy(), y=y[1200:].numpy())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    fit(model, x[:1200], y[:1200])
    batch = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=batch)
    torch.export.save(program, root / "mlp.pt2")
    return {"teacher": root / "mlp.pt2", "eval": root / "eval.npz"}


def run_worker(spec: dict, nproc: int = 1, restarts: int = 0, **popen) -> subprocess.Popen:
    """tests/dist_worker.py on ``nproc`` ranks (torchrun --standalone), or alone for one."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher = TORCHRUN + ["--standalone", f"--nproc-per-node={nproc}",
                               f"--max-restarts={restarts}"]  # fmt: skip
    command = [*launcher, str(WORKER), json.dumps({k: str(v) if isinstance(v, Path) else v
                                                    for k, v in spec.items()})]  # fmt: skip
    return subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def test_two_ranks_one_output_folder_same_student(teacher, tmp_path):
    out = tmp_path / "out"
    spec = {"teacher": teacher["teacher"], "out": out, "iters": 12, "params_dir": tmp_path,
            "eval_data": teacher["eval"]}  # fmt: skip
    code, log = finish(run_worker(spec, nproc=2))
    assert code == 0, log
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["out"]  # no other folder
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["iterations"] == 12
    assert report["world_size"] == 2 and report["global_batch_size"] == 64
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    start = torch.load(tmp_path / "rank0.pt")
    assert any(t.abs().sum() > 0 for t in start.values())


# -- equivalence: 2 ranks x B == 1 process x 2B ---------------------------------------------
B = 8
SHAPE = (1, 16, 16)


def _models():
    """A BatchNorm CNN teacher (the BN prior, DAFL's losses) and a BatchNorm student."""
    torch.manual_seed(0)

    def cnn(width):
        return nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 10),
        )  # fmt: skip

    teacher = cnn(8)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return teacher.eval().requires_grad_(False), cnn(4)


def _gradients(method_name: str, rank: int, size: int) -> dict[str, torch.Tensor]:
    """One generator step and one student KD step on this rank's share of a fixed batch of
    2B latents; the gradients after the ranks averaged them."""
    teacher, student = _models()
    # no random moves of the generated images: each rank would draw its own, and this test
    # compares the ranks' arithmetic with one process sample by sample
    preset = replace(PRESETS["fast"], gen_width=16, augmentations=())
    ctx = MethodContext(teacher=teacher, student=student, input_shape=SHAPE, num_classes=10,
                        domain=InputDomain(), preset=preset, device=torch.device("cpu"),
                        final_layer="8", autocast=nullcontext)  # fmt: skip
    torch.manual_seed(1)
    method = get_method(method_name)(ctx)
    generator = method.generator
    distributed.sync_batchnorm(generator)
    distributed.sync_batchnorm(student)
    distributed.average_gradients(method.optimizer)
    z = torch.randn(2 * B, preset.latent_dim, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(2 * B) % 10
    share = slice(rank * 2 * B // size, (rank + 1) * 2 * B // size)
    method._latent = lambda n: (z[share], labels[share] if method.conditional else None)
    batch = method.generate(2 * B // size)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    distributed.average_gradients(optimizer)
    loss = kd_loss(student.train()(batch.x), batch.teacher_logits, 4.0)
    loss.backward()
    optimizer.step()
    grads = {f"generator.{n}": p.grad.clone() for n, p in generator.named_parameters()}
    grads.update({f"student.{n}": p.grad.clone() for n, p in student.named_parameters()})
    grads["student.bn.running_var"] = student[1].running_var.clone()
    return grads


METHODS = ("dafl", "bn-prior")  # global information entropy and activation; BN statistics


def _rank(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        grads = {name: _gradients(name, rank, size) for name in METHODS}
        torch.save(grads, f"{out}.rank{rank}")
    finally:
        distributed.shutdown()


def test_two_ranks_give_the_gradients_of_one_process_with_twice_the_batch(tmp_path):
    """Generator and student gradients (generator, student and teacher with BatchNorm)."""
    out = str(tmp_path / "grads")
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}") for r in (0, 1)]
    for method_name in METHODS:
        single = _gradients(method_name, 0, 1)
        assert single.keys() == ranks[0][method_name].keys()
        for name, expected in single.items():
            for got in (rank[method_name] for rank in ranks):
                assert torch.allclose(got[name], expected, rtol=0, atol=1e-5), (
                    method_name, name, float((got[name] - expected).abs().max()))  # fmt: skip
        # the test could fail: one rank's own gradient (its half batch) is not the global one
        own = _gradients(method_name, 0, 2)
        assert any(not torch.allclose(own[n], single[n], atol=1e-5) for n in single)


# -- launchers ------------------------------------------------------------------------------
@pytest.mark.slow
def test_nproc_passes_on_a_rank_s_exit_code(teacher, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep")
    command = [sys.executable, "-m", "cli", str(teacher["teacher"]), "--nproc", "2",
               "--out", str(tmp_path / "out"), "--iters", "4", "--no-progress"]  # fmt: skip
    done = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "output folder exists and is not empty" in done.stderr
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep"


@pytest.mark.slow
def test_two_nodes_on_localhost_rendezvous(teacher, tmp_path):
    port = free_port()
    out = tmp_path / "out"
    nodes = [
        subprocess.Popen(
            TORCHRUN + ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dafl-test",
                        "-m", "cli", str(teacher["teacher"]), "--out", str(out), "--iters",
                        "10", "--batch-size", "16", "--no-progress"],
            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [finish(node) for node in nodes]
    assert all(code == 0 for code, _ in results), results
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["iterations"] == 10


# -- interruption, resume, failure ------------------------------------------------------------
@pytest.mark.parametrize(
    "before, after", [pytest.param(2, 1, marks=pytest.mark.slow),
                      pytest.param(1, 2, marks=pytest.mark.slow)]
)  # the reverse direction costs another 40 s: slow
def test_interrupted_run_resumes_with_another_number_of_ranks(teacher, tmp_path, before, after):
    out = tmp_path / "out"
    spec = {"teacher": teacher["teacher"], "out": out, "iters": 16, "params_dir": tmp_path,
            "interrupt_at": [before - 1, 6]}  # Ctrl-C on the last rank at iteration 6
    code, log = finish(run_worker(spec, nproc=before, preexec_fn=ctrl_c_as_at_a_terminal))
    assert code != 0, log
    checkpoint = tmp_path / "out.checkpoint" / "dafl_checkpoint.pt"
    assert checkpoint.is_file() and not out.exists(), log
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 6
    spec.update(resume=True, interrupt_at=None)
    code, log = finish(run_worker(spec, nproc=after))
    assert code == 0, log
    report = json.loads((out / "report.json").read_text())
    assert report["iterations"] == 16 and report["world_size"] == after
    assert not checkpoint.exists()


def kill_rank_1(process: subprocess.Popen, pid_dir: Path, after_s: float) -> None:
    """SIGKILL rank 1 ``after_s`` seconds into its training."""
    pid_file = pid_dir / "rank1.pid"
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert pid_file.exists(), finish(process)[1]
    time.sleep(after_s)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_killed_rank_ends_the_run(teacher, tmp_path):
    out = tmp_path / "out"
    spec = {"teacher": teacher["teacher"], "out": out, "iters": None, "time_budget": 120,
            "pid_dir": tmp_path}  # fmt: skip
    process = run_worker(spec, nproc=2)
    kill_rank_1(process, tmp_path, after_s=1)
    start = time.time()
    code, log = finish(process, timeout=90)
    assert code != 0, log
    assert time.time() - start < 60, log
    assert not out.exists()  # nothing half-written


@pytest.mark.slow
def test_max_restarts_resumes_from_the_checkpoint(teacher, tmp_path):
    """torchrun --max-restarts 1: after a rank is killed, the restarted ranks continue from
    rank 0's last checkpoint (the first one is written 10 s into training)."""
    out = tmp_path / "out"
    spec = {"teacher": teacher["teacher"], "out": out, "iters": None, "time_budget": 30,
            "pid_dir": tmp_path}  # fmt: skip
    process = run_worker(spec, nproc=2, restarts=1)
    kill_rank_1(process, tmp_path, after_s=14)
    code, log = finish(process, timeout=240)
    assert code == 0, log
    assert (tmp_path / "rank0.attempt0").read_text() == "1"
    assert int((tmp_path / "rank0.attempt1").read_text()) > 1  # resumed, not started afresh
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["elapsed_s"] <= 30 + 3


def _listening_sockets(root_pid: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets listening in
    ``root_pid`` and its descendants (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pids, inodes = [root_pid], set()
    while pids:
        pid = pids.pop()
        pids.extend(children.get(pid, []))
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def test_nproc_runs_the_ranks_listening_on_loopback_only(teacher, tmp_path):
    """--nproc 2 runs two ranks and reports them (the user's command, not a rank's). On a
    laptop in a cafe it must not accept connections from the network: every socket the
    launcher and its ranks listen on is bound to the loopback address."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cli", str(teacher["teacher"]), "--nproc", "2",
               "--out", str(out), "--iters", "10", "--batch-size", "16", "--no-progress",
               "--eval-data", str(teacher["eval"])]  # fmt: skip
    logs = tmp_path / "stdout.txt", tmp_path / "stderr.txt"  # pipes unread while polling
    with logs[0].open("w") as stdout_file, logs[1].open("w") as stderr_file:
        run = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=stdout_file,
                               stderr=stderr_file)  # fmt: skip
        seen: set[str] = set()
        linux = Path("/proc/net/tcp").exists()  # the sockets are read from Linux's /proc
        while run.poll() is None:
            seen |= _listening_sockets(run.pid) if linux else set()
            time.sleep(0.3)
    stdout, stderr = (log.read_text() for log in logs)
    assert run.returncode == 0, stderr
    if linux:
        assert seen, "the ranks listened on no socket: nothing was checked"
        assert seen <= LOOPBACK_HEX, f"listening beyond loopback: {seen - LOOPBACK_HEX}"
    assert "output written to" in stdout
    assert "x 2 ranks (batch 16 each, global batch 32)" in stdout  # report.md
    assert "--nproc 2" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_batch_size"] == 32
    assert report["student"]["accuracy"] > 0.5

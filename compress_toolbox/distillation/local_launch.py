"""The ``--nproc N`` shortcut: N ranks on this machine that listen on the loopback interface only
(on Linux and macOS).

torchrun's elastic launcher hosts its rendezvous and agent stores on every interface (torch
2.14's TCPStore binds to ``*`` whatever host it is given), so a run on a laptop would accept
connections from the network. Here the launcher itself hosts the one store, on a socket bound
to 127.0.0.1 (``master_listen_fd``), and starts the ranks as clients of it
(``TORCHELASTIC_USE_AGENT_STORE``: no rank hosts a store of its own); gloo is pinned to the
loopback interface (where the platform names it: not on Windows, see docs/distributed.md).
Several machines still go through ``torchrun`` with the user's own endpoint.
"""

from __future__ import annotations

import datetime
import locale
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch.distributed as dist

from compress_toolbox.errors import DaflError

LOOPBACK = "127.0.0.1"
POLL_S = 0.2
STOP_GRACE_S = 60  # how long ranks get to save their checkpoint after Ctrl-C/SIGTERM
# Windows builds of torch have no libuv (torch's own rendezvous turns it off there too)
USE_LIBUV = sys.platform != "win32"
# What stops a run as Ctrl-C does (a checkpoint, then exit 128 + N): SIGINT, SIGTERM and, on
# Windows, SIGBREAK (Ctrl-Break), counted as SIGINT. Closing the console window also sends
# SIGBREAK, but Windows ends the process as soon as the handler returns: no checkpoint then.
CTRL_BREAK = getattr(signal, "SIGBREAK", None)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *([CTRL_BREAK] if CTRL_BREAK else []))


def stop_signal(signum: int) -> int:
    """The signal a stop by ``signum`` is counted as: Ctrl-Break as Ctrl-C."""
    return signal.SIGINT if signum == CTRL_BREAK else signum


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m cli ARGV`` as ``nproc`` ranks on this machine and return the exit code:
    the first failed rank's (128 + N for a rank killed by signal N), 0 when all finished."""
    if nproc < 1:
        raise DaflError(f"--nproc must be at least 1, got {nproc}")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen()
    port = listener.getsockname()[1]
    # the store takes the socket over (and closes it when it goes)
    store = dist.TCPStore(LOOPBACK, port, None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=600),
                          master_listen_fd=listener.detach(), use_libuv=USE_LIBUV)  # fmt: skip
    # ranks > 0 repeat rank 0's lines, or report the closed connection when rank 0 stopped
    # first: their stderr is shown only when one of them failed first
    logs = [None] + [tempfile.TemporaryFile() for _ in range(1, nproc)]
    ranks = [_start_rank(rank, nproc, port, argv, logs[rank]) for rank in range(nproc)]
    try:
        code, first_failed = _wait(ranks)
        log = logs[first_failed] if first_failed is not None else None
        if log is not None:
            log.seek(0)
            # a rank's redirected stderr is in the locale's encoding (Windows: its code page)
            sys.stderr.write(log.read().decode(locale.getpreferredencoding(False),
                                               errors="replace"))  # fmt: skip
        return code
    finally:
        del store
        for log in logs[1:]:
            log.close()


def _rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port),
               TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0",
               PYTHONUNBUFFERED="1")  # fmt: skip
    loopback = _loopback_interface()
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    return env


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS), if the platform
    lists interfaces; gloo otherwise binds to the address the host name resolves to."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):  # not on every platform
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _start_rank(rank: int, nproc: int, port: int, argv: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *argv], stderr=log,
                            env=_rank_env(rank, nproc, port))  # fmt: skip


def _wait(ranks: list[subprocess.Popen]) -> tuple[int, int | None]:
    """Wait for every rank; on the first failure stop the others; pass Ctrl-C/SIGTERM on.
    Returns the exit code and the rank that failed first (None when none failed)."""
    stopped_by: list[int] = []

    def forward(signum, frame):
        stopped_by.append(stop_signal(signum))
        if os.name == "nt":  # the console sent Ctrl-C/Ctrl-Break to the ranks too
            return
        for rank in ranks:
            if rank.poll() is None:
                rank.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        while True:
            codes = [rank.poll() for rank in ranks]
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed or stopped_by:
                _stop(ranks, gently=bool(stopped_by) and not failed)
                code = codes[failed[0]] if failed else 128 + int(stopped_by[0])
                return (128 - code if code < 0 else code), (failed[0] if failed else None)
            if all(code == 0 for code in codes):
                return 0, None
            time.sleep(POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(ranks: list[subprocess.Popen], gently: bool) -> None:
    """After a signal the ranks agree to save and stop: give them time; after a failure the
    others would only wait on the dead rank: terminate them."""
    deadline = time.monotonic() + (STOP_GRACE_S if gently else 5)
    if not gently:
        for rank in ranks:
            if rank.poll() is None:
                rank.terminate()
    for rank in ranks:
        try:
            rank.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()

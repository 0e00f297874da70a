"""Several processes (torchrun): the one module that knows ranks, the world size, backends and the
process group.

Launched by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment), every rank runs the
whole pipeline up to the end of training; rank 0 alone writes checkpoints, the output folder and
the report. N ranks x batch B behave like one process with batch N x B:

- each rank generates its own batch from its own seed stream (``seed_rank``);
- losses over a batch's statistics (DAFL's information entropy of the mean class distribution,
  BatchNorm statistics, the generator's and student's own BatchNorm layers) use the *global*
  batch through a differentiable all-reduce (``global_moments``, ``sync_batchnorm``);
- gradients are averaged over ranks before every optimiser step (``average_gradients``), so
  the per-sample-mean losses get the global mean's gradient too;
- the stop decision, checkpoint times and Ctrl-C/SIGTERM on any rank are agreed at each
  iteration (``World.vote``).

Outside torchrun (or with one rank) every function here is a no-op or the plain single-process
computation, so a one-process run is unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from compress_toolbox.distillation.local_launch import (
    STOP_SIGNALS,
    USE_LIBUV,
    launch,  # noqa: F401 - the --nproc shortcut, re-exported
    stop_signal,
)
from compress_toolbox.errors import DaflError, first_line

# A rank that stops answering (killed, hung) ends the collectives of the others after this long
# (torchrun itself tears the other workers down as soon as it sees one fail).
TIMEOUT_S = float(os.environ.get("DAFL_DIST_TIMEOUT_S", "600"))
STOP_REASONS = ("", "iterations", "time budget")  # index = code in the stop vote


class RankFailed(DaflError):
    """Another rank failed or disagreed: the run cannot go on."""

    exit_code = 3


class Signalled(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached some rank; all ranks stop together (``exit_code``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


@dataclass
class World:
    """This process's place among the ranks (one rank, rank 0, outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one rank: collectives are needed."""
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes checkpoints, the output folder and the report."""
        return self.rank == 0

    def device(self, resolved: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK when the run is on GPUs."""
        if self.active and resolved.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return resolved

    def vote(self, stop: str | None, signum: int, checkpoint: bool) -> tuple[str, int, bool]:
        """Agree on (stop reason, signal received, checkpoint due): each the maximum over
        ranks, so that one rank's Ctrl-C or exhausted budget stops every rank at the same
        iteration."""
        if not self.active:
            return stop or "", signum, checkpoint
        flags = torch.tensor([STOP_REASONS.index(stop or ""), signum, int(checkpoint)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return STOP_REASONS[int(flags[0])], int(flags[1]), bool(flags[2])

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (recipes, a checkpoint read by rank 0)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, value: str, what: str) -> None:
        """RankFailed unless every rank has the same ``value`` (a digest of ``what``)."""
        if not self.active:
            return
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            raise RankFailed(
                f"the ranks disagree on the {what} ({', '.join(map(str, values))} by rank); "
                "every machine must have the same files and options"
            )

    def broadcast_module(self, module: nn.Module, what: str) -> None:
        """Rank 0's parameters and buffers in ``module`` on every rank, after checking that
        every rank built the same architecture."""
        if not self.active:
            return
        self.check_same(structure_digest(module), f"{what}'s architecture")
        tensors = [*module.parameters(), *module.buffers()]
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
            dist.broadcast(flat, src=0)  # one message; channels-last tensors need no care
            for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                tensor.copy_(part.view_as(tensor))

    def all_gather_cat(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (same shape on each), concatenated along dim 0 in rank order."""
        if not self.active:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def seed_rank(self, seed: int, iteration: int) -> None:
        """Give every rank but 0 its own random stream for generation (rank 0 keeps its own,
        so that one rank runs exactly as a plain process)."""
        if self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank + 7_919 * iteration)


_WORLD = World()


def world() -> World:
    """The current world (one rank until ``init_from_env`` ran under torchrun)."""
    return _WORLD


def launched() -> bool:
    """Started by torchrun (or another launcher setting RANK and WORLD_SIZE) with >1 rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def cores_per_rank() -> int:
    """This machine's CPU cores shared among its ranks: measured on 2 cores, two ranks of 2
    threads each ran 5x slower than two of 1 thread (0.67 against 3.65 iterations/s)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1
    return max(1, (os.cpu_count() or 1) // max(local_ranks, 1))


def restarted() -> bool:
    """This is a restart by torchrun (``--max-restarts``) after a rank failed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def init_from_env(device: str | None = None) -> World:
    """Join the process group torchrun set up (idempotent): gloo for CPU tensors and NCCL for
    CUDA ones when this rank trains on a GPU (LOCAL_RANK picks it); every rank must agree."""
    global _WORLD
    if not launched() or dist.is_initialized():
        return _WORLD
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = str(device or "auto").split(":")[0]
    on_gpu = torch.cuda.is_available() and wanted in ("auto", "cuda")
    if on_gpu:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise DaflError(f"rank {rank} has no GPU of its own: this machine has {gpus}; start "
                            f"at most {gpus} ranks per machine, or add --device cpu")  # fmt: skip
        if not dist.is_nccl_available():  # Windows' torch: gloo's CUDA all-reduce crashes there
            raise DaflError("several ranks on GPUs need NCCL, which this build of torch lacks "
                            "(as on Windows); add --device cpu, or train on one GPU")  # fmt: skip
        torch.cuda.set_device(local_rank)
    backend = "cpu:gloo,cuda:nccl" if on_gpu else "gloo"
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    try:
        dist.init_process_group(backend, timeout=timeout, **_restart_store(rank, size, timeout))
    except (RuntimeError, ValueError) as error:
        reason = first_line(error, 300) or type(error).__name__
        raise RankFailed(f"cannot join the other ranks: {reason}") from None
    _WORLD = World(rank, size, local_rank)
    _WORLD.check_same("cuda" if on_gpu else "cpu", "device kind (every rank needs a GPU, or none)")
    return _WORLD


def _restart_store(rank: int, size: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """After ``torchrun --max-restarts`` restarted the ranks: torchrun's store still holds the
    failed attempt's addresses (seen with torch 2.14: the new rank 0 dialled the killed rank's
    port), so this attempt's process group gets keys of its own."""
    if not restarted():
        return {}
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts it
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                         is_master=rank == 0 and not agent, timeout=timeout,
                         use_libuv=USE_LIBUV)  # fmt: skip
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    store = dist.PrefixStore(f"dafl-compress/attempt{attempt}/", base)
    return {"store": store, "rank": rank, "world_size": size}


def shutdown() -> None:
    """Leave the process group (end of the run on this rank)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Turn a failed collective (another rank died or timed out) into one clear RankFailed."""
    try:
        yield
    except (dist.DistError, RuntimeError) as error:
        # gloo reports a dead peer as a plain RuntimeError ("[...gloo/transport/tcp/pair.cc]
        # Read error ... Connection reset by peer"), seen with torch 2.14
        if (
            not _WORLD.active
            or not isinstance(error, dist.DistError)
            and not any(word in str(error) for word in ("gloo", "NCCL", "Connection", "timed out"))
        ):
            raise
        raise RankFailed(
            f"rank {_WORLD.rank}: another rank stopped answering, so this one stops too "
            f"({first_line(error, 160) or type(error).__name__})"
        ) from None


def structure_digest(module: nn.Module) -> str:
    """A short fingerprint of a module's parameter and buffer names and shapes."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:12]


# -- batch statistics over the global batch --------------------------------------------------
# torch 2.14 marks torch.distributed.nn.functional.all_reduce deprecated in favour of the
# private torch.distributed._functional_collectives; the public one is kept here (the only
# user), and tests/test_distributed.py's gradient-equivalence test fails if it changes.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
    category=FutureWarning,
)  # fmt: skip


def global_moments(
    x: torch.Tensor, dims: list[int] | tuple[int, ...], variance: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Mean and (biased) variance of ``x`` over ``dims`` and over every rank's ``x``, and the
    number of values they cover; differentiable (torch.distributed.nn all-reduce, whose
    backward all-reduces the gradient, which ``average_gradients`` then divides by the world
    size). One rank: exactly ``x.mean`` and ``x.var(unbiased=False)``."""
    count = 1
    for d in dims:
        count *= x.shape[d]
    if not _WORLD.active:
        return x.mean(dims), (x.var(dims, unbiased=False) if variance else None), count
    total = count * _WORLD.size  # equal per-rank batches: the recipe is rank 0's everywhere
    mean = dist_nn.all_reduce(x.sum(dims)) / total
    if not variance:
        return mean, None, total
    shape = [1] * x.dim()
    keep = [d for d in range(x.dim()) if d not in dims]
    for d in keep:
        shape[d] = x.shape[d]
    centred = x - mean.reshape(shape)
    var = dist_nn.all_reduce((centred * centred).sum(dims)) / total
    return mean, var, total


def global_mean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``x.mean(dim)`` over the global batch (differentiable)."""
    return global_moments(x, (dim,), variance=False)[0]


class _GlobalBatchNorm:
    """Mixed into a BatchNorm layer's class while training on several ranks: normalise with
    the global batch's statistics (torch's SyncBatchNorm refuses CPU tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _WORLD.active):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        mean, var, n = global_moments(x, dims)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum
                if factor is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), factor)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


_GLOBAL_CLASSES: dict[type, type] = {}


def sync_batchnorm(module: nn.Module) -> None:
    """Make every BatchNorm layer of ``module`` use global batch statistics while several
    ranks train (same parameters, buffers and state_dict keys; undone by ``unsync``)."""
    if not _WORLD.active:
        return
    for layer in module.modules():
        cls = type(layer)
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            continue
        if not isinstance(layer, _GlobalBatchNorm):
            if cls not in _GLOBAL_CLASSES:
                _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
            layer.__class__ = _GLOBAL_CLASSES[cls]


def unsync_batchnorm(module: nn.Module) -> None:
    """Undo ``sync_batchnorm`` (before export, or anything rank 0 does alone)."""
    for layer in module.modules():
        if isinstance(layer, _GlobalBatchNorm):
            layer.__class__ = type(layer).__mro__[2]


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Before every ``optimizer.step()``, replace each gradient by its mean over the ranks."""
    if not _WORLD.active:
        return

    def hook(opt, _args, _kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([grad.reshape(-1) for grad in grads])  # one all-reduce per step
        dist.all_reduce(flat)
        flat /= _WORLD.size
        for grad, part in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(part.view_as(grad))

    optimizer.register_step_pre_hook(hook)


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------
class SignalFlag:
    """The last SIGINT/SIGTERM received (0: none)."""

    received: int = 0


@contextlib.contextmanager
def deferred_signals() -> Iterator[SignalFlag]:
    """With several ranks, Ctrl-C and SIGTERM only set a flag, which the next ``vote`` spreads:
    a rank interrupted inside a collective would leave the others waiting. One rank: nothing
    changes (the signal raises at once, as before)."""
    flag = SignalFlag()
    if not _WORLD.active or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def record(signum, _frame) -> None:
        flag.received = stop_signal(signum)

    previous = {s: signal.signal(s, record) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- the --nproc shortcut -------------------------------------------------------------------
def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (what the launched ranks get)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out

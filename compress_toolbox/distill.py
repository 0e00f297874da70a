"""Stage 3: DAFL data-free distillation (Chen et al., ICCV 2019) of a teacher into a student."""

from __future__ import annotations

import csv
import math
import os
import random
import time
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DaflError
from .evaldata import EvalData, evaluate
from .generator import make_generator
from .losses import activation_loss, information_entropy_loss, kd_loss, one_hot_loss
from .teacher import Teacher

CHECKPOINT_NAME = "dafl_checkpoint.pt"
POOL_MEMORY_BYTES = 256 * 2**20  # at most this much of recent generated batches is kept
METHODS = ("dafl", "noise")
TASKS = ("classification",)


class DistillInterrupted(DaflError):
    """Training was interrupted (Ctrl-C); a checkpoint was written if a directory was given."""


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters of one training recipe."""

    name: str
    latent_dim: int
    batch_size: int
    gen_width: int  # channels of the generator's first conv block (paper: 128)
    gen_lr: float
    student_optimizer: str  # "adam" or "sgd"
    student_lr: float
    w_oh: float  # one-hot loss weight
    w_ie: float  # information-entropy loss weight
    w_a: float  # activation loss weight
    schedule: str  # "constant", "step" (x0.1 at 40% and 80%) or "cosine"
    epochs: int | None = None  # paper schedule length (epochs x iters_per_epoch iterations)
    iters_per_epoch: int = 120
    momentum: float = 0.9
    weight_decay: float = 0.0
    entropy_base: float = math.e  # the authors' code uses log10
    student_steps: int = 1  # student updates per generated batch (generator step)
    pool_size: int = 1  # student steps draw from the last pool_size generated batches
    kd_temperature: float = 1.0  # softmax temperature of the KD loss (the paper: 1)
    # CPU threads: "all" = os.cpu_count(), "auto" = time 1 vs all threads and keep the faster,
    # or a number.
    cpu_threads: str | int = "all"
    schedule_generator: bool = False  # apply the LR schedule to the generator too
    fit_schedule_to_budget: bool = False  # schedule progress = max(iter/iters, elapsed/budget)
    default_time_budget: float | None = None  # seconds, used when no budget/iters/epochs given
    description: str = ""


PRESETS: dict[str, Preset] = {
    "paper-mnist": Preset(
        name="paper-mnist",
        latent_dim=100,
        batch_size=512,
        gen_width=128,
        gen_lr=0.2,
        student_optimizer="adam",
        student_lr=2e-3,
        w_oh=1.0,
        w_ie=5.0,
        w_a=0.1,
        entropy_base=10.0,
        schedule="constant",  # the authors' code only decays the LR for non-MNIST datasets
        epochs=200,
        iters_per_epoch=120,
        description="authors' MNIST recipe: 200 epochs x 120 iterations, batch 512, no LR decay",
    ),
    "paper-cifar": Preset(
        name="paper-cifar",
        latent_dim=1000,
        batch_size=1024,
        gen_width=128,
        gen_lr=0.02,
        student_optimizer="sgd",
        student_lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        w_oh=0.05,
        w_ie=5.0,
        w_a=0.01,
        entropy_base=10.0,
        schedule="step",
        epochs=2000,
        iters_per_epoch=120,  # DAFL_train.py loops range(120) per epoch for every dataset
        description="authors' CIFAR recipe: 2000 epochs x 120 iterations, student LR x0.1 at "
        "epochs 800 and 1600",
    ),
    # Measured on a 2-core CPU (benchmarks/RESULTS.md): see the tuning table there for why.
    "fast": Preset(
        name="fast",
        latent_dim=100,
        batch_size=128,
        gen_width=16,
        gen_lr=0.2,
        student_optimizer="adam",
        student_lr=5e-3,
        w_oh=1.0,
        w_ie=5.0,
        w_a=0.1,
        entropy_base=10.0,
        schedule="cosine",
        kd_temperature=4.0,
        student_steps=12,
        pool_size=24,
        fit_schedule_to_budget=True,
        cpu_threads="auto",
        default_time_budget=120.0,
        description="tuned for speed on a 2-core CPU: batch 128, 16-channel generator, 12 student "
        "steps per generated batch drawn from the last 24 batches, KD at temperature 4, cosine "
        "LR fitted to the budget",
    ),
}


@dataclass
class DistillResult:
    """What ``distill`` returns. ``student`` is the last one trained (never selected on labels)."""

    student: nn.Module
    history: list[dict[str, Any]]
    iterations: int
    elapsed_s: float
    device: str
    method: str
    preset: str
    batch_size: int
    generator: nn.Module | None = None
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    interrupted: bool = False
    stop_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto" -> cuda when available, else cpu; anything else must name a usable device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DaflError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DaflError(f"device {device!r} requested but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise DaflError(f"device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return resolved


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base LR at ``progress`` in [0, 1] of the planned run."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if progress < 0.4 else 0.1 if progress < 0.8 else 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise DaflError(f"unknown LR schedule {schedule!r}")


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file then rename, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_history_csv(history: list[dict[str, Any]], path: str | Path) -> None:
    """One row per iteration: iteration, elapsed_s, loss_oh, loss_ie, loss_a, loss_kd, accuracy."""
    columns = ["iteration", "elapsed_s", "loss_oh", "loss_ie", "loss_a", "loss_kd", "accuracy"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in columns})


def _make_student_optimizer(preset: Preset, student: nn.Module) -> torch.optim.Optimizer:
    if preset.student_optimizer == "adam":
        return torch.optim.Adam(
            student.parameters(), lr=preset.student_lr, weight_decay=preset.weight_decay
        )
    if preset.student_optimizer == "sgd":
        return torch.optim.SGD(
            student.parameters(),
            lr=preset.student_lr,
            momentum=preset.momentum,
            weight_decay=preset.weight_decay,
        )
    raise DaflError(f"unknown student optimizer {preset.student_optimizer!r}")


def _check_teacher_output(teacher: nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    with torch.no_grad():
        out = teacher(torch.randn(2, *shape, device=device))
    if not isinstance(out, torch.Tensor):
        raise DaflError(
            f"teacher output is a {type(out).__name__}; --task classification needs (N, K) logits"
        )
    if out.dim() != 2 or out.shape[1] < 2:
        raise DaflError(
            f"teacher output has shape {tuple(out.shape)}; --task classification needs (N, K) "
            "logits"
        )
    return int(out.shape[1])


def distill(
    teacher: Teacher,
    student: nn.Module,
    *,
    task: str = "classification",
    method: str = "dafl",
    preset: str | Preset = "fast",
    device: str | torch.device | None = None,
    time_budget: float | None = None,
    iters: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    eval_data: EvalData | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every_s: float = 60,
    resume: bool = False,
    progress: bool = True,
    history_path: str | Path | None = None,
    on_iteration: Callable[[int], None] | None = None,
    eval_interval_s: float | None = None,
) -> DistillResult:
    """Train ``student`` (in place) to mimic ``teacher`` without data, by DAFL or noise KD.

    Stops after ``iters`` iterations, ``epochs`` x preset.iters_per_epoch iterations or
    ``time_budget`` seconds of training, whichever comes first; with none of them the preset's
    default (full paper schedule, or the fast preset's default budget). ``on_iteration`` is
    called after each iteration with its number (used by tests and callers for monitoring).
    ``eval_interval_s`` evaluates every that many seconds instead of every ``eval_every`` its.
    """
    if task not in TASKS:
        raise DaflError(f"--task {task} is not supported yet; only classification is")
    if method not in METHODS:
        raise DaflError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise DaflError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if preset.kd_temperature <= 0:
        raise DaflError(f"KD temperature must be positive, got {preset.kd_temperature}")
    if batch_size is not None:
        if batch_size < 2:
            raise DaflError(f"batch size must be at least 2 (BatchNorm), got {batch_size}")
        preset = replace(preset, batch_size=batch_size)
    for name, value in (("time budget", time_budget), ("iters", iters), ("epochs", epochs)):
        if value is not None and value <= 0:
            raise DaflError(f"{name} must be positive, got {value}")
    dev = resolve_device(device)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        threads = preset.cpu_threads
        torch.set_num_threads(int(threads) if str(threads).isdigit() else os.cpu_count() or 1)

    total_iters: int | None = iters
    if total_iters is None and epochs is not None:
        total_iters = epochs * preset.iters_per_epoch
    if total_iters is None and time_budget is None:
        if preset.default_time_budget is not None:
            time_budget = preset.default_time_budget
        else:
            total_iters = (preset.epochs or 1) * preset.iters_per_epoch
    # Paper presets follow their own schedule length (truncated by a budget); fast fits its
    # schedule to whatever bounds the run.
    paper_total = (preset.epochs or 0) * preset.iters_per_epoch or total_iters

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if resume and (checkpoint_path is None or not checkpoint_path.is_file()):
        where = checkpoint_path or "(no --checkpoint-dir given)"
        raise DaflError(f"cannot resume: no checkpoint at {where}")

    _seed_everything(seed)
    teacher_module = teacher.module
    teacher_device = next((p.device for p in teacher_module.parameters()), torch.device("cpu"))
    grad_flags = [p.requires_grad for p in teacher_module.parameters()]
    teacher_module.to(dev).eval()
    # The teacher is frozen: no weight gradients, only gradients w.r.t. generated inputs.
    teacher_module.requires_grad_(False)
    hook_handle = None
    try:
        _check_teacher_output(teacher_module, tuple(teacher.input_shape), dev)
        features: dict[str, torch.Tensor] = {}
        use_activation = method == "dafl" and preset.w_a > 0
        final_layer = teacher.analysis.final_layer if teacher.analysis else None
        if use_activation and final_layer is None:
            warnings.warn(
                "teacher has no final Linear/1x1-conv layer: activation loss disabled",
                stacklevel=2,
            )
            use_activation = False
        if use_activation:

            def keep_features(_module, inputs):
                features["x"] = inputs[0]

            hook_handle = teacher_module.get_submodule(final_layer).register_forward_pre_hook(
                keep_features
            )
        return _train(
            teacher=teacher,
            student=student,
            method=method,
            preset=preset,
            dev=dev,
            time_budget=time_budget,
            total_iters=total_iters,
            paper_total=paper_total,
            eval_data=eval_data,
            eval_every=eval_every,
            eval_interval_s=eval_interval_s,
            checkpoint_path=checkpoint_path,
            checkpoint_every_s=checkpoint_every_s,
            resume=resume,
            progress=progress,
            history_path=history_path,
            features=features if use_activation else None,
            on_iteration=on_iteration,
        )
    finally:
        if hook_handle is not None:
            hook_handle.remove()
        for param, flag in zip(teacher_module.parameters(), grad_flags):
            param.requires_grad_(flag)
        teacher_module.to(teacher_device)
        torch.set_num_threads(threads_before)


def _autocast(dev: torch.device):
    """bf16 autocast on CUDA when supported (no scaler needed), else fp16; nothing on CPU
    (measured: CPU autocast is slower for these small convs)."""
    if dev.type != "cuda":
        return nullcontext(), False
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), False
    return torch.autocast("cuda", dtype=torch.float16), True


def _train(
    *,
    teacher: Teacher,
    student: nn.Module,
    method: str,
    preset: Preset,
    dev: torch.device,
    time_budget: float | None,
    total_iters: int | None,
    paper_total: int | None,
    eval_data: EvalData | None,
    eval_every: int | None,
    eval_interval_s: float | None,
    checkpoint_path: Path | None,
    checkpoint_every_s: float,
    resume: bool,
    progress: bool,
    history_path: str | Path | None,
    features: dict[str, torch.Tensor] | None,
    on_iteration: Callable[[int], None] | None,
) -> DistillResult:
    from tqdm.auto import tqdm

    tmod = teacher.module
    shape = tuple(teacher.input_shape)
    student.to(dev).train()
    generator = None
    opt_g = None
    if method == "dafl":
        generator = make_generator(shape, preset.latent_dim, preset.gen_width).to(dev).train()
        opt_g = torch.optim.Adam(generator.parameters(), lr=preset.gen_lr)
    opt_s = _make_student_optimizer(preset, student)
    autocast_ctx, fp16 = _autocast(dev)
    scaler_g = torch.amp.GradScaler("cuda", enabled=fp16)
    scaler_s = torch.amp.GradScaler("cuda", enabled=fp16)

    iteration = 0
    elapsed_before = 0.0
    history: list[dict[str, Any]] = []
    micro = preset.batch_size  # micro-batch; halved on CUDA OOM, gradients accumulated
    saved_pool: list = []
    if resume:
        try:
            state = torch.load(checkpoint_path, map_location=dev, weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is a user problem
            raise DaflError(f"cannot resume: {checkpoint_path} is unreadable ({error})") from None
        for key, value in (("method", method), ("preset", preset.name)):
            if state.get(key) != value:
                raise DaflError(
                    f"cannot resume: checkpoint {checkpoint_path} is for {key} "
                    f"{state.get(key)}, not {value}"
                )
        student.load_state_dict(state["student"])
        opt_s.load_state_dict(state["opt_s"])
        if generator is not None:
            generator.load_state_dict(state["generator"])
            opt_g.load_state_dict(state["opt_g"])
        scaler_g.load_state_dict(state["scaler_g"])
        scaler_s.load_state_dict(state["scaler_s"])
        iteration = state["iteration"]
        elapsed_before = state["elapsed_s"]
        history = list(state["history"])
        micro = min(state.get("micro_batch", micro), preset.batch_size)
        _set_rng_state(state["rng"])
        saved_pool = state.get("pool") or []

    def checkpoint(elapsed: float) -> None:
        if checkpoint_path is None:
            return
        _atomic_save(
            {
                "format": "dafl-compress-checkpoint-v1",
                "method": method,
                "preset": preset.name,
                "batch_size": preset.batch_size,
                "micro_batch": micro,
                "student": student.state_dict(),
                "opt_s": opt_s.state_dict(),
                "generator": generator.state_dict() if generator is not None else None,
                "opt_g": opt_g.state_dict() if opt_g is not None else None,
                "scaler_g": scaler_g.state_dict(),
                "scaler_s": scaler_s.state_dict(),
                "schedule": {"total_iters": total_iters, "time_budget": time_budget},
                "iteration": iteration,
                "elapsed_s": elapsed,
                "history": history,
                "rng": _rng_state(),
                "pool": list(pool),  # recent generated batches (student steps draw from them)
            },
            checkpoint_path,
        )

    teacher_accuracy = evaluate(tmod, eval_data, device=dev) if eval_data is not None else None
    student.train()
    num_classes = teacher.num_outputs

    # Evaluate ~10 times per run: every N iterations when the length is known, else by time.
    if eval_data is not None and eval_every is None and eval_interval_s is None:
        if total_iters is not None:
            eval_every = max(1, total_iters // 10)
        elif time_budget is not None:
            eval_interval_s = time_budget / 10

    def progress_of(it: int, elapsed: float) -> float:
        if not preset.fit_schedule_to_budget:
            return it / paper_total if paper_total else 0.0
        fractions = [0.0]
        if total_iters:
            fractions.append(it / total_iters)
        if time_budget:
            fractions.append(elapsed / time_budget)
        return max(fractions)

    def set_lrs(fraction: float) -> None:
        factor = lr_factor(preset.schedule, fraction)
        for group in opt_s.param_groups:
            group["lr"] = preset.student_lr * factor
        if opt_g is not None and preset.schedule_generator:
            for group in opt_g.param_groups:
                group["lr"] = preset.gen_lr * factor

    bar = tqdm(
        total=total_iters,
        initial=iteration,
        disable=not progress,
        desc=f"{method}/{preset.name}",
        unit="it",
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    last_checkpoint = start
    last_eval_time = elapsed_before
    iter_time = 0.0  # running estimate, to stop before the budget is exceeded
    warned_collapse = warned_oom = False
    stop_reason = ""
    accuracy = None

    def generator_step(chunks: int) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        xs, ts = [], []
        sums = {"loss_oh": 0.0, "loss_ie": 0.0, "loss_a": 0.0}
        if generator is None:  # noise baseline: N(0, 1) inputs, teacher outputs as targets
            for _ in range(chunks):
                x = torch.randn(micro, *shape, device=dev)
                with torch.no_grad(), autocast_ctx:
                    ts.append(tmod(x).float())
                xs.append(x)
            return xs, ts, {"loss_oh": None, "loss_ie": None, "loss_a": None}
        opt_g.zero_grad(set_to_none=True)
        for _ in range(chunks):
            z = torch.randn(micro, preset.latent_dim, device=dev)
            with autocast_ctx:
                x = generator(z)
                logits = tmod(x).float()
            l_oh = one_hot_loss(logits)
            l_ie = information_entropy_loss(logits, preset.entropy_base)
            loss = preset.w_oh * l_oh + preset.w_ie * l_ie
            l_a = None
            if features is not None:
                l_a = activation_loss(features.pop("x").float())
                loss = loss + preset.w_a * l_a
            scaler_g.scale(loss / chunks).backward()
            xs.append(x.detach())
            ts.append(logits.detach())
            sums["loss_oh"] += l_oh.item() / chunks
            sums["loss_ie"] += l_ie.item() / chunks
            if l_a is not None:
                sums["loss_a"] += l_a.item() / chunks
        scaler_g.step(opt_g)
        scaler_g.update()
        if features is None:
            sums["loss_a"] = None
        return xs, ts, sums

    # The pool lives on the training device: cap it so large inputs still fit a 4 GB GPU.
    batch_bytes = preset.batch_size * math.prod(shape) * 4
    pool_size = max(1, min(preset.pool_size, POOL_MEMORY_BYTES // batch_bytes))
    pool: deque = deque(saved_pool, maxlen=pool_size)

    def student_steps() -> float:
        total = 0.0
        for step in range(preset.student_steps):
            # the first step on the newest batch, then random ones from the pool
            xs, ts = pool[-1] if step == 0 else pool[random.randrange(len(pool))]
            opt_s.zero_grad(set_to_none=True)
            for x, t in zip(xs, ts):
                with autocast_ctx:
                    out = student(x)
                loss = kd_loss(out, t, preset.kd_temperature) / len(xs)
                scaler_s.scale(loss).backward()
                total += loss.item()
            scaler_s.step(opt_s)
            scaler_s.update()
        return total / preset.student_steps

    # Thread calibration (CPU, cpu_threads="auto"): iterations 2-3 run with all cores, 4-5 with
    # one; the faster setting is kept. Measured: with another process busy on a 2-core machine,
    # 2 OpenMP threads were up to 5x slower than 1 for these small convolutions.
    calibrate = dev.type == "cpu" and preset.cpu_threads == "auto" and (os.cpu_count() or 1) > 1
    thread_times: dict[int, float] = {}
    first_iteration = iteration

    try:
        while True:
            if calibrate:
                done = iteration - first_iteration
                if done == 3:
                    torch.set_num_threads(1)
                elif done == 5:
                    best = min(thread_times, key=thread_times.get)
                    torch.set_num_threads(best)
                    calibrate = False
            elapsed = elapsed_before + time.perf_counter() - start
            if total_iters is not None and iteration >= total_iters:
                stop_reason = "iterations"
                break
            if time_budget is not None and elapsed + iter_time > time_budget:
                stop_reason = "time budget"
                break
            t0 = time.perf_counter()
            set_lrs(progress_of(iteration, elapsed))
            chunks = math.ceil(preset.batch_size / micro)
            try:
                xs, ts, losses = generator_step(chunks)
                pool.append((xs, ts))
                losses["loss_kd"] = student_steps()
            except torch.cuda.OutOfMemoryError:
                if micro <= 1:
                    raise DaflError("out of GPU memory even at micro-batch 1") from None
                micro = max(1, micro // 2)
                for index in range(len(pool)):  # the pooled batches in smaller chunks too
                    xs, ts = pool[index]
                    pool[index] = ([*torch.cat(xs).split(micro)], [*torch.cat(ts).split(micro)])
                torch.cuda.empty_cache()
                if not warned_oom:
                    warnings.warn(
                        f"CUDA out of memory: using micro-batches of {micro} and accumulating "
                        f"gradients to keep the batch of {preset.batch_size}",
                        stacklevel=2,
                    )
                    warned_oom = True
                continue
            iteration += 1
            values = [v for v in losses.values() if v is not None]
            if not all(math.isfinite(v) for v in values):
                raise DaflError(
                    f"loss became NaN at iteration {iteration}; lower the learning rate or "
                    "batch size"
                )
            if method == "dafl" and not warned_collapse and iteration >= 100 and num_classes > 1:
                counts = torch.bincount(torch.cat(ts).argmax(1), minlength=num_classes)
                if counts.max().item() > 0.9 * counts.sum().item():
                    warnings.warn(
                        f"generated samples collapsed to one teacher class at iteration "
                        f"{iteration}; try a larger entropy weight or another seed",
                        stacklevel=2,
                    )
                    warned_collapse = True
            now = time.perf_counter()
            step_time = now - t0
            if calibrate and iteration - first_iteration >= 2:  # the first one is warm-up
                threads = torch.get_num_threads()
                thread_times[threads] = thread_times.get(threads, 0.0) + step_time
            if iteration - first_iteration == 1:  # a slow warm-up: count half of it
                iter_time = 0.5 * step_time
            elif iteration - first_iteration == 2:
                iter_time = step_time
            else:
                iter_time = 0.8 * iter_time + 0.2 * step_time
            elapsed = elapsed_before + now - start
            accuracy = None
            due = (eval_every is not None and iteration % eval_every == 0) or (
                eval_interval_s is not None and elapsed - last_eval_time >= eval_interval_s
            )
            if eval_data is not None and due:
                accuracy = evaluate(student, eval_data, device=dev)
                student.train()
                last_eval_time = elapsed
                elapsed = elapsed_before + time.perf_counter() - start
            history.append({"iteration": iteration, "elapsed_s": round(elapsed, 4), **losses,
                            "accuracy": accuracy})  # fmt: skip
            if bar.total is None and time_budget and iteration == 5:
                # Estimate the run's length from the measured speed, for the progress bar.
                bar.total = iteration + int((time_budget - elapsed) / max(iter_time, 1e-6))
            bar.update(1)
            if iteration % 10 == 0 or accuracy is not None:
                postfix = {k[5:]: f"{v:.3f}" for k, v in losses.items() if v is not None}
                if accuracy is not None:
                    postfix["acc"] = f"{accuracy:.4f}"
                bar.set_postfix(postfix, refresh=False)
            if checkpoint_path is not None and now - last_checkpoint >= checkpoint_every_s:
                checkpoint(elapsed)
                last_checkpoint = time.perf_counter()
            if on_iteration is not None:
                on_iteration(iteration)
    except KeyboardInterrupt:
        bar.close()
        elapsed = elapsed_before + time.perf_counter() - start
        # The interrupted iteration may be half applied; it is simply redone after --resume.
        if history_path is not None:
            write_history_csv(history, history_path)
        if checkpoint_path is not None:
            checkpoint(elapsed)
            raise DistillInterrupted(
                f"interrupted at iteration {iteration}; checkpoint saved to {checkpoint_path}: "
                "rerun the same command with --resume to continue"
            ) from None
        raise DistillInterrupted(
            f"interrupted at iteration {iteration}; no checkpoint (give --checkpoint-dir to be "
            "able to resume)"
        ) from None
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - start
    checkpoint(elapsed)

    student_accuracy = None
    if eval_data is not None:
        student_accuracy = evaluate(student, eval_data, device=dev)
        if history and history[-1]["accuracy"] is None:
            history[-1]["accuracy"] = student_accuracy
    if history_path is not None:
        write_history_csv(history, history_path)
    student.cpu().eval()
    if generator is not None:
        generator.cpu().eval()
    return DistillResult(
        student=student,
        history=history,
        iterations=iteration,
        elapsed_s=elapsed,
        device=str(dev),
        method=method,
        preset=preset.name,
        batch_size=preset.batch_size,
        generator=generator,
        teacher_accuracy=teacher_accuracy,
        student_accuracy=student_accuracy,
        interrupted=False,
        stop_reason=stop_reason,
    )

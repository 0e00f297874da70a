"""Stage 4: data-free distillation of a teacher into a student.

``distill`` builds a ``Trainer``: one loop over a training state, with the method (which makes
the inputs: methods/), the replay pool, the stop policy, threads, checkpoints and progress
(training.py), the recipe sized to the device (recipe.py) and the health checks (health.py).
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.distill import distributed
from compress_toolbox.distill.health import CollapseGuard, GenerationCollapsed, Health, measure
from compress_toolbox.distill.methods import get_method
from compress_toolbox.distill.methods.auto import choose_method
from compress_toolbox.distill.methods.base import Method, MethodContext
from compress_toolbox.distill.parts import (
    Checkpointer,
    Progress,
    ReplayPool,
    StopPolicy,
    ThreadChooser,
    lr_factor,
    module_digest,
    rng_state,
    set_rng_state,
)
from compress_toolbox.distill.presets import PRESETS, Preset, get_preset
from compress_toolbox.distill.recipe import (
    Recipe,
    activation_bytes,
    fit_batch_to_memory,
    size_recipe,
)
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, DaflWarning, TrainingFailed, first_line
from compress_toolbox.limits import available_memory
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.tasks import get_task
from compress_toolbox.tasks.evaldata import EvalData, evaluate, predict, score

__all__ = ["PRESETS", "DistillOptions", "DistillResult", "Preset", "distill", "lr_factor"]

CHECKPOINT_NAME = "dafl_checkpoint.pt"


class DistillInterrupted(DaflError):
    """Training was interrupted (Ctrl-C or SIGTERM); a checkpoint was written if possible."""

    exit_code = 130


@dataclass
class DistillOptions:
    """How to train. Every field is checked by ``validate`` before any work starts."""

    method: str = "auto"  # a registered method name (methods/) or "auto"
    task: str = "classification"  # tasks.py: what the teacher's output means
    preset: str | Preset = "fast"
    device: str | None = None  # None/"auto": cuda when available, else cpu
    time_budget: float | None = None  # seconds of training
    iters: int | None = None
    epochs: int | None = None  # x preset.iters_per_epoch iterations
    batch_size: int | None = None
    seed: int = 0
    threads: int | None = None  # CPU threads; None: the preset's choice
    fine_tune: bool = False  # the student starts from the teacher's weights
    domain: InputDomain = field(default_factory=InputDomain)
    checkpoint_dir: Path | None = None
    checkpoint_every_s: float = 60.0
    resume: bool = False
    progress: bool = True
    history_path: Path | None = None
    eval_every: int | None = None  # evaluate every N iterations ...
    eval_interval_s: float | None = None  # ... or every N seconds (default: ~10 per run)
    health_every: int = 10  # iterations between health checks

    def validate(self) -> Preset:
        """Raise DaflError for any bad value; return the resolved preset."""
        preset = get_preset(self.preset).check()
        get_task(self.task)
        if self.method != "auto":
            get_method(self.method)
        if self.batch_size is not None and self.batch_size < 2:
            raise DaflError(f"batch size must be at least 2 (BatchNorm), got {self.batch_size}")
        for name in ("time_budget", "iters", "epochs", "threads"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise DaflError(f"{name.replace('_', ' ')} must be a positive number, got {value}")
        if sum(v is not None for v in (self.time_budget, self.iters, self.epochs)) > 1:
            raise DaflError("give at most one of time budget, iterations and epochs")
        resolve_device(self.device)
        return preset


@dataclass
class DistillResult:
    """What ``distill`` returns. ``student`` is the last one trained (never selected on labels)."""

    student: nn.Module
    history: list[dict[str, Any]]
    iterations: int
    elapsed_s: float
    device: str
    method: str
    method_reason: str
    preset: str
    recipe: Recipe
    generator: nn.Module | None = None
    sampler: Callable[[int], torch.Tensor] | None = None  # fresh generated inputs
    teacher_accuracy: float | None = None  # on the whole evaluation set
    student_accuracy: float | None = None  # likewise (the curve in history uses a subset)
    teacher_predictions: torch.Tensor | None = None  # top-1 classes on the evaluation set
    stop_reason: str = ""
    health: Health | None = None  # the last check
    restarts: int = 0  # generator restarts after collapses
    num_classes: int = 0  # the teacher's output classes
    world_size: int = 1  # ranks that trained together (global batch = world_size x batch)

    @property
    def batch_size(self) -> int:
        return self.recipe.batch_size


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


def write_history_csv(history: list[dict[str, Any]], path: str | Path) -> None:
    """One row per iteration: iteration, elapsed_s, the method's losses, loss_kd, accuracy and,
    where a health check ran, its figures (empty cells elsewhere)."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in columns})


def _autocast_factory(dev: torch.device):
    """bf16 autocast on CUDA when supported, else none (fp16 would need loss scaling; CPU
    autocast measured slower for these small convs)."""
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def _make_student_optimizer(preset: Preset, student: nn.Module, lr: float):
    if preset.student_optimizer == "adam":
        return torch.optim.Adam(student.parameters(), lr=lr, weight_decay=preset.weight_decay)
    if preset.student_optimizer == "sgd":
        return torch.optim.SGD(
            student.parameters(),
            lr=lr,
            momentum=preset.momentum,
            weight_decay=preset.weight_decay,
        )
    raise DaflError(f"unknown student optimizer {preset.student_optimizer!r}")


class Trainer:
    """Trains a student from a method's generated inputs: per iteration one generator step, then
    ``recipe.student_steps`` KD steps on pooled batches; health checks, evaluation, checkpoints
    and progress around it. ``run`` is the whole loop."""

    def __init__(self, teacher: Teacher, student: nn.Module, options: DistillOptions,
                 eval_data: EvalData | None = None,
                 on_iteration: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.preset = options.validate()
        self.options = options
        self.task = get_task(options.task)
        self.teacher = teacher
        self.student = student
        self.eval_data = eval_data
        self.on_iteration = on_iteration
        self.world = distributed.init_from_env(options.device)
        self.device = self.world.device(resolve_device(options.device))
        self.stop = self._stop_policy()
        self.checkpointer = Checkpointer(  # rank 0 alone reads and writes checkpoints
            Path(options.checkpoint_dir) / CHECKPOINT_NAME
            if options.checkpoint_dir and self.world.is_writer
            else None,
            options.checkpoint_every_s,
        )
        if options.resume and self.world.is_writer and (self.checkpointer.path is None
                               or not self.checkpointer.path.is_file()):  # fmt: skip
            raise DaflError(f"cannot resume: no checkpoint at {self.checkpointer.path}")
        self.recipe = Recipe.from_preset(self.preset, options.batch_size)
        self.history: list[dict[str, Any]] = []
        self.iteration = 0
        self.elapsed_before = 0.0
        self.guard = CollapseGuard()
        self.last_health: Health | None = None
        self.method: Method | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _stop_policy(self) -> StopPolicy:
        options, preset = self.options, self.preset
        total, budget = options.iters, options.time_budget
        if total is None and options.epochs is not None:
            total = options.epochs * preset.iters_per_epoch
        if total is None and budget is None:
            if preset.default_time_budget is not None:
                budget = preset.default_time_budget
            else:
                total = (preset.epochs or 1) * preset.iters_per_epoch
        # Paper presets follow their own schedule length (truncated by a budget); fast fits its
        # schedule to whatever bounds the run.
        length = (preset.epochs or 0) * preset.iters_per_epoch or total
        return StopPolicy(total, budget, length, preset.fit_schedule_to_budget)

    def _context(self) -> MethodContext:
        analysis = self.teacher.analysis
        return MethodContext(
            teacher=self.teacher.module,
            student=self.student,
            input_shape=tuple(self.teacher.input_shape),
            num_classes=self.num_classes,
            domain=self.options.domain,
            preset=self.preset,
            device=self.device,
            final_layer=analysis.final_layer if analysis else None,
            autocast=_autocast_factory(self.device),
            task=self.task,
        )

    def _make_method(self, ctx: MethodContext) -> tuple[Method, str]:
        name, reason = self.options.method, "chosen with --method"
        if name == "auto":
            name, reason = choose_method(ctx)
        method_class = get_method(name)
        unavailable = method_class.unavailable_reason(ctx)
        if unavailable:
            raise DaflError(f"method {name} cannot run on this teacher: {unavailable}")
        return method_class(ctx), reason

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self, elapsed: float) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "preset": self.preset.name,
            "teacher": self.teacher_digest,
            "student": self.student.state_dict(),
            "student_optimizer": self.optimizer.state_dict(),
            "method_state": self.method.state_dict(),
            "guard": self.guard.state_dict(),
            "iteration": self.iteration,
            "elapsed_s": elapsed,
            "history": self.history,
            "rng": rng_state(),
            "pool": self.pool.state(),
            "batch_size": self.recipe.batch_size,
            "student_steps": self.recipe.student_steps,
        }

    def _restore(self) -> None:
        expect = {"method": self.method.name, "preset": self.preset.name,
                  "teacher": self.teacher_digest}  # fmt: skip
        state = None
        if self.world.is_writer:  # the others get rank 0's copy (their machine may have none)
            where = torch.device("cpu") if self.world.active else self.device
            state = self.checkpointer.load(where, expect)
        state = self.world.broadcast_object(state)
        path = self.checkpointer.path or "rank 0's checkpoint"
        try:
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["student_optimizer"])
            self.method.load_state_dict(state["method_state"])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            first = first_line(error)
            raise DaflError(f"cannot resume: {path} does not fit this student ({first})") from None
        self.guard.load_state_dict(state["guard"])
        self.iteration = int(state["iteration"])
        self.elapsed_before = float(state["elapsed_s"])
        self.history = list(state["history"])
        self.recipe = replace(self.recipe, batch_size=int(state["batch_size"]),
                              student_steps=int(state["student_steps"]))  # fmt: skip
        self.pool.load(state["pool"], self.device)
        set_rng_state(state["rng"])

    # -- one iteration ----------------------------------------------------------------------
    def _set_learning_rates(self, elapsed: float) -> None:
        factor = lr_factor(self.preset.schedule, self.stop.progress(self.iteration, elapsed))
        for group in self.optimizer.param_groups:
            group["lr"] = self.student_lr * factor
        if self.preset.schedule_generator and self.method.generator is not None:
            for group in self.method.optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor

    def _student_step(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> float:
        with self.autocast():
            out = self.student(x)
        loss = self.task.distillation_loss(out, teacher_logits, self.preset.kd_temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def _iteration(self) -> tuple[dict[str, float], float, float]:
        """One generator step and the student steps: (losses, generator s, student s)."""
        t0 = time.perf_counter()
        batch = self.method.generate(self.recipe.batch_size)
        self.pool.add(batch.x, batch.teacher_logits)
        t1 = time.perf_counter()
        kd = self._student_step(*self.pool.newest())  # the newest batch first, then the pool
        for _ in range(self.recipe.student_steps - 1):
            kd += self._student_step(*self.pool.draw())
        t2 = time.perf_counter()
        losses = {f"loss_{name}": value for name, value in batch.losses.items()}
        losses["loss_kd"] = kd / self.recipe.student_steps
        return losses, t1 - t0, (t2 - t1) / self.recipe.student_steps

    def _on_out_of_memory(self) -> None:
        if self.recipe.batch_size <= 2:
            raise TrainingFailed("out of GPU memory even at batch 2; use --device cpu")
        self.recipe = replace(self.recipe, batch_size=self.recipe.batch_size // 2)
        self.pool.rebatch(self.recipe.batch_size)
        torch.cuda.empty_cache()
        warnings.warn(f"CUDA out of memory: continuing at batch {self.recipe.batch_size}",
                      DaflWarning, stacklevel=2)  # fmt: skip

    def _measure_health(self) -> Health:
        # every rank judges the same global sample: the collapse verdict is agreed
        x = self.world.all_gather_cat(self.method.sample(self.task.health_samples))
        self.last_health = measure(self.teacher.module, self.student, x, self.iteration,
                                   self.num_classes)  # fmt: skip
        return self.last_health

    def _check_health(self) -> Health:
        """Measure, and answer a collapse by restarting the generator or giving up."""
        health = self._measure_health()
        verdict = self.guard.judge(health)
        if verdict == "restart":
            warnings.warn(
                f"generated inputs collapsed at iteration {self.iteration} "
                f"({health.short()}): restarting the generator",
                category=DaflWarning,
                stacklevel=2,
            )
            self.method.restart()
            self._share_generator()
        elif verdict == "fail":
            raise GenerationCollapsed(
                f"the generated inputs collapsed onto {health.classes} of the teacher's "
                f"{self.num_classes} classes (normalised entropy {health.class_entropy:.2f}) "
                f"and stayed so after {self.guard.restarts} generator restarts; no usable "
                f"student. Check that the teacher is a working classifier (here it answers "
                f"mean confidence {health.teacher_confidence:.2f}), or try another --method "
                "or --seed"
            )
        return health

    def _fit_memory(self) -> None:
        """Shrink the batch (or refuse) when one iteration would not fit the device's memory:
        generator, teacher (with input gradients) and student activations, twice for the
        backward pass."""
        shape = tuple(self.teacher.input_shape)

        def on(module):
            x = torch.zeros(2, *shape, device=self.device)
            return activation_bytes(module, lambda: module.eval()(x), 2)

        student_mode = self.student.training
        per_sample = 2 * (on(self.teacher.module) + on(self.student))
        self.student.train(student_mode)
        if self.method.generator is not None:
            generator = self.method.generator
            per_sample += 2 * activation_bytes(generator, lambda: self.method.sample(2), 2)
        free = available_memory(self.device)
        self.recipe = fit_batch_to_memory(self.recipe, per_sample, free, shape)

    def _try_channels_last(self) -> bool:
        """Put teacher, student and generator in channels-last memory format (measured 18-33%
        faster student steps on a CPU: benchmarks/bench_speedups.py); revert when either model
        cannot run that way (a ``.view`` in user code) or computes anything else."""
        if not self.preset.channels_last or len(self.teacher.input_shape) != 3:
            return False
        modules = (self.teacher.module, self.student)
        x = torch.rand(2, *self.teacher.input_shape, device=self.device)
        try:
            with torch.no_grad():
                before = [m.eval()(x) for m in modules]
                for module in modules:
                    module.to(memory_format=torch.channels_last)
                after = [m(x.contiguous(memory_format=torch.channels_last)) for m in modules]
            same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(before, after))
        except Exception:  # noqa: BLE001 - any failure: stay with the default layout
            same = False
        self.student.train()
        if not same:
            for module in modules:
                module.to(memory_format=torch.contiguous_format)
        elif self.method.generator is not None:  # measured 17-38% faster generator steps too
            self.method.ctx.channels_last = True
            self.method.generator.to(memory_format=torch.channels_last)
        return same

    def _plan(self, generate_s: float, student_s: float, elapsed: float) -> None:
        """Size the recipe from measured step times (once the thread choice has settled)."""
        remaining = None
        if self.stop.time_budget is not None:
            remaining = self.stop.time_budget - elapsed
        self.recipe = size_recipe(self.recipe, generate_s, student_s, remaining,
                                  adapt=self.preset.size_to_budget)  # fmt: skip
        self.recipe.sized_by = "timings (time budget)" if remaining is not None else "counts"
        if remaining is None and self.stop.total_iters is not None:
            self.recipe.expected_iterations = self.stop.total_iters
        self.recipe = self.world.broadcast_object(self.recipe)  # timings differ by rank
        self.progress.line(self.iteration, elapsed, {"plan": self.recipe.describe()})
        if self.recipe.expected_iterations:
            self.progress.set_total(self.iteration + self.recipe.expected_iterations)
            self.guard.set_warmup(self.iteration + self.recipe.expected_iterations)
        if self.recipe.warning:
            warnings.warn(self.recipe.warning, DaflWarning, stacklevel=2)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> DistillResult:
        """Train until the stop policy says so; return the result (student on the CPU)."""
        torch.manual_seed(self.options.seed)
        module = self.teacher.module
        grad_flags = [p.requires_grad for p in module.parameters()]
        home = next((p.device for p in module.parameters()), torch.device("cpu"))
        threads_before = torch.get_num_threads()
        module.to(self.device).eval().requires_grad_(False)  # frozen: input gradients only
        try:
            self.num_classes = self.task.check_output(
                module, self.teacher.input_shape, self.device)  # fmt: skip
            self.student.to(self.device)
            self.teacher_digest = module_digest(module)  # checkpoints name their teacher
            self.world.check_same(self.teacher_digest, "teacher")
            self.world.broadcast_module(self.student, "student")
            distributed.sync_batchnorm(self.student)
            ctx = self._context()
            self.method, self.method_reason = self._make_method(ctx)
            self._share_generator()
            self.channels_last = self._try_channels_last()
            try:
                with distributed.collective_errors():
                    return self._train()
            finally:
                distributed.unsync_batchnorm(self.student)
                if self.method.generator is not None:
                    distributed.unsync_batchnorm(self.method.generator)
                self.method.close()
                if self.channels_last:
                    self.student.to(memory_format=torch.contiguous_format)
        finally:
            module.to(memory_format=torch.contiguous_format)
            for param, flag in zip(module.parameters(), grad_flags):
                param.requires_grad_(flag)
            module.to(home)
            torch.set_num_threads(threads_before)

    def _share_generator(self) -> None:
        """Every rank starts from rank 0's generator, with global BatchNorm statistics and
        gradients averaged over the ranks (after each restart too)."""
        if self.method.generator is None:
            return
        self.world.broadcast_module(self.method.generator, "generator")
        distributed.sync_batchnorm(self.method.generator)
        distributed.average_gradients(self.method.optimizer)

    def _train(self) -> DistillResult:
        self._prepare()
        stop_reason = ""
        try:
            with distributed.deferred_signals() as signals:
                while True:
                    self.threads.before(self.iteration - self.first_iteration)
                    stop, signum, save = self.world.vote(
                        self.stop.reason_to_stop(self.iteration, self.elapsed()),
                        signals.received,
                        self.checkpointer.due(),
                    )  # one agreement per iteration: every rank stops and saves together
                    if signum:
                        raise distributed.Signalled(signum)
                    if save:
                        self.checkpointer.save(self._state(self.elapsed()))
                    if stop:
                        stop_reason = stop
                        break
                    self._step()
        except KeyboardInterrupt as interrupt:
            self.progress.close()
            self._interrupted(self.elapsed(), getattr(interrupt, "exit_code", None))
        finally:  # also on NaN or collapse: no half-drawn bar above the error line
            self.progress.close()
        return self._finish(stop_reason)

    def _prepare(self) -> None:
        """Student optimiser, replay pool, memory and thread choice, the teacher's answers on
        the evaluation data, the progress display: everything the loop needs."""
        self.student.to(self.device).train()
        self.autocast = _autocast_factory(self.device)
        self.student_lr = self.preset.student_lr
        if self.options.fine_tune and self.preset.student_lr_fine_tune is not None:
            self.student_lr = self.preset.student_lr_fine_tune
        self.optimizer = _make_student_optimizer(self.preset, self.student, self.student_lr)
        distributed.average_gradients(self.optimizer)
        outputs = self.teacher.analysis.output_shape if self.teacher.analysis else ()
        batch_bytes = (
            self.recipe.batch_size * (math.prod(self.teacher.input_shape) + math.prod(outputs)) * 4
        )  # inputs and logits
        self.pool = ReplayPool(self.recipe.pool_size, batch_bytes)
        self.recipe = replace(self.recipe, pool_size=self.pool.size)
        if self.options.resume:
            self._restore()
        else:
            self._fit_memory()
        self.recipe = self.world.broadcast_object(self.recipe)  # free memory differs by rank
        self.world.seed_rank(self.options.seed, self.iteration)
        self.threads = ThreadChooser(self.device, self.preset.cpu_threads, self.options.threads,
                                     race=self.stop.time_budget is not None)  # fmt: skip
        self.teacher_predictions = self.monitor = None
        if self.eval_data is not None:
            self.teacher_predictions = predict(self.teacher.module, self.eval_data,
                                               device=self.device)  # fmt: skip
            self.monitor = self.eval_data.subset(self.task.monitor_samples)
        self.eval_every, self.eval_interval_s = self._eval_schedule()
        self.progress = Progress(self.options.progress and self.world.is_writer,
                                 f"{self.method.name}/{self.preset.name}",
                                 self.stop.total_iters, self.iteration)  # fmt: skip
        self.first_iteration = self.iteration
        self.started = time.perf_counter()
        self.last_eval = self.elapsed_before
        self.planned = False

    def elapsed(self) -> float:
        """Seconds of training so far, over every session of a resumed run."""
        return self.elapsed_before + time.perf_counter() - self.started

    def _step(self) -> None:
        """One iteration and its bookkeeping: timing, plan, NaN check, history, health,
        evaluation, progress, checkpoint."""
        self._set_learning_rates(self.elapsed())
        t0 = time.perf_counter()
        try:
            losses, generate_s, student_s = self._iteration()
        except torch.cuda.OutOfMemoryError:
            self._on_out_of_memory()
            return
        self.iteration += 1
        done = self.iteration - self.first_iteration
        step_s = time.perf_counter() - t0
        self.stop.record(step_s, done)
        self.threads.after(done, step_s)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingFailed(
                f"a loss became NaN or infinite at iteration {self.iteration} "
                f"({', '.join(f'{k} {v:.3g}' for k, v in losses.items())}); try a "
                "lower learning rate, a smaller --batch-size or another --method"
            )
        if not self.planned and self.threads.settled and done >= 2:
            self._plan(generate_s, student_s, self.elapsed())
            self.planned = True
        row: dict[str, Any] = dict(losses)
        if self.iteration % self.options.health_every == 0:
            row.update(self._check_health().as_row())
        monitored = self._monitor_accuracy()
        elapsed = self.elapsed()
        self.history.append({"iteration": self.iteration, "elapsed_s": round(elapsed, 4), **row,
                             "accuracy": monitored})  # fmt: skip
        self.progress.update(self.iteration, elapsed, self._figures(losses, monitored))
        if self.on_iteration is not None:
            self.on_iteration(self.iteration)

    def _monitor_accuracy(self) -> float | None:
        """Student accuracy on the evaluation subset, when one is due (else None)."""
        if self.monitor is None:
            return None
        elapsed = self.elapsed()
        due = (self.eval_every is not None and self.iteration % self.eval_every == 0) or (
            self.eval_interval_s is not None and elapsed - self.last_eval >= self.eval_interval_s
        )
        if not due:
            return None
        self.last_eval = elapsed
        return evaluate(self.student, self.monitor, device=self.device)

    def _finish(self, stop_reason: str) -> DistillResult:
        """Last checkpoint, health and full evaluation; the result, student on the CPU."""
        self._check_student_finite()
        elapsed = self.elapsed()
        self.checkpointer.save(self._state(elapsed))
        if self.history:
            self.history[-1].update(self._measure_health().as_row())
        teacher_accuracy = student_accuracy = None
        if self.eval_data is not None:
            teacher_accuracy = score(self.teacher_predictions, self.eval_data.y)
            student_accuracy = evaluate(self.student, self.eval_data, device=self.device)
            if self.history and self.history[-1].get("accuracy") is None:
                self.history[-1]["accuracy"] = student_accuracy
        if self.options.history_path is not None and self.world.is_writer:
            write_history_csv(self.history, self.options.history_path)
        return self._result(elapsed, stop_reason, teacher_accuracy, student_accuracy)

    def _check_student_finite(self) -> None:
        """A last step can leave NaN weights behind finite losses: fail here, as training."""
        for name, tensor in [*self.student.named_parameters(), *self.student.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingFailed(
                    f"the student's {name} became NaN or infinite by iteration "
                    f"{self.iteration}; try a lower learning rate or another --method"
                )

    def _figures(self, losses: dict[str, float], accuracy: float | None) -> dict[str, str]:
        figures = {k[5:]: f"{v:.3f}" for k, v in losses.items()}
        if self.last_health is not None:
            figures["classes"] = str(self.last_health.classes)
            figures["agree"] = f"{self.last_health.agreement:.2f}"
        if accuracy is not None:
            figures["acc"] = f"{accuracy:.4f}"
        return figures

    def _eval_schedule(self) -> tuple[int | None, float | None]:
        """Evaluate ~10 times per run: every N iterations when the length is known, else by
        time; explicit options win."""
        every, interval = self.options.eval_every, self.options.eval_interval_s
        if self.eval_data is None or every is not None or interval is not None:
            return every, interval
        if self.stop.total_iters is not None:
            return max(1, self.stop.total_iters // 10), None
        return None, (self.stop.time_budget or 0) / 10 or None

    def _interrupted(self, elapsed: float, exit_code: int | None = None) -> None:
        # The interrupted iteration may be half applied; it is simply redone after --resume.
        if self.options.history_path is not None and self.world.is_writer:
            write_history_csv(self.history, self.options.history_path)
        if self.checkpointer.path is not None:
            self.checkpointer.save(self._state(elapsed))
            error = DistillInterrupted(
                f"interrupted at iteration {self.iteration}; checkpoint saved to "
                f"{self.checkpointer.path}: rerun the same command with --resume to continue"
            )
        elif not self.world.is_writer:
            error = DistillInterrupted(
                f"interrupted at iteration {self.iteration} (rank {self.world.rank}; rank 0 "
                "saves the checkpoint)"
            )
        else:
            error = DistillInterrupted(
                f"interrupted at iteration {self.iteration}; no checkpoint (give a checkpoint "
                "folder to be able to resume)"
            )
        if exit_code is not None:  # SIGTERM agreed among ranks: 143, as a plain SIGTERM
            error.exit_code = exit_code
        raise error from None

    def _result(self, elapsed, stop_reason, teacher_accuracy, student_accuracy) -> DistillResult:
        self.student.cpu().eval()
        generator = self.method.generator
        if generator is not None:
            generator.cpu().eval()
        self.method.ctx.device = torch.device("cpu")
        return DistillResult(
            student=self.student,
            history=self.history,
            iterations=self.iteration,
            elapsed_s=elapsed,
            device=str(self.device),
            method=self.method.name,
            method_reason=self.method_reason,
            preset=self.preset.name,
            recipe=self.recipe,
            generator=generator,
            sampler=self.method.sample,
            teacher_accuracy=teacher_accuracy,
            student_accuracy=student_accuracy,
            teacher_predictions=self.teacher_predictions,
            stop_reason=stop_reason,
            health=self.last_health,
            restarts=self.guard.restarts,
            num_classes=self.num_classes,
            world_size=self.world.size,
        )


def distill(
    teacher: Teacher,
    student: nn.Module,
    options: DistillOptions | None = None,
    *,
    eval_data: EvalData | None = None,
    on_iteration: Callable[[int], None] | None = None,
    **changes: Any,
) -> DistillResult:
    """Train ``student`` (in place) to mimic ``teacher`` without data.

    ``options`` (a ``DistillOptions``) or keyword arguments naming its fields (``method``,
    ``preset``, ``time_budget``, ``iters``, ...) say how; with no budget the preset's default
    (the full paper schedule, or the fast preset's 120 s). ``eval_data`` is for monitoring and
    the result's accuracy only, never for training. ``on_iteration`` is called after each
    iteration with its number. Raises DaflError for bad options, TrainingFailed when training
    produces no usable student, DistillInterrupted on Ctrl-C (after saving a checkpoint).
    """
    options = options or DistillOptions()
    known = {f.name for f in fields(DistillOptions)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"distill() got unknown option(s): {', '.join(unknown)}")
    options = replace(options, **changes)
    return Trainer(teacher, student, options, eval_data, on_iteration).run()

"""Stage 4: data-free distillation of a teacher into a student.

``distill`` builds a ``Trainer``: one loop over a training state, with the method (which makes
the inputs: methods/), the replay pool, the stop policy, threads, checkpoints and progress
(parts.py), the recipe sized to the device (recipe.py; planning.py decides when) and the
health checks (health.py).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.distillation import distributed
from compress_toolbox.distillation.environment import (
    autocast_factory,
    check_finite,
    denormals_flushed,
    iteration_bytes_per_sample,
    try_channels_last,
)
from compress_toolbox.distillation.evaluation import Evaluation
from compress_toolbox.distillation.health import CollapseGuard, Health, measure, progress_figures
from compress_toolbox.distillation.methods import get_method
from compress_toolbox.distillation.methods.auto import choose_method
from compress_toolbox.distillation.methods.base import Method, MethodContext
from compress_toolbox.distillation.optimizers import make_student_optimizer
from compress_toolbox.distillation.options import (
    DistillOptions,
    DistillResult,
    WarmStart,
    interruption,
    resolve_device,
    with_note,
    write_history_csv,
)
from compress_toolbox.distillation.parts import (
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
from compress_toolbox.distillation.planning import Planner
from compress_toolbox.distillation.recipe import Recipe, fit_batch_to_memory
from compress_toolbox.errors import DaflError, DaflWarning, TrainingFailed, first_line
from compress_toolbox.limits import available_memory
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.tasks import get_task
from compress_toolbox.tasks.evaldata import EvalData

CHECKPOINT_NAME = "dafl_checkpoint.pt"
RESERVE_SHARE = 0.25  # of a time budget, at most, kept for evaluation outside iterations
# iterations after warm-up and the thread choice whose median step times make the plan: from
# one, the README demo made 115% of its plan and a test run 134%
PLAN_PROBES = 3


class Trainer:
    """Trains a student from a method's generated inputs: per iteration one generator step, then
    ``recipe.student_steps`` KD steps on pooled batches; health checks, evaluation, checkpoints
    and progress around it. ``run`` is the whole loop."""

    def __init__(self, teacher: Teacher, student: nn.Module, options: DistillOptions,
                 eval_data: EvalData | None = None,
                 on_iteration: Callable[[int], None] | None = None,
                 warm_start: WarmStart | None = None) -> None:  # fmt: skip
        self.preset = options.validate()
        self.preset_changes = self.preset.changes()  # what the report and checkpoints state
        self.warm_start = warm_start
        self.options = options
        self.task = get_task(options.task)
        self.teacher = teacher
        self.student = student
        self.eval_data = eval_data
        self.on_iteration = on_iteration
        self.world = distributed.init_from_env(options.device)
        self.device = self.world.device(resolve_device(options.device))
        self.stop = StopPolicy.for_run(options.iters, options.epochs, options.time_budget,
                                       self.preset)  # fmt: skip
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
            autocast=autocast_factory(self.device),
            task=self.task,
            student_from_teacher=self.options.fine_tune,
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
            "preset_changes": self.preset_changes,
            "teacher": self.teacher_digest,
            "student": self.student.state_dict(),
            "student_optimizer": self.optimizer.state_dict(),
            "method_state": self.method.state_dict(),
            "method_weights": asdict(self.method.weights),
            "student_rates": [self.student_lr, self.student_decay],
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
                  "preset_changes": self.preset_changes,
                  "teacher": self.teacher_digest}  # fmt: skip
        state = None
        if self.world.is_writer:  # the others get rank 0's copy (their machine may have none)
            where = torch.device("cpu") if self.world.active else self.device
            state = self.checkpointer.load(where, expect)
        state = self.world.broadcast_object(state)
        path = self.checkpointer.path or "rank 0's checkpoint"
        self._check_settings(state, path)
        try:
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["student_optimizer"])
            for group in self.optimizer.param_groups:  # an older checkpoint's: this run's
                group["weight_decay"] = self.student_decay
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

    def _check_settings(self, state: dict[str, Any], path: Path | str) -> None:
        """DaflError naming each setting the checkpoint at ``path`` trained with that differs
        from this run's: the method's loss weights, the student's learning rate and weight
        decay (one the checkpoint does not record, being older than it, is not compared).
        Those that follow where the student starts differ when ``--init`` does."""
        saved_weights = state.get("method_weights") or {}
        recorded = [(f"{self.method.name}.{name}", saved_weights[name], value)
                    for name, value in asdict(self.method.weights).items()
                    if name in saved_weights]  # fmt: skip
        saved_rates = state.get("student_rates")
        if saved_rates is not None:
            recorded += [("student learning rate", saved_rates[0], self.student_lr),
                         ("student weight decay", saved_rates[1], self.student_decay)]  # fmt: skip
        differ = "; ".join(f"{name} {_setting(there)} there, {_setting(here)} here"
                           for name, there, here in recorded if there != here)  # fmt: skip
        if differ:
            raise DaflError(f"cannot resume: checkpoint {path} was trained with other settings "
                            f"({differ}); was the student started the same way (--init)?")

    # -- one iteration ----------------------------------------------------------------------
    def _set_learning_rates(self, elapsed: float) -> None:
        factor = lr_factor(self.preset.schedule, self.stop.progress(self.iteration, elapsed))
        for group in self.optimizer.param_groups:
            group["lr"] = self.student_lr * factor
        if self.preset.schedule_generator and self.method.generator is not None:
            for group in self.method.optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor

    def _student_step(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            out = self.student(x)
        loss = self.task.distillation_loss(out, teacher_logits, self.preset.kd_temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()  # a tensor: reading it would wait for the device at every step

    def _iteration(self) -> tuple[dict[str, float], float, float]:
        """One generator step and the student steps: (losses, generator s, student s)."""
        t0 = time.perf_counter()
        batch = self.method.generate(self.recipe.batch_size)
        self.pool.add(batch.x, batch.teacher_logits)
        t1 = time.perf_counter()
        kd = self._student_step(*self.pool.newest())  # the newest batch first, then the pool
        for _ in range(self.recipe.student_steps - 1):
            kd = kd + self._student_step(*self.pool.draw())
        losses = {f"loss_{name}": value for name, value in batch.losses.items()}
        losses["loss_kd"] = float(kd) / self.recipe.student_steps  # the one wait for the device
        t2 = time.perf_counter()
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
        """The health figures on a fresh generated sample; ``check_s`` its seconds."""
        start = time.perf_counter()
        # every rank judges the same global sample: the collapse verdict is agreed. One call
        # for the whole sample: a conditional generator balances the classes within it, and
        # its BatchNorm normalises over it
        x = self.world.all_gather_cat(self.method.sample(self.task.health_samples))
        self.last_health = measure(self.teacher.module, self.student, x, self.iteration,
                                   self.num_classes, self.task.health_logits,
                                   self.task.found_share)  # fmt: skip
        self.check_s = time.perf_counter() - start
        return self.last_health

    def _check_health(self) -> Health:
        """Measure, and answer a collapse by restarting the generator (or giving up)."""
        health = self._measure_health()
        if self.guard.respond(health, self.iteration, self.num_classes) == "restart":
            self.method.restart()
            self._share_generator()
        return health

    def _time_bookkeeping(self) -> None:
        """Before a time-budgeted run's plan: one health check and one evaluation of the
        curve's subset timed where none has run yet, for the plan to count them."""
        if self.stop.time_budget is None:
            return
        if self.check_s is None:
            self._measure_health()
        self.evaluation.time_once(self.student)

    def _checks_share_s(self) -> float:
        """The last health check's seconds spread over the iterations between checks, and an
        evaluation's over those between evaluations every N iterations
        (``DistillOptions.eval_every``)."""
        return (self.check_s or 0.0) / self.options.health_every \
            + self.evaluation.per_iteration_s()  # fmt: skip

    def _fit_memory(self) -> None:
        """Shrink the batch (or refuse) when one iteration would not fit the device's memory."""
        per_sample = iteration_bytes_per_sample(self.teacher, self.student, self.method,
                                                self.device)  # fmt: skip
        self.recipe = fit_batch_to_memory(self.recipe, per_sample,
                                          available_memory(self.device),
                                          tuple(self.teacher.input_shape))  # fmt: skip

    def _try_channels_last(self) -> bool:
        """Channels-last memory format where the preset asks and the models allow it."""
        if not self.preset.channels_last:
            return False
        return try_channels_last(self.teacher, self.student, self.method, self.device)

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
            if self.warm_start is not None:  # before any checkpoint is restored over it
                self.student.load_state_dict(self.warm_start.student)
                self.method.load_state_dict(self.warm_start.method)
            self._share_generator()
            self.channels_last = self._try_channels_last()
            try:
                with distributed.collective_errors(), denormals_flushed():
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
        self.autocast = autocast_factory(self.device)
        self.student_lr, self.student_decay = self.preset.student_rates(self.options.fine_tune,
                                                                        self.task.name)
        self.optimizer = make_student_optimizer(self.preset, self.student, self.student_lr,
                                                self.student_decay)  # fmt: skip
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
        self.steps_after_probes = self.recipe.student_steps  # what the plan starts from
        self.probes: list[tuple[float, float]] = []  # (generator, student step) seconds
        if self.stop.time_budget is not None:
            # Until the plan, iterations are probes with one student step: their cost is
            # unknown (a 16 M-MAC teacher's first full iteration took 173 s of a 180 s budget
            # on a busy 2-core CPU), and a plan needs only one step of each kind.
            self.recipe = replace(self.recipe, student_steps=1)
        self.world.seed_rank(self.options.seed, self.iteration)
        self.threads = ThreadChooser(self.device, self.preset.cpu_threads, self.options.threads,
                                     race=self.stop.time_budget is not None)  # fmt: skip
        self.evaluation = Evaluation(self.eval_data, self.teacher.module, self.task, self.device,
                                     self.options, self.stop, self.elapsed_before)  # fmt: skip
        # The budget also pays for the teacher's pass over the evaluation data just made and
        # the student's at the end (no slower than the teacher's): on a busy 2-core CPU they
        # took a 180 s run to 201 s (1,000 text lines through a 16 M-MAC teacher).
        # A quarter of the budget at most, so that a large evaluation set leaves training time.
        self.stop.reserve_s = min(2 * self.evaluation.teacher_s,
                                  RESERVE_SHARE * (self.stop.time_budget or 0.0))  # fmt: skip
        self.progress = Progress(self.options.progress and self.world.is_writer,
                                 f"{self.method.name}/{self.preset.name}",
                                 self.stop.total_iters, self.iteration)  # fmt: skip
        self.check_s: float | None = None  # seconds of the last health check
        self.planner = Planner(self.preset, self.stop, self.world, self.progress, self.guard,
                               self.evaluation.seconds_still_due)  # fmt: skip
        self.first_iteration = self.iteration
        self.started = time.perf_counter()

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
        row: dict[str, Any] = dict(losses)
        if self.iteration % self.options.health_every == 0:
            row.update(self._check_health().as_row())
        if not self.planner.planned and self.threads.settled and done >= 2:
            self.probes.append((generate_s, student_s))
        probes_needed = PLAN_PROBES if self.stop.time_budget is not None else 1
        if not self.planner.planned and len(self.probes) >= probes_needed:
            self._time_bookkeeping()  # before the elapsed time the plan starts from
            unprobed = replace(self.recipe, student_steps=self.steps_after_probes)
            step_s = [statistics.median(times) for times in zip(*self.probes)]
            self.recipe = self.planner.plan(unprobed, self.iteration, *step_s,
                                            self.elapsed(), self._checks_share_s())  # fmt: skip
        elif self.planner.planned and self.stop.time_budget is not None:
            self.recipe = self.planner.watch(self.recipe, self.iteration, generate_s, student_s,
                                             self.elapsed(), self._checks_share_s())  # fmt: skip
        monitored = self.evaluation.monitor(self.student, self.iteration, self.elapsed())
        elapsed = self.elapsed()
        self.history.append({"iteration": self.iteration, "elapsed_s": round(elapsed, 4), **row,
                             "accuracy": monitored})  # fmt: skip
        figures = progress_figures(losses, self.last_health, monitored)
        self.progress.update(self.iteration, elapsed, figures)
        if self.on_iteration is not None:
            self.on_iteration(self.iteration)

    def _finish(self, stop_reason: str) -> DistillResult:
        """Last checkpoint, health and full evaluation; the result, student on the CPU."""
        check_finite(self.student, self.iteration)
        elapsed = self.elapsed()
        self.checkpointer.save(self._state(elapsed))
        if self.history:
            self.history[-1].update(self._measure_health().as_row())
        teacher_accuracy, student_accuracy = self.evaluation.final(self.student)
        if self.history and self.history[-1].get("accuracy") is None:
            self.history[-1]["accuracy"] = student_accuracy
        if self.options.history_path is not None and self.world.is_writer:
            write_history_csv(self.history, self.options.history_path)
        return self._result(elapsed, stop_reason, teacher_accuracy, student_accuracy)

    def _interrupted(self, elapsed: float, exit_code: int | None = None) -> None:
        # The interrupted iteration may be half applied; it is simply redone after --resume.
        if self.options.history_path is not None and self.world.is_writer:
            write_history_csv(self.history, self.options.history_path)
        if self.checkpointer.path is not None:
            self.checkpointer.save(self._state(elapsed))
        error = interruption(self.iteration, self.checkpointer.path, self.world)
        if exit_code is not None:  # SIGTERM agreed among ranks: 143, as a plain SIGTERM
            error.exit_code = exit_code
        raise error from None

    def _result(self, elapsed, stop_reason, teacher_accuracy, student_accuracy) -> DistillResult:
        self.student.cpu().eval()
        generator = self.method.generator
        if generator is not None:
            generator.cpu().eval()
        self.method.ctx.device = torch.device("cpu")
        note = self.method.note()
        return DistillResult(
            student=self.student,
            history=self.history,
            iterations=self.iteration,
            elapsed_s=elapsed,
            device=str(self.device),
            method=self.method.name,
            method_reason=with_note(self.method_reason, note),
            method_note=note,
            preset=self.preset.name,
            preset_changes=self.preset_changes,
            recipe=self.recipe,
            generator=generator,
            sampler=self.method.sample,
            teacher_accuracy=teacher_accuracy,
            student_accuracy=student_accuracy,
            teacher_predictions=self.evaluation.teacher_predictions,
            stop_reason=stop_reason,
            health=self.last_health,
            restarts=self.guard.restarts,
            num_classes=self.num_classes,
            world_size=self.world.size,
            method_state=self.method.state_dict(),
        )


def _setting(value: Any) -> str:
    """A setting's value in a message: numbers as ``:g`` writes them (1e-3, not 0.001000...)."""
    return f"{value:g}" if isinstance(value, float) else str(value)

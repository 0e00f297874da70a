"""``--method race``: auto by measurement. Auto's candidate methods (methods/auto.py) each train
a copy of the student for an equal slice of a quarter of the budget; every leg's student is
scored by its top-1 agreement with the teacher on a probe set drawn from *all* legs' generators
(a student is not judged on its own generator alone, which a collapsed generator would flatter);
the winner's student and generator go on for the rest of the budget.

The race overrides auto's rule only by a margin the probe set can resolve: its candidate order
puts the rule's choice first, and another candidate wins only when it agrees with the teacher on
more than ``MARGIN`` more of the probes. One process only: under torchrun the rule decides (the
legs' samplers differ by rank, and a race's cost would be paid by every rank).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.distillation import distributed
from compress_toolbox.distillation.methods.auto import race_candidates, rule
from compress_toolbox.distillation.methods.base import batchnorm_layers
from compress_toolbox.distillation.options import (
    DistillInterrupted,
    DistillOptions,
    DistillResult,
    WarmStart,
    resolve_device,
    with_note,
)
from compress_toolbox.distillation.parts import Checkpointer, StopPolicy
from compress_toolbox.distillation.trainer import CHECKPOINT_NAME, Trainer
from compress_toolbox.errors import DaflError, DaflWarning, TrainingFailed, first_line
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.tasks import Task, get_task
from compress_toolbox.tasks.evaldata import EvalData

RACE_SHARE = 0.25  # of the run's budget, for all legs together
PROBES_PER_LEG = 128  # generated inputs each leg's generator adds to the shared probe set
MARGIN = 0.02  # agreement a candidate needs above the rule's choice to replace it
# (about one standard error of an agreement near 0.8 on 384 probes; more where agreement is
# lower or the probes fewer: a loose bar, which the rule's evidence on the suite backs)
SCORE_BATCH = 64


@dataclass(frozen=True)
class RaceLeg:
    """One candidate's short run: its iterations and its student's agreement with the teacher
    on the shared probe set (None when the leg failed: ``note`` says why)."""

    method: str
    iterations: int = 0
    agreement: float | None = None
    note: str = ""


@dataclass(frozen=True)
class RaceOutcome:
    """What the race measured and chose, for the report."""

    legs: tuple[RaceLeg, ...]
    winner: str
    rule_choice: str
    seconds: float
    probes: int

    def reason(self) -> str:
        """The report's ``method_reason``: what was raced and why the winner won."""
        scored = sorted((leg for leg in self.legs if leg.agreement is not None),
                        key=lambda leg: -leg.agreement)  # fmt: skip
        figures = ", ".join(f"{leg.method} {leg.agreement:.3f} ({leg.iterations} it)"
                            for leg in scored)  # fmt: skip
        failed = "".join(f"; {leg.method} failed ({leg.note})" for leg in self.legs
                         if leg.agreement is None)  # fmt: skip
        if self.winner != self.rule_choice and self.legs[0].agreement is None:
            why = f"auto's choice, {self.rule_choice}, failed"
        elif self.winner != self.rule_choice:
            why = f"more than {MARGIN:.2f} above auto's choice, {self.rule_choice}"
        elif len(scored) > 1 and scored[0].method != self.winner:
            why = f"auto's choice, kept: no other candidate led it by more than {MARGIN:.2f}"
        else:
            why = "auto's choice, and the race's best"
        return (f"raced for {self.seconds:.0f} s; top-1 agreement with the teacher on "
                f"{self.probes} inputs from every candidate's generator: {figures}{failed}; "
                f"{self.winner} continued ({why})")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def distill_by_race(
    teacher: Teacher, student: nn.Module, options: DistillOptions,
    eval_data: EvalData | None = None, on_iteration: Callable[[int], None] | None = None,
) -> DistillResult:  # fmt: skip
    """``distill`` with ``--method race``: race the candidates, then train the winner's student
    (``student``, in place) and generator for the rest of the budget."""
    preset = options.validate()
    task = get_task(options.task)
    candidates = _ordered_candidates(teacher, task)
    split = _split_budget(options, preset, len(candidates))
    if not _one_process() or len(candidates) < 2 or split is None:
        why = ("under torchrun the race does not run" if not _one_process()
               else f"one candidate for this teacher ({candidates[0]})" if len(candidates) < 2
               else "too few iterations to race")  # fmt: skip
        result = Trainer(teacher, student, replace(options, method="auto"), eval_data,
                         on_iteration).run()  # fmt: skip
        return replace(result, method_reason=f"auto's rule ({why}): {result.method_reason}")
    leg_budget, rest_budget = split
    if options.resume:
        return _resume(teacher, student, options, eval_data, on_iteration, rest_budget(None))
    outcome, start = race(teacher, student, options, candidates, leg_budget)
    rest = replace(options, method=outcome.winner, **rest_budget(outcome.seconds))
    result = Trainer(teacher, student, rest, eval_data, on_iteration, warm_start=start).run()
    return replace(result, method_reason=with_note(outcome.reason(), result.method_note),
                   race=outcome,
                   elapsed_s=outcome.seconds + result.elapsed_s)  # fmt: skip


def race(teacher: Teacher, student: nn.Module, options: DistillOptions,
         candidates: tuple[str, ...], leg_budget: dict[str, Any]) -> tuple[RaceOutcome, WarmStart]:
    """Train a copy of ``student`` with each candidate under ``leg_budget`` (DistillOptions
    fields), score the legs; (what was measured, the winner's state). ``student`` is untouched.
    The first candidate is the rule's choice. TrainingFailed when every leg failed."""
    started = time.perf_counter()
    legs, results = [], {}
    for name in candidates:
        leg_options = replace(options, method=name, checkpoint_dir=None, resume=False,
                              history_path=None, **leg_budget)  # fmt: skip
        try:
            with warnings.catch_warnings():  # a leg is short by design
                warnings.filterwarnings("ignore", "the budget buys only", DaflWarning)
                results[name] = Trainer(teacher, copy.deepcopy(student), leg_options).run()
        except TrainingFailed as error:
            legs.append(RaceLeg(name, note=first_line(error, 120)))
        except DistillInterrupted as interrupted:  # legs keep no checkpoint
            # the same exception (its context, e.g. a SIGTERM, says how to exit), retold
            interrupted.args = (f"interrupted during the race ({name}'s leg), before any "
                                "checkpoint: run the command again",)  # fmt: skip
            raise
    if not results:
        raise TrainingFailed(f"every method raced failed: {'; '.join(leg.note for leg in legs)}")
    torch.manual_seed(options.seed)
    probes = torch.cat([result.sampler(PROBES_PER_LEG) for result in results.values()])
    task, device = get_task(options.task), resolve_device(options.device)
    teacher_out = _answers(teacher.module, probes, device)
    for name, result in results.items():
        student_out = _answers(result.student, probes, device)
        legs.append(RaceLeg(name, result.iterations,
                            agreement(teacher_out, student_out, task)))  # fmt: skip
    legs.sort(key=lambda leg: candidates.index(leg.method))
    winner = _winner(legs)
    start = WarmStart(results[winner].student.state_dict(), results[winner].method_state)
    outcome = RaceOutcome(tuple(legs), winner, candidates[0], time.perf_counter() - started,
                          len(probes))  # fmt: skip
    return outcome, start


def agreement(teacher_out: torch.Tensor, student_out: torch.Tensor, task: Task) -> float:
    """Share of the class decisions ``task.health_logits`` makes of the outputs on which the
    student's top-1 answer is the teacher's."""
    t_logits, s_logits = task.health_logits(teacher_out, student_out)
    return float((t_logits.argmax(1) == s_logits.argmax(1)).float().mean())


@torch.no_grad()
def _answers(module: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``module``'s outputs on ``x``, run on ``device`` in batches, gathered on the CPU;
    ``module`` goes back where it was."""
    home = next(module.parameters(), torch.zeros(())).device
    training = module.training
    module.to(device).eval()
    try:
        return torch.cat([module(chunk.to(device)).float().cpu() for chunk in x.split(SCORE_BATCH)])
    finally:
        module.to(home).train(training)


def _one_process() -> bool:
    return not distributed.launched()


def _winner(legs: list[RaceLeg]) -> str:
    """The rule's choice (the first leg) unless another leg beats it by more than MARGIN."""
    scored = [leg for leg in legs if leg.agreement is not None]
    best = max(scored, key=lambda leg: leg.agreement)
    first = legs[0]
    if first.agreement is not None and best.agreement <= first.agreement + MARGIN:
        return first.method
    return best.method


def _ordered_candidates(teacher: Teacher, task: Task) -> tuple[str, ...]:
    """Auto's candidates for this teacher, the rule's choice first."""
    layers = batchnorm_layers(teacher.module)
    chosen, _ = rule(task, layers)
    others = [name for name in race_candidates(task, layers) if name != chosen]
    return (chosen, *others)


Budget = dict[str, Any]  # DistillOptions fields: time_budget, iters, epochs


def _split_budget(options: DistillOptions, preset, legs: int
                  ) -> tuple[Budget, Callable[[float | None], Budget]] | None:  # fmt: skip
    """(each leg's budget, the rest's budget given the race's seconds) as DistillOptions fields:
    a time budget splits by the race's measured time, an iteration budget by iterations (None
    when it has too few for legs of 2 iterations)."""
    stop = StopPolicy.for_run(options.iters, options.epochs, options.time_budget, preset)
    unset = {"iters": None, "epochs": None, "time_budget": None}
    if stop.time_budget is not None:
        budget = stop.time_budget
        leg = {**unset, "time_budget": RACE_SHARE * budget / legs}

        def rest(race_s: float | None) -> dict[str, Any]:
            spent = RACE_SHARE * budget if race_s is None else race_s
            return {**unset, "time_budget": max(budget - spent, 1.0)}

        return leg, rest
    leg_iters = int(RACE_SHARE * stop.total_iters / legs)
    if leg_iters < 2:
        return None
    rest_iters = stop.total_iters - legs * leg_iters
    return {**unset, "iters": leg_iters}, lambda _: {**unset, "iters": rest_iters}


def _resume(teacher, student, options, eval_data, on_iteration, rest_budget) -> DistillResult:
    """Continue a raced run from its checkpoint: the winner's method (the checkpoint names it)
    for the rest of the budget (a time budget less a quarter: the race's share)."""
    folder = options.checkpoint_dir
    checkpoint = Checkpointer(Path(folder) / CHECKPOINT_NAME if folder else None, 0.0)
    try:
        method = checkpoint.load(torch.device("cpu"), {})["method"]
    except DaflError:
        method = "auto"  # the trainer says what is wrong with the checkpoint
    result = Trainer(teacher, student, replace(options, method=method, **rest_budget),
                     eval_data, on_iteration).run()  # fmt: skip
    reason = with_note("the race's winner, resumed from its checkpoint", result.method_note)
    return replace(result, method_reason=reason)

"""When a run sizes its recipe: once the thread choice has settled (the first plan), and again
when a time-budgeted run's iterations drift far from what was planned (a re-plan). What the
recipe becomes is recipe.py's ``size_recipe``; this module decides when, agrees it across
ranks and says it on the progress output."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace

from compress_toolbox.distillation.distributed import World
from compress_toolbox.distillation.health import CollapseGuard
from compress_toolbox.distillation.parts import Progress, StopPolicy
from compress_toolbox.distillation.presets import Preset
from compress_toolbox.distillation.recipe import (
    DRIFT_WINDOW,
    TARGET_ITERATIONS,
    RateWatch,
    Recipe,
    size_recipe,
)
from compress_toolbox.errors import DaflWarning


class Planner:
    """Plans a run's recipe from measured step times and re-plans a time-budgeted run whose
    iteration time drifted (``RateWatch``); rank 0 decides, every rank gets its recipe.
    ``outside_s()``: seconds the rest of the budget owes to work between iterations that is
    not a health check (the curve's evaluations); the stop policy's reserve is left too."""

    def __init__(self, preset: Preset, stop: StopPolicy, world: World, progress: Progress,
                 guard: CollapseGuard,
                 outside_s: Callable[[], float] = lambda: 0.0) -> None:  # fmt: skip
        self.preset, self.stop, self.world = preset, stop, world
        self.progress, self.guard = progress, guard
        self.outside_s = outside_s
        self.rate = RateWatch()
        self.planned = False

    def _for_iterations(self, elapsed: float) -> float:
        """The seconds of the budget left for iterations and their health checks."""
        budget = self.stop.time_budget or 0.0
        return max(budget - elapsed - self.stop.reserve_s - self.outside_s(), 0.0)

    def plan(self, recipe: Recipe, iteration: int, generate_s: float, student_s: float,
             elapsed: float, checks_s: float = 0.0) -> Recipe:  # fmt: skip
        """The first plan: the recipe sized from one generator and one student step's time
        and the health checks' seconds per iteration."""
        remaining = None
        if self.stop.time_budget is not None:
            remaining = self._for_iterations(elapsed)
        recipe = size_recipe(replace(recipe, checks_s=checks_s), generate_s, student_s,
                             remaining, adapt=self.preset.size_to_budget)  # fmt: skip
        recipe.sized_by = "timings (time budget)" if remaining is not None else "counts"
        if remaining is None and self.stop.total_iters is not None:
            recipe.expected_iterations = self.stop.total_iters
        self.planned = True
        return self._announce(recipe, "plan", iteration, elapsed)

    def watch(self, recipe: Recipe, iteration: int, generate_s: float, student_s: float,
              elapsed: float, checks_s: float = 0.0) -> Recipe:  # fmt: skip
        """After each planned iteration of a time-budgeted run (``checks_s``: the last health
        check's seconds spread over the iterations between checks): the recipe re-sized when
        the last iterations took far more or less time than planned (student steps per
        generated batch from the preset's number again, the progress total what the rest of
        the budget buys), else ``recipe`` as it is."""
        self.rate.add(generate_s, student_s, checks_s)
        if iteration % DRIFT_WINDOW:  # the same iterations on every rank: they agree
            return recipe
        budget = self.stop.time_budget or 0.0
        times = self.rate.drifted(recipe) if elapsed < 0.95 * budget else None
        times, remaining = self.world.broadcast_object(
            (times, self._for_iterations(elapsed)))  # rank 0's
        if times is None:
            return recipe
        planned_s = recipe.iteration_s
        took_s = times[0] + recipe.student_steps * times[1] + times[2]
        base = replace(recipe, student_steps=self.preset.student_steps, checks_s=times[2])
        # the iterations the run still lacks of the target, not the target again: late in a
        # run a re-plan would otherwise cut the student steps to buy iterations it does not need
        lacking = max(TARGET_ITERATIONS - iteration, 0)
        new = size_recipe(base, *times[:2], remaining, adapt=self.preset.size_to_budget,
                          target_iterations=lacking)  # fmt: skip
        new.replans = recipe.replans + 1
        new.warning = None  # said once, at the first plan
        why = f"iterations took {took_s:.2f} s, not the planned {planned_s:.2f} s"
        new = self._announce(new, f"re-plan ({why})", iteration, elapsed)  # sets the total
        self.rate.clear()
        return new

    def _announce(self, recipe: Recipe, label: str, iteration: int, elapsed: float) -> Recipe:
        """Rank 0's recipe on every rank (timings differ by rank), on the progress output, its
        expected iterations the progress total and the collapse guard's warm-up."""
        recipe = self.world.broadcast_object(recipe)
        self.progress.line(iteration, elapsed, {label: recipe.describe()})
        recipe.planned_total = iteration + (recipe.expected_iterations or 0)
        if recipe.expected_iterations:
            self.progress.set_total(recipe.planned_total)
            self.guard.set_warmup(iteration + recipe.expected_iterations)
        if recipe.warning:
            warnings.warn(recipe.warning, DaflWarning, stacklevel=3)
        return recipe

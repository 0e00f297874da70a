"""Data-free distillation on sklearn's digits (teachers trained here in a few seconds): every
method, the collapse guard, checkpoints and resume, budgets and option checks.

The 8x8 digits are upsampled to 16x16: at 8x8 (64 dimensions) Gaussian noise covers the input
space so well that the noise-KD baseline matches DAFL, whereas at 16x16, as on MNIST, noise
gives ~60% and DAFL ~95%. Every run here fixes its thread count and seed, so results do not
depend on the machine's load.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress_toolbox.distillation import distill
from compress_toolbox.distillation.generator import make_generator
from compress_toolbox.distillation.health import GenerationCollapsed
from compress_toolbox.distillation.losses import (
    activation_loss,
    information_entropy_loss,
    kd_loss,
    one_hot_loss,
)
from compress_toolbox.distillation.methods import method_names
from compress_toolbox.distillation.options import DistillInterrupted
from compress_toolbox.distillation.parts import lr_factor
from compress_toolbox.distillation.presets import PRESETS
from compress_toolbox.distillation.recipe import RateWatch, Recipe
from compress_toolbox.distillation.trainer import CHECKPOINT_NAME
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, TrainingFailed
from compress_toolbox.load.teacher import Teacher
from compress_toolbox.tasks.evaldata import EvalData, evaluate

SHAPE = (1, 16, 16)
MEAN, STD = 0.3, 0.4  # the digits teacher takes (pixels - 0.3) / 0.4: normalised outside
DOMAIN = InputDomain.from_options(MEAN, STD, SHAPE)


def small_cnn(width: int, batchnorm: bool = False) -> nn.Module:
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        norm(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        norm(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 4 * width),
        nn.ReLU(),
        nn.Linear(4 * width, 10),
    )


def small_mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def _train(model: nn.Module, x, y, epochs: int = 15) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(100):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    """A CNN teacher (BatchNorm optional) on 16x16 digits and an MLP on the flat 8x8 ones,
    trained on 1,200 digits; the other 597 are the evaluation sets."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = DOMAIN.to_model(F.interpolate(pixels, size=SHAPE[1:], mode="bilinear"))
    flat = pixels.flatten(1)  # [0, 1] features, no normalisation
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y))
    train, test = perm[:1200], perm[1200:]
    cnn = _train(small_cnn(16), images[train], y[train])
    cnn_bn = _train(small_cnn(16, batchnorm=True), images[train], y[train])
    mlp = _train(small_mlp(64), flat[train], y[train], epochs=40)
    sets = {
        "cnn": (Teacher.from_module(cnn, SHAPE), EvalData(images[test], y[test])),
        "cnn_bn": (Teacher.from_module(cnn_bn, SHAPE), EvalData(images[test], y[test])),
        "mlp": (Teacher.from_module(mlp, (64,)), EvalData(flat[test], y[test])),
    }
    for teacher, eval_data in sets.values():
        assert evaluate(teacher.module, eval_data) > 0.9
    yield sets
    torch.set_num_threads(threads)


# A small, deterministic recipe: constant LR so resumed runs match exactly, one thread.
TINY = replace(PRESETS["fast"], batch_size=64, gen_width=32, schedule="constant",
               cpu_threads=1, fit_schedule_to_budget=False, size_to_budget=False)  # fmt: skip


def run(teacher, student=None, **kwargs):
    kwargs.setdefault("preset", TINY)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("threads", 1)
    kwargs.setdefault("domain", DOMAIN if len(teacher.input_shape) == 3 else InputDomain())
    torch.manual_seed(123)  # same initial student in every run (resume comparisons)
    if student is None:
        student = small_cnn(8) if len(teacher.input_shape) == 3 else small_mlp(16)
    return distill(teacher, student, **kwargs)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 30, 18)])
def test_generator_output_shape(shape):
    generator = make_generator(shape, latent_dim=16, width=8)
    assert generator(torch.randn(4, 16)).shape == (4, *shape)


def test_vector_generator_shape():
    assert make_generator((20,), latent_dim=8, width=16)(torch.randn(5, 8)).shape == (5, 20)


def test_losses():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    # balanced confident predictions: entropy of the mean is log 2, the loss its negative
    assert information_entropy_loss(logits).item() == pytest.approx(-math.log(2), abs=1e-3)
    assert information_entropy_loss(logits, base=10).item() == pytest.approx(
        -math.log10(2), abs=1e-3
    )
    assert one_hot_loss(logits).item() < 1e-3
    assert activation_loss(torch.tensor([[-2.0, 2.0]])).item() == -2.0
    assert kd_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits.flip(1)).item() > 1.0
    # temperature T compares softmax(logits / T) and scales by T**2 (Hinton et al.)
    student = torch.tensor([[1.0, 3.0], [2.0, -1.0]])
    assert kd_loss(student, logits, temperature=4.0).item() == pytest.approx(
        16 * kd_loss(student / 4, logits / 4).item()
    )


def test_lr_schedules():
    assert lr_factor("step", 0.39) == 1.0 and lr_factor("step", 0.5) == pytest.approx(0.1)
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == pytest.approx(0.0)


METHODS = ("dafl", "noise", "adversarial", "conditional", "bn-prior", "dfad")
# dfad on the MLP: 0.11 -> 0.21 in 200 iterations (measured), not the +0.2 asked of the others:
# DFAD was written for image teachers (and segmentation), so it runs on the CNN only here.
METHOD_TEACHERS = [(m, t) for m in METHODS for t in ("cnn", "mlp")
                   if not (m in ("bn-prior", "dfad") and t == "mlp")]  # fmt: skip


@pytest.mark.parametrize(("method", "kind"), METHOD_TEACHERS)
def test_every_method_trains_a_student(digits, method, kind):
    """Losses stay finite and the student beats its (chance-level) initialisation on real
    digits; bn-prior needs BatchNorm, so it runs on the BatchNorm teacher."""
    teacher, eval_data = digits["cnn_bn" if method == "bn-prior" else kind]
    torch.manual_seed(123)
    student = small_cnn(8) if kind == "cnn" else small_mlp(16)
    before = evaluate(student, eval_data)
    iters = 60 if kind == "cnn" else 200  # the MLP's steps are tiny
    result = run(teacher, student, method=method, iters=iters, eval_data=eval_data)
    assert result.method == method and result.iterations == iters
    assert result.student_accuracy > before + 0.2, (before, result.student_accuracy)
    for row in result.history:
        losses = [v for k, v in row.items() if k.startswith("loss_")]
        assert losses and all(math.isfinite(v) for v in losses)
    assert result.health is not None and 0.0 <= result.health.agreement <= 1.0


def test_every_registered_method_is_tested():
    """Every method but the detection and segmentation ones (their runs are in
    test_detection.py and test_segmentation.py)."""
    task_methods = {"dafl-det", "bn-prior-det", "dafl-seg"}
    assert set(method_names()) - task_methods == {m for m, _ in METHOD_TEACHERS}


def test_dafl_beats_noise_baseline_on_images(digits, tmp_path):
    teacher, eval_data = digits["cnn"]
    dafl = run(teacher, method="dafl", iters=120, eval_data=eval_data, eval_every=40,
               history_path=tmp_path / "h.csv")  # fmt: skip
    noise = run(teacher, method="noise", iters=120, eval_data=eval_data)
    assert dafl.teacher_accuracy == pytest.approx(evaluate(teacher.module, eval_data))
    assert dafl.student_accuracy > 0.8, dafl.student_accuracy  # chance is 0.1
    # measured 0.93 vs 0.38 with these seeds and one thread: a wide margin, deterministic
    assert dafl.student_accuracy > noise.student_accuracy + 0.2
    assert dafl.iterations == 120 and len(dafl.history) == 120
    assert [r["accuracy"] is not None for r in dafl.history].count(True) == 3
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0].startswith("iteration,elapsed_s,loss_oh,loss_ie,loss_a,loss_kd")
    assert "class_entropy" in lines[0] and "agreement" in lines[0] and len(lines) == 121
    assert not dafl.student.training and next(dafl.student.parameters()).device.type == "cpu"
    assert noise.generator is None and "loss_oh" not in noise.history[0]


def test_auto_picks_by_batchnorm_and_says_why(digits):
    with_bn = run(digits["cnn_bn"][0], method="auto", iters=2)
    without = run(digits["cnn"][0], method="auto", iters=2)
    assert with_bn.method == "bn-prior" and "BatchNorm" in with_bn.method_reason
    assert without.method == "adversarial" and "no BatchNorm" in without.method_reason


def test_adversarial_spreads_its_samples_only_for_a_student_from_the_teachers_weights(
        digits, tmp_path):  # fmt: skip
    """The diversity term follows where the student starts (``fine_tune``), the report's method
    line says when it is off, and a checkpoint made with it off does not resume with it on."""
    teacher = digits["cnn"][0]
    fresh = run(teacher, method="adversarial", iters=2, checkpoint_dir=tmp_path)
    tuned = run(teacher, method="adversarial", iters=2, fine_tune=True)
    assert fresh.method_note == "diversity term off: the student starts fresh"
    assert fresh.method_reason.endswith(f"; {fresh.method_note}")
    assert tuned.method_note is None and "diversity" not in tuned.method_reason
    assert "loss_div" not in fresh.history[0] and "loss_div" in tuned.history[0]
    with pytest.raises(DaflError, match=r"other settings \(adversarial.div 0 there, 1 here; "
                                        r"student learning rate .*\); .*--init"):  # fmt: skip
        run(teacher, method="adversarial", iters=4, checkpoint_dir=tmp_path, resume=True,
            fine_tune=True)  # fmt: skip


def test_the_student_trains_at_the_rates_of_where_it_starts(digits, tmp_path):
    """A fresh student's optimiser has the preset's weight decay, a student from the teacher's
    weights the fine-tuning rate and none (``Preset.student_rates``), as its checkpoint shows."""
    teacher = digits["cnn"][0]
    assert TINY.weight_decay > 0 and TINY.weight_decay_fine_tune == 0
    for fine_tune in (False, True):
        folder = tmp_path / f"fine_tune_{fine_tune}"
        run(teacher, method="dafl", iters=2, checkpoint_dir=folder, fine_tune=fine_tune)
        state = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
        group = state["student_optimizer"]["param_groups"][0]
        assert (group["lr"], group["weight_decay"]) == TINY.student_rates(fine_tune)
    fresh = tmp_path / "fine_tune_False"
    with pytest.raises(DaflError, match=r"other settings \(student learning rate 0.005 there, "
                                        r"0.001 here; student weight decay 0.0001 there, 0 "
                                        r"here\); .*--init"):  # fmt: skip
        run(teacher, method="dafl", iters=4, checkpoint_dir=fresh, resume=True, fine_tune=True)
    # one from before the rates and a loss weight were recorded (here the last, fine-tuned
    # one's) resumes at this run's decay
    older = tmp_path / "older"
    older.mkdir()
    del state["student_rates"], state["method_weights"]["oh"]
    state["student_optimizer"]["param_groups"][0]["weight_decay"] = 0.5
    torch.save(state, older / CHECKPOINT_NAME)
    run(teacher, method="dafl", iters=4, checkpoint_dir=older, resume=True, fine_tune=True)
    resumed = torch.load(older / CHECKPOINT_NAME, weights_only=True)
    assert resumed["iteration"] == 4 and resumed["student_rates"] == [1e-3, 0.0]
    assert resumed["student_optimizer"]["param_groups"][0]["weight_decay"] == 0.0


def test_training_reads_and_writes_denormal_floats_as_zero_and_leaves_them_after(digits):
    """Weight decay drives unused weights to denormal floats, on which x86 convolutions run
    several times slower: training flushes them to zero, nothing after it does."""
    tiny = torch.tensor([1e-39])  # denormal: float32's smallest normal is 1.2e-38
    seen = []
    run(digits["cnn"][0], method="dafl", iters=2,
        on_iteration=lambda iteration: seen.append((tiny * 1.0).item()))  # fmt: skip
    assert seen == [0.0, 0.0]
    assert (tiny * 1.0).item() == pytest.approx(1e-39)


def test_bn_prior_refused_without_batchnorm(digits):
    with pytest.raises(DaflError, match="no BatchNorm layers"):
        run(digits["cnn"][0], method="bn-prior", iters=2)


class Saturated(nn.Module):
    """A 'classifier' that answers class 3 whatever the input (a broken teacher)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * 0.0 + torch.eye(10)[3] * 20.0


@pytest.mark.parametrize("method", ["dafl", pytest.param("conditional", marks=pytest.mark.slow)])
def test_collapse_is_detected_restarted_then_fatal(method):
    teacher = Teacher.from_module(Saturated(), SHAPE)
    with pytest.warns(UserWarning, match="restarting the generator"):
        with pytest.raises(GenerationCollapsed, match="collapsed onto 1 of the teacher's 10"):
            run(teacher, method=method, iters=500)


@pytest.mark.parametrize("method", ["dafl", "noise", "adversarial", "conditional", "bn-prior"])
def test_resume_continues_exactly(digits, tmp_path, method):
    teacher = digits["cnn_bn"][0]
    straight = run(teacher, method=method, iters=12, seed=3)
    run(teacher, method=method, iters=6, seed=3, checkpoint_dir=tmp_path)
    resumed = run(teacher, method=method, iters=12, seed=3, checkpoint_dir=tmp_path, resume=True)
    assert resumed.iterations == 12
    assert [r["iteration"] for r in resumed.history] == list(range(1, 13))
    for a, b in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_interrupt_saves_checkpoint_and_resume_finishes(digits, tmp_path):
    teacher = digits["cnn"][0]

    def interrupt(iteration):
        if iteration == 7:
            raise KeyboardInterrupt

    with pytest.raises(DistillInterrupted, match="--resume"):
        run(teacher, iters=15, checkpoint_dir=tmp_path, on_iteration=interrupt)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # plain tensors only
    assert state["iteration"] == 7 and len(state["history"]) == 7
    assert not (tmp_path / (CHECKPOINT_NAME + ".tmp")).exists()
    result = run(teacher, iters=15, checkpoint_dir=tmp_path, resume=True)
    assert result.iterations == 15
    assert [r["iteration"] for r in result.history] == list(range(1, 16))


def test_resume_refuses_another_preset_method_or_teacher(digits, tmp_path):
    run(digits["cnn"][0], method="dafl", iters=2, checkpoint_dir=tmp_path)
    with pytest.raises(DaflError, match="for preset fast, not other"):
        run(digits["cnn"][0], method="dafl", iters=4, checkpoint_dir=tmp_path, resume=True,
            preset=replace(TINY, name="other"))  # fmt: skip
    with pytest.raises(DaflError, match="for preset_changes .*, not .*'dafl.oh': 2.0"):
        run(digits["cnn"][0], method="dafl", iters=4, checkpoint_dir=tmp_path, resume=True,
            preset=TINY.with_weights("dafl", oh=2.0))  # fmt: skip
    with pytest.raises(DaflError, match="for method dafl, not noise"):
        run(digits["cnn"][0], method="noise", iters=4, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(DaflError, match="for teacher"):
        run(digits["cnn_bn"][0], method="dafl", iters=4, checkpoint_dir=tmp_path, resume=True)


def test_resume_without_checkpoint_fails(digits, tmp_path):
    with pytest.raises(DaflError, match="no checkpoint"):
        run(digits["cnn"][0], iters=2, checkpoint_dir=tmp_path, resume=True)


def test_epochs_count_the_presets_iterations_per_epoch(digits):
    """``epochs`` (``--epochs``) trains epochs x the preset's ``iters_per_epoch`` iterations,
    and only one of time budget, iterations and epochs may be given."""
    teacher = digits["mlp"][0]
    result = run(teacher, method="dafl", epochs=2, preset=replace(TINY, iters_per_epoch=3))
    assert result.iterations == 6 and len(result.history) == 6
    with pytest.raises(DaflError, match="at most one of time budget, iterations and epochs"):
        run(teacher, iters=2, epochs=1)


def test_time_budget_stops_on_time(digits):
    teacher, eval_data = digits["cnn"]
    t0 = time.perf_counter()
    result = run(teacher, preset="fast", time_budget=3, eval_data=eval_data)
    wall = time.perf_counter() - t0
    assert result.preset == "fast" and result.stop_reason == "time budget"
    assert result.elapsed_s < 3.0 + 2.0  # slack: one iteration may overrun on a busy machine
    assert wall < 3.0 + 4.0  # + set-up, evaluation before and after training
    assert result.iterations >= 2
    assert result.recipe.expected_iterations is not None  # the plan was made and printed
    # ~10 evaluations are planned (every budget/10 s); slow warm-up iterations merge some
    assert sum(r["accuracy"] is not None for r in result.history) >= 2


class _CountsTrainingCalls(nn.Module):
    """``module``, counting its forward calls in training mode (the student's steps)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return self.module(x)


def test_a_time_budgeted_run_probes_with_one_student_step_until_its_plan(digits):
    """Before the plan a time-budgeted iteration's cost is unknown: one student step each (a
    full iteration of a large teacher on a busy CPU once ate a whole budget); the plan then
    restores the preset's student steps. An iteration-bound run takes them from the start."""
    teacher, _ = digits["cnn"]
    preset = replace(TINY, student_steps=6)
    for bounds, first_steps in (({"time_budget": 4}, 1), ({"iters": 3}, 6)):
        student = _CountsTrainingCalls(small_cnn(8))
        steps: list[int] = []

        def count(_iteration: int, student=student, steps=steps) -> None:
            steps.append(student.calls - sum(steps))

        # dafl: adversarial exploration would add the generator's own call of the student
        result = run(teacher, student=student, preset=preset, on_iteration=count, method="dafl",
                     **bounds)  # fmt: skip
        assert steps[0] == first_steps, (bounds, steps)
        assert result.recipe.student_steps == 6 and steps[-1] == 6, (bounds, steps)


class _SlowsDown(nn.Module):
    """``module``, taking ``delay`` seconds more per call after its first ``calls`` calls (a
    machine that another job starts to share)."""

    def __init__(self, module: nn.Module, calls: int, delay: float) -> None:
        super().__init__()
        self.module, self.calls_left, self.delay = module, calls, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls_left -= 1
        if self.calls_left < 0:
            time.sleep(self.delay)
        return self.module(x)


def test_a_run_that_slows_down_is_replanned(digits, capsys):
    """The plan is made from the first iterations' times; when later iterations take far
    longer, the run re-plans (fewer student steps per generated batch, a new total) and says
    so on its progress output."""
    teacher, _ = digits["cnn"]
    slow = Teacher.from_module(_SlowsDown(teacher.module, calls=30, delay=0.15), SHAPE)
    preset = replace(TINY, size_to_budget=True, student_steps=8)
    result = run(slow, preset=preset, time_budget=6, progress=True)
    err = capsys.readouterr().err
    assert result.recipe.replans >= 1, err
    assert "re-plan (iterations took" in err
    assert result.recipe.student_steps < 8  # the budget buys too few generator steps now


def test_rate_watch_waits_for_a_full_window_and_a_real_drift():
    recipe = Recipe(batch_size=8, student_steps=2, pool_size=4, generate_s=0.1,
                    student_step_s=0.05)  # fmt: skip
    watch = RateWatch(window=3)
    for _ in range(2):
        watch.add(1.0, 1.0)
    assert watch.drifted(recipe) is None  # not a full window yet
    watch.clear()
    for _ in range(3):
        watch.add(0.11, 0.055)  # 10% slower: noise, not a drift
    assert watch.drifted(recipe) is None
    for _ in range(3):
        watch.add(0.05, 0.02)  # much faster: re-plan with these times
    assert watch.drifted(recipe) == pytest.approx((0.05, 0.02, 0.0))
    watch.clear()
    for _ in range(3):  # steps as planned, but health checks now cost 0.3 s per iteration
        watch.add(0.1, 0.05, 0.3)
    assert watch.drifted(recipe) == pytest.approx((0.1, 0.05, 0.3))


class _SlowOnLargeBatches(nn.Module):
    """``module``, taking ``delay`` seconds more per call on more than ``batch`` inputs (a
    health check's 256 generated inputs, the evaluation data): checks that cost a large
    input's teacher far more than its training steps."""

    def __init__(self, module: nn.Module, batch: int, delay: float) -> None:
        super().__init__()
        self.module, self.batch, self.delay = module, batch, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.batch:
            time.sleep(self.delay)
        return self.module(x)


def test_the_plan_counts_health_checks_evaluations_and_the_reserve():
    """The budget a plan divides among iterations leaves out the reserve for the final
    evaluation and the curve's evaluations still due, and an iteration costs its health
    checks' share too (PicoDet at 800 x 608 made 71% of a plan that counted none of them;
    how close runs come to their plans is measured in benchmarks/RESULTS.md)."""
    from compress_toolbox.distillation import distributed
    from compress_toolbox.distillation.health import CollapseGuard
    from compress_toolbox.distillation.parts import Progress, StopPolicy
    from compress_toolbox.distillation.planning import Planner

    stop = StopPolicy.for_run(None, None, 100.0, TINY)
    stop.reserve_s = 10.0
    planner = Planner(TINY, stop, distributed.world(), Progress(False, "t", None, 0),
                      CollapseGuard(), outside_s=lambda: 20.0)  # fmt: skip
    recipe = Recipe(batch_size=8, student_steps=2, pool_size=4)
    planned = planner.plan(recipe, 4, 0.3, 0.1, 10.0, checks_s=0.5)
    # (100 - 10 elapsed - 10 reserve - 20 evaluations) / (0.3 + 2 x 0.1 + 0.5)
    assert planned.iteration_s == pytest.approx(1.0)
    assert planned.expected_iterations == 60 and planned.planned_total == 64
    assert "500 ms of health checks per iteration" in planned.describe()


def test_evaluations_every_n_iterations_are_a_share_of_each_planned_iteration():
    """With --eval-every N, a timed evaluation costs each iteration a Nth of its seconds (the
    trainer adds it to the health checks' share the plan counts); evaluations due by time are
    counted as the seconds still due instead, and add nothing per iteration."""
    from compress_toolbox.distillation.evaluation import Evaluation
    from compress_toolbox.distillation.options import DistillOptions
    from compress_toolbox.distillation.parts import StopPolicy
    from compress_toolbox.tasks import get_task
    from compress_toolbox.tasks.evaldata import EvalData

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    data = EvalData(torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    for options, share in ((DistillOptions(eval_every=5), 1 / 5), (DistillOptions(), 0.0)):
        stop = StopPolicy.for_run(None, None, 100.0, TINY)
        evaluation = Evaluation(data, model, get_task("classification"), torch.device("cpu"),
                                options, stop, 0.0)  # fmt: skip
        assert evaluation.per_iteration_s() == 0.0  # none timed yet
        evaluation.time_once(model)
        assert evaluation.subset_s > 0
        assert evaluation.per_iteration_s() == pytest.approx(share * evaluation.subset_s)


def test_a_timed_run_times_a_health_check_and_an_evaluation_for_its_plan(digits, capsys):
    """A time-budgeted run with evaluation data plans with a health check and an evaluation
    timed, and report.json's recipe keeps what its plan expected."""
    teacher, eval_data = digits["cnn"]
    slow = Teacher.from_module(_SlowOnLargeBatches(teacher.module, 64, 0.2), SHAPE)
    result = run(slow, eval_data=eval_data, time_budget=6, progress=True, method="dafl")
    err = capsys.readouterr().err
    plans = re.findall(r"iteration (\d+), .* plan batch .* (\d+) ms of health checks per "
                       r"iteration: about (\d+) iterations", err)  # fmt: skip
    assert plans, err
    first, checks_ms, expected = (int(n) for n in plans[0])
    assert checks_ms >= 20  # a check's 0.2 s of the teacher's delay, over 10 iterations
    if result.recipe.replans == 0:  # report.md quotes the last plan
        assert result.recipe.planned_total == first + expected


def test_a_late_replan_asks_only_for_the_iterations_the_run_lacks():
    """Past the target number of iterations, a re-plan keeps the preset's student steps even
    when the rest of the budget buys few iterations; early in a run it trades them away."""
    from compress_toolbox.distillation import distributed
    from compress_toolbox.distillation.health import CollapseGuard
    from compress_toolbox.distillation.parts import Progress, StopPolicy
    from compress_toolbox.distillation.planning import Planner
    from compress_toolbox.distillation.recipe import DRIFT_WINDOW, TARGET_ITERATIONS

    preset = replace(TINY, size_to_budget=True, student_steps=12)
    stop = StopPolicy.for_run(None, None, 100.0, preset)

    class Totals(Progress):  # the totals the planner set, in order
        def set_total(self, total: int) -> None:
            super().set_total(total)
            self.totals.append(total)

    def replanned(iteration: int) -> Recipe:
        progress = Totals(False, "t", None, 0)
        progress.totals = []
        planner = Planner(preset, stop, distributed.world(), progress, CollapseGuard())
        recipe = Recipe(batch_size=8, student_steps=12, pool_size=4, generate_s=0.01,
                        student_step_s=0.001)  # fmt: skip
        for i in range(DRIFT_WINDOW):  # 10x slower: 1.2 s per iteration, 20 s left
            recipe = planner.watch(recipe, iteration + i + 1, 0.1, 0.01, 80.0)
        assert recipe.replans == 1
        # set once per re-plan: the iterations so far and those the rest of the budget buys
        assert progress.totals == [iteration + DRIFT_WINDOW + recipe.expected_iterations]
        return recipe

    assert replanned(TARGET_ITERATIONS + 100).student_steps == 12
    assert replanned(0).student_steps == 4  # 20 s buy 142 iterations of the 390 still lacking


def test_bad_teacher_output_is_a_clear_error():
    teacher = Teacher.from_module(nn.Sequential(nn.Conv2d(1, 3, 1)), SHAPE)
    with pytest.raises(DaflError, match=r"teacher output is \(2, 3, 16, 16\)"):
        run(teacher, iters=1)


class NanTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def test_nan_teacher_is_refused_before_training():
    with pytest.raises(DaflError, match="NaN or infinite on random inputs"):
        run(Teacher.from_module(NanTeacher(), SHAPE), iters=3)


def test_exploding_training_stops_with_training_failed(digits):
    exploding = replace(TINY, student_lr=1e30)
    with pytest.raises(TrainingFailed, match="NaN or infinite at iteration"):
        run(digits["cnn"][0], method="noise", iters=20, preset=exploding)


def test_nan_student_weights_after_the_last_step_fail_as_training(digits):
    student = small_cnn(8)

    def poison(iteration):  # finite losses, then NaN weights: what a last bad step leaves
        if iteration == 2:
            student[0].weight.data[0, 0, 0, 0] = float("nan")

    with pytest.raises(TrainingFailed, match=r"student's 0.weight became NaN"):
        run(digits["cnn"][0], student=student, method="noise", iters=2, on_iteration=poison)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "nope"}, "unknown preset"),
        ({"method": "nope"}, "unknown method"),
        ({"device": "tpu9"}, "device"),
        ({"time_budget": float("nan")}, "time budget must be a positive number"),
        ({"iters": 0}, "iters must be a positive number"),
        ({"threads": -1}, "threads must be a positive number"),
        ({"batch_size": 1}, "at least 2"),
        ({"preset": replace(TINY, student_steps=0)}, "student_steps must be a positive"),
        ({"preset": replace(TINY, schedule="linear")}, "schedule must be one of"),
    ],
)
def test_bad_options(digits, kwargs, message):
    kwargs.setdefault("iters", 1)
    with pytest.raises(DaflError, match=message):
        run(digits["cnn"][0], **kwargs)


def test_race_trains_every_candidate_then_continues_the_winner(digits):
    """--method race on a BatchNorm teacher: bn-prior (auto's choice) first, dafl and
    adversarial beside it, an equal share of a quarter of the iterations each, every leg scored
    on the shared probe set; the rest of the budget goes to the winner, whose student learns."""
    teacher, eval_data = digits["cnn_bn"]
    result = run(teacher, method="race", iters=48, eval_data=eval_data)
    race = result.race
    assert [leg.method for leg in race.legs] == ["bn-prior", "dafl", "adversarial"]
    assert all(leg.iterations == 4 and 0.0 <= leg.agreement <= 1.0 for leg in race.legs)
    assert race.probes == 3 * 128 and race.rule_choice == "bn-prior"
    assert result.method == race.winner and result.iterations == 48 - 3 * 4
    assert result.method_reason.startswith("raced for") and "continued" in result.method_reason
    assert all(leg.method in result.method_reason for leg in race.legs)
    assert result.student_accuracy > 0.8, result.student_accuracy


def test_race_splits_a_time_budget_and_counts_its_time(digits):
    teacher = digits["mlp"][0]
    result = run(teacher, method="race", time_budget=6)
    assert [leg.method for leg in result.race.legs] == ["adversarial", "dafl"]  # no BatchNorm
    assert result.race.seconds >= 0.25 * 6 * 0.5  # two legs of 0.75 s, less their set-up
    assert result.elapsed_s == pytest.approx(result.race.seconds + result.history[-1]["elapsed_s"],
                                             abs=0.5)  # fmt: skip
    assert result.elapsed_s <= 6 + 1.0


def test_the_winner_goes_on_from_its_legs_student_and_generator(digits):
    """A warm start loads the leg's student and generator: one more iteration moves them by a
    learning rate's step, where a fresh start is far away."""
    from compress_toolbox.distillation.options import DistillOptions, WarmStart
    from compress_toolbox.distillation.trainer import Trainer

    teacher = digits["cnn"][0]
    leg = run(teacher, method="dafl", iters=6)
    start = WarmStart(leg.student.state_dict(), leg.method_state)
    # seed 1: a fresh generator unlike the leg's
    options = DistillOptions(method="dafl", preset=TINY, iters=1, progress=False, threads=1,
                             domain=DOMAIN, seed=1)  # fmt: skip
    torch.manual_seed(5)
    warm = Trainer(teacher, small_cnn(8), options, warm_start=start).run()
    torch.manual_seed(5)
    cold = Trainer(teacher, small_cnn(8), options).run()

    def distance(a: nn.Module, b: nn.Module) -> float:
        pairs = zip(a.parameters(), b.parameters())
        return max(float((p - q).detach().abs().max()) for p, q in pairs)

    # Adam moves a weight by about its learning rate per step
    student_step = (TINY.student_steps + 1) * TINY.student_lr
    assert distance(warm.student, leg.student) < student_step
    assert distance(cold.student, leg.student) > 3 * student_step
    generator_step = 2 * TINY.gen_lr
    assert distance(warm.generator, leg.generator) < generator_step
    assert distance(cold.generator, leg.generator) > 3 * generator_step


def test_the_rules_choice_wins_a_near_tie():
    from compress_toolbox.distillation.race import MARGIN, RaceLeg, _winner

    assert _winner([RaceLeg("bn-prior", 5, 0.80), RaceLeg("dafl", 5, 0.80 + MARGIN)]) == "bn-prior"
    assert _winner([RaceLeg("bn-prior", 5, 0.80), RaceLeg("dafl", 5, 0.85)]) == "dafl"
    assert _winner([RaceLeg("bn-prior", note="collapsed"), RaceLeg("dafl", 5, 0.3)]) == "dafl"


def test_race_under_torchrun_leaves_the_choice_to_the_rule(digits, monkeypatch):
    from compress_toolbox.distillation import race

    monkeypatch.setattr(race, "_one_process", lambda: False)  # as under torchrun
    result = run(digits["cnn"][0], method="race", iters=2)
    assert result.race is None and result.method == "adversarial"
    assert result.method_reason.startswith("auto's rule (under torchrun the race does not run)")


def test_too_few_iterations_are_not_raced(digits):
    result = run(digits["cnn"][0], method="race", iters=10)  # legs of 1 iteration: too short
    assert result.race is None and result.iterations == 10
    assert result.method_reason.startswith("auto's rule (too few iterations to race)")


def test_a_raced_run_resumes_with_its_winner(digits, tmp_path):
    teacher = digits["cnn"][0]
    first = run(teacher, method="race", iters=20, checkpoint_dir=tmp_path)  # legs of 2
    assert first.iterations == 20 - 2 * 2
    resumed = run(teacher, method="race", iters=28, checkpoint_dir=tmp_path, resume=True)
    assert resumed.method == first.method and resumed.iterations == 28 - 2 * 3
    assert [r["iteration"] for r in resumed.history] == list(range(1, 23))
    assert "resumed" in resumed.method_reason


def test_an_interrupted_race_says_there_is_nothing_to_resume(digits, monkeypatch):
    """A leg keeps no checkpoint: the message says so; SIGTERM's exit code is kept."""
    from compress_toolbox.distillation import race

    class Interrupted(race.Trainer):
        def run(self):
            error = DistillInterrupted("interrupted at iteration 3; no checkpoint")
            error.exit_code = 143
            raise error

    monkeypatch.setattr(race, "Trainer", Interrupted)
    with pytest.raises(DistillInterrupted, match="during the race .bn-prior's leg.") as caught:
        run(digits["cnn_bn"][0], method="race", iters=48)
    assert caught.value.exit_code == 143


def test_report_md_quotes_the_plan_of_a_time_budgeted_run():
    from compress_toolbox.report.render import _planned

    timed = {"planned_total": 147, "sized_by": "timings (time budget)", "replans": 0}
    assert _planned({"recipe": timed}) == " (planned: about 147)"
    again = {**timed, "replans": 2}
    assert _planned({"recipe": again}) == " (planned: about 147, re-planned 2 times)"
    assert _planned({"recipe": {**timed, "sized_by": "counts"}}) == ""

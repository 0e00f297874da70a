"""The trainer's separate pieces: input domain, recipe sizing, health checks, replay pool, stop
policy, checkpoints, the method registry and the onnxscript adapter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from compress_toolbox.distillation.generator import make_generator
from compress_toolbox.distillation.health import (
    CollapseGuard,
    GenerationCollapsed,
    Health,
    class_entropy,
    judge_student,
)
from compress_toolbox.distillation.losses import (
    BatchNormStatistics,
    adversarial_loss,
    bounded_activation_loss,
    spread_features,
    uniformity_loss,
)
from compress_toolbox.distillation.methods import get_method, method_names
from compress_toolbox.distillation.methods.base import MethodContext
from compress_toolbox.distillation.parts import Checkpointer, ReplayPool, StopPolicy
from compress_toolbox.distillation.presets import PRESETS
from compress_toolbox.distillation.recipe import (
    MEMORY_SHARE,
    MIN_USEFUL_ITERATIONS,
    Recipe,
    fit_batch_to_memory,
    size_recipe,
)
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError, DaflWarning
from compress_toolbox.tasks.evaldata import load_eval_data


def test_domain_maps_pixels_per_channel_and_back():
    domain = InputDomain.from_options([0.5, 0.25, 0.0], [0.5, 0.25, 2.0], (3, 4, 4))
    pixels = torch.rand(2, 3, 4, 4)
    x = domain.to_model(pixels)
    torch.testing.assert_close(x[:, 0], (pixels[:, 0] - 0.5) / 0.5)
    torch.testing.assert_close(x[:, 2], pixels[:, 2] / 2.0)
    torch.testing.assert_close(domain.to_pixels(x), pixels)
    assert InputDomain.from_options(None, None).to_model(pixels) is pixels
    flat = InputDomain.from_options(0.5, 0.5).to_model(torch.ones(3, 7))
    assert torch.equal(flat, torch.ones(3, 7))


def test_domain_options_take_the_clis_text_and_refuse_bad_text_in_one_line():
    """The Python API takes --mean/--std as the CLI writes them; a bad one is a DaflError."""
    text = InputDomain.from_options("0.5,0.25,0", "0.5,0.25,2", (3, 4, 4))
    assert text == InputDomain.from_options([0.5, 0.25, 0.0], [0.5, 0.25, 2.0], (3, 4, 4))
    with pytest.raises(DaflError, match="--mean must be finite numbers, got '0.5,x'"):
        InputDomain.from_options("0.5,x", None)


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [([0.1, 0.2], None, "has 2 values"), (None, [0.0], "must not be zero"),
     ([float("nan")], None, "finite")],
)  # fmt: skip
def test_domain_rejects_bad_statistics(mean, std, message):
    with pytest.raises(DaflError, match=message):
        InputDomain.from_options(mean, std, (3, 8, 8))


def test_eval_data_and_generator_share_the_domain(tmp_path):
    """uint8 eval images and the generator's sigmoid pixels land in the same range."""
    domain = InputDomain.from_options(0.2, 0.4, (1, 8, 8))
    x = (torch.arange(64, dtype=torch.uint8) * 4).view(1, 8, 8).repeat(3, 1, 1)
    import numpy as np

    np.savez(tmp_path / "d.npz", x=x.numpy(), y=np.array([0, 1, 2]))
    data = load_eval_data(tmp_path / "d.npz", (1, 8, 8), domain, num_classes=3)
    low, high = domain.to_model(torch.zeros(1)), domain.to_model(torch.ones(1))
    assert data.x.min() >= low - 1e-6 and data.x.max() <= high + 1e-6
    generator = make_generator((1, 8, 8), latent_dim=4, width=4, domain=domain)
    fake = generator(torch.randn(16, 4))
    assert fake.min() >= low - 1e-6 and fake.max() <= high + 1e-6


def test_eval_labels_outside_the_teacher_classes_are_refused(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 10]))
    with pytest.raises(DaflError, match="label 10 is outside the teacher's 10 classes"):
        load_eval_data(tmp_path / "d.npz", (1, 8, 8), num_classes=10)


def test_conditional_generator_takes_labels():
    generator = make_generator((1, 12, 12), latent_dim=6, width=8, num_classes=5)
    out = generator(torch.randn(4, 6), torch.tensor([0, 1, 2, 4]))
    assert out.shape == (4, 1, 12, 12)
    with pytest.raises(ValueError, match="needs labels"):
        generator(torch.randn(4, 6))


def test_bounded_activation_loss_is_scale_free_and_bounded():
    features = torch.randn(8, 16)
    loss = bounded_activation_loss(features, reference=1.0)
    huge = bounded_activation_loss(features * 1e6, reference=1.0)
    assert -1.0 < huge.item() < loss.item() < 0.0
    torch.testing.assert_close(
        bounded_activation_loss(features * 3, 3.0), bounded_activation_loss(features, 1.0)
    )


def test_adversarial_loss_counts_only_agreeing_samples():
    teacher = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # agrees on the first sample only
    loss = adversarial_loss(student, teacher)
    first = adversarial_loss(student[:1], teacher[:1])
    assert loss.item() == pytest.approx(first.item() / 2)
    assert loss.item() < 0


def test_adversarial_loss_has_finite_gradients_for_a_certain_teacher():
    """A teacher so sure that its softmax holds exact zeros (logits 120 apart) still gives the
    generator, through the teacher's logits, a finite gradient (it was NaN)."""
    teacher = torch.tensor([[120.0, 0.0, -10.0]], requires_grad=True)
    student = torch.tensor([[2.0, 0.0, 1.0]], requires_grad=True)
    adversarial_loss(student, teacher).backward()
    assert torch.isfinite(teacher.grad).all() and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_uniformity_loss_is_highest_for_repeated_samples_and_pushes_them_apart():
    def loss(features, earlier=None):
        return uniformity_loss(spread_features(features), earlier)

    same = torch.ones(8, 5)
    spread = torch.eye(8, 5) + torch.eye(8, 5).roll(5, 0)  # 8 directions, some pairs orthogonal
    assert loss(same).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(spread) < loss(same + 0.1 * spread)
    features = (torch.ones(4, 3) + 0.01 * torch.randn(4, 3)).requires_grad_()
    loss(features).backward()
    assert loss(features - 10 * features.grad) < loss(features)  # a step spreads them
    with torch.autocast("cpu", dtype=torch.bfloat16):  # near-copies still count, in bf16 too
        assert loss(torch.ones(32, 64) + 1e-3 * torch.randn(32, 64)) < 0


def test_uniformity_loss_counts_earlier_samples():
    """A batch spread among itself still scores high when it repeats what came before."""
    batch = torch.eye(4)
    assert uniformity_loss(batch, batch.clone()) > uniformity_loss(batch, -batch)
    assert torch.isfinite(uniformity_loss(torch.ones(1, 3), None))  # one sample, nothing earlier


def test_spread_features_pool_maps_and_bound_the_gradient_of_short_rows():
    assert spread_features(torch.rand(5, 7, 3, 3)).shape == (5, 7)  # what, not where
    rows = torch.cat([torch.randn(7, 6), 1e-9 * torch.randn(1, 6)]).requires_grad_()
    uniformity_loss(spread_features(rows), None).backward()
    assert torch.isfinite(rows.grad).all() and rows.grad.abs().max() < 1e4


def test_diversity_keeps_a_bounded_bank_of_earlier_features_across_a_resume():
    """The diversity term's earlier features stay at FEATURE_BANK rows, newest first, and travel
    with the method's state (a resumed run goes on comparing with them)."""
    from compress_toolbox.distillation.methods.base import FEATURE_BANK

    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    ctx = MethodContext(teacher, teacher, (1, 4, 4), 3, InputDomain(), PRESETS["fast"],
                        torch.device("cpu"), final_layer="3",
                        student_from_teacher=True)  # fmt: skip
    method = get_method("adversarial")(ctx)
    for _ in range(3):
        batch = method.generate(FEATURE_BANK // 2)
    assert "div" in batch.losses and method.spread.earlier.shape == (FEATURE_BANK, 8)
    newest = spread_features(teacher[:3](batch.x))
    assert torch.allclose(method.spread.earlier[: FEATURE_BANK // 2], newest, atol=1e-5)
    again = get_method("adversarial")(ctx)
    again.load_state_dict(method.state_dict())
    assert torch.equal(again.spread.earlier, method.spread.earlier)


def test_bn_prior_spreads_its_samples_when_asked():
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(16, 3)).eval()  # fmt: skip
    preset = PRESETS["fast"].with_weights("bn-prior", div=1.0)
    ctx = MethodContext(teacher, teacher, (1, 4, 4), 3, InputDomain(), preset,
                        torch.device("cpu"), final_layer="4")  # fmt: skip
    method = get_method("bn-prior")(ctx)
    batch = method.generate(12)
    assert batch.losses["div"] < 0 and method.spread.earlier.shape == (12, 16)
    again = get_method("bn-prior")(ctx)
    again.load_state_dict(method.state_dict())
    assert torch.equal(again.spread.earlier, method.spread.earlier)
    older = {key: value for key, value in method.state_dict().items() if key != "earlier_features"}
    again.load_state_dict(older)  # a checkpoint from before the term
    assert again.spread.earlier is None
    for each in (method, again):
        each.close()
    assert not teacher[4]._forward_pre_hooks  # close() took its hook off the teacher
    default = get_method("bn-prior")(replace(ctx, preset=PRESETS["fast"]))
    assert "div" not in default.generate(12).losses  # off unless asked
    default.close()


def test_adversarial_spreads_its_samples_only_for_a_student_from_the_teachers_weights():
    """The diversity term is on where the student starts from the teacher's weights and off,
    said in the report's method line, where it starts fresh; a weight set applies to both."""
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    fresh = MethodContext(teacher, teacher, (1, 4, 4), 3, InputDomain(), PRESETS["fast"],
                          torch.device("cpu"), final_layer="3")  # fmt: skip
    tuned = replace(fresh, student_from_teacher=True)
    asked = replace(fresh, preset=PRESETS["fast"].with_weights("adversarial", div=0.5))
    made = {name: get_method("adversarial")(ctx)
            for name, ctx in (("fresh", fresh), ("tuned", tuned), ("asked", asked))}  # fmt: skip
    assert "div" not in made["fresh"].generate(12).losses and made["fresh"].weights.div == 0
    assert made["fresh"].note() == "diversity term off: the student starts fresh"
    for name in ("tuned", "asked"):
        assert "div" in made[name].generate(12).losses and made[name].note() is None
    assert made["asked"].weights.div == 0.5
    for method in made.values():
        method.close()


def test_a_set_diversity_weight_can_be_given_back_to_the_method():
    """``adversarial.div=null`` (bench_suite's ``--set``) undoes a set weight: the method
    decides again; None stays refused where a weight has a number for default."""
    preset = PRESETS["fast"].with_weights("adversarial", div=0.5).with_options(
        **{"adversarial.div": None})
    assert preset.loss_weights["adversarial"]["div"] is None and preset.changes() == {}
    with pytest.raises(DaflError, match="dafl.div must be a number"):
        PRESETS["fast"].with_weights("dafl", div=None)


@pytest.mark.parametrize(("method", "preset", "message"), [
    ("adversarial", PRESETS["fast"], "activation and diversity losses disabled"),
    ("bn-prior", PRESETS["fast"].with_weights("bn-prior", div=1.0), "diversity loss disabled"),
])
def test_a_teacher_without_a_final_layer_turns_its_feature_losses_off_with_a_warning(
        method, preset, message):  # fmt: skip
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(16, 3)).eval()  # fmt: skip
    ctx = MethodContext(teacher, teacher, (1, 4, 4), 3, InputDomain(), preset,
                        torch.device("cpu"), final_layer=None,
                        student_from_teacher=True)  # fmt: skip
    with pytest.warns(DaflWarning, match=message):
        made = get_method(method)(ctx)
    assert made.features is None and not {"a", "div"} & set(made.generate(12).losses)
    made.close()


def test_batchnorm_statistics_is_zero_at_the_running_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    stats = BatchNormStatistics(model)
    assert len(stats) == 1
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        pre = model[0](x)
    model[1].running_mean.copy_(pre.mean((0, 2, 3)))
    model[1].running_var.copy_(pre.var((0, 2, 3), unbiased=False))
    model(x)
    assert stats.loss().item() == pytest.approx(0.0, abs=1e-4)
    model(x * 3)
    assert stats.loss().item() > 1.0
    with torch.no_grad():
        model(x)  # nothing recorded without gradients
    assert stats.loss() is None
    stats.close()


def test_class_entropy():
    assert class_entropy(torch.zeros(50, dtype=torch.long), 10) == 0.0
    assert class_entropy(torch.arange(100) % 10, 10) == pytest.approx(1.0)
    assert class_entropy(torch.arange(100) % 2, 10) == pytest.approx(0.301, abs=1e-3)


def _health(iteration, entropy):
    return Health(iteration, 1, entropy, 1.0, 0.5, 0.5)


def test_collapse_guard_restarts_then_fails():
    guard = CollapseGuard(patience=2, max_restarts=1, warmup=10)
    assert guard.judge(_health(5, 0.0)) == "ok"  # warm-up never counts
    assert [guard.judge(_health(i, 0.0)) for i in (10, 20)] == ["ok", "restart"]
    assert guard.judge(_health(25, 0.0)) == "ok"  # a new warm-up after the restart
    assert guard.judge(_health(30, 0.9)) == "ok"  # a healthy check resets the count
    assert [guard.judge(_health(i, 0.1)) for i in (40, 50)] == ["ok", "fail"]
    guard.set_warmup(1000)
    assert guard.warmup == 50


def test_collapse_guard_restarts_when_the_teacher_finds_nothing_in_most_inputs():
    guard = CollapseGuard(patience=2, max_restarts=1, warmup=10)
    blind = [Health(i, 10, 0.95, 0.9, 0.5, 0.9, found=0.3) for i in (10, 20)]
    assert [guard.judge(h) for h in blind] == ["ok", "restart"]
    assert guard.judge(Health(40, 10, 0.95, 0.9, 0.5, 0.9, found=0.9)) == "ok"
    with pytest.raises(GenerationCollapsed, match="finds nothing in 70% of the generated"):
        for i in (50, 60):
            guard.respond(Health(i, 10, 0.95, 0.9, 0.5, 0.9, found=0.3), i, 10)


def test_judge_student():
    assert judge_student(0.9, 0.8, None) == []
    assert "less than half" in judge_student(0.9, 0.4, None)[0]
    collapsed = Health(100, 10, 0.95, 0.9, 0.1, 0.0)
    assert "same class" in judge_student(None, None, collapsed)[0]
    assert judge_student(None, None, _health(100, 0.9)) == []
    assert "no training iteration" in judge_student(None, None, None)[0]
    assert "at the end of training the generated inputs collapsed onto 1" in judge_student(
        None, None, _health(100, 0.1))[0]  # fmt: skip
    blind = Health(100, 10, 0.95, 0.9, 0.8, 0.9, found=0.25)
    assert "finds nothing in 75% of the generated inputs" in judge_student(None, None, blind)[0]
    guessing = Health(100, 10, 0.95, 0.9, 0.12, 0.9)
    assert "only 12%" in judge_student(None, None, guessing, num_classes=10)[0]
    assert judge_student(None, None, Health(100, 10, 0.95, 0.9, 0.5, 0.9), num_classes=10) == []
    assert judge_student(0.9, 0.8, None, num_classes=10) == []  # eval data decides


def test_recipe_trades_student_steps_for_generator_steps_on_a_short_budget():
    recipe = Recipe.from_preset(PRESETS["fast"])
    roomy = size_recipe(recipe, 0.05, 0.01, remaining_s=600, adapt=True)
    assert roomy.student_steps == recipe.student_steps and roomy.warning is None
    tight = size_recipe(recipe, 1.0, 0.2, remaining_s=300, adapt=True)
    assert 4 <= tight.student_steps < recipe.student_steps
    assert tight.expected_iterations < MIN_USEFUL_ITERATIONS and "s of training" in tight.warning
    fixed = size_recipe(recipe, 1.0, 0.2, remaining_s=300, adapt=False)
    assert fixed.student_steps == recipe.student_steps


def test_stop_policy():
    stop = StopPolicy(total_iters=10, time_budget=None)
    assert stop.reason_to_stop(9, 1e9) is None and stop.reason_to_stop(10, 0) == "iterations"
    timed = StopPolicy(None, 10.0, fit_to_budget=True)
    timed.record(2.0, 2)
    assert timed.reason_to_stop(3, 7.0) is None and timed.reason_to_stop(3, 8.5) == "time budget"
    assert timed.progress(3, 5.0) == pytest.approx(0.5)
    timed.reserve_s = 1.0  # the final evaluation's expected seconds
    assert timed.reason_to_stop(3, 6.5) is None and timed.reason_to_stop(3, 7.5) == "time budget"


def test_replay_pool_caps_memory_and_rebatches():
    pool = ReplayPool(size=10, batch_bytes=100, memory_bytes=300)
    assert pool.size == 3
    for i in range(5):
        pool.add(torch.full((4, 2), float(i)), torch.zeros(4, 3))
    assert len(pool) == 3 and pool.newest()[0][0, 0] == 4
    pool.rebatch(2)
    assert len(pool) == 3 and all(len(x) == 2 for x, _ in pool.batches)


def test_checkpoints_are_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "ckpt.pt"
    torch.save({"format": "dafl-compress-checkpoint-v2", "x": Evil()}, path)
    with pytest.raises(DaflError, match="cannot be read safely|not a dafl-compress"):
        Checkpointer(path, 60).load(torch.device("cpu"), {})
    torch.save({"format": "dafl-compress-checkpoint-v2", "method": "dafl"}, path)
    with pytest.raises(DaflError, match="lacks"):
        Checkpointer(path, 60).load(torch.device("cpu"), {})


def test_method_registry():
    assert {"dafl", "noise", "adversarial", "conditional", "bn-prior"} <= set(method_names())
    with pytest.raises(DaflError, match="unknown method 'nope'"):
        get_method("nope")


def test_onnxscript_internals_the_adapter_relies_on():
    """Fails loudly when onnxscript moves what onnxscript_adapter.py patches."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    rules = {id(rule) for rule in _fuse_batchnorm.rules.rules}
    assert rules and rules <= {id(rule) for rule in rewriter._DEFAULT_REWRITE_RULES}


def test_generator_losses_are_read_as_numbers_in_one_go():
    from compress_toolbox.distillation.methods.base import as_floats

    terms = {"oh": (1.0, torch.tensor(0.25, requires_grad=True) * 2),
             "a": (0.1, torch.tensor([3.0]))}  # fmt: skip
    assert as_floats(terms) == {"oh": 0.5, "a": 3.0}
    assert as_floats({}) == {}


def test_adam_is_fused_only_for_parameters_on_cuda():
    from compress_toolbox.distillation.optimizers import adam

    optimizer = adam(nn.Linear(2, 2).parameters(), 0.1)
    assert optimizer.defaults["fused"] is None  # the CPU keeps the measured default
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_the_batch_is_halved_to_fit_memory_and_a_shape_that_never_fits_is_refused():
    recipe = Recipe(256, 1, 8)
    free = int(100 * 2**20 / MEMORY_SHARE)  # 100 MiB usable
    with pytest.warns(DaflWarning, match="using batch 64"):
        assert fit_batch_to_memory(recipe, 2**20 + 1, free, (3, 8, 8)).batch_size == 64
    assert fit_batch_to_memory(recipe, 2**18, free, (3, 8, 8)) == recipe  # 64 MiB fits
    assert fit_batch_to_memory(recipe, 2**30, None, (3, 8, 8)) == recipe  # free memory unknown
    with pytest.raises(DaflError, match=r"inputs of shape \(3, 8, 8\) need about 0.1 GiB"):
        fit_batch_to_memory(recipe, 60 * 2**20, free, (3, 8, 8))


def test_progress_is_a_live_bar_on_a_terminal_and_sparse_lines_on_a_file(monkeypatch, capsys):
    """README: "a live bar on a terminal, a plain line every 30 s when output goes to a file"."""
    import io
    import sys

    from compress_toolbox.distillation import parts

    clock = [0.0]
    monkeypatch.setattr(parts.time, "perf_counter", lambda: clock[0])
    progress = parts.Progress(True, "dafl", total=100, initial=0)  # stderr is captured: a file
    assert progress.bar is None
    for iteration in range(1, 101):
        clock[0] = iteration  # one iteration a second
        progress.update(iteration, clock[0], {"acc": "0.5"})
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"dafl: iteration {i}/100, {i} s; acc 0.5" for i in (30, 60, 90)]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    progress = parts.Progress(True, "dafl", total=100, initial=0)
    progress.update(40, 40.0, {"acc": "0.5"})
    assert progress.bar is not None and progress.bar.n == 40
    progress.close()
    assert "40/100" in sys.stderr.getvalue()

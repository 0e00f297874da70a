"""Each method owns its loss weights (a frozen dataclass next to it); presets change them by
method name and still give exactly the numbers they gave when ``Preset`` held every weight."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import pytest
import torch
from torch import nn

from compress_toolbox.distillation.methods import (
    LossWeights,
    get_method,
    loss_weights,
    method_names,
    register_method,
)
from compress_toolbox.distillation.methods.base import MethodContext
from compress_toolbox.distillation.methods.dafl import DAFL
from compress_toolbox.distillation.presets import PRESETS, get_preset
from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError

# Preset's w_* fields (and entropy_base, bounded_activation) before the weights moved into the
# methods: every method read these, whatever its name.
_SHARED = {"ie": 5.0, "entropy_base": 10.0, "ce": 1.0, "bn": 5.0, "adv": 1.0}
BEFORE = {
    "paper-mnist": {**_SHARED, "oh": 1.0, "a": 0.1, "bounded_activation": False},
    "paper-cifar": {**_SHARED, "oh": 0.05, "a": 0.01, "bounded_activation": False},
    "fast": {**_SHARED, "oh": 1.0, "a": 0.1, "bounded_activation": True},
}


# Settings added to a method since, with their defaults: DAFL's diversity term (session 35), on
# in adversarial only, where it follows where the student starts unless set (session 37).
ADDED: dict[str, dict] = {
    **{name: {"div": 0.0} for name in ("dafl", "dafl-seg", "dafl-det", "bn-prior-det", "bn-prior")},
    "adversarial": {"div": None},
}


@pytest.mark.parametrize("preset", sorted(BEFORE))
@pytest.mark.parametrize("method", method_names())
def test_every_preset_gives_every_method_the_numbers_it_gave_before(preset, method):
    weights = loss_weights(get_method(method), PRESETS[preset].loss_weights)
    expected = {**BEFORE[preset], **ADDED.get(method, {})}
    for field in fields(weights):
        assert getattr(weights, field.name) == expected[field.name], field.name


def _context(preset, input_shape=(1, 8, 8), classes=3) -> MethodContext:
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
    return MethodContext(teacher=teacher, student=student, input_shape=input_shape,
                         num_classes=classes, domain=InputDomain(), preset=preset,
                         device=torch.device("cpu"), final_layer="3",
                         autocast=nullcontext)  # fmt: skip


def test_the_fast_generators_learn_at_the_rates_measured_per_task():
    """0.02 for classifiers and detectors (at the paper's 0.2 a pixel-domain generator saturated
    into flat patches), 0.2 for segmentation (measured worse at 0.02), also after a restart;
    the paper presets keep the paper's rate and conditional generators theirs."""
    assert get_preset("paper-mnist").generator_lr("classification", conditional=False) == 0.2
    preset = get_preset("fast")
    assert preset.generator_lr("segmentation", conditional=True) == preset.gen_lr_conditional
    cases = (("dafl", "classification", 0.02), ("dafl-det", "detection", 0.02),
             ("dafl", "segmentation", 0.2))  # fmt: skip
    for name, task, rate in cases:
        method = get_method(name)(replace(_context(preset), task=task))
        for _ in range(2):
            assert [group["lr"] for group in method.optimizer.param_groups] == [rate], task
            method.restart()
        method.close()


def test_a_task_rate_is_checked_and_settable():
    preset = get_preset("fast").with_options(gen_lr_by_task={"classification": 0.1})
    assert preset.generator_lr("classification", conditional=False) == 0.1
    with pytest.raises(DaflError, match="gen_lr_by_task"):
        get_preset("fast").with_options(gen_lr_by_task={"segmentation": -1})
    preset = get_preset("fast").with_options(student_lr_by_task={"classification": 0.02})
    assert preset.student_rates(False, "classification") == (0.02, 1e-4)
    # a rate set by name is every task's, segmentation's own included
    fast = get_preset("fast")
    assert fast.with_options(student_lr=0.02).student_rates(False, "segmentation")[0] == 0.02
    assert fast.with_options(gen_lr=0.05).generator_lr("segmentation", conditional=False) == 0.05
    with pytest.raises(DaflError, match=r"student_lr_by_task\['segmentation'\] must be a positive"):
        get_preset("fast").with_options(student_lr_by_task={"segmentation": 0})


def test_the_weights_reach_the_loss_terms():
    torch.manual_seed(0)
    ctx = replace(_context(get_preset("paper-cifar")), student_from_teacher=True)
    method = get_method("adversarial")(ctx)
    x = method.sample(4)
    terms = method.loss_terms(x, method.ctx.teacher(x), None)
    assert {name: weight for name, (weight, _) in terms.items()} == {
        "oh": 0.05, "ie": 5.0, "a": 0.01, "div": 1.0, "adv": 1.0}  # fmt: skip
    method.close()


def test_a_method_takes_the_weights_set_for_the_method_it_derives_from():
    preset = get_preset("fast").with_options(**{"dafl.oh": 2, "adversarial.adv": 0.5})
    assert preset.loss_weights["dafl"] == {"bounded_activation": True, "oh": 2}
    adversarial = loss_weights(get_method("adversarial"), preset.loss_weights)
    assert (adversarial.oh, adversarial.adv, adversarial.bounded_activation) == (2.0, 0.5, True)
    assert loss_weights(get_method("dafl"), preset.loss_weights).oh == 2.0
    assert loss_weights(get_method("dfad"), preset.loss_weights).adv == 1.0  # not derived
    assert preset.with_weights("dafl", a=0.0).loss_weights["dafl"]["oh"] == 2  # others kept
    assert PRESETS["fast"].loss_weights == {"dafl": {"bounded_activation": True}}  # unchanged
    assert hash(preset) == hash(PRESETS["fast"]) and preset != PRESETS["fast"]  # hashable


def test_a_report_names_what_was_changed_from_the_named_preset():
    from compress_toolbox.report.render import _preset_changes

    fast = get_preset("fast")
    assert fast.changes() == {}
    changed = fast.with_options(**{"dafl-det.div": 1, "dafl.bounded_activation": True,
                                   "student_steps": fast.student_steps + 1})  # fmt: skip
    # bounded_activation is fast's own value: not a change
    assert changed.changes() == {"student_steps": fast.student_steps + 1, "dafl-det.div": 1}
    assert replace(changed, name="mine").changes() == {}  # a preset of its own: its name says
    assert fast.with_options(**{"dafl.oh": 1.0}).changes() == {}  # DAFL's own value
    dropped = replace(fast, loss_weights={}, augmentations=("photometric",))
    assert dropped.changes() == {"augmentations": ["photometric"],  # as JSON has it
                                 "dafl.bounded_activation": False}  # fmt: skip
    report = {"preset_changes": changed.changes()}
    assert _preset_changes(report) == (
        f" (changed: student_steps={fast.student_steps + 1}, dafl-det.div=1.0)")
    assert _preset_changes({"preset_changes": {}}) == _preset_changes({}) == ""


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"w_oh": 1.0}, r"unknown preset field\(s\): w_oh \(loss weights are set per method as "
                        r"METHOD.WEIGHT, e.g. dafl.oh\)"),
        ({"dafl.ohh": 1.0}, "unknown loss weight.* dafl.ohh; dafl has: oh, ie, a, entropy_base"),
        ({"daf.oh": 1.0}, "loss weights for unknown method 'daf'; choose one of adversarial"),
        ({"dafl.oh": -1}, "dafl.oh must be a number >= 0, got -1"),
        ({"dafl.a": float("nan")}, "dafl.a must be a number >= 0"),
        ({"dafl.bounded_activation": 1}, "dafl.bounded_activation must be true or false"),
        ({"noise.oh": 1.0}, "noise has: none"),
    ],
)
def test_a_wrong_weight_is_one_clear_line(changes, message):
    with pytest.raises(DaflError, match=message) as error:
        get_preset("fast").with_options(**changes)
    assert "\n" not in str(error.value)


def test_the_registry_knows_each_methods_weights():
    assert get_method("dafl").weights_type().oh == 1.0
    assert issubclass(get_method("dafl-det").weights_type, get_method("dafl").weights_type)
    assert get_method("noise").weights_type is LossWeights


@dataclass(frozen=True)
class _Unrelated(LossWeights):  # not DAFL's weights
    x: float = 1.0


@dataclass(frozen=True)
class _Foreign:  # not LossWeights at all
    x: float = 1.0


@pytest.mark.parametrize(
    ("weights", "message"),
    [(_Unrelated, "must extend those of 'dafl'"), (_Foreign, "frozen LossWeights")],
)
def test_the_registry_refuses_inconsistent_weights(weights, message):
    odd = type("Odd", (DAFL,), {"name": "odd-test", "weights_type": weights})
    with pytest.raises(ValueError, match=message):
        register_method(odd)
    assert "odd-test" not in method_names()


def test_a_student_from_the_teachers_weights_takes_the_fine_tuning_rates_where_set():
    fast, cifar = get_preset("fast"), get_preset("paper-cifar")
    assert fast.student_rates(False) == (fast.student_lr, fast.weight_decay) == (5e-3, 1e-4)
    assert fast.student_rates(True) == (fast.student_lr_fine_tune, 0.0)
    # segmentation's fresh students have a rate of their own; from the teacher's, the same
    assert fast.student_rates(False, "segmentation") == (1e-2, 1e-4)
    assert fast.student_rates(False, "classification") == (5e-3, 1e-4)
    assert fast.student_rates(True, "segmentation") == (1e-3, 0.0)
    assert cifar.student_rates(True) == cifar.student_rates(False) == (0.1, 5e-4)  # none set
    for name in ("weight_decay", "weight_decay_fine_tune"):
        for bad in (-1e-4, float("nan"), "1e-4", True):
            with pytest.raises(DaflError, match=f"{name} must be a number >= 0"):
                fast.with_options(**{name: bad})
    with pytest.raises(DaflError, match="weight_decay must be a number >= 0, got None"):
        fast.with_options(weight_decay=None)
    assert fast.with_options(weight_decay_fine_tune=None).student_rates(True) == (1e-3, 1e-4)

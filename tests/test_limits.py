"""Bounded work: a runaway student derivation is stopped within its time and memory."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from models import example, lenet5

from compress_toolbox.limits import LimitExceeded, bounded
from compress_toolbox.student import derive as student_module
from compress_toolbox.student.derive import StudentError, make_student

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS")


def test_time_bound_stops_a_python_loop():
    start = time.perf_counter()
    with pytest.raises(LimitExceeded, match="took over") as caught:
        with bounded(0.3, None):
            while True:
                sum(range(1000))
    assert caught.value.what == "time"
    assert time.perf_counter() - start < 3


def test_time_bound_works_when_ctrl_c_is_ignored():
    """A process started in the background ignores SIGINT; the bound must still stop it."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(LimitExceeded, match="took over"):
            with bounded(0.3, None):
                while True:
                    sum(range(1000))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_block_within_its_bounds_leaves_no_late_interrupt():
    with bounded(0.2, 2**30):
        total = sum(range(1000))
    time.sleep(0.5)  # past the deadline: the cancelled timer must not interrupt us now
    assert total == 499500


@linux_only
def test_memory_bound_stops_a_runaway_allocation():
    with pytest.raises(LimitExceeded, match="memory") as caught:
        with bounded(None, 256 * 2**20):
            torch.ones(2**31, dtype=torch.uint8)  # 2 GiB
    assert caught.value.what == "memory"
    torch.ones(2**28, dtype=torch.uint8)  # the cap is lifted afterwards


def test_real_ctrl_c_is_not_taken_for_the_time_bound():
    with pytest.raises(KeyboardInterrupt):
        with bounded(30, None):
            raise KeyboardInterrupt


def test_a_runaway_derivation_is_refused_within_its_time_limit(monkeypatch):
    def never_ends(*args, **kwargs):
        while True:
            sum(range(1000))

    monkeypatch.setattr(student_module, "_strategies", lambda module: [never_ends])
    start = time.perf_counter()
    with pytest.raises(StudentError, match=r"took over 1 s .*was stopped"):
        make_student(lenet5(), example_input=example((1, 32, 32)), time_limit=1.0)
    assert time.perf_counter() - start < 5


@linux_only
def test_a_derivation_that_eats_memory_is_refused(monkeypatch):
    monkeypatch.setattr(student_module, "memory_cap", lambda: 256 * 2**20)

    def hungry(*args, **kwargs):
        return [torch.ones(2**28, dtype=torch.uint8) for _ in range(16)]  # 4 GiB in all

    monkeypatch.setattr(student_module, "_strategies", lambda module: [hungry])
    with pytest.raises(StudentError, match="more than 0.2 GiB of memory"):
        make_student(lenet5(), example_input=example((1, 32, 32)))

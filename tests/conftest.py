"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _light_cpu():
    """Tiny models: one thread is fastest on a 2-core machine and immune to busy neighbours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def ctrl_c_as_at_a_terminal() -> None:
    """``preexec_fn`` for a child the test will send SIGINT: a test run started in the
    background (``cmd &`` in a script) ignores SIGINT, and children inherit that, so the CLI
    would never see the test's Ctrl-C. Restore the default, as in a terminal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args) -> int:
    """The command line in this process (so monkeypatches apply); its exit code."""
    from cli.main import main

    return main([str(a) for a in args])


def one_error_line(capture, *needles: str) -> str:
    """stderr (``capsys``, or ``capfd`` to include C++ messages) is one line holding every
    needle, without a traceback."""
    err = capture.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err

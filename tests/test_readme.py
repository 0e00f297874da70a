"""The README's promises that no other test file checks: its Python API example runs as
written (on a small teacher, with a short budget), and its commands exist."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _python_example() -> str:
    section = README[README.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 64, 32), nn.ReLU(), nn.Linear(32, 10))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model((x - 0.2860) / 0.3530), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x[:2],), str(tmp_path / "teacher.onnx"), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    np.savez(tmp_path / "test.npz", x=(x[1200:, 0] * 255).to(torch.uint8).numpy(),
             y=y[1200:].numpy())  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code = _python_example().replace("time_budget=120", "time_budget=3")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "student" / "student.onnx").is_file()
    assert (tmp_path / "out" / "student.onnx").is_file()
    assert (tmp_path / "out" / "report.json").is_file()
    assert namespace["result"].method == "adversarial"  # no BatchNorm in this teacher


def test_readme_commands_exist():
    for script in ("scripts/demo.sh", "scripts/test.sh", "examples/make_teacher.py",
                   "benchmarks/bench_suite.py", "benchmarks/teachers/make_suite.py"):  # fmt: skip
        assert script in README or script.split("/")[-1] in README, script
        assert (REPO / script).is_file(), script


def test_the_demo_falls_back_to_scikit_learns_digits_which_it_installs(monkeypatch):
    """README: make_teacher.py "falls back to scikit-learn's digits" where Fashion-MNIST cannot
    be installed (no apt-get, as on Windows), so demo.sh installs scikit-learn with the package;
    without it the script says what to install in one line."""
    import configparser
    import importlib.util
    import sys

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    demo = config["options.extras_require"]["demo"]
    assert "scikit-learn" in demo and '-e ".[demo]"' in (REPO / "scripts/demo.sh").read_text()
    spec = importlib.util.spec_from_file_location("make_teacher", REPO / "examples/make_teacher.py")
    make_teacher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_teacher)
    monkeypatch.setattr(make_teacher, "_install_fashion_mnist", lambda: False)
    name, train_x, train_y, test_x, test_y = make_teacher.load_data()
    assert name == "sklearn digits" and train_x.shape == (1400, 8, 8) and len(test_y) == 397
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"neither Fashion-MNIST nor scikit-learn .*\.\[demo\]"):
        make_teacher.load_data()


def test_every_relative_link_in_the_documents_resolves():
    for document in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" in target:
                continue
            assert (document.parent / target).exists(), f"{document.name}: {target}"


def test_the_method_lists_name_every_registered_method():
    """README's and docs/output.md's ``--method a|b|...`` lists are written by hand: every
    registered method and the two choosers (auto, race) are on them, and nothing else."""
    from compress_toolbox.distillation.methods import method_names

    for text in (README, (REPO / "docs" / "output.md").read_text()):
        listed = re.search(r"`--method ([a-z|-]+)`", text).group(1).split("|")
        assert sorted(listed) == sorted(["auto", "race", *method_names()])

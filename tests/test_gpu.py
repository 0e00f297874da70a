"""The CUDA code paths: bf16 autocast, a real out-of-memory answered by halving the batch,
checkpoint and resume with CUDA random state, and the whole pipeline on a GPU.

Skipped (and reported as skipped) on machines without CUDA, as in CI; run on a GPU machine with
``python -m pytest tests/test_gpu.py`` (benchmarks/gpu_check.sh does, with the GPU benchmarks).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_distill import MEAN, SHAPE, STD, TINY, digits, run, small_cnn  # noqa: F401 (digits is a fixture)

from compress_toolbox.distillation.trainer import CHECKPOINT_NAME
from compress_toolbox.errors import DaflWarning
from compress_toolbox.tasks.evaldata import evaluate

# cuBLAS is deterministic only with this workspace, read when its first handle is made (before
# any test of this file runs): see the ``deterministic`` fixture
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("method", "kind"), [("dafl", "cnn"), ("bn-prior", "cnn_bn")])
def test_training_on_cuda_learns_and_returns_a_cpu_student(digits, method, kind):  # noqa: F811
    teacher, eval_data = digits[kind]
    torch.manual_seed(123)
    student = small_cnn(8)
    before = evaluate(student, eval_data)
    result = run(teacher, student, method=method, iters=60, eval_data=eval_data, device="cuda")
    assert result.student_accuracy > before + 0.2, (before, result.student_accuracy)
    assert all(math.isfinite(v) for row in result.history for k, v in row.items()
               if k.startswith("loss_"))  # fmt: skip
    assert next(result.student.parameters()).device.type == "cpu"
    assert next(result.student.parameters()).dtype == torch.float32  # autocast, not bf16 weights


def test_adam_on_cuda_is_the_fused_kernel():
    from compress_toolbox.distillation.optimizers import adam

    assert adam(torch.nn.Linear(2, 2).cuda().parameters(), 0.1).defaults["fused"] is True


def test_real_out_of_memory_halves_the_batch_and_finishes(digits):  # noqa: F811
    """A per-process memory cap makes the allocator itself fail at a large batch; the trainer
    must release the failed step's memory, halve the batch and go on."""
    teacher, _ = digits["cnn"]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(400e6 / total)  # about 400 MB for this process
    try:
        preset = TINY.with_options(batch_size=65536, gen_width=64)
        with pytest.warns(DaflWarning, match="CUDA out of memory: continuing at batch"):
            result = run(teacher, small_cnn(8), preset=preset, iters=5, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert result.iterations == 5
    assert result.recipe.batch_size < 65536


@pytest.fixture
def deterministic():
    """CUDA's deterministic kernels (the image shifts' gather, cuDNN, cuBLAS) for one test: its
    default ones sum in a varying order, and a DAFL generator amplifies those last-bit
    differences within a few iterations, so two runs of one seed would not be comparable."""
    torch.use_deterministic_algorithms(True)
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def test_resume_on_cuda_continues(digits, tmp_path, deterministic):  # noqa: F811
    teacher = digits["cnn_bn"][0]
    straight = run(teacher, method="dafl", iters=12, seed=3, device="cuda")
    run(teacher, method="dafl", iters=6, seed=3, device="cuda", checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert "cuda" in state["rng"]
    resumed = run(teacher, method="dafl", iters=12, seed=3, device="cuda",
                  checkpoint_dir=tmp_path, resume=True)  # fmt: skip
    assert [r["iteration"] for r in resumed.history] == list(range(1, 13))
    for a, b in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compress_on_cuda_writes_a_verified_folder(digits, tmp_path):  # noqa: F811
    from models import save_torchscript

    from compress_toolbox import CompressConfig, compress

    teacher, _ = digits["cnn"]
    path = save_torchscript(teacher.module, SHAPE, tmp_path / "cnn.pt")
    result = compress(
        path,
        CompressConfig.from_options(
            out=tmp_path / "out",
            iters=60,
            device="cuda",
            progress=False,
            mean=[MEAN],
            std=[STD],
            method="dafl",
        ),
    )
    assert (tmp_path / "out" / "student.onnx").exists()
    assert result.report["device"].startswith("cuda")
    assert result.report["onnx_check"]["max_abs_diff"] < 1e-3

"""What speeds up one training iteration of the suite's small nets on this machine?

    python benchmarks/bench_speedups.py [--teachers lenet5-fashion resnet8-fashion32] [--threads 1]

For each teacher (from benchmarks/teachers/out, see make_suite.py) and its derived student it
times, at batch 128: a student KD step (forward + backward + Adam) and a DAFL generator step
(generator and teacher forward + backward), in the default memory format, in channels-last, and
under torch.compile (its compile time reported apart); and the teacher's forward under no_grad
vs inference_mode. Prints medians of 10 timed repeats after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compress_toolbox import load_teacher, make_student  # noqa: E402
from compress_toolbox.distillation.generator import make_generator  # noqa: E402
from compress_toolbox.distillation.losses import kd_loss  # noqa: E402

SUITE = HERE / "teachers" / "out"


def median_ms(step, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def student_step(student, x, t_logits, optimizer):
    def step():
        loss = kd_loss(student(x), t_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def generator_step(generator, teacher, optimizer, batch):
    def step():
        logits = teacher(generator(torch.randn(batch, 100)))
        loss = -logits.softmax(1).max(1).values.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(entry: dict, batch: int) -> dict[str, float]:
    teacher = load_teacher(SUITE / entry["file"], model_class=entry["model_class"],
                           model_kwargs=entry["model_kwargs"],
                           input_shape=entry.get("input_shape_option"))  # fmt: skip
    shape = teacher.input_shape
    module = teacher.module.eval().requires_grad_(False)
    student = make_student(module, example_input=torch.randn(2, *shape)).train()
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        t_logits = module(x)
    figures = {}
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    figures["student step"] = median_ms(student_step(student, x, t_logits, optimizer))
    generator = make_generator(shape, 100, 16)
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    figures["generator step"] = median_ms(generator_step(generator, module, g_opt, batch))
    with torch.no_grad():
        figures["teacher forward, no_grad"] = median_ms(lambda: module(x))
    with torch.inference_mode():
        figures["teacher forward, inference_mode"] = median_ms(lambda: module(x))
    if len(shape) == 3:
        cl = torch.channels_last
        student.to(memory_format=cl)
        module.to(memory_format=cl)
        generator.to(memory_format=cl)
        x_cl = x.contiguous(memory_format=cl)
        figures["student step, channels_last"] = median_ms(
            student_step(student, x_cl, t_logits, optimizer))  # fmt: skip
        figures["generator step, channels_last"] = median_ms(
            generator_step(generator, module, g_opt, batch))  # fmt: skip
        student.to(memory_format=torch.contiguous_format)
        module.to(memory_format=torch.contiguous_format)
    compiled = torch.compile(student)
    start = time.perf_counter()
    student_step(compiled, x, t_logits, optimizer)()
    figures["torch.compile: compile seconds"] = time.perf_counter() - start
    figures["student step, torch.compile"] = median_ms(
        student_step(compiled, x, t_logits, optimizer))  # fmt: skip
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = ["lenet5-fashion", "mobilenet-fashion32", "resnet8-fashion32"]
    parser.add_argument("--teachers", nargs="*", default=defaults)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    entries = {e["name"]: e for e in json.loads((SUITE / "suite.json").read_text())}
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    for name in args.teachers:
        for label, value in measure(entries[name], args.batch).items():
            unit = "s" if "seconds" in label else "ms"
            print(f"{name:22s} {label:38s} {value:9.1f} {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

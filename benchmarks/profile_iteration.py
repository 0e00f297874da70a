"""Where does a real training iteration spend its time? (CPU or GPU)

    python benchmarks/profile_iteration.py [--teacher lenet5-mnist] [--preset paper-mnist]
                                           [--iters 200] [--device cuda] [--autocast off]
                                           [--no-profile]

Runs ``distill`` on a suite teacher (benchmarks/teachers/out, see make_suite.py) twice: once
plain for ``--iters`` iterations (iterations per second, the figure that matters), then for a
quarter of them under torch.profiler. Prints the ops with the most self time on the host and on
the device, and how often the host waited for the device (synchronisations, copies to the host,
``.item()``): on a GPU, small networks are bound by the host's launching, and every wait breaks
the queue of launched work. ``--autocast off`` trains in float32 on a GPU instead of bf16
autocast (to measure what the casts cost small networks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compress_toolbox import distill, load_teacher, make_student  # noqa: E402
from compress_toolbox.distillation import trainer  # noqa: E402

SUITE = HERE / "teachers" / "out"
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
         "aten::item", "cudaMemcpyAsync", "aten::nonzero")  # fmt: skip


def run(teacher, preset: str, iters: int, device: str) -> float:
    """Distil a fresh student for ``iters`` iterations; iterations per second after the first
    (set-up, the first iteration's kernel choices and allocations left out)."""
    module = teacher.module.eval()
    student = make_student(module, example_input=torch.randn(2, *teacher.input_shape))
    marks: list[float] = []
    result = distill(teacher, student, preset=preset, iters=iters, device=device,
                     progress=False, method="dafl",
                     on_iteration=lambda _: marks.append(time.perf_counter()))  # fmt: skip
    return (result.iterations - 1) / (marks[-1] - marks[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="lenet5-mnist")
    parser.add_argument("--preset", default="paper-mnist")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--autocast", choices=("on", "off"), default="on")
    parser.add_argument("--no-profile", action="store_true", help="the rate only")
    args = parser.parse_args()
    if args.autocast == "off":
        trainer.autocast_factory = lambda device: contextlib.nullcontext
    warnings.filterwarnings("ignore")
    entry = {e["name"]: e for e in json.loads((SUITE / "suite.json").read_text())}[args.teacher]
    teacher = load_teacher(SUITE / entry["file"], model_class=entry["model_class"],
                           model_kwargs=entry["model_kwargs"],
                           input_shape=entry.get("input_shape_option"))  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rate = run(teacher, args.preset, args.iters, device)
    print(f"{args.teacher}, preset {args.preset}, {device}, autocast {args.autocast}: "
          f"{rate:.1f} iterations/s ({args.iters} iterations, the first left out)",
          flush=True)  # fmt: skip
    if args.no_profile:
        return 0
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run(teacher, args.preset, max(args.iters // 4, 10), device)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    for event in averages:
        if event.key in WAITS:
            print(f"host waits: {event.key:28s} {event.count:7d} calls, "
                  f"{event.self_cpu_time_total / 1000:9.1f} ms self")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the suite's students could reach with the teacher's own training images: the ceiling
that data-free distillation is measured against.

The same derived student as ``dafl-compress`` builds (half width, started from the teacher's
weights as the fast preset does), the same optimiser, learning rate, cosine schedule, batch and
KD temperature as the fast preset, for the same wall-time budget (one thread per run with
``--jobs 2``, as bench_suite.py's); only the inputs differ: real training images (labels
unused: the student learns the teacher's outputs) instead of generated ones. A data-free
student near this ceiling has no more to gain from better generated inputs at this budget; far
below it, the generator is what limits it.

    python benchmarks/teachers/make_suite.py      # once: the teachers
    python benchmarks/bench_ceiling.py --teachers lenet5-fashion --seeds 3 --jobs 2

Training images: Fashion-MNIST's 60k training set, MNIST's even-indexed 5,000 test images
(the teacher's own; evaluation on the odd-indexed 5,000), the digits MLP's 1,200.
Prints one line per run and the medians, as % of the teacher's accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUITE = HERE / "teachers" / "out"


def _setup() -> None:
    """Imports for a worker process (spawned: the repository and the suite's data loader)."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE / "teachers"))
    import warnings

    warnings.filterwarnings("ignore")


def _teacher_and_student(entry: dict, seed: int):
    """The suite teacher as ``dafl-compress`` loads it, and the student plan it derives."""
    from dataclasses import replace

    from compress_toolbox import CompressConfig
    from compress_toolbox.load.teacher import load_teacher
    from compress_toolbox.pipeline import fit_teacher_to_task
    from compress_toolbox.student.plan import plan_student

    config = CompressConfig.from_options(mean=entry["mean"], std=entry["std"], seed=seed)
    teacher = load_teacher(SUITE / entry["file"], model_class=entry["model_class"],
                           model_kwargs=entry["model_kwargs"],
                           input_shape=entry.get("input_shape_option"))  # fmt: skip
    config = replace(config, task=config.task.bound_to(teacher))
    teacher = fit_teacher_to_task(teacher, config.task)
    return teacher, plan_student(teacher, config)


def _real_images(entry: dict, shape: tuple[int, ...]):
    """(training inputs, evaluation inputs, evaluation labels) as the teacher takes them."""
    import torch
    from make_suite import load_raw, to_input

    mean_std = None
    if entry["mean"] is not None:  # normalisation outside the model, as the suite gives it
        mean_std = tuple(torch.tensor(entry[k]).view(-1, 1, 1) for k in ("mean", "std"))
    train_x, _, eval_x, eval_y = load_raw(entry["data"])
    return (to_input(train_x, shape, mean_std), to_input(eval_x, shape, mean_std),
            torch.from_numpy(eval_y.astype("int64")))  # fmt: skip


def _train(teacher, plan, x, budget: float) -> int:
    """KD on random batches of ``x`` for ``budget`` seconds with the fast preset's student
    recipe; the number of steps made."""
    from compress_toolbox.distillation.losses import kd_loss
    from compress_toolbox.distillation.presets import PRESETS

    preset = PRESETS["fast"]
    return train_on_images(teacher.module, plan.module, x, budget,
                           preset.student_rates(plan.from_teacher), preset.batch_size,
                           lambda s, t: kd_loss(s, t, preset.kd_temperature))  # fmt: skip


def train_on_images(teacher, student, images, budget: float, rates: tuple[float, float],
                    batch: int, loss_fn) -> int:  # fmt: skip
    """Adam at ``rates`` (learning rate, weight decay) on ``loss_fn(student(x), teacher(x))``
    over random batches of ``images`` for ``budget`` seconds, the learning rate on a cosine
    over the budget (as fit_schedule_to_budget); the number of steps made."""
    import math

    import torch

    from compress_toolbox.distillation.optimizers import adam

    lr, weight_decay = rates
    optimizer = adam(student.parameters(), lr, weight_decay)
    teacher.eval()
    student.train()
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
        x = images[torch.randint(len(images), (batch,))]
        with torch.no_grad():
            target = teacher(x)
        loss = loss_fn(student(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def run_one(entry: dict, seed: int, budget: float, threads: int) -> dict:
    """KD of the derived student on the teacher's real training images for ``budget`` s."""
    _setup()
    import torch

    from compress_toolbox.tasks.evaldata import accuracy

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    teacher, plan = _teacher_and_student(entry, seed)
    x, eval_x, eval_y = _real_images(entry, tuple(teacher.input_shape))
    steps = _train(teacher, plan, x, budget)
    student = plan.module.eval()
    with torch.no_grad():
        predictions = torch.cat([student(b) for b in eval_x.split(500)]).argmax(1)
    return {"teacher": entry["name"], "seed": seed, "budget": budget, "steps": steps,
            "accuracy": accuracy(predictions, eval_y),
            "teacher_accuracy": entry["teacher_accuracy"], "student_kind": plan.kind}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", nargs="*", help="suite names (default: the ONNX ones)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, help="seconds (default: the suite's own)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each "
                        "when > 1)")  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_suite import budget_for

    entries = json.loads((SUITE / "suite.json").read_text())
    if args.teachers:
        unknown = sorted(set(args.teachers) - {e["name"] for e in entries})
        if unknown:
            parser.error(f"unknown teacher(s) {', '.join(unknown)}; the suite has "
                         f"{', '.join(e['name'] for e in entries)}")  # fmt: skip
        entries = [e for e in entries if e["name"] in args.teachers]
    else:
        entries = [e for e in entries if e["file"].endswith(".onnx")]
    threads = 1 if args.jobs > 1 else 2
    jobs = [(e, seed, budget_for(e, args.budget), threads)
            for e in entries for seed in range(args.seeds)]  # fmt: skip
    rows = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for row in pool.map(run_one, *zip(*jobs)):
            share = row["accuracy"] / row["teacher_accuracy"]
            print(f"{row['teacher']} seed {row['seed']}: {row['accuracy']:.4f} "
                  f"({share:.1%} of {row['teacher_accuracy']:.4f}) in {row['budget']:.0f} s, "
                  f"{row['steps']} student steps, {row['student_kind']}", flush=True)  # fmt: skip
            rows.append(row)
    print("\n| teacher | budget | real-data KD (seeds) | median, % of teacher |")
    print("|---|---|---|---|")
    for entry in entries:
        mine = [r for r in rows if r["teacher"] == entry["name"]]
        shares = [r["accuracy"] / r["teacher_accuracy"] for r in mine]
        seeds = " / ".join(f"{r['accuracy']:.4f}" for r in mine)
        print(f"| {entry['name']} | {mine[0]['budget']:.0f} s | {seeds} | "
              f"{statistics.median(shares):.1%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

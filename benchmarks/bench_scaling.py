"""Scaling over processes: iterations per second and student accuracy at a fixed time budget,
1 rank against N ranks (torchrun via ``--nproc``), the same per-rank batch (so N ranks train
on an N-times larger global batch).

    python benchmarks/bench_scaling.py --teacher T.onnx --eval-data T-eval.npz \\
        [--mean M --std S] [--ranks 1 2] [--budget 30] [--seeds 3] [--batch-size 64]

Each run is the whole CLI (``dafl-compress T --nproc N --time-budget S ...``); the figures come
from its report.json: iterations, training seconds, global batch, accuracy of student.onnx on
the evaluation data. Prints one row per rank count with medians over the seeds, and the
machine's load average before and after. On a 2-core CPU, 2 ranks compete for the same cores
as 1 rank's 2 threads: expect no speed-up there; the point of several ranks is several GPUs or
machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_run(args: argparse.Namespace, ranks: int, seed: int, out: Path) -> dict:
    command = [
        sys.executable, "-m", "cli", str(args.teacher), "--out", str(out),
        "--time-budget", str(args.budget), "--batch-size", str(args.batch_size),
        "--seed", str(seed), "--no-progress", "--eval-data", str(args.eval_data),
    ]  # fmt: skip
    for option in ("mean", "std"):  # the suite's teachers take normalised inputs
        if getattr(args, option):
            command += [f"--{option}", getattr(args, option)]
    if ranks > 1:
        command += ["--nproc", str(ranks)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s), seed {seed}: exit {done.returncode}\n{done.stderr}")
    report = json.loads((out / "report.json").read_text())
    return {
        "iterations": report["iterations"],
        "train_s": report["elapsed_s"],
        "it_per_s": report["iterations"] / report["elapsed_s"],
        "samples_per_s": report["iterations"] * report["global_batch_size"] / report["elapsed_s"],
        "global_batch": report["global_batch_size"],
        "student_steps": report["recipe"]["student_steps"],
        "accuracy": report["student"]["accuracy"],
        "teacher_accuracy": report["teacher"]["accuracy"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--eval-data", type=Path, required=True)
    parser.add_argument("--mean", help="passed on (e.g. 0.286 for lenet5-fashion)")
    parser.add_argument("--std", help="passed on (e.g. 0.353)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budget", type=float, default=30.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPU cores", flush=True)
    runs: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):  # interleaved, so that load changes hit both alike
            for ranks in args.ranks:
                run = one_run(args, ranks, seed, Path(tmp) / f"r{ranks}s{seed}")
                runs.setdefault(ranks, []).append(run)
                print(f"  {ranks} rank(s), seed {seed}: {json.dumps(run)}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{args.teacher.name}, {args.budget:g} s budget, batch {args.batch_size} per rank, "
          f"medians of {args.seeds} seeds")  # fmt: skip
    print("| ranks | global batch | iterations | it/s | generated samples/s | student steps/it "
          "| student acc | teacher acc | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for ranks, rows in runs.items():
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(
            f"| {ranks} | {med['global_batch']:.0f} | {med['iterations']:.0f} | "
            f"{med['it_per_s']:.2f} | {med['samples_per_s']:.0f} | {med['student_steps']:.0f} "
            f"| {med['accuracy']:.4f} | {med['teacher_accuracy']:.4f} | {med['wall_s']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()

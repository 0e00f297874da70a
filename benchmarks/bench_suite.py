"""The teacher suite benchmark: every suite teacher x method x seed, end to end through the
same ``compress`` the CLI runs (import from the shipped file, verification, derived student,
distillation, ONNX export, evaluation of student.onnx on the teacher's evaluation set).

    python benchmarks/teachers/make_suite.py          # once: train and export the teachers
    python benchmarks/bench_suite.py                  # auto vs plain DAFL, 3 seeds
    python benchmarks/bench_suite.py --methods auto --seeds 1 --teachers lenet5-fashion \\
        --budget 60 --set student_steps=8 --jobs 2

The default compares the default (``auto``: method and student start chosen by the tool) with
plain DAFL (``dafl+fresh``: the DAFL method from a freshly initialised student, as in the paper).
``--quantize`` adds ``--quantize int8 --quantize-teacher`` to every run and prints the INT8 table
(teacher fp32 / teacher int8 / student fp32 / student int8: accuracy, size, latency, medians over
seeds) and the share of the wall time spent quantising.
Budgets: 180 s for teachers of at most 5 M MACs, 600 s up to 50 M (the targets' budgets),
unless --budget. ``--jobs 2`` runs two at a time with one thread each (faster, but each run then
has one core: say so when quoting). Prints one line per run and a table of medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUITE = HERE / "teachers" / "out"


def budget_for(entry: dict, fixed: float | None) -> float:
    if fixed:
        return fixed
    return 180.0 if entry["macs"] <= 5e6 else 600.0


def parse_sets(pairs: list[str]) -> dict:
    """key=value preset overrides (numbers parsed, else strings)."""
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return changes


def run_one(entry: dict, method: str, seed: int, budget: float, changes: dict,
            threads: int | None, iters: int | None, quantize: bool = False,
            fingerprint: str | None = None) -> dict:  # fmt: skip
    """One compress run in this (worker) process; returns the figures of its report."""
    sys.path.insert(0, str(REPO))
    import warnings

    warnings.filterwarnings("ignore")
    from compress_toolbox import CompressConfig, compress
    from compress_toolbox.distillation.presets import PRESETS
    from compress_toolbox.errors import DaflError, TrainingFailed

    preset = PRESETS["fast"].with_options(**changes) if changes else "fast"
    name, _, init = method.partition("+")  # "dafl+fresh": method dafl, student init fresh
    out = Path(tempfile.mkdtemp(prefix="suite-")) / "out"
    budget_option = {"iters": iters} if iters else {"time_budget": budget}
    if quantize:
        budget_option.update(quantize="int8", quantize_teacher=True)
    start = time.perf_counter()
    status, report = "ok", None
    try:
        try:
            compress(
                SUITE / entry["file"],
                CompressConfig.from_options(
                    out=out,
                    eval_data=SUITE / entry["eval"],
                    mean=entry["mean"],
                    std=entry["std"],
                    model_class=entry["model_class"],
                    model_kwargs=entry["model_kwargs"],
                    input_shape=entry.get("input_shape_option"),
                    init=init or "auto",
                    method=name,
                    preset=preset,
                    seed=seed,
                    threads=threads,
                    progress=False,
                    **budget_option,
                ),
            )
        except TrainingFailed as error:
            status = f"FAILED: {str(error)[:120]}"
        except DaflError as error:  # e.g. a method that cannot run on this teacher
            status = f"not run: {str(error)[:120]}"
        wall = time.perf_counter() - start
        if (out / "report.json").exists():
            report = json.loads((out / "report.json").read_text())
    finally:  # whatever happens, no suite-* folder is left in the temporary folder
        shutil.rmtree(out.parent, ignore_errors=True)
    row = {"teacher": entry["name"], "requested": method, "seed": seed, "status": status,
           "wall_s": wall, "budget": budget, "iters": iters, "set": changes,
           "quantize": quantize, "fingerprint": fingerprint}  # fmt: skip
    if report:
        row.update(
            method=report["method"], accuracy=report["student"]["accuracy"],
            teacher_accuracy=report["teacher"]["accuracy"], iterations=report["iterations"],
            train_s=report["elapsed_s"], recipe=report["recipe"],
            restarts=report["generator_restarts"], health=report["health"],
            timings=report["timings"], student_kind=report["student"]["kind"],
            race=report.get("race"),
        )  # fmt: skip
        if report.get("int8"):
            row["int8"] = int8_rows(report)
    return row


def fingerprint(entry: dict, changes: dict) -> str:
    """What a run's figures depend on besides its teacher name, method, seed and budget: the
    preset's every field after ``changes``, and the teacher's files and manifest entry (a
    rebuilt teacher, a changed preset default or an edit of the file holding its model class,
    any class in it, is another run)."""
    from dataclasses import asdict

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from compress_toolbox.distillation.presets import PRESETS

    digest = hashlib.sha256()
    preset = PRESETS["fast"].with_options(**changes)
    digest.update(json.dumps([asdict(preset), entry], sort_keys=True, default=str).encode())
    sources = [SUITE / entry["file"], SUITE / (entry["file"] + ".data"), SUITE / entry["eval"]]
    if entry.get("model_class"):  # "path/to/models.py:ClassName"
        sources.append(Path(entry["model_class"].rpartition(":")[0]))
    for path in sources:
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _key(teacher: str, method: str, seed: int, budget: float, iters: int | None,
         quantize: bool, fingerprint: str | None) -> tuple:  # fmt: skip
    """What makes two runs the same run (a resumed benchmark reuses only those)."""
    return teacher, method, seed, None if iters else budget, iters, quantize, fingerprint


def row_key(row: dict) -> tuple:
    """``_key`` of a finished run (one from before fingerprints matches nothing)."""
    return _key(row["teacher"], row["requested"], row["seed"], row["budget"], row.get("iters"),
                row.get("quantize", False), row.get("fingerprint"))  # fmt: skip


def job_key(job: tuple) -> tuple:
    """``_key`` of a run to make (``run_one``'s arguments)."""
    entry, method, seed, budget, _changes, _threads, iters, quantize, prints = job
    return _key(entry["name"], method, seed, budget, iters, quantize, prints)


def summarise(rows: list[dict], entries: list[dict], methods: list[str]) -> str:
    """The table of medians over seeds, one line per teacher and method."""
    lines = [
        "| teacher | format | MACs | teacher acc | method (ran) | student acc (median) | "
        "% of teacher | seeds | iterations (% of plan) | train s | wall s | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        for method in methods:
            runs = [r for r in rows if r["teacher"] == entry["name"] and r["requested"] == method]
            done = [r for r in runs if r.get("accuracy") is not None]
            if not runs:
                continue
            acc = statistics.median(r["accuracy"] for r in done) if done else float("nan")
            t_acc = entry["teacher_accuracy"]
            ran = ",".join(sorted({r.get("method", "?") for r in runs}))
            failed = sum(r["status"] != "ok" for r in runs)
            per_seed = " / ".join(f"{r['accuracy']:.4f}" for r in done)
            lines.append(
                f"| {entry['name']} | {entry['format']} | {entry['macs'] / 1e6:.2f} M | "
                f"{t_acc:.4f} | {method} ({ran}) | {acc:.4f} ({per_seed}) | "
                f"{100 * acc / t_acc:.1f}% | {len(runs)} | "
                f"{statistics.median(r.get('iterations', 0) for r in runs):.0f} "
                f"({_of_plan(runs)}) | "
                f"{statistics.median(r.get('train_s', 0) for r in runs):.0f} | "
                f"{statistics.median(r['wall_s'] for r in runs):.0f} | {failed} |"
            )
    return "\n".join(lines)


def _planned(row: dict) -> int | None:
    """The iterations a time-budgeted run's last (re-)plan expected (None for others)."""
    from compress_toolbox.report.render import planned_iterations

    return planned_iterations(row.get("recipe"))


def _of_plan(runs: list[dict]) -> str:
    """The runs' iterations as a share of their plans (issue 25: within 20% on an idle
    machine), each run's, or "-" where none was planned by time."""
    shares = [f"{100 * r['iterations'] / _planned(r):.0f}%" for r in runs if _planned(r)]
    return " / ".join(shares) or "-"


INT8_KEYS = ("model", "status", "score", "onnx_bytes", "latency_ms", "agreement")


def int8_rows(report: dict) -> list[dict]:
    """The report's INT8 table rows, as the benchmarks keep them."""
    return [{key: r[key] for key in INT8_KEYS} for r in report["int8"]["rows"]]


def summarise_int8(rows: list[dict], teachers: list[str], score: str = "accuracy") -> str:
    """The INT8 table: per teacher, each model's median ``score`` (accuracy, mean IoU), file
    size, latency and agreement with the float student over the seeds, and the share of the
    wall time spent quantising."""
    lines = [
        f"| teacher | model | {score} (median) | size (bytes) | latency batch 1 ms | "
        "latency batch 32 ms | agreement with fp32 | status | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    shares = []
    for teacher in teachers:
        runs = [r for r in rows if r["teacher"] == teacher and r.get("int8")]
        for model in ("teacher fp32", "teacher int8", "student fp32", "student int8"):
            found = [m for r in runs for m in r["int8"] if m["model"] == model]
            if not found:
                continue

            def median(get, items=found):
                values = [v for v in map(get, items) if v is not None]
                return statistics.median(values) if values else None

            latency = [m.get("latency_ms") or {} for m in found]
            figures = (median(lambda m: m["score"]), median(lambda m: m["onnx_bytes"]),
                       median(lambda t: t.get("batch 1"), latency),
                       median(lambda t: t.get("batch 32"), latency),
                       median(lambda m: m.get("agreement")))  # fmt: skip
            text = " | ".join("-" if v is None else f"{v:.4g}" for v in figures)
            status = ",".join(sorted({m["status"] for m in found}))
            lines.append(f"| {teacher} | {model} | {text} | {status} | {len(found)} |")
        shares += [r["timings"]["quantize_s"] / r["wall_s"] for r in runs if r.get("timings")]
    if shares:
        share = 100 * statistics.median(shares)
        lines.append(f"\nquantising (student and teacher): median {share:.1f}% of a run's wall "
                     f"time (max {100 * max(shares):.1f}%)")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teachers", nargs="*", help="names from suite.json (default: all)")
    parser.add_argument("--methods", nargs="*", default=["auto", "dafl+fresh"],
                        help="NAME or NAME+INIT (dafl+fresh: plain DAFL)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds first-seed .. first-seed+seeds-1")  # fmt: skip
    parser.add_argument("--budget", type=float, help="seconds per run (default: by MACs)")
    parser.add_argument("--iters", type=int, help="iterations per run instead of a budget")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="fast-preset fields to change, and loss weights as "
                        "METHOD.WEIGHT (e.g. dafl.oh=0.5)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (1 thread each)")
    parser.add_argument("--threads", type=int,
                        help="threads per run (default: 1 with --jobs > 1, else the tool's choice; "
                        "1 for two invocations side by side)")  # fmt: skip
    parser.add_argument("--quantize", action="store_true",
                        help="also write and measure INT8 student and teacher")  # fmt: skip
    parser.add_argument(
        "--json",
        type=Path,
        help="write every run's figures here, after each run; runs already in the file at "
        "the same settings (preset after --set, teacher files) are not run again (resume a long "
        "benchmark; rows written before runs were fingerprinted are run again); the table counts "
        "only this command's runs",
    )
    args = parser.parse_args()
    manifest = SUITE / "suite.json"
    if not manifest.exists():
        print(f"{manifest} not found: run benchmarks/teachers/make_suite.py first")
        return 2
    entries = json.loads(manifest.read_text())
    if args.teachers:
        entries = [e for e in entries if e["name"] in args.teachers]
    changes = parse_sets(args.set)
    threads = args.threads or (1 if args.jobs > 1 else None)
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    prints = {e["name"]: fingerprint(e, changes) for e in entries}
    jobs = [(e, m, s, budget_for(e, args.budget), changes, threads, args.iters, args.quantize,
             prints[e["name"]])
            for e in entries for m in args.methods
            for s in range(args.first_seed, args.first_seed + args.seeds)]  # fmt: skip
    wanted = {job_key(job) for job in jobs}
    kept = [r for r in rows if row_key(r) in wanted]
    done = {row_key(r) for r in kept}
    jobs = [job for job in jobs if job_key(job) not in done]
    print(f"{len(jobs)} runs ({len(kept)} done already in {args.json}, "
          f"{len(rows) - len(kept)} other runs there not counted), {args.jobs} at a time; "
          f"preset changes: {changes or 'none'}", flush=True)  # fmt: skip
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, *job) for job in jobs]
        for future in futures:
            row = future.result()
            rows.append(row)
            kept.append(row)
            if args.json:  # after each run, atomically: a killed benchmark resumes
                partial = args.json.with_suffix(".partial")
                partial.write_text(json.dumps(rows, indent=1, default=str))
                partial.replace(args.json)
            acc = row.get("accuracy")
            print(f"{row['teacher']:22s} {row['requested']:>11s}->{row.get('method', '?'):11s} "
                  f"seed {row['seed']}: acc {acc if acc is None else f'{acc:.4f}'} "
                  f"(teacher {row.get('teacher_accuracy', 0):.4f}), {row.get('iterations')} it "
                  f"(planned {_planned(row)}), "
                  f"train {row.get('train_s', 0):.0f} s, wall {row['wall_s']:.0f} s, "
                  f"{row['status']}", flush=True)  # fmt: skip
    print()
    print(summarise(kept, entries, args.methods))
    if args.quantize:
        print()
        print(summarise_int8(kept, [entry["name"] for entry in entries]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

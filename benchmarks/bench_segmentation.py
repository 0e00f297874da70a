"""The segmentation benchmark (issue 14): Fashion-MNIST canvas teachers x method x budget, end to
end through the same ``compress`` the CLI runs (import and verification of the shipped file,
student, distillation, ONNX export, mean IoU of student.onnx on 1,000 evaluation canvases).

    python benchmarks/teachers/make_segmentation.py     # once: data and teachers (~10 min)
    python benchmarks/bench_segmentation.py --budgets 120 600 --methods auto dafl dfad
    python benchmarks/bench_segmentation.py --budgets 180 --seeds 3 --quantize   # INT8 too
    python benchmarks/bench_segmentation.py --set gen_lr=0.02    # a fast-preset field changed
    python benchmarks/bench_segmentation.py --iters 540 --set dafl-seg.div=1   # equal iterations

Teachers: ``unet-seg`` with a derived student, ``lraspp-seg`` with ``--student zoo``
(``--student`` sets another for every run); each file as torch's default ONNX (BatchNorm
folded) or ``.pt2`` (BatchNorm kept: ``--formats pt2``).
Prints one line per run and a table of medians over seeds: teacher and student mean IoU and
their ratio (the target: >= 0.85 within 600 s on an idle 2-core CPU), one row per setting: the
fingerprint column (bench_suite.py's ``fingerprint``: the fast preset after ``--set`` and the
teacher's files) tells apart rows of the same ``--set`` made under other preset defaults.
``--quantize`` adds ``--quantize int8 --quantize-teacher`` to each run and a second table: the
INT8 student's mean IoU against the float student's (issue 27's target: within 2 points), file
sizes, status.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
DATA = HERE / "teachers" / "out" / "segmentation"

from bench_suite import (  # noqa: E402 (this folder is on the path)
    fingerprint,
    int8_rows,
    parse_sets,
    summarise_int8,
)

STUDENTS = {"unet-seg": "auto", "lraspp-seg": "zoo"}


def run_one(teacher: str, fmt: str, method: str, budget: float, seed: int, threads: int | None,
            batch_size: int | None = None, init: str = "auto", quantize: bool = False,
            changes: dict | None = None, iters: int | None = None,
            student: str | None = None) -> dict:  # fmt: skip
    """One ``compress`` run; its figures (a failed student keeps its figures, marked).
    ``student``: ``--student`` (None: the teacher's in STUDENTS); ``threads`` None: the
    preset's choice."""
    from compress_toolbox import CompressConfig, compress
    from compress_toolbox.distillation.presets import PRESETS
    from compress_toolbox.errors import DaflError

    path = DATA / f"{teacher}.{fmt}"
    budget = None if iters else budget
    student = student or STUDENTS[teacher]
    files = {"file": f"{DATA.name}/{path.name}", "eval": f"{DATA.name}/seg_eval.npz"}
    row = {"teacher": teacher, "format": fmt, "method": method, "budget": budget, "seed": seed,
           "student": student, "batch_size": batch_size, "init": init,
           "quantize": quantize, "set": changes or {}, "iters": iters,
           "threads": "auto" if threads is None else threads,
           "fingerprint": fingerprint(files, changes or {})}  # fmt: skip
    preset = PRESETS["fast"].with_options(**changes) if changes else "fast"
    int8_options = {"quantize": "int8", "quantize_teacher": True} if quantize else {}
    budget_option = {"iters": iters} if iters else {"time_budget": budget}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        try:
            result = compress(
                path,
                CompressConfig.from_options(
                    task="segmentation",
                    student=student,
                    out=out,
                    eval_data=DATA / "seg_eval.npz",
                    method=method,
                    preset=preset,
                    **budget_option,
                    seed=seed,
                    threads=threads,
                    batch_size=batch_size,
                    init=init,
                    progress=False,
                    **int8_options,
                ),
            )
            report = result.report
        except DaflError as error:
            row["error"] = str(error)[:300]
            report_path = out / "report.json"
            report = json.loads(report_path.read_text()) if report_path.exists() else None
        if report:
            seg = report["segmentation"]
            row.update(status=report["status"], ran=report["method"],
                       student_kind=report["student"]["kind"],
                       teacher_miou=seg["teacher"]["mean_iou"],
                       student_miou=seg["student"]["mean_iou"],
                       student_pixel_acc=seg["student"]["pixel_accuracy"],
                       iterations=report["iterations"], train_s=report["elapsed_s"],
                       # the recipe as the last (re-)plan left it: a timed run trades
                       # student steps per generated batch for iterations (recipe.py)
                       student_steps=report["recipe"]["student_steps"],
                       replans=report["recipe"]["replans"],
                       macs_ratio=report["student"]["macs"] / report["teacher"]["macs"],
                       )  # fmt: skip
            if report.get("int8"):
                row["int8"] = int8_rows(report)
                row["timings"] = report["timings"]
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return row


def _table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (
            row["teacher"],
            row["format"],
            row["student"],
            row["method"],
            row["budget"],
            row.get("iters"),
            row.get("batch_size"),
            row.get("init", "auto"),
            json.dumps(row.get("set", {}), sort_keys=True),
            row.get("fingerprint"),  # the same --set text under other preset defaults differs
            row.get("threads", 1),  # rows written before it was recorded ran the default, 1
        )
        groups.setdefault(key, []).append(row)
    lines = ["| teacher | file | student | method (ran) | budget | batch | teacher mIoU | "
             "student mIoU (median) | % of teacher | seeds | iterations | failed | fingerprint |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, group in groups.items():
        teacher, fmt, student, method, budget, iters, batch, init, changes, prints, threads = key
        settings = prints[:8] if prints else "not recorded"
        batch = batch or "default"
        budget = f"{iters} it" if iters else f"{budget:.0f} s"
        if threads != 1:
            budget += f", {threads} threads"
        if changes != "{}":
            method = f"{method} {changes}"
        done = [r for r in group if "student_miou" in r]
        if not done:
            lines.append(f"| {teacher} | {fmt} | {student} | {method} | {budget} | {batch} "
                         f"| | | | {len(group)} | | {len(group)} | {settings} |")  # fmt: skip
            continue
        t = statistics.median(r["teacher_miou"] for r in done)
        s = statistics.median(r["student_miou"] for r in done)
        ran = "/".join(sorted({r["ran"] for r in done}))
        kind = done[0]["student_kind"] + ("" if init == "auto" else f" (--init {init})")
        its = statistics.median(r["iterations"] for r in done)
        failed = sum(r.get("status") != "ok" for r in group)
        lines.append(f"| {teacher} | {fmt} | {kind} | {method} ({ran}) | {budget} | {batch} | "
                     f"{t:.4f} | {s:.4f} | {100 * s / t:.1f}% | {len(group)} | {its:.0f} | "
                     f"{failed} | {settings} |")  # fmt: skip
    return "\n".join(lines)


def _int8_table(rows: list[dict]) -> str:
    """bench_suite's INT8 table in mean IoU, and the INT8 student's median loss against the
    float student of the same run."""
    teachers = list(dict.fromkeys(r["teacher"] for r in rows if r.get("int8")))
    notes = []
    for teacher in teachers:
        runs = [r for r in rows if r["teacher"] == teacher and r.get("int8")]
        losses = [_score(r, "student fp32") - _score(r, "student int8") for r in runs
                  if _score(r, "student int8") is not None]  # fmt: skip
        if losses:
            notes.append(f"{teacher}: the INT8 student loses {100 * statistics.median(losses):.2f} "
                         f"points of mean IoU (median; per seed "
                         f"{', '.join(f'{100 * x:+.2f}' for x in losses)})")  # fmt: skip
    return "\n".join([summarise_int8(rows, teachers, score="mean IoU"), "", *notes])


def _score(row: dict, model: str) -> float | None:
    return next((m["score"] for m in row["int8"] if m["model"] == model), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=list(STUDENTS))
    parser.add_argument("--formats", nargs="+", default=["onnx"], choices=("onnx", "pt2"))
    parser.add_argument("--methods", nargs="+", default=["auto"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[600.0])
    parser.add_argument("--iters", type=int, help="iterations per run instead of --budgets "
                        "(deterministic at one thread)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed+seeds-1"
    )
    parser.add_argument("--batch-size", type=int, help="default: the task's (16 for segmentation)")
    defaults = ", ".join(f"{teacher} {student}" for teacher, student in STUDENTS.items())
    parser.add_argument("--student", help="--student for every run (auto, zoo, zoo:NAME); "
                        f"default: the teacher's ({defaults})")  # fmt: skip
    parser.add_argument("--init", choices=("auto", "fresh", "teacher"), default="auto")
    parser.add_argument(
        "--threads",
        type=lambda value: None if value == "auto" else int(value),
        default=1,
        help="CPU threads per run (1: measured faster on a shared 2-core CPU; auto: the "
        "preset's choice, as a user's run makes it)",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="fast-preset fields to change, as bench_suite.py's")  # fmt: skip
    parser.add_argument("--quantize", action="store_true",
                        help="also write and judge INT8 student and teacher")  # fmt: skip
    parser.add_argument("--json", type=Path, help="append every run's row to this JSON list")
    parser.add_argument(
        "--table", type=Path, nargs="*", help="only print the table of these JSON files' rows"
    )
    args = parser.parse_args()
    if args.table:
        rows = [row for path in args.table for row in json.loads(path.read_text())]
        print(_table(rows))
        if any(row.get("int8") for row in rows):
            print(_int8_table(rows))
        return 0
    if not (DATA / "seg_eval.npz").exists():
        print(f"no {DATA}/seg_eval.npz: run benchmarks/teachers/make_segmentation.py first")
        return 2
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    mine = []
    for budget in [None] if args.iters else args.budgets:
        for teacher in args.teachers:
            for fmt in args.formats:
                for method in args.methods:
                    for seed in range(args.first_seed, args.first_seed + args.seeds):
                        row = run_one(teacher, fmt, method, budget, seed, args.threads,
                                      args.batch_size, args.init, args.quantize,
                                      parse_sets(args.set), args.iters,
                                      args.student)  # fmt: skip
                        mine.append(row)
                        print(json.dumps(row), flush=True)
                        if args.json:
                            args.json.write_text(json.dumps(rows + mine, indent=1) + "\n")
    print(_table(mine))
    if args.quantize:
        print(_int8_table(mine))
    return 0


if __name__ == "__main__":
    sys.exit(main())

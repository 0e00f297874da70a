"""The detection benchmark (issue 26, first slice): a tiny YOLOv8-style detector trained
(seeded) on scenes of scikit-learn's digits pasted at several scales on noisy 64 px canvases,
exported with torch.onnx.export as users ship it, then compressed end to end through the same
``compress`` the CLI runs (derived half-width student, dafl-det, student.onnx scored by
COCOeval on 300 held-out scenes).

    python benchmarks/bench_detection.py                      # 180 s teacher, 300 s budget
    python benchmarks/bench_detection.py --budget 60 --teacher-seconds 60
    python benchmarks/bench_detection.py --head levels   # raw levels, as YOLOv7 ships them
    python benchmarks/bench_detection.py --data D --iters 500 --set dafl-det.div=1   # a screen

Prints teacher and student mAP@0.5 (and @[.5:.95]), their ratio, the parameter ratio and the
student's fidelity (its mAP@0.5 against the teacher's own detections).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def teacher_files(args: argparse.Namespace):
    """The teacher and its scenes: built (trained for --teacher-seconds), or with --data those
    a previous run of the same seed, head and size built there (so that two arms of a screen
    distil the same teacher; training by time is not repeatable)."""
    from compress_toolbox.tasks.detection.scenes import SceneSpec
    from compress_toolbox.tasks.detection.training import (
        BenchmarkFiles,
        TrainOptions,
        make_benchmark,
    )

    data = Path(args.data) if args.data else Path(args.out) / "data"
    made = {"seed": args.seed, "head": args.head, "size": args.size,
            "teacher_seconds": args.teacher_seconds}  # fmt: skip
    kept = kept_teacher(data, made, ("teacher.onnx", "scenes.npz")) if args.data else None
    if kept:
        return BenchmarkFiles(data / "teacher.onnx", data / "scenes.npz",
                              kept["teacher_map_50"], kept["num_classes"])  # fmt: skip
    files = make_benchmark(data, TrainOptions(seconds=args.teacher_seconds, seed=args.seed),
                           SceneSpec(size=args.size), head=args.head)  # fmt: skip
    keep_teacher(data, made, teacher_map_50=files.teacher_map_50, num_classes=files.num_classes)
    return files


def kept_teacher(data: Path, made: dict, files: tuple[str, ...]) -> dict | None:
    """What ``keep_teacher`` recorded of the teacher an earlier run built in ``data`` with the
    settings ``made`` (None: none built there); a teacher made otherwise, or a record whose
    ``files`` are not all there, stops the run."""
    record = data / "benchmark.json"
    if not record.is_file():
        return None
    kept = json.loads(record.read_text())
    if kept["made"] != made:
        raise SystemExit(f"{data} holds a teacher made with {kept['made']}, not {made}")
    missing = [name for name in files if not (data / name).is_file()]
    if missing:
        raise SystemExit(f"{record} records a teacher but {', '.join(missing)} is missing: "
                         "delete the record to build it again")  # fmt: skip
    return kept


def keep_teacher(data: Path, made: dict, **figures) -> None:
    """Record in ``data`` that its teacher was made with the settings ``made``, and its
    ``figures``, for ``kept_teacher``."""
    (data / "benchmark.json").write_text(json.dumps({"made": made, **figures}))


def run(args: argparse.Namespace) -> dict:
    """Build the teacher and scenes, compress, and return the figures of report.json."""
    import torch
    from bench_suite import parse_sets

    from compress_toolbox import CompressConfig, compress
    from compress_toolbox.distillation.presets import PRESETS
    from compress_toolbox.errors import DaflError

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    files = teacher_files(args)
    built_s = time.perf_counter() - start
    decoding = {"decode": f"{HERE / 'teachers' / 'levels_model.py'}:decode_outputs"}
    changes = parse_sets(args.set)
    budget = {"iters": args.iters} if args.iters else {"time_budget": args.budget}
    config = CompressConfig.from_options(task="detection", eval_data=str(files.eval_data),
                                         threads=args.threads, seed=args.seed,
                                         out=str(out / "run"), force=True, progress=False,
                                         method=args.method, **budget,
                                         preset=PRESETS["fast"].with_options(**changes),
                                         **(decoding if args.head == "levels" else {}))  # fmt: skip
    start = time.perf_counter()
    try:
        compress(files.teacher, config)
    except DaflError as error:  # a failed student still leaves its report
        print(f"run failed: {str(error)[:300]}")
    report_path = out / "run" / "report.json"
    if not report_path.is_file():
        raise SystemExit("no report.json written")
    report = json.loads(report_path.read_text())
    t, s = report["teacher"], report["student"]
    ratio = s["map_50"] / t["map_50"] if t["map_50"] else None
    return {"teacher_map_50": t["map_50"], "student_map_50": s["map_50"], "map_50_ratio": ratio,
            "teacher_map_50_95": t["map_50_95"], "student_map_50_95": s["map_50_95"],
            "params_ratio": s["params"] / t["params"], "teacher_params": t["params"],
            "student_params": s["params"],
            "fidelity_map_50": report["detection"]["fidelity_map_50"],
            "status": report["status"], "iterations": report["iterations"],
            "method": report["method"], "teacher_build_s": round(built_s, 1),
            "compress_s": round(time.perf_counter() - start, 1),
            "budget_s": None if args.iters else args.budget,
            "iters": args.iters, "set": changes, "seed": args.seed, "head": args.head}  # fmt: skip


def main() -> None:
    """Parse the options, run once, print the figures (and write them as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="distillation seconds")
    parser.add_argument("--teacher-seconds", type=float, default=180.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/bench_detection")
    parser.add_argument("--data", help="the teacher's folder, reused when a run of the same "
                        "seed, head and size built it there (default: a new one in --out)")
    parser.add_argument("--iters", type=int, help="iterations instead of --budget (deterministic "
                        "at one thread, for screens at equal iterations)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="fast-preset fields and loss weights to change, as bench_suite.py's")
    parser.add_argument("--head", choices=("yolov8", "yolov5", "levels"), default="yolov8",
                        help="the teacher's head as shipped: decoded YOLOv8 or YOLOv5 layout, or "
                        "a YOLOv5-layout one's raw levels, one output per stride, scored through "
                        "benchmarks/teachers/levels_model.py's decoding")
    args = parser.parse_args()
    print_figures(run(args), Path(args.out))


def print_figures(figures: dict, out: Path) -> None:
    """Print a run's figures (and write them to ``out``/figures.json), then the summary line."""
    print(json.dumps(figures, indent=1))
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    ratio = figures["map_50_ratio"]
    print(f"teacher mAP@0.5 {figures['teacher_map_50']:.4f}, student "
          f"{figures['student_map_50']:.4f}, ratio {ratio if ratio is None else round(ratio, 3)}"
          f", params ratio {figures['params_ratio']:.3f}")


if __name__ == "__main__":
    main()

"""dafl-compress command line: argument parsing only; every stage is a compress_toolbox function.

dafl-compress TEACHER --task classification [options]   the whole job
dafl-compress inspect TEACHER [--json]                    load, verify and describe a teacher
dafl-compress student TEACHER [--width 0.5]               derive a student, compare sizes
dafl-compress zoo list [--task TASK]                      the model zoo
dafl-compress quantize MODEL.onnx --calibration-data X.npz  INT8 for an existing ONNX model

The library (and so torch) is imported inside each command, after the arguments are parsed and
with Ctrl-C and SIGTERM handled: ``--help`` and usage errors answer at once, and an interrupt
during torch's seconds-long import ends as one line, not a half-initialised numpy's traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from cli.parsers import (
    compress_parser,
    inspect_parser,
    quantize_parser,
    student_parser,
    zoo_parser,
)

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
SUBCOMMANDS = ("inspect", "student", "zoo", "quantize")
LAUNCH_COMMAND = "DAFL_LAUNCH_COMMAND"  # set by --nproc for the ranks it starts
CTRL_BREAK = getattr(signal, "SIGBREAK", None)  # Windows only


def _teacher_kwargs(args: argparse.Namespace) -> dict:
    return {
        "model_class": args.model_class,
        "model_kwargs": args.model_kwargs,
        "input_shape": args.input_shape,
        "trust_pickle": args.trust_pickle,
    }


def _describe_teacher(teacher) -> dict:
    a = teacher.analysis
    return {
        "source": str(teacher.source),
        "format": teacher.format,
        "input_shape": list(teacher.input_shape),
        "num_outputs": teacher.num_outputs,
        "output_shape": list(a.output_shape),
        "task": "detection" if teacher.details.get("one_detection_head") else a.task,
        "params": a.params,
        "macs": a.macs,
        "max_abs_diff": teacher.max_abs_diff,
        "max_rel_diff": teacher.max_rel_diff,
        "final_layer": a.final_layer,
        "details": teacher.details,
        "layers": [vars(layer) for layer in a.layers],
    }


def run_inspect(args: argparse.Namespace) -> int:
    from compress_toolbox import load_teacher
    from compress_toolbox.tasks import get_task

    task = get_task(args.task or "classification").with_head(args.head) if (
        args.task or args.head) else None  # fmt: skip
    teacher = load_teacher(args.teacher, **_teacher_kwargs(args),
                           join_outputs=bool(task and task.joins_outputs))  # fmt: skip
    info = _describe_teacher(teacher)
    if task is not None:
        bound = task.bound_to(teacher)
        info["read_as"], info["hints"] = bound.describe_teacher(), list(bound.hints())
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    print(f"{info['source']}: {info['format']} ({info['details']})")
    print(
        f"  input {tuple(info['input_shape'])} -> output {tuple(info['output_shape'])}, "
        f"task guess: {info['task']}"
    )
    if "read_as" in info:
        print(f"  --task {args.task or 'classification'} reads it as: {info['read_as']}")
        for hint in info["hints"]:
            print(f"  note: {hint}")
    print(f"  params {info['params']:,}  MACs {info['macs']:,}")
    print(
        f"  verified: max abs diff {info['max_abs_diff']:.2e} "
        f"(relative {info['max_rel_diff']:.2e}) at batch 1 and 3; runs at batch 7"
    )
    print(f"  {len(info['layers'])} conv/linear layers:")
    for layer in info["layers"]:
        print(
            f"    {layer['type']:<8} {layer['in_width']:>5} -> {layer['out_width']:<5} "
            f"{layer['name']}"
        )
    return 0


def run_student(args: argparse.Namespace) -> int:
    from compress_toolbox import CompressConfig, load_teacher
    from compress_toolbox.errors import DaflError
    from compress_toolbox.export.writer import export_pt2
    from compress_toolbox.pipeline import load_task_teacher, prepare_inputs, save_student_onnx
    from compress_toolbox.tasks import task_of_output

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.resolve() == Path(args.teacher).resolve():
            raise DaflError(f"--out {out}: that is the teacher; choose another file")
        if out.exists() and not args.force:
            raise DaflError(f"--out {out}: exists (use --force to replace it)")
    options = {**_teacher_kwargs(args), "width": args.width, "init": args.init, "head": args.head}
    if args.task:
        config = CompressConfig.from_options(task=args.task, **options)
        teacher = load_task_teacher(args.teacher, config)
    else:  # the task its output fits, or detection for outputs that look like one head
        teacher = load_teacher(args.teacher, **_teacher_kwargs(args))
        guess = getattr(task_of_output(teacher.analysis.output_shape), "name", "classification")
        if teacher.details.get("one_detection_head"):
            guess = "detection"
        config = CompressConfig.from_options(task=guess, **options)
        if config.task.joins_outputs:
            teacher = load_task_teacher(args.teacher, config)
    inputs = prepare_inputs(teacher, config)
    _print_comparison(inputs.teacher.analysis, inputs.plan.analysis)
    if out is not None:
        suffix = ".onnx" if out.suffix.lower() == ".onnx" else ".pt2"
        partial = out.with_name(f".{out.stem}.partial-{os.getpid()}{suffix}")
        try:
            if suffix == ".onnx":
                saved = save_student_onnx(inputs.plan.module, inputs, partial, shown_as=out)
            else:
                export_pt2(inputs.plan.module, teacher.input_shape, partial)
            os.replace(partial, out)  # atomically: an old file is never half-replaced
        finally:
            partial.unlink(missing_ok=True)
        check = ""
        if suffix == ".onnx":
            exported_as = saved.exported_as or {}
            check = f" (onnxruntime agrees: max abs diff {saved.max_abs_diff:.1e}"
            check += "; the teacher's input and output names" if exported_as.get(
                "same_as_teacher") else ""  # fmt: skip
            layout = exported_as.get("input_layout")
            check += f"; input {layout}, as the teacher's file)" if layout else ")"
        print(f"student saved to {out}{check}")
    return 0


def _print_comparison(teacher, student) -> None:
    print(f"{'':10}{'teacher':>14}{'student':>14}{'ratio':>8}")
    for label, t, s in (
        ("params", teacher.params, student.params),
        ("MACs", teacher.macs, student.macs),
    ):
        print(f"{label:10}{t:>14,}{s:>14,}{s / max(t, 1):>8.3f}")
    print(f"widths    teacher {teacher.widths}\n          student {student.widths}")


def run_zoo(args: argparse.Namespace) -> int:
    import model_zoo

    print(f"{'name':40}{'task':16}{'input':14}{'params':>14}{'MACs':>16}")
    for name in model_zoo.list_models(args.task):
        entry = model_zoo.get_entry(name)  # its cost metadata: no model is built
        macs = "n/a" if entry.meta.macs is None else f"{entry.meta.macs:,}"
        shape = "x".join(map(str, entry.default_input))
        print(f"{name:40}{entry.task:16}{shape:14}{entry.meta.params:>14,}{macs:>16}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from compress_toolbox.export.int8 import describe, kept_float_reason, quantize_file
    from compress_toolbox.report.render import latency_columns

    result, rows = quantize_file(
        Path(args.model), Path(args.calibration_data), out=args.out, samples=args.samples,
        eval_data=args.eval_data, task=args.task, mean=args.mean, std=args.std, force=args.force,
        head=args.head,
    )  # fmt: skip
    if args.json:
        print(json.dumps({"int8": describe(result), "rows": [asdict(r) for r in rows]}))
        return 0
    columns = latency_columns([row.latency_ms for row in rows])
    headings = "".join(f"{'ms, ' + key:>14}" for key in columns)
    print(f"{'':6}{'file':>28}{'bytes':>10}{headings}{'score':>9}")
    for row in rows:
        score = "n/a" if row.score is None else f"{100 * row.score:.2f}%"
        ms = [row.latency_ms.get(key) for key in columns]
        ms_text = "".join(f"{'n/a' if v is None else f'{v:.3f}':>14}" for v in ms)
        print(f"{row.model:6}{row.file:>28}{row.onnx_bytes:>10,}{ms_text}{score:>9}")
    agreement, measure = result.agreement.value, result.agreement.task_measure or "top-1 agreement"
    verdict = "REJECTED (not equivalent): " + result.reason if result.reason else "kept"
    print(f"{measure} with fp32: {'n/a' if agreement is None else f'{100 * agreement:.2f}%'}"
          f" on {result.agreement_on}; float ops: "
          f"{', '.join(result.quantized.float_op_types) or 'none'}")  # fmt: skip
    if result.quantized.kept_float:
        print(kept_float_reason(result.quantized))
    print(f"{result.path}: {verdict}")
    return 0


def run_compress(args: argparse.Namespace) -> int:
    from compress_toolbox import CompressConfig, compress
    from compress_toolbox.distillation import distributed

    command = "dafl-compress " + command_line(sys.argv[1:])
    if args.nproc is not None and not distributed.launched():
        os.environ[LAUNCH_COMMAND] = command  # the ranks' report names the user's command
        return distributed.launch(args.nproc, distributed.strip_option(args.argv, "--nproc"))

    config = CompressConfig.from_options(
        task=args.task, head=args.head, decode=args.decode, student=args.student,
        width=args.width, init=args.init, eval_data=args.eval_data, **_teacher_kwargs(args),
        mean=args.mean, std=args.std,
        method=args.method, preset=args.preset, time_budget=args.time_budget, iters=args.iters,
        epochs=args.epochs, batch_size=args.batch_size, device=args.device, seed=args.seed,
        threads=args.threads, progress=not args.no_progress, resume=args.resume,
        out=args.out, force=args.force, dry_run=args.dry_run, opset=args.opset,
        quantize=args.quantize, quantize_samples=args.quantize_samples,
        quantize_teacher=args.quantize_teacher, command=os.environ.get(LAUNCH_COMMAND, command),
    )  # fmt: skip
    result = compress(args.teacher, config)
    if not distributed.world().is_writer:  # rank 0 prints the report
        return 0
    if args.dry_run:
        print(f"student plan: {result.plan.kind}")
        _print_comparison(result.teacher.analysis, result.plan.analysis)
        return 0
    print((result.out_dir / "report.md").read_text(encoding="utf-8"))
    print(f"output written to {result.out_dir}/")
    return 0


def command_line(argv: Sequence[str]) -> str:
    """``argv`` quoted as this platform's shell reads it (cmd.exe takes no single quotes)."""
    return subprocess.list2cmdline(argv) if os.name == "nt" else shlex.join(argv)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the trainer saves a checkpoint on its way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def _show_notice(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"dafl-compress: warning: {message}", file=sys.stderr, flush=True)


def _parse(argv: list[str]):
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
        parser = {"inspect": inspect_parser, "student": student_parser, "zoo": zoo_parser,
                  "quantize": quantize_parser}[command]()  # fmt: skip
        runner = {"inspect": run_inspect, "student": run_student, "zoo": run_zoo,
                  "quantize": run_quantize}[command]  # fmt: skip
    else:
        parser, runner = compress_parser(), run_compress
    args = parser.parse_args(argv)
    args.argv = argv  # --nproc relaunches the same command
    return args, runner


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise it: a KeyboardInterrupt inside a library's
    import (numpy's, measured) leaves that library half-initialised, and the error it then
    raises replaces ours."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = [signal.SIGINT, *([CTRL_BREAK] if CTRL_BREAK else [])]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dafl-compress`` console script; returns the exit code.

    Exit codes: 0 done; 2 bad input (one line naming the file and the problem); 3 training
    failed (collapse, NaN, or a student far below its teacher: its folder is kept); 130 Ctrl-C
    and 143 SIGTERM (a checkpoint is saved: rerun with --resume); 1 a bug (--debug shows it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Windows' Ctrl-Break is answered as Ctrl-C
    previous_break = CTRL_BREAK and signal.signal(CTRL_BREAK, signal.default_int_handler)
    try:
        try:
            with _ctrl_c_deferred():  # the parsers import torch, numpy & co.
                args, runner = _parse(argv)
        except SystemExit as done:  # --help (0) or a usage error (2, one line already printed)
            return int(done.code or 0)
        from compress_toolbox.errors import DaflWarning

        with warnings.catch_warnings():  # the caller's warning settings come back afterwards
            if not debug:
                warnings.filterwarnings("ignore")
                warnings.filterwarnings("always", category=DaflWarning)
                warnings.showwarning = _show_notice
            return runner(args)
    except KeyboardInterrupt as interrupt:
        # DistillInterrupted (with its checkpoint message) arrives as a DaflError below; this is
        # an interruption anywhere else (start-up, import, export).
        print("dafl-compress: interrupted", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and friends: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:  # noqa: BLE001 - every error ends as one line unless --debug
        if debug:
            raise
        return _report_error(error, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if CTRL_BREAK:
            signal.signal(CTRL_BREAK, previous_break)
        ranks = sys.modules.get("compress_toolbox.distillation.distributed")
        if ranks is not None:  # leave the process group, if any
            ranks.shutdown()


def _report_error(error: Exception, argv: list[str]) -> int:
    from compress_toolbox.distillation.options import DistillInterrupted
    from compress_toolbox.errors import DaflError, first_line

    if isinstance(error, DistillInterrupted):
        print(f"dafl-compress: {error}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(error.__context__, Terminated) else error.exit_code
    if isinstance(error, DaflError):
        print(f"dafl-compress: error: {error}", file=sys.stderr)
        return error.exit_code
    where = next((a for a in argv if not a.startswith("-") and a not in SUBCOMMANDS), None)
    text = first_line(error, 300)
    print(
        f"dafl-compress: unexpected error{f' with {where}' if where else ''}: "
        f"{type(error).__name__}: {text} (rerun with --debug for the traceback)",
        file=sys.stderr,
    )
    return 1


def entry_point() -> None:
    """The ``dafl-compress`` console script: ``main`` with its exit code."""
    if getattr(sys, "frozen", False):
        # A frozen executable (PyInstaller) is also what a spawned child process runs: let
        # multiprocessing take over here in a child instead of starting the CLI again.
        import multiprocessing

        multiprocessing.freeze_support()
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        # a name the console's code page cannot spell (Windows, output redirected) is escaped,
        # not an error after the work is done
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        code = main()
    except KeyboardInterrupt:  # between the handlers above (rare)
        code = EXIT_INTERRUPTED
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        # Ctrl-C inside a C extension's import can leave CPython marked "KeyboardInterrupt
        # unhandled", and it then kills itself with SIGINT at exit (status -2, not 130) although
        # we handled it. Everything is cleaned up by now: leave with our code directly.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # guarded: safe under Windows' spawn start method
    import multiprocessing

    multiprocessing.freeze_support()
    entry_point()

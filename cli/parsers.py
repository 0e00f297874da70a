"""The command line's parsers: one per subcommand, the main command's options in groups
(teacher, student, training, evaluation data, output). Parsing only: no stage runs here. The
library's names a parser lists (methods, tasks, defaults) are imported where that parser is
built: importing them imports torch, which main.py does only under its Ctrl-C guard."""

from __future__ import annotations

import argparse

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _add_teacher_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher file")
    group.add_argument(
        "teacher",
        metavar="TEACHER",
        help="ONNX (.onnx, external data beside it is fine), TorchScript, "
        "torch.export (.pt2) or PyTorch checkpoint; the format is read from "
        "the file's content. With the tf extra: Keras .keras/.h5, a SavedModel "
        "folder, frozen .pb, TF1 checkpoint .meta, TF2 checkpoint .index "
        "(with --model-class file.py:build_fn) or .tflite",
    )
    group.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="input shape without batch, when the file does not record it "
        "(checkpoints, some TorchScript files)",
    )
    group.add_argument(
        "--model-class",
        metavar="SPEC",
        help="for a state_dict: package.module:Class, path/file.py:Class, "
        "a model_zoo name or a torchvision model name; for a TF2 checkpoint: "
        "path/file.py:build_fn returning the Keras model",
    )
    group.add_argument(
        "--model-kwargs",
        metavar="JSON",
        default=None,
        help="keyword arguments for --model-class, as JSON (e.g. '{\"num_classes\": 10}')",
    )
    group.add_argument(
        "--trust-model-code",
        "--trust-pickle",
        dest="trust_pickle",
        action="store_true",
        help="run the code a model file carries: a whole pickled model, pickled objects or "
        "compiled code in a .pt2, TorchScript __setstate__ or operators that reach files or "
        "the network, Keras Lambda layers (only for files you trust; --trust-pickle is its "
        "old name)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and warnings")


def compress_parser() -> argparse.ArgumentParser:
    """The main command's parser: the teacher, the student, training, data and output."""
    parser = Parser(
        prog="dafl-compress",
        description="Compress a trained classifier, segmentation network or detector (the "
        "teacher) into a half-width student without training data (DAFL, Chen et al. 2019), "
        "export it to ONNX, verify it with onnxruntime and write a report.\n\nOther commands: "
        "dafl-compress inspect TEACHER | student TEACHER | zoo list | quantize MODEL.onnx  "
        "(each has --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_teacher_options(parser)
    _add_student_options(parser)
    _add_training_options(parser)
    _add_data_options(parser)
    _add_output_options(parser)
    _add_quantize_options(parser)
    return parser


def _add_quantize_options(parser: argparse.ArgumentParser) -> None:
    from compress_toolbox.export.quantize import DEFAULT_SAMPLES

    group = parser.add_argument_group(
        "INT8", "after the float student is verified, also write student.int8.onnx, calibrated "
        "on the trained generator's inputs (docs/int8.md)"
    )  # fmt: skip
    group.add_argument(
        "--quantize",
        metavar="int8",
        help="int8: onnxruntime static quantisation (QDQ, per-channel int8 weights); an INT8 "
        "student that loses more than 2 points of accuracy (or agrees with the float one on "
        "less than 95%% of generated inputs) is written as student.int8.rejected.onnx",
    )
    group.add_argument(
        "--quantize-samples",
        type=int,
        metavar="N",
        help=f"generated inputs to calibrate on (default: {DEFAULT_SAMPLES})",
    )
    group.add_argument(
        "--quantize-teacher",
        action="store_true",
        help="also quantise the teacher the same way (teacher.int8.onnx, a row in the report)",
    )


def _add_student_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        default="classification",
        help="what the teacher does: classification ((N, K) logits) or segmentation ((N, K, H, "
        "W) per-pixel logits, or a dict with 'out') or detection (raw head outputs: one YOLOv8 "
        "(N, 4+K, A) or YOLOv5 (N, A, 5+K), or boxes (N, A, 4+) and scores (N, A, K); "
        "docs/detection.md) (default: %(default)s)",
    )
    _add_head_option(parser)
    parser.add_argument(
        "--decode", metavar="FILE.py:FUNCTION",
        help="--task detection: your decoding of the raw outputs (runs that file), called as "
        "FUNCTION(outputs, (height, width)) -> one dict of boxes (x1, y1, x2, y2 pixels), "
        "scores, labels per image; the report then gives mAP on --eval-data for heads whose "
        "boxes are encoded against anchors (docs/detection.md)",
    )  # fmt: skip
    parser.add_argument(
        "--student",
        default="auto",
        metavar="auto|zoo|zoo:NAME",
        help="auto: the teacher with every conv/linear width halved; zoo: the "
        "zoo model for the task closest to 1/4 of the teacher's MACs; zoo:NAME: "
        "that zoo model, refused when no smaller than the teacher (default: %(default)s)",
    )
    parser.add_argument(
        "--width",
        type=float,
        default=0.5,
        help="width multiplier for --student auto (default: %(default)s)",
    )
    parser.add_argument(
        "--init",
        choices=("auto", "fresh", "teacher"),
        default="auto",
        help="derived student's start: the teacher's largest-L1 channels (teacher), fresh "
        "weights as in DAFL (fresh); auto: teacher with the fast preset, fresh with the paper "
        "presets (default: %(default)s)",
    )


def _listing(summaries: dict[str, str]) -> str:
    """``name: summary; ...`` for an option's help (``%`` escaped for argparse)."""
    return "; ".join(f"{name}: {text}" for name, text in summaries.items()).replace("%", "%%")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    from compress_toolbox.distillation.methods import method_summaries
    from compress_toolbox.distillation.methods.auto import RACE_SUMMARY
    from compress_toolbox.distillation.methods.auto import SUMMARY as AUTO_SUMMARY
    from compress_toolbox.distillation.presets import PRESETS

    methods = method_summaries()
    train = parser.add_argument_group("training")
    train.add_argument(
        "--method",
        choices=("auto", "race", *methods),
        default="auto",
        help=f"{_listing({'auto': AUTO_SUMMARY, 'race': RACE_SUMMARY, **methods})} "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--preset",
        default="fast",
        help=f"{_listing({n: p.description for n, p in PRESETS.items()})} (default: %(default)s)",
    )
    budget = train.add_mutually_exclusive_group()
    budget.add_argument(
        "--time-budget",
        type=float,
        metavar="SEC",
        help="train for this many seconds; the schedule is fitted to it "
        "(fast preset default: 120 s)",
    )
    budget.add_argument("--iters", type=int, metavar="N", help="train for N iterations")
    budget.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help="train for N epochs of the preset's iterations per epoch",
    )
    train.add_argument("--batch-size", type=int, metavar="N", help="override the preset's batch")
    train.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    train.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads (default: the preset's choice; fast times 1 against all)",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint/"
    )
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes on this machine (listening on 127.0.0.1 only; one GPU "
        "each when there are GPUs); the global batch is N x --batch-size. Several machines: "
        "torchrun --nnodes ... -m cli (see README)",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    from compress_toolbox.tasks.evaldata import describe_preprocessing

    data = parser.add_argument_group(
        "evaluation data (for the report only, never for training)", describe_preprocessing()
    )
    data.add_argument(
        "--eval-data",
        metavar="PATH",
        help=".npz with x and y, a folder of MNIST-style idx files, or an ImageFolder directory; "
        "segmentation: .npz with x and masks y (N,H,W; 255 = ignore), or a folder of images "
        "beside a folder 'masks' of PNG masks",
    )
    data.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="normalisation mean")
    data.add_argument("--std", type=_floats, metavar="S[,S,S]", help="normalisation std")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: ./dafl-out/<teacher name>/); written whole "
        "at the end; checkpoints for --resume live in DIR.checkpoint/",
    )
    output.add_argument("--force", action="store_true", help="replace a non-empty --out")
    output.add_argument(
        "--opset",
        type=int,
        help="ONNX opset of student.onnx (default: 20, torch's exporter; "
        "11-17 use the legacy exporter)",
    )
    output.add_argument(
        "--dry-run",
        action="store_true",
        help="load, analyse and show the student plan without training",
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_head_option(parser: argparse.ArgumentParser) -> None:
    from compress_toolbox.tasks.detection.heads import HEAD_NAMES

    parser.add_argument(
        "--head", choices=HEAD_NAMES,
        help="--task detection: the head layout, where the outputs' shapes and names do not "
        "tell it (boxes+scores: the first output is the boxes; ssd: boxes+scores whose scores "
        "are a softmax, column 0 the background, or the last where the teacher shows it)",
    )  # fmt: skip


def inspect_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dafl-compress inspect",
        description="Load a teacher, verify the import against the original and describe it.",
    )
    _add_teacher_options(parser)
    parser.add_argument("--task", help="also say how this task reads the teacher (detection: "
                        "its head layout, several outputs joined)")  # fmt: skip
    _add_head_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def student_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dafl-compress student",
        description="Derive a student by shrinking every conv/linear "
        "width; print teacher vs student params, MACs and widths.",
    )
    _add_teacher_options(parser)
    parser.add_argument("--width", type=float, default=0.5, help="default: %(default)s")
    parser.add_argument("--init", choices=("auto", "fresh", "teacher"), default="auto",
                        help="auto: as compress does for the task")  # fmt: skip
    parser.add_argument("--task", help="the teacher's task, for --init auto and how its outputs "
                        "are read (default: the one its output fits)")  # fmt: skip
    _add_head_option(parser)
    parser.add_argument(
        "--out", metavar="FILE.onnx|FILE.pt2",
        help="save the (untrained) student: .onnx as ONNX, verified with onnxruntime; else a "
        "torch.export archive",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    return parser


def quantize_parser() -> argparse.ArgumentParser:
    """``dafl-compress quantize MODEL.onnx``: INT8 for an existing float ONNX model."""
    from compress_toolbox.export.quantize import DEFAULT_SAMPLES

    parser = Parser(
        prog="dafl-compress quantize",
        description="Quantise a float ONNX model (e.g. student.onnx of an output folder) to "
        "INT8 with onnxruntime (static, QDQ, per-channel int8 weights), calibrated on the inputs "
        "of --calibration-data; verify it, compare it with the float model and write "
        "MODEL.int8.onnx, or MODEL.int8.rejected.onnx when it loses more than the margin "
        "(docs/int8.md). A run with --quantize int8 does this from its trained generator.",
    )  # fmt: skip
    parser.add_argument("model", metavar="MODEL.onnx", help="the float ONNX model")
    parser.add_argument(
        "--calibration-data", metavar="FILE", required=True,
        help=".npy array, or .npz with an array x, of inputs as the model takes them "
        "(already normalised), first axis = samples; cycled when fewer than --samples",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help="calibration inputs fed (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", metavar="FILE", help="default: MODEL.int8.onnx beside MODEL")
    parser.add_argument("--force", action="store_true", help="replace an existing INT8 file")
    parser.add_argument("--eval-data", metavar="PATH", help="labelled data, as for compress: "
                        "the margin is then 2 points of accuracy (mean IoU)")  # fmt: skip
    parser.add_argument("--task", help="classification, segmentation or detection (default: "
                        "from the model's output)")  # fmt: skip
    _add_head_option(parser)
    parser.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="normalisation mean")
    parser.add_argument("--std", type=_floats, metavar="S[,S,S]", help="normalisation std")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def zoo_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dafl-compress zoo", description="The model zoo.")
    parser.add_argument("action", choices=("list",))
    from compress_toolbox.tasks import task_names

    parser.add_argument("--task", choices=task_names())
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser

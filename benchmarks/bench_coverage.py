"""Coverage benchmark (issue 15): does ``dafl-compress student`` give a half-width student for
the architectures users bring? 33 timm and torchvision families, random weights, 10 classes,
a small input (3x64x64 where the family takes it, else its smallest working size: recorded),
each exported three ways: torch's default ONNX exporter (dynamo), the legacy exporter at
opset 17 (both from a batch of 2 with a dynamic batch axis), TorchScript (torch.jit.trace of a
batch of 1, then save).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/bench_coverage.py \\
        --json benchmarks/coverage_out/baseline.json
    PYTHONPATH=$PWD python benchmarks/bench_coverage.py --families convnext_atto \\
        vit_tiny_patch16_224 --routes legacy torchscript --timeout 30 --mem-gb 4
    PYTHONPATH=$PWD python benchmarks/bench_coverage.py --json FILE --report-only   # table again

Every step runs in a fresh subprocess under a wall-clock timeout and an address-space cap
(RLIMIT_AS): one family can never take the machine down. Per family, one child exports the
three files into --out-dir (cached: a rerun skips files already there). Per file, one child runs
the CLI's own entry point, ``cli.main.main(["student", FILE, "--out", "student.onnx"])``
(exactly what ``dafl-compress student FILE --out student.onnx`` runs: derive, export to ONNX,
check it with onnxruntime; TorchScript files also get ``--input-shape``) and records whether
the teacher imported and verified, whether a student was made, its parameter ratio (from the
CLI's printed comparison), whether its ONNX agreed with onnxruntime, the seconds (export
included) and the last line of stderr. The JSON is rewritten after every
file; a killed run resumes where it stopped (rows are keyed by family, route, timeout, mem cap).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ROUTES = ("dynamo", "legacy", "torchscript")
SUFFIX = {"dynamo": ".dynamo.onnx", "legacy": ".legacy.onnx", "torchscript": ".torchscript.pt"}
SIZES = (64, 96, 128, 160, 224)  # tried in order: the first that builds and runs is used
RATIO_RANGE = (0.15, 0.40)
MARK = "@@bench "  # prefix of the lines the children print for this script


@dataclass(frozen=True)
class Family:
    name: str
    source: str  # timm | torchvision
    kind: str  # CNN | transformer | hybrid
    size_kwarg: str | None = None  # constructor argument that takes the input size


FAMILIES = [  # the priority order first, then the 17 that worked
    Family("convnext_atto", "timm", "CNN"),
    Family("cspresnet50", "timm", "CNN"),
    Family("dpn68", "timm", "CNN"),
    Family("rexnet_100", "timm", "CNN"),
    Family("vit_tiny_patch16_224", "timm", "transformer", "img_size"),
    Family("deit_tiny_patch16_224", "timm", "transformer", "img_size"),
    Family("mobilevit_xxs", "timm", "hybrid"),
    Family("ghostnet_100", "timm", "CNN"),
    Family("poolformer_s12", "timm", "hybrid"),
    Family("mixnet_s", "timm", "CNN"),
    Family("levit_128s", "timm", "hybrid", "img_size"),
    Family("swin_t", "torchvision", "transformer"),
    Family("maxvit_t", "torchvision", "hybrid", "input_size"),
    Family("efficientformer_l1", "timm", "hybrid", "img_size"),
    Family("alexnet", "torchvision", "CNN"),
    Family("vgg11_bn", "torchvision", "CNN"),
    Family("resnet18d", "timm", "CNN"),
    Family("resnet26", "timm", "CNN"),
    Family("seresnext26d_32x4d", "timm", "CNN"),
    Family("efficientnet_b0", "timm", "CNN"),
    Family("mobilenetv3_small_100", "timm", "CNN"),
    Family("mobilenetv4_conv_small", "timm", "CNN"),
    Family("regnetx_002", "timm", "CNN"),
    Family("repvgg_a0", "timm", "CNN"),
    Family("hrnet_w18_small", "timm", "CNN"),
    Family("densenet121", "timm", "CNN"),
    Family("dla34", "timm", "CNN"),
    Family("inception_v3", "timm", "CNN"),
    Family("tinynet_a", "timm", "CNN"),
    Family("xception41", "timm", "CNN"),
    Family("googlenet", "torchvision", "CNN"),
    Family("mnasnet0_5", "torchvision", "CNN"),
    Family("squeezenet1_1", "torchvision", "CNN"),
]
BY_NAME = {f.name: f for f in FAMILIES}


@dataclass
class Row:
    """One exported file through ``dafl-compress student`` (and the student's ONNX check)."""

    family: str
    source: str
    kind: str
    route: str
    timeout: float
    mem_gb: float
    size: int | None = None  # input height = width
    file: str | None = None
    export_error: str | None = None
    imported: bool = False  # loaded and verified against the original
    import_rel_diff: float | None = None
    student: bool = False
    ratio: float | None = None  # student params / teacher params
    onnx_ok: bool | None = None  # student.onnx agrees with onnxruntime (None: not tried)
    onnx_rel_diff: float | None = None
    seconds: float | None = None  # the CLI's wall time, start-up included
    onnx_seconds: float | None = None
    error: str | None = None  # the CLI's one line, TIMEOUT or MEMORY
    onnx_error: str | None = None

    def key(self) -> tuple:
        return self.family, self.route, self.timeout, self.mem_gb

    def good(self) -> bool:
        in_range = self.ratio is not None and RATIO_RANGE[0] <= self.ratio <= RATIO_RANGE[1]
        return self.student and in_range


@dataclass
class ChildResult:
    """What a limited child did: its marker lines, exit code, stderr tail, how it ended."""

    marks: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    mark_times: list[float] = field(default_factory=list)  # seconds since start, per mark
    returncode: int | None = None
    stderr: str = ""
    seconds: float = 0.0
    ended: str = "exit"  # exit | TIMEOUT (which deadline: the stage that hung)
    stage: str = ""


# ---------------------------------------------------------------- children (limited processes)


def _limit_memory(mem_gb: float):
    def apply() -> None:
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        os.setsid()  # own process group: a timeout kills the child and anything it started

    return apply


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_child(args: list[str], stages: list[tuple[str, float]], mem_gb: float) -> ChildResult:
    """Run ``python ARGS`` under the memory cap; ``stages`` is [(marker, seconds)]: the child
    must print ``@@bench MARKER ...`` within each stage's seconds of the previous mark."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
               os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1")  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            preexec_fn=_limit_memory(mem_gb))  # fmt: skip
    err_lines: list[str] = []
    threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True).start()
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    result = ChildResult()
    pending, last = list(stages), start
    while True:
        limit = pending[0][1] if pending else 30.0  # after the last mark: just exit
        try:
            line = lines.get(timeout=max(0.0, last + limit - time.perf_counter()))
        except queue.Empty:
            result.ended, result.stage = "TIMEOUT", pending[0][0] if pending else "exit"
            _kill(proc)
            break
        if line is None:
            break
        result.stdout.append(line)
        if line.startswith(MARK):
            result.marks.append(line[len(MARK) :].strip())
            result.mark_times.append(time.perf_counter() - start)
            if pending and result.marks[-1].startswith(pending[0][0]):
                pending.pop(0)
                last = time.perf_counter()
    result.returncode = proc.wait()
    result.seconds = time.perf_counter() - start
    time.sleep(0.05)  # let the stderr thread drain
    result.stderr = "".join(err_lines)
    return result


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


MEMORY_SIGNS = ("MemoryError", "bad_alloc", "Cannot allocate memory", "can't allocate memory",
                "out of memory", "DefaultCPUAllocator")  # fmt: skip


def one_line(stderr: str, returncode: int | None) -> str:
    """The CLI's error line (else the last stderr line), trimmed; MEMORY: when it is one."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("dafl-compress:") and "warning:" not in ln]
    text = (ours or lines or [f"exit status {returncode}"])[-1]
    text = re.sub(r"\(rerun with --debug for the traceback\)", "", text)
    text = re.sub(r"\S*/coverage_out/", "", text).strip()[:300]
    if any(sign in stderr for sign in MEMORY_SIGNS) or (returncode or 0) in (-9, -6, -11):
        return f"MEMORY: {text}"
    return text


# ---------------------------------------------------------------- export (child side)


def build(family: Family, size: int):
    """The family with random weights and 10 classes, sized for ``size`` where it must be."""
    import torch

    value = (size, size) if family.size_kwarg == "input_size" else size  # torchvision's MaxViT
    kwargs = {family.size_kwarg: value} if family.size_kwarg else {}
    if family.source == "timm":
        import timm

        model = timm.create_model(family.name, pretrained=False, num_classes=10, **kwargs)
    else:
        import torchvision

        if family.name == "googlenet":
            kwargs.update(aux_logits=False, init_weights=True)
        model = torchvision.models.get_model(family.name, weights=None, num_classes=10, **kwargs)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    return model


def smallest_build(family: Family):
    errors = []
    for size in SIZES:
        try:
            return build(family, size), size
        except Exception as error:  # noqa: BLE001 - try the next size
            errors.append(f"{size}: {type(error).__name__}: {str(error)[:100]}")
    raise RuntimeError(f"cannot build at any of {SIZES}: {errors[-1]}")


def export_route(model, route: str, x, path: Path) -> None:
    import torch

    partial = path.with_name(f".partial{path.suffix}")
    names = {"input_names": ["input"], "output_names": ["output"]}
    batch = {"dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}, **names}
    if route == "dynamo":  # a batch of 2 and a dynamic batch axis, as most users export
        torch.onnx.export(model, (x.repeat(2, 1, 1, 1),), str(partial), dynamo=True, **batch)
    elif route == "legacy":
        torch.onnx.export(model, (x.repeat(2, 1, 1, 1),), str(partial), dynamo=False,
                          opset_version=17, **batch)  # fmt: skip
    else:
        torch.jit.save(torch.jit.trace(model, (x,)), str(partial))
    data = partial.with_name(partial.name + ".data")
    if data.exists():  # external data would be tied to the partial name: fold it in
        import onnx

        onnx.save_model(onnx.load(str(partial)), str(partial), save_as_external_data=False)
        data.unlink()
    partial.replace(path)


def export_family(name: str, out_dir: Path, routes: list[str]) -> None:
    """Child: build ``name``, write its missing files and ``NAME.meta.json`` (size, errors)."""
    import warnings


    warnings.filterwarnings("ignore")
    family = BY_NAME[name]
    meta_path = out_dir / f"{name}.meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"errors": {}}
    try:
        model, meta["size"] = smallest_build(family)
    except Exception as error:  # noqa: BLE001
        meta["build_error"] = str(error)[:300]
        meta_path.write_text(json.dumps(meta))
        print(MARK + "built error", flush=True)
        return
    meta_path.write_text(json.dumps(meta))
    print(MARK + "built", flush=True)
    for route in routes:
        path = out_dir / f"{name}{SUFFIX[route]}"
        if not path.exists():
            export_at_some_size(family, model, meta, route, path)
            meta_path.write_text(json.dumps(meta))
        print(MARK + f"exported {route}", flush=True)


def export_at_some_size(family: Family, model, meta: dict, route: str, path: Path) -> None:
    """Export ``route`` at the family's size, else at the next size that exports (the legacy
    exporter refuses adaptive pooling that does not divide: AlexNet and VGG at 64x64 export
    at 224). The size used is kept in ``meta["route_sizes"]``; the first error otherwise."""
    import torch

    sizes = [meta["size"], *(size for size in SIZES if size > meta["size"])]
    first_error = None
    for size in sizes:
        try:
            sized = model if size == meta["size"] else build(family, size)
            export_route(sized, route, torch.randn(1, 3, size, size), path)
        except Exception as error:  # noqa: BLE001
            first_error = first_error or f"{type(error).__name__}: {str(error).strip()[:200]}"
            continue
        meta["errors"].pop(route, None)
        if size != meta["size"]:
            meta.setdefault("route_sizes", {})[route] = size
        return
    meta["errors"][route] = first_error


# ---------------------------------------------------------------- student (child side)


def student_child(teacher: str, out: str, shape: str, shape_option: str) -> int:
    """Child: the CLI's ``student`` subcommand writing ``out`` (.onnx: exported and checked
    with onnxruntime by the CLI itself)."""
    import contextlib
    import io

    start = time.perf_counter()
    import compress_toolbox
    from cli.main import main

    original = compress_toolbox.load_teacher

    def observed(*args, **kwargs):
        loaded = original(*args, **kwargs)  # raises unless it imported and verified
        # to the real stdout: the CLI's own output is being captured below
        print(MARK + f"imported {loaded.max_rel_diff}", file=sys.__stdout__, flush=True)
        return loaded

    compress_toolbox.load_teacher = observed
    argv = ["student", teacher, "--out", out, "--force"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv + (["--input-shape", shape] if shape_option == "yes" else []))
    print(printed.getvalue(), end="", flush=True)
    print(MARK + f"cli {code} {time.perf_counter() - start:.2f}", flush=True)
    agreed = re.search(r"onnxruntime agrees: max abs diff (\S+)\)", printed.getvalue())
    if agreed:
        print(MARK + f"onnx ok 0 {agreed.group(1)}", flush=True)
    return code


# ---------------------------------------------------------------- parent


def ensure_exported(family: Family, args: argparse.Namespace) -> dict:
    """Export the family's missing files in a limited child; return its meta."""
    meta_path = args.out_dir / f"{family.name}.meta.json"
    missing = [r for r in args.routes if not (args.out_dir / f"{family.name}{SUFFIX[r]}").exists()]
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    tried = set(meta.get("errors", {})) | ({*ROUTES} if "build_error" in meta else set())
    missing = [r for r in missing if r not in tried]
    if missing:
        stages = [("built", args.export_timeout)] + [(f"exported {r}", args.export_timeout)
                                                     for r in missing]  # fmt: skip
        print(f"exporting {family.name}: {', '.join(missing)}", flush=True)
        child = [__file__, "--export-child", family.name, "--out-dir", str(args.out_dir)]
        done = run_child([*child, "--routes", *missing], stages, args.mem_gb)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"errors": {}}
        meta.setdefault("errors", {})
        for route in [] if "build_error" in meta else missing:
            if f"exported {route}" not in done.marks and route not in meta["errors"]:
                timed_out = done.ended == "TIMEOUT"
                how = "TIMEOUT" if timed_out else one_line(done.stderr, done.returncode)
                meta["errors"][route] = f"{how} (export)"
        if "size" not in meta and "build_error" not in meta:
            meta["build_error"] = one_line(done.stderr, done.returncode)
        meta_path.write_text(json.dumps(meta))
    return meta


def run_file(row: Row, path: Path, args: argparse.Namespace) -> None:
    """``dafl-compress student`` on one file in a limited child; fills ``row``."""
    work = args.out_dir / "students"
    work.mkdir(exist_ok=True)
    out = work / f"{path.name}.student.onnx"
    option = "yes" if row.route == "torchscript" else "no"  # --input-shape for TorchScript
    child = [__file__, "--student-child", str(path), str(out), f"3,{row.size},{row.size}", option]
    done = run_child(child, [("cli", args.timeout), ("onnx", args.timeout)], args.mem_gb)
    for mark in done.marks:
        word, *rest = mark.split()
        if word == "imported":
            row.imported, row.import_rel_diff = True, float(rest[0])
        elif word == "onnx":
            row.onnx_ok, row.onnx_seconds = rest[0] == "ok", float(rest[1])
            row.onnx_rel_diff = float(rest[2]) if row.onnx_ok else None
            row.onnx_error = None if row.onnx_ok else " ".join(rest[2:])
    cli = next((m for m in done.marks if m.startswith("cli ")), None)
    if cli:
        row.seconds = float(cli.split()[2])
    if done.ended == "TIMEOUT" and done.stage != "onnx":
        stage = "student derivation" if row.imported else "import"
        row.seconds, row.error = round(done.seconds, 1), f"TIMEOUT ({stage})"
    elif done.ended == "TIMEOUT":
        row.onnx_ok, row.onnx_error = False, "TIMEOUT"
    elif cli is None or cli.split()[1] != "0":
        row.seconds = row.seconds or round(done.seconds, 1)
        row.error = one_line(done.stderr, done.returncode)
    match = re.search(r"^params\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)", _stdout_of(done), re.M)
    if cli and cli.split()[1] == "0":
        row.student = True
    if match:
        t, s = (int(v.replace(",", "")) for v in match.groups()[:2])
        row.ratio = round(s / max(t, 1), 4)
    out.unlink(missing_ok=True)


def _stdout_of(done: ChildResult) -> str:
    return "".join(done.stdout)


def load_rows(path: Path | None) -> list[Row]:
    if not path or not path.exists():
        return []
    names = {f.name for f in fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in json.loads(path.read_text())]


def save_rows(rows: list[Row], path: Path | None) -> None:
    if not path:
        return
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    partial.replace(path)


def run_all(args: argparse.Namespace) -> list[Row]:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.json)
    done = {r.key() for r in rows}
    for family in [BY_NAME[n] for n in args.families]:
        todo = [r for r in args.routes
                if (family.name, r, args.timeout, args.mem_gb) not in done]  # fmt: skip
        if not todo:
            continue
        meta = ensure_exported(family, args)
        for route in todo:
            size = meta.get("route_sizes", {}).get(route, meta.get("size"))
            row = Row(family.name, family.source, family.kind, route, args.timeout, args.mem_gb,
                      size=size)  # fmt: skip
            path = args.out_dir / f"{family.name}{SUFFIX[route]}"
            if path.exists():
                row.file = path.name
                run_file(row, path, args)
            else:
                row.export_error = meta.get("build_error") or meta["errors"].get(route)
                row.error = f"not exported: {row.export_error}"
            rows.append(row)
            save_rows(rows, args.json)
            print(format_row(row), flush=True)
    return rows


# ---------------------------------------------------------------- report


def format_row(r: Row) -> str:
    ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
    secs = f"{r.seconds:.1f}" if r.seconds is not None else "-"
    onnx = {True: "ok", False: "FAIL", None: "-"}[r.onnx_ok]
    error = r.error or (f"onnx: {r.onnx_error}" if r.onnx_ok is False else "")
    error = re.sub(r"^dafl-compress: (unexpected error with \S+: |error: )", "", error)
    error = error.replace("cannot derive a consistent half-width student from this architecture",
                          "cannot derive")[:110]  # fmt: skip
    return (f"{r.family:24}{r.source:12}{r.kind:12}{r.route:12}{r.size or '-':>4} "
            f"{'ok' if r.imported else 'no':6}{'yes' if r.student else 'no':8}{ratio:>6} "
            f"{onnx:5}{secs:>7}  {error}")  # fmt: skip


def header() -> str:
    return (f"{'family':24}{'source':12}{'kind':12}{'route':12}{'size':>4} {'import':6}"
            f"{'student':8}{'ratio':>6} {'onnx':5}{'sec':>7}  error")  # fmt: skip


def totals(rows: list[Row], routes: list[str]) -> str:
    families = sorted({r.family for r in rows}, key=list(BY_NAME).index)
    complete = [f for f in families if {r.route for r in rows if r.family == f} >= set(routes)]

    def all_routes(family: str, test) -> bool:
        return all(test(r) for r in rows if r.family == family and r.route in routes)

    good = [f for f in complete if all_routes(f, Row.good)]
    good_onnx = [f for f in complete if all_routes(f, lambda r: r.good() and r.onnx_ok)]
    timed = [r for r in rows if r.seconds is not None]
    worst = max(timed, key=lambda r: r.seconds, default=None)
    exported = [r for r in rows if r.file]
    return "\n".join([
        f"files importing (and verifying): {sum(r.imported for r in rows)} of {len(exported)} "
        f"exported ({len(rows)} family/route pairs, {len(rows) - len(exported)} not exported)",
        f"students made: {sum(r.student for r in rows)}; with ratio "
        f"{RATIO_RANGE[0]}-{RATIO_RANGE[1]}: {sum(r.good() for r in rows)}; "
        f"student.onnx agrees with onnxruntime: {sum(bool(r.onnx_ok) for r in rows)}",
        f"families with a student of ratio {RATIO_RANGE[0]}-{RATIO_RANGE[1]} on all routes "
        f"({', '.join(routes)}): {len(good)} of {len(complete)}; with its ONNX verified too: "
        f"{len(good_onnx)}",
        f"worst seconds: {worst.seconds:.1f} ({worst.family} {worst.route}: "
        f"{worst.error or 'ok'})" if worst else "worst seconds: -",
        f"timeouts: {sum((r.error or '').startswith('TIMEOUT') for r in rows)}, memory: "
        f"{sum('MEMORY' in (r.error or '') for r in rows)}",
    ])  # fmt: skip


def report(rows: list[Row], args: argparse.Namespace) -> None:
    order = {name: i for i, name in enumerate(BY_NAME)}
    rows = [r for r in rows if r.family in args.families and r.route in args.routes]
    rows.sort(key=lambda r: (order[r.family], ROUTES.index(r.route)))
    print("\n" + header())
    for row in rows:
        print(format_row(row))
    print("\n" + totals(rows, args.routes))
    missing = [f"{f}/{r}" for f in args.families for r in args.routes
               if not any(x.family == f and x.route == r for x in rows)]  # fmt: skip
    if missing:
        print(f"not run: {' '.join(missing)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=list(BY_NAME), choices=list(BY_NAME),
                        metavar="NAME", help="default: all 33, in priority order")  # fmt: skip
    parser.add_argument("--routes", nargs="*", default=list(ROUTES), choices=ROUTES)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per file for the student (default: %(default)s)")  # fmt: skip
    parser.add_argument("--export-timeout", type=float, default=300.0,
                        help="seconds per exported file (default: %(default)s)")  # fmt: skip
    parser.add_argument("--mem-gb", type=float, default=8.0,
                        help="memory (address-space) cap per child, GiB: %(default)s")  # fmt: skip
    parser.add_argument("--json", type=Path, help="rows written here after each file; resumes")
    parser.add_argument("--out-dir", type=Path, default=HERE / "coverage_out",
                        help="exported files (cached) (default: %(default)s)")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="print the --json table")
    parser.add_argument("--export-child", metavar="FAMILY", help=argparse.SUPPRESS)
    parser.add_argument("--student-child", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_child:
        export_family(args.export_child, args.out_dir, args.routes)
        return 0
    if args.student_child:
        return student_child(*args.student_child)
    import importlib.util

    if not args.report_only and importlib.util.find_spec("timm") is None:
        print("bench_coverage builds timm models: pip install timm (1.0.31 measured)")
        return 2
    rows = load_rows(args.json) if args.report_only else run_all(args)
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

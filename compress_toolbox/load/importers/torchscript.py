"""TorchScript archives (torch.jit.save): rebuilt as ordinary layers through ONNX.

A TorchScript archive carries code (``code/**.py``) that torch compiles and runs: a class's
``__setstate__`` while the file loads, ``forward`` when we check the module. Before
torch.jit.load, that code is read as text and refused without --trust-model-code when it
defines ``__setstate__`` or can reach an operator outside the ``aten`` and ``prim`` namespaces or
one of those that reach the outside world (files, network), and the archive's pickles may only
name the types torch's own loader knows (no custom C++ classes, no remote references).

The text is scanned without trusting our reading of strings and comments (the TorchScript lexer
could read them differently): every identifier anywhere counts, which can only refuse more.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from compress_toolbox.errors import ImportFailed
from compress_toolbox.load.importers.base import (
    FileHead,
    ImportedModel,
    random_inputs,
    register_importer,
    torch_output_as_warning,
    torch_runner,
    verify,
)
from compress_toolbox.load.importers.torch_to_onnx import module_via_onnx

TRUST_HINT = "pass --trust-model-code if you trust the file"
# Operators (by name, in any namespace, and as tensor methods) that reach outside the process.
OUTSIDE_WORLD = {
    "save": "writes a file",
    "from_file": "reads a file",
    "rpc_async": "calls another machine",
    "rpc_sync": "calls another machine",
    "rpc_remote": "calls another machine",
    "classes": "uses a custom C++ class (torch.classes)",
}
# prim operators that printed TorchScript calls as ``ops.prim.X``: accessors and control helpers.
PRIM_OPS = {
    "NumToTensor", "RaiseException", "TupleIndex", "StringIndex", "ModuleContainerIndex",
    "EnumName", "EnumValue", "Uninitialized", "abs", "data", "device", "dtype", "grad", "id",
    "index", "itemsize", "layout", "max", "min", "name", "nbytes", "rangelist", "requires_grad",
    "tolist", "type", "unchecked_cast", "unchecked_unwrap_optional",
}  # fmt: skip
SAFE_NAMESPACES = ("aten", "prim")
_SPACE = " \t\n\r\f\v\\"  # what the TorchScript lexer may skip between tokens, and more
_GAP = r"[ \t\n\r\f\v\\]*"
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOT_COMMENT = re.compile(rf"\.{_GAP}#")
# getattr(name, "literal"): the only form printed code uses (a child module named "0")
_GETATTR = re.compile(
    rf'getattr{_GAP}\({_GAP}[A-Za-z_][A-Za-z0-9_]*{_GAP},{_GAP}"([^"\\\n]*)"{_GAP}\)'
)


def _sniff(info: FileHead) -> bool:
    return info.zip_has("/constants.pkl") and any("/code/" in name for name in info.zip_names)


class _ShapeOnly:
    def __init__(self, size):
        self.size = tuple(size)


class _TracedInputsReader(pickle.Unpickler):
    """Reads only tensor *shapes* from ``traced_inputs.pkl`` (what torch.jit.trace saw)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *args: _ShapeOnly(size)
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, tag: value
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            return None
        raise pickle.UnpicklingError(f"{module}.{name} not allowed")

    def persistent_load(self, pid):
        return None


def traced_input_shape(path: Path) -> tuple[int, ...] | None:
    """The input shape (without batch) that the module was traced with, if the file records it."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/traced_inputs.pkl"))
            saved = _TracedInputsReader(io.BytesIO(archive.read(name))).load()
        inputs = saved.get("forward") if isinstance(saved, dict) else None
        if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            return inputs[0].size[1:]
    except Exception:  # not recorded, scripted rather than traced, another layout: ask the user
        return None
    return None


def code_problem(path: Path) -> str | None:
    """Why the TorchScript archive ``path`` may run code that reaches outside the model, as
    "MEMBER does X" (None when it does not): read from its ``code/`` sources and pickles before
    torch loads anything of it."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            lower = name.lower()  # torch's zip reader finds members ignoring case
            if lower.endswith("/model.json"):
                problem = "marks the legacy format, whose code this tool cannot check"
            elif lower.endswith(".py"):
                problem = _source_problem(archive.read(name).decode("latin-1"))
            elif lower.endswith("pkl"):
                problem = _pickle_problem(archive.read(name))
            else:
                continue
            if problem:
                return f"{name} {problem}"
    return None


def _source_problem(text: str) -> str | None:
    if _DOT_COMMENT.search(text):
        return "has a comment inside an attribute access, which hides what it calls"
    for match in _WORD.finditer(text):
        word, start = match.group(), match.start()
        if _follows_dot(text, start):
            if word in OUTSIDE_WORLD:
                return f"calls .{word}, which {OUTSIDE_WORLD[word]}"
        elif word == "__setstate__":
            return "defines __setstate__ (code that runs on load)"
        elif word in ("torch", "ops", "__torch__"):
            problem = _namespace_problem(word, _components(text, match.end()))
            if problem:
                return problem
        elif word == "getattr":
            literal = _GETATTR.match(text, start)
            if not literal:
                return "calls getattr in a form this tool cannot check"
            if literal.group(1) in OUTSIDE_WORLD:
                return f"reaches {literal.group(1)!r}, which {OUTSIDE_WORLD[literal.group(1)]}"
    return None


def _follows_dot(text: str, start: int) -> bool:
    i = start - 1
    while i >= 0 and text[i] in _SPACE:
        i -= 1
    return i >= 0 and text[i] == "."


def _components(text: str, end: int) -> list[str]:
    """The dotted names after a root name: ``torch . add`` -> ["add"]."""
    parts = []
    while True:
        i = end
        while i < len(text) and text[i] in _SPACE:
            i += 1
        if i >= len(text) or text[i] != ".":
            return parts
        i += 1
        while i < len(text) and text[i] in _SPACE:
            i += 1
        word = _WORD.match(text, i)
        if not word:
            return parts
        parts.append(word.group())
        end = word.end()


def _namespace_problem(root: str, parts: list[str]) -> str | None:
    """``torch.X`` is aten::X, ``ops.NS.X`` is NS::X, and ``.autograd.`` leads back to aten
    (as torch's own resolver reads them); the archive's classes live under ``__torch__``."""
    if root == "__torch__":
        return None if parts else "uses __torch__ as a value"
    if root == "torch":
        namespace, rest = "aten", parts
    else:
        namespace, rest = (parts[0], parts[1:]) if parts else ("", [])
    while rest and rest[0] == "autograd":
        namespace, rest = "aten", rest[1:]
    if namespace not in SAFE_NAMESPACES:
        return f"calls operators of the {namespace or '(unnamed)'!r} namespace"
    if not rest:
        return f"uses the {namespace} operator namespace as a value, which hides what it calls"
    op = rest[0]
    if op in OUTSIDE_WORLD:
        return f"calls {namespace}::{op}, which {OUTSIDE_WORLD[op]}"
    if namespace == "prim" and op not in PRIM_OPS and not op.startswith("is_"):
        return f"calls prim::{op}, an internal operator model code does not use"
    return None


def _pickle_problem(data: bytes) -> str | None:
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("INST", "OBJ", "STACK_GLOBAL"):
                return f"has a pickle opcode ({opcode.name}) torch's loader does not use"
            if opcode.name == "GLOBAL":  # torch's loader resolves other names to fixed code
                module, _, name = str(argument).partition(" ")
                custom = "classes" in f"{module}.{name}".split(".")
                if custom or module.startswith("torch.distributed"):
                    return f"refers to {module}.{name}, a C++ class outside the model's code"
    except (ValueError, pickle.UnpicklingError, EOFError) as error:
        return f"has an unreadable pickle ({error})"
    return None


@register_importer("torchscript", _sniff)
def import_torchscript(
    path: Path, *, input_shape=None, trust_pickle=False, **_unused
) -> ImportedModel:
    """Check the archive's code (refused unless ``trust_pickle``: the --trust-model-code flag),
    load with torch.jit.load, export to ONNX, convert back to editable layers, verify."""
    problem = None if trust_pickle else code_problem(path)
    if problem:
        raise ImportFailed(f"{path}: in the TorchScript archive, {problem}; {TRUST_HINT}")
    with torch_output_as_warning(path):
        return _load_and_rebuild(path, input_shape)


def _load_and_rebuild(path: Path, input_shape) -> ImportedModel:
    try:
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as error:
        raise ImportFailed(f"{path}: cannot load TorchScript archive: {error}") from None
    shape = tuple(input_shape) if input_shape else traced_input_shape(path)
    if not shape:
        raise ImportFailed(
            f"{path}: TorchScript file does not record its input shape; "
            "give it with --input-shape C,H,W"
        )
    try:
        scripted(random_inputs(shape, 1))
    except Exception as error:
        raise ImportFailed(f"{path}: does not run on input shape {shape}: {error}") from None
    module = module_via_onnx(scripted, shape, path, dynamo=False)
    max_abs, max_rel = verify(module, torch_runner(scripted), shape, path)
    details = {"verified_against": "torch.jit.load", "rebuilt_via": "onnx (opset 17)"}
    return ImportedModel(module, shape, max_abs, max_rel, details)

"""PyTorch checkpoints: a state_dict (plain or wrapped) with its model class, or a pickled model."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.errors import ImportFailed
from compress_toolbox.load.importers.base import (
    FileHead,
    ImportedModel,
    random_inputs,
    register_importer,
    torch_runner,
    verify,
)
from compress_toolbox.load.user_code import load_object, user_file

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "student", "teacher")
TORCHVISION_INPUT = (3, 224, 224)


def _sniff(info: FileHead) -> bool:
    if info.zip_names:
        return info.zip_has("/data.pkl") and not any("/code/" in n for n in info.zip_names)
    return info.is_legacy_torch_save()


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()
        )
    )


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise ImportFailed(f"{path}: no state_dict found in the checkpoint (top level: {keys})")
    if all(key.startswith("module.") for key in obj):  # saved from DataParallel / DDP
        obj = {key[len("module.") :]: value for key, value in obj.items()}
    return obj


def _load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust_pickle:
            raise ImportFailed(
                f"{path}: the checkpoint holds pickled Python objects (a whole model?), which can "
                "run code when loaded; pass --trust-pickle if you trust the file, "
                "or save a state_dict"
            ) from None
        weights_only_error = error
    except Exception as error:
        raise ImportFailed(f"{path}: cannot read the PyTorch checkpoint: {error}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as error:
        raise ImportFailed(
            f"{path}: cannot unpickle the checkpoint: {error} "
            f"(weights-only load said: {weights_only_error})"
        ) from None


def model_class_file(spec: str | None) -> Path | None:
    """The user's file that ``--model-class`` names (``file.py:Class``, or ``pkg.mod:Class``
    found in the working folder), without running it; None for library models."""
    if spec and spec.startswith(("zoo:", "torchvision:")):
        return None
    return user_file(spec)


def resolve_model_class(spec: str) -> tuple[Any, tuple[int, ...] | None]:
    """``pkg.mod:Class``, ``path/file.py:Class``, a torchvision or zoo model name.

    A bare name means torchvision's model when torchvision has one, else the zoo's;
    ``torchvision:NAME`` and ``zoo:NAME`` say which.

    Returns the callable building the model and its default input shape when known.
    """
    if ":" in spec and not spec.startswith(("zoo:", "torchvision:")):
        return load_object(spec, "--model-class", ImportFailed), None
    import torchvision

    import model_zoo

    prefix, _, name = (
        spec.rpartition(":") if spec.startswith(("zoo:", "torchvision:")) else ("", "", spec)
    )
    # A bare name is looked up in torchvision first (most checkpoints in the wild are its models;
    # several zoo names, such as the CIFAR-style resnet18, shadow them), then in our zoo.
    if prefix in ("", "torchvision") and name in torchvision.models.list_models():
        return (lambda **kwargs: torchvision.models.get_model(name, weights=None, **kwargs)), (
            TORCHVISION_INPUT
        )
    if prefix in ("", "zoo") and name in model_zoo.list_models():
        entry = model_zoo.get_entry(name)
        return (lambda **kwargs: model_zoo.get_model(name, **kwargs)), entry.default_input
    raise ImportFailed(
        f"--model-class {spec!r}: not 'package.module:Class', 'file.py:Class', "
        "a torchvision model name (or torchvision:NAME) or a model_zoo name (or zoo:NAME)"
    )


def _describe_mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            parts.append(
                f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
            )
    return "; ".join(parts)


@register_importer("pytorch-checkpoint", _sniff)
def import_checkpoint(
    path: Path, *, model_class=None, model_kwargs=None, input_shape=None, trust_pickle=False,
    **_unused,
) -> ImportedModel:
    """Build ``model_class(**model_kwargs)``, load the state_dict strictly (or a trusted pickle)."""
    loaded = _load(path, trust_pickle)
    default_shape = None
    if isinstance(loaded, nn.Module):  # a whole pickled model, loaded with trust_pickle
        module = loaded
    else:
        state = _unwrap_state_dict(loaded, path)
        if not model_class:
            raise ImportFailed(
                f"{path}: a state_dict needs the model's class: give --model-class "
                "package.module:Class, file.py:Class or a zoo/torchvision name"
            )
        builder, default_shape = resolve_model_class(model_class)
        try:
            module = builder(**(model_kwargs or {}))
        except Exception as error:
            raise ImportFailed(
                f"--model-class {model_class}: cannot build it with {model_kwargs or {}}: {error}"
            ) from None
        if not isinstance(module, nn.Module):
            raise ImportFailed(f"--model-class {model_class} did not build an nn.Module")
        mismatch = _describe_mismatch(module, state)
        if mismatch:
            raise ImportFailed(f"{path}: state_dict does not match {model_class}: {mismatch}")
        module.load_state_dict(state, strict=True)
    module.eval()
    shape = tuple(input_shape) if input_shape else default_shape
    if not shape:
        raise ImportFailed(
            f"{path}: a checkpoint does not record its input shape; "
            "give it with --input-shape C,H,W"
        )
    try:
        with torch.no_grad():
            module(random_inputs(shape, 1))
    except Exception as error:
        raise ImportFailed(
            f"{path}: the model does not run on input shape {shape}: {error}"
        ) from None
    # The module *is* the checkpoint's own class: this checks determinism and batch handling.
    reference = torch_runner(module)
    max_abs, max_rel = verify(module, reference, shape, path)
    details = {"verified_against": "the checkpoint's own class", "model_class": model_class}
    return ImportedModel(module, shape, max_abs, max_rel, details)

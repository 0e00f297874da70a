"""What the converter's routes share: the options' errors (``UserError``), a ``Route``, TensorFlow
itself (imported on first use), and the NHWC input handling."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

OPSET = 17
INPUT_NAME = "input"  # the placeholder name of the functions we trace (Keras, SavedModel, TF2)


class UserError(Exception):
    """A problem with the user's file or options, said in one line."""


@dataclass
class Route:
    """How one format is read: its input size, its conversion, and TensorFlow running it."""

    shape: tuple[int, ...]  # H, W, C
    convert: Callable[[], onnx.ModelProto]
    run: Callable[[np.ndarray], list[np.ndarray]]  # NHWC batch -> outputs, in ONNX order
    notes: list[str] = field(default_factory=list)


_MODULE_MISSING = re.compile(
    r"Could not deserialize class '([^']+)' because its parent module ([\w.]+) cannot be imported"
)
_CLASS_UNKNOWN = re.compile(r"Could not locate class '([^']+)'|Unknown layer: '([^']+)'")
SAVED_MODEL_HINT = "save the model as a SavedModel (model.export(DIR)), which loads without it"


def keras_class_missing(message: str) -> str | None:
    """What to tell the user when Keras cannot rebuild a model because one of its classes is
    defined in Python code that is not importable here (a package such as keras_cv, or the
    user's own registered layer); None for any other error. Keras's own message ends in the
    whole model's config, thousands of characters, so it is not passed on."""
    found = _MODULE_MISSING.search(message)
    if found:
        name, module = found.groups()
        package = module.split(".")[0]
        return (f"the Keras model's class {name} is defined in the Python package {package} "
                f"({module}), which cannot be imported here: make {package} importable where "
                f"dafl-compress runs (pip install it), or {SAVED_MODEL_HINT}")  # fmt: skip
    found = _CLASS_UNKNOWN.search(message)
    if found:
        name = found.group(1) or found.group(2)
        return (f"the Keras model uses a custom class, {name}, and Keras rebuilds it only "
                "where its code was imported first, which a model file cannot ask for: "
                f"{SAVED_MODEL_HINT}")  # fmt: skip
    return None


def load_tf():
    """TensorFlow, imported on first use (the converter process only)."""
    import tensorflow as tf

    return tf


def input_spec(shape: tuple[int | None, ...]):
    """A float32 NHWC TensorSpec with a free batch, named INPUT_NAME."""
    tf = load_tf()
    return tf.TensorSpec((None, *shape), tf.float32, name=INPUT_NAME)


def nhwc(static: list, given: tuple[int, ...] | None, what: str) -> tuple[int, ...]:
    """H, W, C from a 4-D static shape, ``given`` (from --input-shape) winning."""
    if len(static) != 4:
        raise UserError(f"{what} has shape {static}; dafl-compress reads image models (N,H,W,C)")
    if given:
        return tuple(given)
    if any(dim is None or dim < 0 for dim in static[1:]):
        raise UserError(f"{what} has no fixed size ({static}); give it with --input-shape C,H,W")
    return tuple(int(dim) for dim in static[1:])


def traced_function(function, shape, outputs_of):
    """Convert a traced tf.function; TensorFlow runs the same function for the reference."""
    import tf2onnx

    spec = input_spec(shape)
    traced = load_tf().function(function, input_signature=[spec], autograph=False)
    concrete = traced.get_concrete_function(spec)
    input_name = concrete.inputs[0].name  # "input:0": what inputs_as_nchw must name

    def convert():
        return tf2onnx.convert.from_function(
            traced, input_signature=[spec], opset=OPSET, inputs_as_nchw=[input_name]
        )[0]

    def run(x):
        return outputs_of(traced(x))

    return convert, run


def flat_numpy(result) -> list:
    # tf2onnx orders a function's outputs as tf.nest.flatten does (dict keys sorted)
    return [value.numpy() for value in load_tf().nest.flatten(result)]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

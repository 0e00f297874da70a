"""TFLite: float models as they are, full-int8 ones dequantised, dynamic-range ones refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import tf_common as common
import tf_graph_safety as SAFETY


def _tflite_quantisation(source: Path) -> str:
    """'float', 'int8' (activations quantised too) or 'dynamic' (int8 weights, float math)."""
    try:
        return _read_tflite_quantisation(source.read_bytes())
    except Exception as error:  # a damaged flatbuffer fails anywhere while it is read
        raise common.UserError(f"not a readable TFLite file (truncated or corrupt?): "
                        f"{common.first_line(error)}") from None  # fmt: skip


def _read_tflite_quantisation(data: bytes) -> str:
    from tf2onnx.tflite.Model import Model
    from tf2onnx.tflite.TensorType import TensorType

    model = Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    integer = (TensorType.INT8, TensorType.UINT8)

    def constant(tensor) -> bool:
        return model.Buffers(tensor.Buffer()).DataLength() > 0

    tensors = [graph.Tensors(i) for i in range(graph.TensorsLength())]
    if any(t.Type() in integer and not constant(t) for t in tensors):
        return "int8"
    for i in range(graph.OperatorsLength()):
        inputs = [graph.Tensors(j) for j in graph.Operators(i).InputsAsNumpy() if j >= 0]
        if any(t.Type() in integer and constant(t) for t in inputs):
            return "dynamic"
    return "float"


def route_tflite(source: Path, args):
    """TFLite: float as is; full-int8 dequantised (tf2onnx --dequantize); refuse dynamic-range."""
    import tf2onnx

    tf = common.load_tf()
    quantisation = _tflite_quantisation(source)
    if not args.trust_code:
        SAFETY.check_tflite(source.read_bytes())
    if quantisation == "dynamic":
        raise common.UserError(
            "a dynamic-range quantised TFLite model (int8 weights, float arithmetic) cannot be "
            "converted faithfully: give the float model (.tflite before quantisation, "
            "SavedModel or .keras)"
        )
    interpreter = tf.lite.Interpreter(model_path=str(source))
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1:
        raise common.UserError(f"the TFLite model has {len(inputs)} inputs; one is supported")
    if inputs[0]["dtype"] != tf.float32.as_numpy_dtype:
        raise common.UserError(
            f"the TFLite model takes {inputs[0]['dtype'].__name__} inputs: convert it with "
            "float input and output (inference_input_type=tf.float32)"
        )
    name = inputs[0]["name"]
    shape = common.nhwc(list(inputs[0]["shape_signature"]), args.shape, f"TFLite input '{name}'")

    def convert():
        if quantisation == "float":
            return tf2onnx.convert.from_tflite(
                str(source), opset=common.OPSET, inputs_as_nchw=[name]
            )[0]
        # from_tflite has no dequantize option: tf2onnx's command line does
        out = Path(args.out) / "dequantised.onnx"
        command = [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(source),
                   "--dequantize", "--opset", str(common.OPSET), "--inputs-as-nchw", name,
                   "--output", str(out)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace")
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
            raise common.UserError(f"tf2onnx --dequantize failed: {tail[0]}")
        return onnx.load(str(out))

    def run(x):  # the interpreter at batch 1, sample by sample
        interpreter.resize_tensor_input(inputs[0]["index"], [1, *shape])
        interpreter.allocate_tensors()
        results = []
        for sample in x:
            interpreter.set_tensor(inputs[0]["index"], sample[None])
            interpreter.invoke()
            results.append([interpreter.get_tensor(o["index"]) for o in outputs])
        return [np.concatenate([r[k] for r in results]) for k in range(len(outputs))]

    return common.Route(shape, convert, run, notes=[f"tflite-{quantisation}"])

"""The TensorFlow -> ONNX converter, run in its own process by ``importers/tensorflow.py``
(``convert.py``): nothing here is imported by compress_toolbox itself."""

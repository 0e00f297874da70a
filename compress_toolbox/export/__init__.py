"""Stage 4, export: the one torch -> ONNX writer and the onnxruntime helpers (``writer``), and the
one numeric verification (``verification``)."""

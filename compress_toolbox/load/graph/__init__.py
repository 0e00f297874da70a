"""Foreign graphs made editable: ONNX -> torch.fx through onnx2torch (``onnx_compat``), producers'
spellings of layers put back together (``onnx_cleanup``, ``decompositions``) and sizes frozen at
export time made free again (``shape_agnostic``)."""

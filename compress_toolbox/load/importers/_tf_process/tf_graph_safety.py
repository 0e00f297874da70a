"""Static checks of TensorFlow graphs, made before TensorFlow loads, traces or runs any of them.

A TensorFlow graph is a program: besides arithmetic it can write and read files (``WriteFile``,
``ReadFile``, ``SaveV2``, ``ImmutableConst``), run Python (``PyFunc``), print to files
(``PrintV2``) or talk to other processes (``_Send``, ``Collective*``, ``RpcCall``). Many of those
ops are not even marked stateful (``ReadFile`` is not), so TensorFlow's own flags cannot be
trusted to keep them out of constant folding. The check is therefore an allowlist: every op of
every graph and function that can run must be one that only computes tensors (``SAFE_OPS``: the
ops tf2onnx converts, a few pure math ops it rewrites, variables and function calls); anything
else is refused unless the user trusts the file.

The only exception is a saver's own ops (``SAVER_OPS``: SaveV2, RestoreV2...), accepted where
dafl-compress never runs anything: outside the functions a TF2 SavedModel's object graph names
(TensorFlow 2's loader restores variables through the object graph, not the saver's
functions), and outside the part of a TF1 graph that computes its outputs (TF1 variables are
read from the checkpoint by name, the file's restore op is never run: ``convert.py``).

Used only in the converter process (``convert.py``): TensorFlow is imported inside the
functions that need it, never by importing this file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

ELEMENTWISE = """
Abs Acos Acosh Add AddN AddV2 All Angle Any ApproximateEqual Asin Asinh Atan Atan2 Atanh
Betainc BitwiseAnd BitwiseOr BitwiseXor Cast Ceil ClipByValue Complex ComplexAbs Conj Cos Cosh
Digamma Div DivNoNan Elu Equal Erf Erfc Erfinv Exp Expm1 Floor FloorDiv FloorMod Greater
GreaterEqual Igamma Igammac Imag Invert IsFinite IsInf IsNan LeakyRelu LeftShift Less LessEqual
Lgamma Log Log1p LogicalAnd LogicalNot LogicalOr Maximum Minimum Mod Mul Neg NotEqual
Polygamma Pow Real RealDiv Reciprocal Relu Relu6 RightShift Rint Round Rsqrt Select SelectV2
Selu Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Square SquaredDifference Sub Tan Tanh
TruncateDiv TruncateMod Xdivy Xlog1py Xlogy Zeta
"""
REDUCTIONS_AND_NN = """
ArgMax ArgMin AvgPool AvgPool3D BatchMatMul BatchMatMulV2 BatchMatMulV3 BiasAdd BiasAddV1
Bincount Bucketize CTCGreedyDecoder CombinedNonMaxSuppression Conv2D Conv2DBackpropInput Conv3D
Conv3DBackpropInputV2 CropAndResize CudnnRNN Cumprod Cumsum DenseBincount DepthToSpace
DepthwiseConv2dNative DepthwiseConv2dNativeBackpropInput Dilation2D Einsum ExtractImagePatches
FFT FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3 InTopKV2 L2Loss LRN LSTMBlockCell
LogSoftmax MatMul Max MaxPool MaxPool3D MaxPoolV2 MaxPoolWithArgmax Mean Min
NonMaxSuppressionV2 NonMaxSuppressionV3 NonMaxSuppressionV4 NonMaxSuppressionV5 NthElement
Prod RFFT RFFT2D ResizeArea ResizeBicubic ResizeBilinear ResizeNearestNeighbor SegmentMax
SegmentMean SegmentMin SegmentProd SegmentSum Softmax SoftmaxCrossEntropyWithLogits
SpaceToBatchND SpaceToDepth SparseSoftmaxCrossEntropyWithLogits Sum TopKV2 UnsortedSegmentMax
UnsortedSegmentMin UnsortedSegmentProd UnsortedSegmentSum AdjustContrastv2 AdjustHue
AdjustSaturation HSVToRGB RGBToHSV Cholesky MatrixBandPart MatrixDeterminant MatrixDiag
MatrixDiagPart MatrixDiagPartV2 MatrixDiagPartV3 MatrixDiagV2 MatrixDiagV3 MatrixInverse
MatrixSetDiagV3 MatrixTriangularSolve Qr SelfAdjointEigV2 Svd
"""
ARRAYS = """
BatchToSpaceND BroadcastArgs BroadcastTo CheckNumerics CheckNumericsV2 Concat ConcatV2 Const
Cross Diag DiagPart DynamicPartition DynamicStitch EnsureShape ExpandDims Fill Gather
GatherNd GatherV2 HistogramFixedWidth Identity IdentityN InvertPermutation LinSpace LowerBound
MirrorPad OneHot OnesLike Pack Pad PadV2 ParallelDynamicStitch Placeholder PlaceholderV2
PlaceholderWithDefault PreventGradient Range Rank Reshape ReverseSequence ReverseV2 Roll
ScatterNd Shape ShapeN Size Slice Split SplitV Squeeze StopGradient StridedSlice
TensorScatterAdd TensorScatterMax TensorScatterMin TensorScatterSub TensorScatterUpdate Tile
Transpose Unique UniqueWithCounts UnravelIndex Unpack UpperBound Where ZerosLike
"""
OTHER_TENSORS = """
DenseToDenseSetOperation Dequantize FakeQuantWithMinMaxArgs FakeQuantWithMinMaxVars Multinomial
QuantizeAndDequantizeV2 QuantizeAndDequantizeV3 QuantizeAndDequantizeV4 QuantizeV2
RaggedGather RaggedRange RaggedTensorFromVariant RaggedTensorToSparse RaggedTensorToTensor
RaggedTensorToVariant RandomShuffle RandomStandardNormal RandomUniform RandomUniformInt
SampleDistortedBoundingBox SampleDistortedBoundingBoxV2 SparseFillEmptyRows SparseReshape
SparseSegmentMean SparseSegmentMeanWithNumSegments SparseSegmentSqrtN
SparseSegmentSqrtNWithNumSegments SparseSegmentSum SparseSegmentSumWithNumSegments SparseToDense
TensorListFromTensor TensorListGetItem TensorListLength TensorListReserve TensorListResize
TensorListSetItem TensorListStack AsString ReduceJoin StaticRegexReplace StringJoin StringLower
StringSplit StringSplitV2 StringToHashBucketFast StringToNumber StringUpper
"""
# Control flow, function calls and variables (in memory): what holds a computation together.
STRUCTURE = """
Assert Case If NoOp PartitionedCall StatefulPartitionedCall StatelessCase StatelessIf
StatelessWhile While ControlTrigger Enter Exit LoopCond Merge NextIteration RefEnter RefExit
RefIdentity RefMerge RefSwitch Switch Assign AssignVariableOp IsVariableInitialized
ReadVariableOp ResourceGather VarHandleOp VarIsInitializedOp Variable VariableV2
"""
SAFE_OPS = frozenset(
    " ".join((ELEMENTWISE, REDUCTIONS_AND_NN, ARRAYS, OTHER_TENSORS, STRUCTURE)).split()
)
# A checkpoint saver's ops: accepted only in the save/restore subgraphs saver_def names.
SAVER_OPS = frozenset(
    "SaveV2 RestoreV2 MergeV2Checkpoints ShardedFilename ShardedFilespec Save SaveSlices Restore "
    "RestoreSlice StaticRegexFullMatch DisableCopyOnRead".split()
)
# Words in an op's name that say what it can reach, for the message (the allowlist decides).
RISKS = (
    (("PyFunc", "Python"), "runs Python code"),
    (
        (
            "File",
            "Save",
            "Restore",
            "Reader",
            "Dataset",
            "Summary",
            "Snapshot",
            "ImmutableConst",
            "Checkpoint",
            "LoadAndRemap",
            "Writer",
            "Iterator",
            "Vocab",
            "Proto",
        ),
        "can touch files",
    ),  # fmt: skip
    (
        ("Send", "Recv", "Collective", "Rpc", "Remote", "Nccl"),
        "can talk to other processes or the network",
    ),  # fmt: skip
    (("Print", "Debug"), "can write to the console or to files"),
)
CONSENT = "pass --trust-model-code if you trust the file"


class UnsafeGraph(Exception):
    """A graph holds an op outside the allowlist; the message is one line for the user."""


def _risk(op: str) -> str:
    for words, risk in RISKS:
        if any(word.lower() in op.lower() for word in words):
            return risk
    return "is not among the ops known to only compute tensors"


def _refuse(where: str, op: str, node: str) -> UnsafeGraph:
    return UnsafeGraph(f"{where} contains op {op} ({node}), which {_risk(op)}; {CONSENT}")


def _producer(name: str) -> str:
    """The node an input string names: '^a', 'a:1' and 'a:output:0' are all node 'a'."""
    return name.lstrip("^").split(":")[0]


def _called(node, library: dict) -> Iterator[str]:
    """The library functions ``node`` calls: as its op, or in a func / list(func) attr (f,
    then_branch, body, branches...), nested attrs of a called function included."""
    if node.op in library:
        yield node.op
    pending = list(node.attr.values())
    while pending:
        value = pending.pop()
        if value.HasField("func"):
            yield value.func.name
            pending.extend(value.func.attr.values())
        for func in value.list.func:
            yield func.name
            pending.extend(func.attr.values())


class _Walk:
    """Checks nodes and the functions they call, each function once."""

    def __init__(self, library: dict, what: str):
        self.library, self.what, self.done = library, what, set()

    def nodes(self, nodes: Iterable, where: str, allowed: frozenset) -> None:
        for node in nodes:
            if node.op not in allowed and node.op not in self.library:
                raise _refuse(where, node.op, f"node '{node.name}'")
            for name in _called(node, self.library):
                self.function(name, allowed)

    def function(self, name: str, allowed: frozenset) -> None:
        if name in self.done or name not in self.library:
            return  # checked already, or not in the file (TensorFlow then refuses to load it)
        self.done.add(name)
        where = f"{self.what}'s function '{name}'"
        self.nodes(self.library[name].node_def, where, allowed)


def check_graph(graph_def, what: str, *, runs_all: bool = True,
                functions: Iterable[str] = ()) -> None:  # fmt: skip
    """Refuse (UnsafeGraph) an op outside SAFE_OPS in what TensorFlow may run: ``functions``
    (a SavedModel's object graph) and what they call, and the nodes and what they call when
    ``runs_all``; elsewhere in the file only SAVER_OPS are also accepted (a saver's subgraphs
    and functions, which dafl-compress never runs)."""
    library = {function.signature.name: function for function in graph_def.library.function}
    lenient = SAFE_OPS | SAVER_OPS
    # First any op that is not even a saver's (the one worth naming), then saver ops that may run.
    for allowed_functions, allowed_nodes in (
        (lenient, lenient), (SAFE_OPS, SAFE_OPS if runs_all else lenient)
    ):  # fmt: skip
        walk = _Walk(library, what)
        for name in functions:  # first: a function the nodes also call is checked as these are
            walk.function(name, allowed_functions)
        walk.nodes(graph_def.node, what, allowed_nodes)


def check_saved_model(saved_model, what: str = "the SavedModel") -> None:
    """Every meta graph of a parsed SavedModel. What TensorFlow 2's loader may run is the
    functions its object graph names (signatures, resource initialisers, restore functions)
    and what they call: SAFE_OPS only. Its graph's nodes and the saver functions they call
    (``__inference__traced_save``/``_restore``) are run only by the TF1 loader, which
    dafl-compress does not use (a TF1 SavedModel's graph is checked again, strictly, where it
    computes the outputs: tf1_graphs.py)."""
    for meta_graph in saved_model.meta_graphs:
        roots = set(meta_graph.object_graph_def.concrete_functions)
        for obj in meta_graph.object_graph_def.nodes:
            roots.update(obj.function.concrete_functions)
            if obj.bare_concrete_function.concrete_function_name:
                roots.add(obj.bare_concrete_function.concrete_function_name)
        check_graph(meta_graph.graph_def, what, runs_all=False, functions=sorted(roots))


def check_tflite(data: bytes, what: str = "the TFLite model") -> None:
    """Select TensorFlow ops (``Flex<Op>`` custom ops carrying a TensorFlow NodeDef) must be in
    SAFE_OPS, by their name and by the NodeDef they carry (the Flex delegate runs the latter).
    Other custom ops are left to the interpreter, which fails on any it has no kernel for."""
    from tensorflow.core.framework.node_def_pb2 import NodeDef
    from tf2onnx.flexbuffers import read_flexbuffer
    from tf2onnx.tflite.BuiltinOperator import BuiltinOperator
    from tf2onnx.tflite.Model import Model

    model = Model.GetRootAsModel(data, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = code.DeprecatedBuiltinCode()  # a byte; 127 says the real code is BuiltinCode
        if builtin == BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES:
            builtin = code.BuiltinCode()
        custom = builtin == BuiltinOperator.CUSTOM and code.CustomCode() is not None
        codes.append(code.CustomCode().decode(errors="replace") if custom else "")
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for i in range(graph.OperatorsLength()):
            operator = graph.Operators(i)
            code = codes[operator.OpcodeIndex()]
            if not code.startswith("Flex"):
                continue
            node = NodeDef()
            try:
                name, serialised = read_flexbuffer(operator.CustomOptionsAsNumpy().tobytes(),
                                                   decode_strings=False)[:2]  # fmt: skip
                node.ParseFromString(serialised)
            except Exception:
                raise _refuse(what, code, f"operator {i}, its TensorFlow node unreadable") from None
            for op in (code[len("Flex") :], name.decode(errors="replace"), node.op):
                if op not in SAFE_OPS:
                    raise _refuse(what, code, f"operator {i}, running TensorFlow's {op}")

"""Adding to an ONNX graph under names that clash with nothing in it: every name the graph
uses (``graph_names``), a new one (``unused``), and nodes and int64 constants added that way
(``GraphAdditions``)."""

from __future__ import annotations

import numpy as np
import onnx


def graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every name ``graph`` uses: its nodes', their inputs' and outputs', its initializers',
    inputs', outputs' and value infos'."""
    names = {name for node in graph.node for name in (node.name, *node.input, *node.output)}
    names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    return names - {""}


def unused(name: str, taken: set[str]) -> str:
    """``name``, with underscores added until it is not in ``taken``; now taken."""
    while name in taken:
        name += "_"
    taken.add(name)
    return name


class GraphAdditions:
    """Nodes and int64 constants appended to ``graph``, each named after a base name made
    unique (``unused``) among every name the graph uses."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph, self.taken = graph, graph_names(graph)

    def name(self, base: str) -> str:
        """A new name from ``base``, now taken."""
        return unused(base, self.taken)

    def const(self, base: str, values: list[int]) -> str:
        """An int64 initializer of ``values``; its name."""
        name = self.name(base)
        self.graph.initializer.append(onnx.numpy_helper.from_array(np.array(values, np.int64),
                                                                   name))  # fmt: skip
        return name

    def node(self, op: str, inputs: list[str], outputs: str | list[str],
             **attributes) -> str:  # fmt: skip
        """A node ``op`` of ``inputs``; ``outputs`` a base name (made unique: the node's name
        too), or a list of names already reserved. Returns its (first) output's name."""
        if isinstance(outputs, str):
            outputs = [self.name(outputs)]
        self.graph.node.append(onnx.helper.make_node(op, inputs, outputs,
                                                     name=self.name(outputs[0]), **attributes))
        return outputs[0]

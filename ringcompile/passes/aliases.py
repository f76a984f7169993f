"""Which nodes share memory, and which nodes change it in place.

FX records no edge from an in-place change to the later readers of the tensor it changes (or of
any view of it): ``b = x.new_empty(s); b[..., :6].copy_(k); sdpa(q, b, v)`` reads ``b`` through an
edge to ``new_empty``. A pass that moves a value (a shard, a gather) must take it after the changes
its readers see, or it hands them the memory as it was before.

- ``is_view(node)``: whether a node's result may share its first input's memory;
- ``storage_root(node)``: the node whose memory ``node`` may share, following views back;
- ``written_tensors(node)``: the tensors a node changes in place (``x.add_(y)``, ``x[i] = v``,
  ``x += y``, ``out=``);
- ``Writes``: every change of one graph by the memory it changes, to ask which change a reader
  sees last.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch.fx import Graph, Node

from ringcompile.passes.dims import example, is_tensor_node
from ringcompile.passes.fx_utils import in_place_method

__all__ = ["IN_PLACE_OPERATORS", "Writes", "is_view", "storage_root", "written_tensors"]

# ops whose result shares (or may share: ``reshape``, ``contiguous``) its input's memory
_VIEW_METHODS = {
    "view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "flatten",
    "unflatten", "t", "narrow", "select", "as_strided", "detach", "view_as", "expand_as", "chunk",
    "split", "unbind", "swapaxes", "movedim", "diagonal", "contiguous", "real", "imag",
}  # fmt: skip
# casts return their input itself when it already has the dtype (``x.float()`` of a float32 x)
_CASTS = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "long", "int", "bool"}

# ``x += y`` on a tensor changes x (Dynamo records ``operator.iadd``); ``x[i] = v`` too
IN_PLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
    operator.ior: operator.or_, operator.ixor: operator.xor, operator.imatmul: operator.matmul,
}  # fmt: skip


def _advanced(index) -> bool:
    """An index with a tensor or a list in it: ``x[index]`` copies, it shares no memory."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (Node, list)) for i in items)


def is_view(node: Node) -> bool:
    if node.op == "call_function":
        return node.target is operator.getitem and not (
            is_tensor_node(node.args[0]) and _advanced(node.args[1])
        )
    if node.op != "call_method":
        return False
    if node.target in _VIEW_METHODS:
        return True
    if node.target in _CASTS and node.args:
        a, b = example(node.args[0]), example(node)
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.dtype, a.device) == (b.dtype, b.device)
        )
    return False


def storage_root(node: Node) -> Node:
    """The node whose memory ``node`` may share (``node`` itself when it is no view)."""
    while is_view(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def written_tensors(node: Node) -> list[Node]:
    """The tensors whose memory ``node`` changes (a node without Dynamo's example values counts
    as a tensor: only ``x += 1`` on a number is known to change none)."""
    if in_place_method(node):
        targets = [node.args[0]]
    elif node.op == "call_function" and (
        node.target in IN_PLACE_OPERATORS or node.target is operator.setitem
    ):
        targets = [node.args[0]]
    elif node.op == "call_function" and "out" in node.kwargs:
        out = node.kwargs["out"]
        targets = list(out) if isinstance(out, (tuple, list)) else [out]
    else:
        return []
    return [t for t in targets if isinstance(t, Node) and (is_tensor_node(t) or example(t) is None)]


class Writes:
    """Every in-place change of a graph, by the memory it changes, as the graph stands now."""

    def __init__(self, graph: Graph):
        self._position = {n: i for i, n in enumerate(graph.nodes)}
        self._root = {n: storage_root(n) for n in graph.nodes}
        self._by_root: dict[Node, list[Node]] = defaultdict(list)
        for n in graph.nodes:
            for t in written_tensors(n):
                self._by_root[self._root[t]].append(n)

    def last_before(self, node: Node, reader: Node | None) -> Node | None:
        """The last change to ``node``'s memory after ``node`` and before ``reader`` (None: no
        reader yet, so no change), or None: what ``reader`` reads is ``node`` as it was made."""
        start, end = self._position.get(node), self._position.get(reader)
        if start is None or end is None:
            return None
        seen = [
            w for w in self._by_root.get(self._root[node], ()) if start < self._position[w] < end
        ]
        return seen[-1] if seen else None

"""Pass 1: one spelling per op, so that every later pass matches one form.

Expects: a Dynamo FX graph.
Guarantees, for nodes whose first argument is a tensor:
- a Python operator is a call_function of its ``operator`` function, however Dynamo recorded it
  (``x.__eq__(y)`` on torch 2.11, ``operator.eq(x, y)`` on others) or the model wrote it
  (``torch.eq(x, y)``, ``x.mul(y)``, ``torch.bitwise_and(m, n)``: two operands, nothing else);
- a torch function that is also a tensor method taking the same arguments after ``self``
  (``torch.transpose(x, 1, 2)``, ``torch.sum(x, -1)``, ``torch.reshape(x, s)``) is the method
  call (``x.transpose(1, 2)``), the form Dynamo gives most tensor ops;
- ``scaled_dot_product_attention`` takes q, k, v by position and every other argument by name;
- an in-place method or operator on a tensor the graph made itself, which no view shares
  (``out.add_(y)``, ``s.scatter_(1, i, v)``, ``h += r``), is its out-of-place form, and the
  readers after it read its result: FX records no edge from the change to them, so a later
  pass that shards or gathers the tensor would hand them a copy the change never reached. Graph
  inputs, module state and views keep their in-place changes (``shard_sequence`` shards and
  gathers their memory after the changes each reader sees).
Nothing else changes, and what each node computes is the same.

    eq = l.__eq__(r); t = torch.transpose(x, 1, 2); sdpa(q, k, v, None, 0.0, True)
    -> eq = l == r; t = x.transpose(1, 2); sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
"""

from __future__ import annotations

import builtins
import operator

import torch
from torch.fx import Node

from ringcompile.passes.aliases import IN_PLACE_OPERATORS, is_view
from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import is_tensor_node
from ringcompile.passes.fx_utils import in_place_method, is_sdpa, sdpa_args

_DUNDERS = {
    "__eq__": operator.eq, "__ne__": operator.ne, "__lt__": operator.lt, "__le__": operator.le,
    "__gt__": operator.gt, "__ge__": operator.ge, "__and__": operator.and_,
    "__or__": operator.or_, "__xor__": operator.xor, "__invert__": operator.invert,
    "__neg__": operator.neg, "__add__": operator.add, "__sub__": operator.sub,
    "__mul__": operator.mul, "__truediv__": operator.truediv,
    "__floordiv__": operator.floordiv, "__mod__": operator.mod, "__pow__": operator.pow,
    "__matmul__": operator.matmul, "__getitem__": operator.getitem, "__abs__": operator.abs,
}  # fmt: skip
# one operand and nothing else: ``abs(x)``, ``torch.abs(x)``, ``x.abs()``
_UNARY = {builtins.abs: operator.abs, torch.abs: operator.abs, "abs": operator.abs}
# ``x.__rmul__(y)`` is ``y * x``
_REFLECTED = {
    "__radd__": operator.add, "__rsub__": operator.sub, "__rmul__": operator.mul,
    "__rtruediv__": operator.truediv, "__rpow__": operator.pow, "__rmatmul__": operator.matmul,
}  # fmt: skip

# torch functions and methods that are a binary operator when given two operands and nothing else
# (``torch.add(x, y, alpha=2)`` or ``torch.div(x, y, rounding_mode=...)`` are not)
_BINARY = {
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
    "gt": operator.gt, "ge": operator.ge, "add": operator.add, "sub": operator.sub,
    "mul": operator.mul, "div": operator.truediv, "matmul": operator.matmul,
    "bitwise_and": operator.and_, "bitwise_or": operator.or_,
}  # fmt: skip

# torch.<name>(x, *args, **kwargs) is x.<name>(*args, **kwargs) for these
_AS_METHODS = (
    "transpose", "swapaxes", "permute", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten",
    "chunk", "split", "tensor_split", "unbind", "cumsum", "diff", "sum", "mean", "amax", "amin",
    "var", "std", "all", "any", "softmax", "log_softmax", "masked_fill",
)  # fmt: skip
_FUNCTION_METHODS = {getattr(torch, name): name for name in _AS_METHODS}
_BINARY_FUNCTIONS = {getattr(torch, name): op for name, op in _BINARY.items()}


def normalized(node: Node) -> tuple[str, object, tuple] | None:
    """The (op, target, args) ``node`` becomes, or None where it stays as it is."""
    if not node.args or not is_tensor_node(node.args[0]):
        return None
    t, args = node.target, node.args
    if node.op == "call_method":
        if t in _DUNDERS:
            return "call_function", _DUNDERS[t], args
        if t in _REFLECTED and len(args) == 2:
            return "call_function", _REFLECTED[t], args[::-1]
        if t in _BINARY and len(args) == 2 and not node.kwargs:
            return "call_function", _BINARY[t], args
        if t in _UNARY and len(args) == 1 and not node.kwargs:
            return "call_function", _UNARY[t], args
    elif node.op == "call_function":
        if t in _UNARY and len(args) == 1 and not node.kwargs:
            return "call_function", _UNARY[t], args
        if t in _BINARY_FUNCTIONS and len(args) == 2 and not node.kwargs:
            return "call_function", _BINARY_FUNCTIONS[t], args
        if t in _FUNCTION_METHODS and "out" not in node.kwargs:
            return "call_method", _FUNCTION_METHODS[t], args
    return None


def _out_of_place(node: Node, position: dict[Node, int]) -> tuple[str, object] | None:
    """The out-of-place (op, target) for an in-place ``node`` whose change nothing else can see."""
    t = node.target
    if in_place_method(node) and hasattr(torch.Tensor, t[:-1]):
        new = ("call_method", t[:-1])
    elif node.op == "call_function" and t in IN_PLACE_OPERATORS:
        new = ("call_function", IN_PLACE_OPERATORS[t])
    else:
        return None
    x = node.args[0]
    if (
        not isinstance(x, Node)
        or not is_tensor_node(x)
        or x.op not in ("call_function", "call_method")
        or is_view(x)
    ):
        return None  # a graph input, module state or a view: the change must stay visible
    here = position[node]
    for u in x.users:
        if position[u] < here and is_view(u):
            return None  # a view made before the change would see it
    return new


def _functionalize(graph) -> None:
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        new = _out_of_place(node, position)
        if new is None:
            continue
        x = node.args[0]
        node.op, node.target = new
        later = [u for u in x.users if u is not node and position[u] > position[node]]
        for u in later:
            u.replace_input_with(x, node)


def run(ctx: RingContext) -> None:
    _functionalize(ctx.gm.graph)
    for node in ctx.gm.graph.nodes:
        if is_sdpa(node):
            a = sdpa_args(node)
            node.args = (a.pop("query"), a.pop("key"), a.pop("value"))
            node.kwargs = a
            continue
        new = normalized(node)
        if new is not None:
            node.op, node.target, node.args = new

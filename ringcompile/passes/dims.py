"""Which input dims become which output dims, op by op: how the passes follow the sequence.

``dim_map(node)`` answers, for a node of a Dynamo FX graph, a list of ``(input_node, {in_dim:
out_dim})`` for the tensor inputs whose dims pass through to the output position by position
(the sequence of a linear layer's input is the sequence of its output; the sequence of a
``transpose(1, 2)`` moves). A dim that is split, merged, sliced, reduced or mixed (the key dim of
``q @ k^T``) is left out of the map, and ``None`` means the op is not understood at all. The passes
never guess: a sequence dim that is not in the map is gathered (exact) or sharded afresh.

The rules follow the tensors' shapes from Dynamo's example values, never integer constants, so a
sequence length that equals another dim is no trap. Graphs are in one spelling (pass 0,
``normalize``): operators are ``operator`` functions, and shape ops and reductions are methods.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from ringcompile.passes.fx_utils import SDPA_TARGETS
from ringcompile.passes.outlined import rowwise_region_of

DimMap = list[tuple[Node, dict[int, int]]]

# -- shapes from Dynamo's example values --------------------------------------------------------


def example(node: Any):
    return node.meta.get("example_value") if isinstance(node, Node) else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The (first) tensor shape a node produces, or None for non-tensors."""
    v = example(node)
    if isinstance(v, (tuple, list)):
        v = v[0] if v and isinstance(v[0], torch.Tensor) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def is_tensor_node(node: Any) -> bool:
    return shape_of(node) is not None


# -- op tables ----------------------------------------------------------------------------------
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.where,
    torch.cos, torch.sin, torch.exp, torch.rsqrt, torch.sqrt, torch.tanh, torch.sigmoid,
    torch.abs, torch.clamp, torch.maximum, torch.minimum, torch.logical_and, torch.logical_or,
    torch.logical_not, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.invert, operator.abs,
    F.silu, F.gelu, F.relu, F.dropout, F.softplus, F.tanh, F.sigmoid,
    torch._C._nn.gelu, torch.relu, torch.masked_fill, torch.polar,
    torch.ones_like, torch.zeros_like, torch.full_like,  # (they read no values; dims are the input's)
}
_POINTWISE_METHODS = {
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone",
    "detach", "pow", "rsqrt", "sqrt", "exp", "cos", "sin", "neg", "sigmoid", "tanh", "mul",
    "add", "sub", "div", "masked_fill", "clamp", "abs", "long", "int", "bool", "logical_and",
    "logical_or", "where", "requires_grad_",
    "copy",  # (``x.copy_(src)``: src broadcast to x)
}
# ``x.new_empty(sizes)``: a tensor made from its sizes; ``x`` is read for its dtype and device
_CREATIONS = {"new_empty", "new_zeros", "new_ones", "new_full"}
_NORMS = {torch.rms_norm, F.rms_norm, F.layer_norm, torch.layer_norm}
_SOFTMAXES = {F.softmax, F.log_softmax}
_LINEARS = {F.linear, torch._C._nn.linear}
_MATMULS = {operator.matmul, torch.bmm}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "all", "any"}


def _arg(node: Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _pointwise(node: Node, out: tuple[int, ...]) -> DimMap:
    """Broadcasting, right-aligned; a dim of size 1 broadcast to more carries nothing."""
    args = list(node.args) + list(node.kwargs.values())
    if node.op == "call_method" and node.target in ("to", "type_as", "type"):
        args = args[:1]  # the other arguments only name a dtype or device
    result = []
    for a in args:
        s = shape_of(a)
        if s is None:
            continue
        off = len(out) - len(s)
        m = {d: d + off for d in range(len(s)) if off + d >= 0 and s[d] == out[d + off]}
        result.append((a, m))
    return result


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> dict[int, int]:
    """Dims of ``src`` that reappear unchanged as one dim of ``dst`` (a view's pass-through)."""
    m: dict[int, int] = {}
    i = j = 0
    while i < len(src) and j < len(dst):
        if src[i] == dst[j]:
            m[i] = j
            i += 1
            j += 1
            continue
        # a size-1 dim inserted or dropped (``unsqueeze``) moves no element: skip it, so the
        # dims beyond it still map
        if dst[j] == 1:
            j += 1
            continue
        if src[i] == 1:
            i += 1
            continue
        # consume a group whose products agree: dims inside are split or merged, not mapped
        pi, pj = src[i], dst[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(src):
                    return m
                pi *= src[i]
                i += 1
            else:
                if j >= len(dst):
                    return m
                pj *= dst[j]
                j += 1
    return m


def _index_map(x_shape: tuple[int, ...], index) -> dict[int, int] | None:
    """Basic indexing ``x[index]``: full slices keep a dim, ints drop it, None adds one, one list of
    ints picks along its dim."""
    if not isinstance(index, tuple):
        index = (index,)
    lists = [i for i in index if isinstance(i, list)]
    if len(lists) > 1 or not all(isinstance(j, int) for i in lists for j in i):
        return None  # several advanced indices move their dims; tensors index by data
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    m: dict[int, int] = {}
    d = o = 0
    for item in index:
        if item is Ellipsis:
            for _ in range(len(x_shape) - n_real):
                m[d] = o
                d += 1
                o += 1
        elif item is None:
            o += 1
        elif isinstance(item, int):
            d += 1
        elif isinstance(item, list):
            # one list of ints picks along its dim, which stays in place (Falcon's
            # ``qkv[..., [-2], :]``): that dim is not carried, the others are
            d += 1
            o += 1
        elif isinstance(item, slice):
            full = item == slice(None) or (
                item.step in (None, 1)
                and (item.start in (None, 0))
                and (item.stop is None or (isinstance(item.stop, int) and item.stop >= x_shape[d]))
            )
            if full:
                m[d] = o
            d += 1
            o += 1
        else:
            return None  # advanced (tensor) indexing
    while d < len(x_shape):
        m[d] = o
        d += 1
        o += 1
    return m


def _setitem_map(node: Node) -> DimMap | None:
    """``x[index] = v`` changes ``x``: the dims the index keeps whole pass through ``x`` (a dim
    it slices or picks does not, so a sequence there is never written row by row), and ``v``'s
    dims line up, right-aligned, with the view ``x[index]``'s."""
    x, index, v = node.args
    xs = shape_of(x)
    m = _index_map(xs, index) if xs is not None else None
    if m is None:
        return None
    result = [(x, {d: d for d in m})]
    vs = shape_of(v)
    if vs is not None:
        items = index if isinstance(index, tuple) else (index,)
        n_view = (len(xs) - sum(isinstance(i, int) for i in items)
                  + sum(i is None for i in items))  # fmt: skip
        of_view = {o: d for d, o in m.items()}
        off = n_view - len(vs)
        result.append((v, {d: of_view[d + off] for d in range(len(vs))
                           if d + off in of_view and vs[d] == xs[of_view[d + off]]}))
    return result


def dim_map(node: Node) -> DimMap | None:
    """``[(input, {in_dim: out_dim})]`` for the node's pass-through dims, or None if unknown."""
    if node.op == "call_function" and node.target is operator.setitem:
        return _setitem_map(node)
    out = shape_of(node)
    region = rowwise_region_of(node)
    if region is not None and out is not None:  # its rows in, the same rows out
        return [(node.args[i], {d: d for d in range(region.lead)}) for i in region.row_inputs]
    if out is None or node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    x = node.args[0] if node.args else None
    xs = shape_of(x)

    if (node.op == "call_function" and t in _POINTWISE_FUNCTIONS) or (
        node.op == "call_method" and (t in _POINTWISE_METHODS or t.endswith("_") and t[:-1] in _POINTWISE_METHODS)
    ):  # (``x.add_(y)`` maps its dims as ``x.add(y)`` does)
        return _pointwise(node, out)

    if node.op == "call_function" and t is operator.getitem:
        if isinstance(example(x), (tuple, list)):
            return [(x, {d: d for d in range(len(out))})]  # an element of chunk/unbind/split
        m = _index_map(xs, node.args[1]) if xs is not None else None
        return None if m is None else [(x, m)]

    if node.op == "call_function" and t in (torch.cat, torch.concat, torch.stack):
        tensors = node.args[0]
        dim = _arg(node, 1, "dim", 0)
        result = []
        for a in tensors:
            s = shape_of(a)
            if s is None:
                return None
            dd = dim % (len(s) + (t is torch.stack))
            if t is torch.stack:
                result.append((a, {d: d + (d >= dd) for d in range(len(s))}))
            else:
                result.append((a, {d: d for d in range(len(s)) if d != dd}))
        return result
    if node.op == "call_function" and t is torch.addmm:
        # bias + mat1 @ mat2 (GPT-2's Conv1D on flattened rows): mat1's rows are the output's
        mat1 = _arg(node, 1, "mat1")
        return [(mat1, {0: 0})] if shape_of(mat1) is not None else None
    if xs is None:
        return None

    if (node.op == "call_function" and t in _SOFTMAXES) or (
        node.op == "call_method" and t in ("softmax", "log_softmax")
    ):
        dim = _arg(node, 1, "dim")
        if not isinstance(dim, int):
            return None
        return [(x, {d: d for d in range(len(xs)) if d != dim % len(xs)})]
    if node.op == "call_function" and t is torch.topk:  # (values, indices) along one dim
        dim = _arg(node, 2, "dim", -1)
        return [(x, {d: d for d in range(len(xs)) if d != dim % len(xs)})]
    if node.op == "call_function" and t in _NORMS:
        normalized = _arg(node, 1, "normalized_shape")
        keep = len(xs) - len(normalized)
        return [(x, {d: d for d in range(keep)})]
    if node.op == "call_function" and t in _LINEARS:
        return [(x, {d: d for d in range(len(xs) - 1)})]
    if node.op == "call_function" and t is torch.view_as_complex:  # (..., n, 2) -> (..., n)
        return [(x, {d: d for d in range(len(xs) - 1)})]
    if node.op == "call_function" and t is torch.view_as_real:  # (..., n) -> (..., n, 2)
        return [(x, {d: d for d in range(len(xs))})]
    if node.op == "call_function" and t is F.embedding:
        return [(x, {d: d for d in range(len(xs))})]
    if node.op == "call_function" and t in _MATMULS:
        b = node.args[1]
        bs = shape_of(b)
        if bs is None or len(xs) < 2 or len(bs) < 2:
            return None
        off_a, off_b = len(out) - len(xs), len(out) - len(bs)
        ma = {d: d + off_a for d in range(len(xs) - 1) if xs[d] == out[d + off_a]}
        mb = {d: d + off_b for d in range(len(bs) - 2) if bs[d] == out[d + off_b]}
        mb[len(bs) - 1] = len(out) - 1
        return [(x, ma), (b, mb)]
    if node.op == "call_function" and t in SDPA_TARGETS:
        return [(x, {d: d for d in range(len(xs))})]  # queries' rows are the output's rows

    if node.op == "call_method" and t.removesuffix("_") == "index_put":
        # x.index_put(indices, values): the dims no index tensor picks along pass through x,
        # and values' trailing dims line up with them (right-aligned, as they broadcast)
        indices, values = _arg(node, 1, "indices"), _arg(node, 2, "values")
        if not isinstance(indices, (tuple, list)):
            return None
        picked = {d for d, i in enumerate(indices) if i is not None}
        keep = {d: d for d in range(len(xs)) if d not in picked}
        result = [(x, keep)]
        vs = shape_of(values)
        if vs is not None:
            off = len(xs) - len(vs)
            result.append((values, {d: d + off for d in range(len(vs)) if d + off in keep
                                    and d + off >= len(indices) and vs[d] == xs[d + off]}))
        return result
    if node.op == "call_method" and t in _CREATIONS:
        return []  # no input's dims: its sizes say its shape (``size_args``)
    if node.op == "call_method" and t in ("transpose", "swapaxes"):
        a, b = (_arg(node, 1, "dim0") % len(xs), _arg(node, 2, "dim1") % len(xs))
        m = {d: d for d in range(len(xs))}
        m[a], m[b] = b, a
        return [(x, m)]
    if node.op == "call_method" and t == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        return [(x, {int(src) % len(xs): o for o, src in enumerate(dims)})]
    if node.op == "call_method" and t in ("view", "reshape", "expand", "unsqueeze", "squeeze",
                                          "flatten", "unflatten"):
        if t == "expand":
            off = len(out) - len(xs)
            return [(x, {d: d + off for d in range(len(xs)) if xs[d] == out[d + off]})]
        return [(x, _reshape_groups(xs, out))]
    if node.op == "call_method" and t.removesuffix("_") == "scatter":  # x.scatter(dim, index, src)
        dim = _arg(node, 1, "dim") % len(xs)
        keep = {d: d for d in range(len(xs)) if d != dim}
        return [(a, keep) for a in (x, _arg(node, 2, "index"), _arg(node, 3, "src"))
                if shape_of(a) is not None and len(shape_of(a)) == len(xs)]
    if node.op == "call_method" and t in ("chunk", "split", "tensor_split"):
        dim = _arg(node, 2, "dim", 0) % len(xs)
        return [(x, {d: d for d in range(len(xs)) if d != dim})]
    if node.op == "call_method" and t == "unbind":
        dim = _arg(node, 1, "dim", 0) % len(xs)
        return [(x, {d: d - (d > dim) for d in range(len(xs)) if d != dim})]
    if node.op == "call_method" and t in _REDUCTIONS:
        dims = _arg(node, 1, "dim")
        if dims is None:
            return [(x, {})]
        dims = {d % len(xs) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        keepdim = _arg(node, 2, "keepdim", False)
        m, o = {}, 0
        for d in range(len(xs)):
            if d in dims:
                o += bool(keepdim)
                continue
            m[d] = o
            o += 1
        return [(x, m)]
    return None


def dtype_only_inputs(node: Node) -> list[Node]:
    """Tensor inputs the op reads for their dtype or device alone (``x.type_as(other)``,
    ``x.to(other)``): any rows of them serve, a shard as well as the whole."""
    if node.op == "call_method" and node.target in ("type_as", "to", "type"):
        return [a for a in [*node.args[1:], *node.kwargs.values()] if is_tensor_node(a)]
    if node.op == "call_method" and node.target in _CREATIONS:
        return [node.args[0]]
    return []


def made_from_sizes(node: Node) -> bool:
    """Whether ``node`` makes a tensor from its sizes alone (``x.new_empty(2, 4, S, 10)``): made
    on this rank's tokens, it takes the local length at its sequence dim (``size_args``)."""
    return node.op == "call_method" and node.target in _CREATIONS and size_args(node) is not None


def size_args(node: Node) -> tuple[str, list[int]] | None:
    """For ops whose arguments spell the output shape (view, reshape, expand): where they are.

    Returns ("args", positions) with each output dim's position in ``node.args``, or
    ("tuple", positions) when the sizes come as one tuple argument at ``node.args[1]``.
    """
    if node.op == "call_method" and node.target in ("view", "reshape", "expand", "new_empty",
                                                    "new_zeros", "new_ones"):
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            return "tuple", list(range(len(node.args[1])))
        if len(node.args) > 1:
            return "args", list(range(1, len(node.args)))
        return None  # (sizes given by keyword)
    if node.op == "call_method" and node.target == "new_full" and len(node.args) > 1:
        return "tuple", list(range(len(node.args[1])))
    return None

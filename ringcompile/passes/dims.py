"""Which input dims become which output dims, op by op: how the passes follow the sequence.

Expects: a Dynamo FX graph in one spelling (pass 1, ``normalize``: operators are ``operator``
functions, and shape ops and reductions are methods) whose nodes carry Dynamo's example values.
Guarantees: ``dim_map(node)`` answers a list of ``(input_node, {in_dim: out_dim})`` for the tensor
inputs whose dims pass through to the output position by position (the sequence of a linear
layer's input is the sequence of its output; the sequence of a ``transpose(1, 2)`` moves). A dim
that is split, merged, sliced, reduced or mixed (the key dim of ``q @ k^T``) is left out of the
map, and ``None`` means the op is not understood at all. The passes never guess: a sequence dim
that is not in the map is gathered (exact) or sharded afresh.

One rule per family of ops, registered for its targets with ``@dim_rule`` (``DIM_RULES``: target
-> rule; ``rule_of(node)``): functions for ``call_function`` nodes, method names for
``call_method`` ones (an in-place method, ``x.add_(y)``, is registered beside its out-of-place
form where it maps alike). A rule reads a torch function's arguments as ``normalize_function``
binds them to its schema, a method's or a Python operator's by hand (``_args``). The rules follow
the tensors' shapes from the example values, never integer constants, so a sequence length that
equals another dim is no trap. The target sets other passes also read (``POINTWISE_FUNCTIONS``,
``POINTWISE_METHODS``, ``NORMS``, ``SOFTMAXES``, ``LINEARS``, ``REDUCTIONS``) are public here.
Beside the map: ``shape_of``/``example`` read example values, and ``dtype_only_inputs``,
``made_from_sizes`` and ``size_args`` say what ``plan_sequence`` and ``shard_sequence`` need of
ops that read a tensor for its dtype alone or make one from sizes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from ringcompile.passes.fx_utils import SDPA_TARGETS
from ringcompile.passes.rowwise_region import rowwise_region_of

DimMap = list[tuple[Node, dict[int, int]]]
# a rule: (node, its output's shape; setitem's, which returns nothing, None) -> its dim map, or
# None where the rule does not understand the call
DimRule = Callable[[Node, tuple[int, ...]], DimMap | None]

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


# -- the registry -------------------------------------------------------------------------------
_RULES: dict[Any, DimRule] = {}
DIM_RULES = MappingProxyType(_RULES)  # target -> its rule, read-only


def dim_rule(*targets):
    """Registers the decorated rule for ``targets``: functions (``call_function``) and method names
    (``call_method``); a target has one rule."""

    def register(rule: DimRule) -> DimRule:
        for t in targets:
            if _RULES.setdefault(t, rule) is not rule:
                raise ValueError(f"{t} has two dim rules: {_RULES[t].__name__}, {rule.__name__}")
        return rule

    return register


def rule_of(node: Node) -> DimRule | None:
    """The rule for ``node``'s target. (A method's target is its name and a function's the
    function itself, so the two forms never collide in one table.)"""
    if node.op not in ("call_function", "call_method"):
        return None
    return _RULES.get(node.target)


def dim_map(node: Node) -> DimMap | None:
    """``[(input, {in_dim: out_dim})]`` for the node's pass-through dims, or None if unknown."""
    out = shape_of(node)
    region = rowwise_region_of(node)
    if region is not None:  # its rows in, the same rows out
        return (
            None
            if out is None
            else [(node.args[i], _identity(region.lead)) for i in region.row_inputs]
        )
    rule = rule_of(node)
    if rule is None or (out is None and rule is not _setitem):  # (setitem returns nothing)
        return None
    return rule(node, out)


# -- helpers ------------------------------------------------------------------------------------


def _args(node: Node, *params: str) -> dict[str, Any]:
    """The node's arguments by name. A torch function's are bound to its schema or signature by
    ``normalize_function``, defaults filled in. It finds none for a method name or a Python
    operator (``operator.matmul``), so their positional arguments are bound by hand to ``params``
    (``self`` first). A rule that names no ``params`` gets only the keywords of a call that binds
    no single schema, and so refuses it rather than guess."""
    if node.op == "call_function":
        try:
            bound = normalize_function(
                node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
            )
        except (TypeError, RuntimeError):  # (no schema binds, or several do)
            bound = None
        if bound is not None:
            return bound.kwargs
    return {**dict(zip(params, node.args)), **node.kwargs}


def _identity(n: int) -> dict[int, int]:
    return {d: d for d in range(n)}


def _all_but(n: int, dim: int) -> dict[int, int]:
    """Every dim of n but ``dim`` (negative or not) stays in place."""
    return {d: d for d in range(n) if d != dim % n}


def _aligned(s: tuple[int, ...], out: tuple[int, ...]) -> dict[int, int]:
    """Dims of ``s`` that broadcast, right-aligned, to a dim of ``out`` of the same size (one of
    size 1 broadcast to more carries nothing)."""
    off = len(out) - len(s)
    return {d: d + off for d in range(len(s)) if d + off >= 0 and s[d] == out[d + off]}


def _broadcast(operands, out: tuple[int, ...]) -> DimMap:
    return [(a, _aligned(shape_of(a), out)) for a in operands if shape_of(a) is not None]


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


# -- the rules ----------------------------------------------------------------------------------
POINTWISE_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.neg,
        operator.pow,
        operator.iadd,
        operator.imul,
        operator.isub,
        operator.itruediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.neg,
        torch.pow,
        torch.where,
        torch.cos,
        torch.sin,
        torch.exp,
        torch.rsqrt,
        torch.sqrt,
        torch.tanh,
        torch.sigmoid,
        torch.abs,
        torch.clamp,
        torch.maximum,
        torch.minimum,
        torch.logical_and,
        torch.logical_or,
        torch.logical_not,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.and_,
        operator.or_,
        operator.invert,
        operator.abs,
        F.silu,
        F.gelu,
        F.relu,
        F.dropout,
        F.softplus,
        F.tanh,
        F.sigmoid,
        torch._C._nn.gelu,
        torch.relu,
        torch.masked_fill,
        torch.polar,
        # (they read no values; their dims are the input's)
        torch.ones_like,
        torch.zeros_like,
        torch.full_like,
    }
)
# their arguments after ``self`` only name a dtype or device
_CASTS = frozenset({"to", "type", "type_as"})
POINTWISE_METHODS = _CASTS | {
    "float",
    "half",
    "bfloat16",
    "double",
    "contiguous",
    "clone",
    "detach",
    "pow",
    "rsqrt",
    "sqrt",
    "exp",
    "cos",
    "sin",
    "neg",
    "sigmoid",
    "tanh",
    "mul",
    "add",
    "sub",
    "div",
    "masked_fill",
    "clamp",
    "abs",
    "long",
    "int",
    "bool",
    "logical_and",
    "logical_or",
    "where",
    "requires_grad_",
    "copy",  # (``x.copy_(src)``: src broadcast to x)
}


def _in_place(methods) -> set[str]:
    """The in-place forms (``add_``) there are of ``methods``."""
    return {f"{m}_" for m in methods if hasattr(torch.Tensor, f"{m}_")}


@dim_rule(*POINTWISE_FUNCTIONS, *POINTWISE_METHODS - _CASTS, *_in_place(POINTWISE_METHODS))
def _pointwise(node: Node, out: tuple[int, ...]) -> DimMap:
    """Every tensor operand broadcasts to the output (``x.add_(y)`` maps as ``x.add(y)`` does)."""
    return _broadcast([*node.args, *node.kwargs.values()], out)


@dim_rule(*_CASTS)
def _cast(node: Node, out: tuple[int, ...]) -> DimMap:
    """``x.to(dtype)``, ``x.type_as(other)``: x's dims, as they are."""
    return _broadcast(node.args[:1], out)


@dim_rule(operator.getitem)
def _getitem(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """An element of chunk's, unbind's or split's tuple has the tuple's dims (the rule of the op
    that made it says which); ``x[index]`` maps as basic indexing does (``_index_map``)."""
    x, index = node.args
    if isinstance(example(x), (tuple, list)):
        return [(x, _identity(len(out)))]
    xs = shape_of(x)
    m = _index_map(xs, index) if xs is not None else None
    return None if m is None else [(x, m)]


@dim_rule(operator.setitem)
def _setitem(node: Node, out: None) -> DimMap | None:
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
        result.append(
            (
                v,
                {
                    d: of_view[d + off]
                    for d in range(len(vs))
                    if d + off in of_view and vs[d] == xs[of_view[d + off]]
                },
            )
        )
    return result


def _each_tensor(node: Node, dims: Callable[[int, int], dict[int, int]]) -> DimMap | None:
    """``dims(rank, dim)`` for each of the ``tensors`` a cat or stack joins along ``dim``."""
    args = _args(node)
    tensors = args.get("tensors", [None])
    shapes = [shape_of(a) for a in tensors]
    if None in shapes:
        return None
    return [(a, dims(len(s), args["dim"])) for a, s in zip(tensors, shapes)]


@dim_rule(torch.cat, torch.concat)
def _cat(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """Laid end to end along ``dim``; the other dims pass through."""
    return _each_tensor(node, _all_but)


@dim_rule(torch.stack)
def _stack(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """A new dim at ``dim``: the inputs' dims from there on move one up."""
    return _each_tensor(node, lambda n, dim: {d: d + (d >= dim % (n + 1)) for d in range(n)})


@dim_rule(torch.addmm)
def _addmm(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """bias + mat1 @ mat2 (GPT-2's Conv1D on flattened rows): mat1's rows are the output's."""
    mat1 = _args(node).get("mat1")
    return [(mat1, {0: 0})] if shape_of(mat1) is not None else None


SOFTMAXES = frozenset({F.softmax, F.log_softmax})


@dim_rule(*SOFTMAXES, "softmax", "log_softmax")
def _softmax(node: Node, out: tuple[int, ...]) -> DimMap | None:
    args = _args(node, "input", "dim")
    x, dim = args.get("input"), args.get("dim")
    xs = shape_of(x)
    return None if xs is None or not isinstance(dim, int) else [(x, _all_but(len(xs), dim))]


@dim_rule(torch.topk)
def _topk(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """(values, indices) of the largest along ``dim``: the other dims pass through."""
    args = _args(node)
    xs = shape_of(args.get("input"))
    return None if xs is None else [(args["input"], _all_but(len(xs), args["dim"]))]


NORMS = frozenset({torch.rms_norm, F.rms_norm, F.layer_norm, torch.layer_norm})


@dim_rule(*NORMS)
def _norm(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """Normalised over the trailing ``normalized_shape``: the dims before it pass through."""
    args = _args(node)
    xs = shape_of(args.get("input"))
    if xs is None:
        return None
    return [(args["input"], _identity(len(xs) - len(args["normalized_shape"])))]


LINEARS = frozenset({F.linear, torch._C._nn.linear})


@dim_rule(*LINEARS, torch.view_as_complex)
def _last_dim_replaced(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """A linear's features, a complex number's (real, imaginary) pair: (..., n) -> (..., m)."""
    x = _args(node).get("input")
    xs = shape_of(x)
    return None if xs is None else [(x, _identity(len(xs) - 1))]


@dim_rule(torch.view_as_real, F.embedding, *SDPA_TARGETS)
def _leading(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """The first argument's dims lead the output's: (..., n) -> (..., n, 2); token ids ->
    (..., D); the queries' rows are attention's output rows."""
    args = _args(node)
    x = args.get("input", args.get("query"))
    xs = shape_of(x)
    return None if xs is None else [(x, _identity(len(xs)))]


@dim_rule(operator.matmul, torch.bmm)
def _matmul(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """``a @ b``: a's rows, b's columns and the batch dims neither broadcasts pass through; the
    contracted dim does not."""
    args = _args(node, "input", "mat2")
    a, b = args.get("input"), args.get("mat2")
    sa, sb = shape_of(a), shape_of(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return None
    ma = {d: o for d, o in _aligned(sa, out).items() if d < len(sa) - 1}
    mb = {d: o for d, o in _aligned(sb, out).items() if d < len(sb) - 2}
    mb[len(sb) - 1] = len(out) - 1
    return [(a, ma), (b, mb)]


@dim_rule("index_put", "index_put_")
def _index_put(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """``x.index_put(indices, values)``: the dims no index tensor picks along pass through x, and
    values' trailing dims line up with them (right-aligned, as they broadcast)."""
    args = _args(node, "input", "indices", "values")
    x, indices, values = args.get("input"), args.get("indices"), args.get("values")
    xs = shape_of(x)
    if xs is None or not isinstance(indices, (tuple, list)):
        return None
    keep = {d: d for d in range(len(xs)) if d >= len(indices) or indices[d] is None}
    result = [(x, keep)]
    vs = shape_of(values)
    if vs is not None:
        result.append(
            (values, {d: o for d, o in _aligned(vs, xs).items() if o in keep and o >= len(indices)})
        )
    return result


# ``x.new_empty(sizes)``: a tensor made from its sizes; ``x`` is read for its dtype and device
_CREATIONS = frozenset({"new_empty", "new_zeros", "new_ones", "new_full"})


@dim_rule(*_CREATIONS)
def _creation(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """No input's dims: its sizes say its shape (``size_args``)."""
    return None if shape_of(node.args[0]) is None else []


@dim_rule("transpose", "swapaxes")
def _transpose(node: Node, out: tuple[int, ...]) -> DimMap | None:
    args = _args(node, "input", "dim0", "dim1")
    x, a, b = args.get("input"), args.get("dim0"), args.get("dim1")
    xs = shape_of(x)
    if xs is None or not isinstance(a, int) or not isinstance(b, int):
        return None
    a, b = a % len(xs), b % len(xs)
    m = _identity(len(xs))
    m[a], m[b] = b, a
    return [(x, m)]


@dim_rule("permute")
def _permute(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """``x.permute(2, 0, 1)`` or ``x.permute((2, 0, 1))``: output dim o is input dim dims[o]."""
    x, *dims = node.args  # (by hand: a method's varargs)
    xs = shape_of(x)
    if xs is None:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [(x, {int(src) % len(xs): o for o, src in enumerate(dims)})]


@dim_rule("view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten")
def _reshape(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """The dims that reappear whole; a dim split or merged with another is not carried."""
    xs = shape_of(node.args[0])
    return None if xs is None else [(node.args[0], _reshape_groups(xs, out))]


@dim_rule("expand")
def _expand(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """``x`` broadcast to the sizes: the dims it already had at full size pass through."""
    return None if shape_of(node.args[0]) is None else _broadcast(node.args[:1], out)


@dim_rule("scatter", "scatter_")
def _scatter(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """``x.scatter(dim, index, src)``: the rows of all three line up but along ``dim``."""
    args = _args(node, "input", "dim", "index", "src")
    xs = shape_of(args.get("input"))
    if xs is None:
        return None
    keep = _all_but(len(xs), args["dim"])
    return [
        (a, keep)
        for a in (args["input"], args.get("index"), args.get("src"))
        if shape_of(a) is not None and len(shape_of(a)) == len(xs)
    ]


@dim_rule("chunk", "split", "tensor_split")
def _split(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """Pieces along ``dim`` (each a ``getitem`` of the tuple): the other dims pass through."""
    args = _args(node, "input", "sections", "dim")
    xs = shape_of(args.get("input"))
    return None if xs is None else [(args["input"], _all_but(len(xs), args.get("dim", 0)))]


@dim_rule("unbind")
def _unbind(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """Slices along ``dim``, which goes: the dims after it move one down."""
    args = _args(node, "input", "dim")
    xs = shape_of(args.get("input"))
    if xs is None:
        return None
    dim = args.get("dim", 0) % len(xs)
    return [(args["input"], {d: d - (d > dim) for d in range(len(xs)) if d != dim})]


REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "var", "std", "all", "any"})


@dim_rule(*REDUCTIONS)
def _reduction(node: Node, out: tuple[int, ...]) -> DimMap | None:
    """Reduced along ``dim`` (one or several; all without it or with an empty one), kept as size 1
    with ``keepdim``: the other dims pass through. Whether dims were kept is read from the
    output's rank, not from an argument: ``x.var(d, unbiased)`` has another at keepdim's place."""
    args = _args(node, "input", "dim")
    x, dims = args.get("input"), args.get("dim")
    xs = shape_of(x)
    if xs is None or out is None:
        return None
    if dims is None or dims == () or dims == []:
        return [(x, {})]
    dims = {d % len(xs) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    keepdim = len(out) == len(xs)
    m, o = {}, 0
    for d in range(len(xs)):
        if d in dims:
            o += bool(keepdim)
            continue
        m[d] = o
        o += 1
    return [(x, m)]


# -- what shard_sequence and plan_sequence read besides the map ---------------------------------


def dtype_only_inputs(node: Node) -> list[Node]:
    """Tensor inputs the op reads for their dtype or device alone (``x.type_as(other)``,
    ``x.to(other)``): any rows of them serve, a shard as well as the whole."""
    if node.op == "call_method" and node.target in _CASTS:
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
    if node.op == "call_method" and node.target in (
        "view",
        "reshape",
        "expand",
        "new_empty",
        "new_zeros",
        "new_ones",
    ):
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            return "tuple", list(range(len(node.args[1])))
        if len(node.args) > 1:
            return "args", list(range(1, len(node.args)))
        return None  # (sizes given by keyword)
    if node.op == "call_method" and node.target == "new_full" and len(node.args) > 1:
        return "tuple", list(range(len(node.args[1])))
    return None

"""Pass 7: mixture-of-experts blocks become one op that computes each token row alone.

Expects: a graph in one spelling (pass 1).
Guarantees: where a graph routes N token rows to experts as transformers' grouped-matmul experts
do (Mixtral, Qwen3-MoE, ...) —

    ids_sorted, perm = sort(top_k_index.reshape(-1))          # N·k (token, choice) pairs by expert
    x_g = x[perm // k]; w_g = top_k_weights.reshape(-1)[perm]
    offsets = cumsum(histc(ids_sorted, bins=E, ...))
    y_g = (row by row on x_g, grouped_mm(., W, offs=offsets), ...) * w_g[:, None]
    inv = empty_like(perm); inv[perm] = arange(N·k)
    out = y_g[inv].view(N, k, D).sum(1)

or sends every token through every expert as Llama 4 does —

    r = x.repeat(E, 1) * scores.transpose(0, 1).reshape(-1, 1)     # (E·N, D), expert-major
    y = bmm(... bmm(r.view(E, -1, D), W_up) ..., W_down)            # (E, N, D)
    out = y.view(-1, D).reshape(E, -1, D).sum(0)

— those nodes become one ``call_module`` of a ``RowwiseRegion`` (``passes/rowwise_region.py``): its
output row t is computed from its inputs' row t alone, whichever other rows are there, since
sorting, grouping by expert and the inverse permutation only order rows, a grouped matmul
computes each row alone, and the per-expert copies keep the rows' order. ``dims`` maps rows through it, so the later passes run the experts on
this rank's tokens (at any batch size: ``unflatten_rows`` keeps it in (batch, sequence) form).
Its sizes that count rows (``arange(N·k)``, the view to (N, k, D); Llama 4's views leave them
to -1) are read from its inputs, so it runs on any number of rows.

Every node between is checked to keep its rows in one order — the tokens', the pairs', the
sorted pairs' or the per-expert copies' — and to combine rows of one order only; anything else
leaves the graph as it was (the experts then run on every token, exactly, and ``explain`` says
which node was not understood).

    ... sort, getitem, floordiv, histc, cumsum, grouped_mm, ..., setitem, view, sum
    -> out = self.experts_0(top_k_index, top_k_weights, x, w_gate_up, w_down)
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import POINTWISE_FUNCTIONS, POINTWISE_METHODS, shape_of
from ringcompile.passes.fx_utils import source_line
from ringcompile.passes.rowwise_region import RowwiseRegion

# Row orders: token rows (N), (token, choice) pairs in token order (N·k), the pairs sorted by
# expert (N·k; the sorted expert ids themselves are SORTED_IDS); the permutation (sorted -> pairs),
# it floor-divided by k (sorted -> tokens), the inverse permutation (pairs -> sorted); per-expert
# counts (no rows); tokens with their k choices (N, k, ...).
TOKENS, PAIRS, SORTED, SORTED_IDS, PERM, PERM_TOKENS, INVERSE, COUNTS, CHOICES = (
    "tokens",
    "pairs",
    "sorted",
    "sorted ids",
    "perm",
    "perm // k",
    "inverse",
    "counts",
    "choices",
)
_RESHAPES = ("reshape", "view")
_KEEP_ORDER = ("to", "float", "int", "long", "contiguous", "type", "bfloat16", "half", "double")


def _is_grouped_mm(target) -> bool:
    return "grouped_mm" in getattr(target, "__name__", str(target))


def _rows(order: str | None) -> str | None:
    """The order for combining rows: sorted ids are sorted rows."""
    return SORTED if order == SORTED_IDS else order


class _NotDispatch(Exception):
    """The form is there, but a node in it is not understood (``explain`` says which)."""


class _NotCandidate(Exception):
    """Not this form at all (a sort or a repeat of something else): nothing to say."""


class _Region:
    """What both forms share: the region's inputs as rows or not, and outlining it."""

    what = ""

    def __init__(self):
        self.label: dict[Node, str] = {}
        self.inputs: list[Node] = []  # what the region reads from outside, in first-read order
        self.row_inputs: set[Node] = set()  # those read as rows
        self.free_inputs: set[Node] = set()  # those read as no rows (parameters, constants)

    def _of(self, a, members) -> str | None:
        """An argument's order: a region node's label; None for anything else (an input)."""
        if not isinstance(a, Node):
            return None
        if a in members:
            return self.label[a]
        if a not in self.inputs:
            self.inputs.append(a)
        return None

    def _free(self, *nodes) -> None:
        self.free_inputs |= {a for a in nodes if isinstance(a, Node) and a in self.inputs}

    def _check_inputs(self) -> None:
        if (
            self.row_inputs & self.free_inputs
            or set(self.inputs) != self.row_inputs | self.free_inputs
        ):
            raise _NotDispatch("an input read both as rows and as no rows, or as neither")

    def _resized(self, n: Node, copy: Node, env: dict) -> None:
        """Make ``copy`` (of ``n``) follow its inputs' row counts where ``n`` spells them."""

    def outline(self, gm: GraphModule, region: list[Node], out: Node, name: str) -> Node:
        """Replace the region by a call of a ``RowwiseRegion`` whose sizes follow its inputs."""
        sub = Graph()
        env: dict[Node, Node] = {}
        for a in self.inputs:
            env[a] = sub.placeholder(a.name)
            env[a].meta = dict(a.meta)
        for n in region:
            copy = sub.node_copy(n, lambda a: env[a])
            self._resized(n, copy, env)
            env[n] = copy
        sub.output(env[out])
        rows = tuple(i for i, a in enumerate(self.inputs) if a in self.row_inputs)
        gm.add_submodule(name, RowwiseRegion(GraphModule(gm, sub), rows, self.what))
        graph = gm.graph
        with graph.inserting_before(out):
            call = graph.call_module(name, tuple(self.inputs))
        call.meta = dict(out.meta)
        out.replace_all_uses_with(call)
        for n in reversed(region):
            graph.erase_node(n)
        return call


class _Dispatch(_Region):
    """One candidate: the ``sort`` of the flattened (N, k) expert choices, checked node by node."""

    what = "a mixture-of-experts dispatch (sorted by expert)"

    def __init__(self, sort: Node):
        super().__init__()
        self.sort = sort
        ids = sort.args[0]
        if not (ids.op == "call_method" and ids.target in _RESHAPES and ids.args[1:] == (-1,)):
            raise _NotCandidate("the sorted ids are not the flattened choices")
        choices = shape_of(ids.args[0])
        if choices is None or len(choices) != 2:
            raise _NotCandidate("the sorted ids are not (tokens, k) choices")
        self.N, self.k = choices
        self.perm: Node | None = None
        self.arange: Node | None = None
        self.view: Node | None = None

    def find(self) -> tuple[list[Node], Node]:
        """The region's nodes (in graph order) and its output, labelled; or _NotDispatch."""
        gets = list(self.sort.users)
        if len(gets) != 2 or sorted(g.args[1] for g in gets if g.target is operator.getitem) != [
            0,
            1,
        ]:
            raise _NotCandidate("sort's results are used otherwise")
        perm = self.perm = next(g for g in gets if g.args[1] == 1)
        inverse = [
            u for u in perm.users if u.op == "call_function" and u.target is torch.empty_like
        ]
        if len(inverse) != 1:
            raise _NotCandidate("no inverse permutation")
        inverse = inverse[0]
        back = [u for u in inverse.users if u.target is operator.getitem and u.args[1] is inverse]
        if len(back) != 1 or len(back[0].users) != 1:
            raise _NotCandidate("the inverse permutation is used otherwise")
        view = next(iter(back[0].users))
        if not (view.op == "call_method" and view.target in _RESHAPES and len(view.users) == 1):
            raise _NotCandidate("the pairs are not viewed as (tokens, k, ...)")
        out = next(iter(view.users))
        if not (
            out.op == "call_method"
            and out.target == "sum"
            and (out.args[1:] == (1,) or (out.args[1:] == () and out.kwargs.get("dim") == 1))
        ):
            raise _NotCandidate("the k choices are not summed")
        self.view = view
        region = self._nodes(out, inverse)
        members = set(region)
        for n in region:
            self.label[n] = self._label(n, members)
        if self.label[out] != TOKENS:
            raise _NotDispatch("the output is not in token order")
        self._check_inputs()
        for n in region:
            if n is not out and any(u not in members for u in n.users):
                raise _NotDispatch(f"{n.name} is used outside the dispatch")
        return region, out

    def _nodes(self, out: Node, inverse: Node) -> list[Node]:
        """What ``out`` reads that depends on the sort, the inverse permutation's nodes, and the
        flattenings of the (N, k) choices and weights."""
        order = {n: i for i, n in enumerate(out.graph.nodes)}
        fills = {u for u in inverse.users if u.target is operator.setitem}
        after_sort: set[Node] = {inverse} | fills
        for n in out.graph.nodes:
            if n is self.sort or any(a in after_sort for a in n.all_input_nodes):
                after_sort.add(n)
        region, stack = set(fills), [out, *fills]
        while stack:
            n = stack.pop()
            region.add(n)
            for a in n.all_input_nodes:
                flattens = (a.op == "call_method" and a.target in _RESHAPES and a.args[1:] == (-1,)
                            and shape_of(a.args[0]) == (self.N, self.k))  # fmt: skip
                counts = n in fills and a.target is torch.arange
                if a not in region and (a in after_sort or flattens or counts):
                    stack.append(a)
        return sorted(region, key=order.__getitem__)

    def _label(self, n: Node, members) -> str:
        t, args = n.target, n.args
        of = [self._of(a, members) for a in args]
        kw = {k: self._of(v, members) for k, v in n.kwargs.items()}
        method, function = n.op == "call_method", n.op == "call_function"
        if (
            method
            and t in _RESHAPES
            and args[1:] == (-1,)
            and shape_of(args[0]) == (self.N, self.k)
        ):
            if of[0] is None:  # the choices or their weights, flattened: (token, choice) pairs
                self.row_inputs.add(args[0])
                return PAIRS
        if n is self.sort:
            return "sort"
        if t is operator.getitem and of[0] == "sort":
            return SORTED_IDS if args[1] == 0 else PERM
        if t is operator.floordiv and of == [PERM, None] and args[1] == self.k:
            return PERM_TOKENS
        if t is operator.getitem and of[1] is not None:
            src, index = args[0], of[1]
            if index == PERM_TOKENS:  # x[perm // k]: the tokens, in sorted pair order
                if of[0] == TOKENS:
                    return SORTED
                if of[0] is None and shape_of(src)[:1] == (self.N,):
                    self.row_inputs.add(src)
                    return SORTED
            if index == PERM and of[0] == PAIRS:
                return SORTED
            if index == INVERSE and _rows(of[0]) == SORTED:
                return PAIRS
            if index == SORTED_IDS and of[0] is None:  # a per-expert parameter at each row's expert
                self._free(src)
                return SORTED
        if function and t is torch.histc and of[0] == SORTED_IDS:
            return COUNTS
        if method and t == "cumsum" and of[0] == COUNTS:
            return COUNTS
        if method and t in _KEEP_ORDER and of[0] is not None and all(o is None for o in of[1:]):
            return of[0]
        if function and t is torch.empty_like and of == [PERM]:
            return "inverse, unfilled"
        if function and t is torch.arange and len(args) == 1 and args[0] == self.N * self.k:
            self.arange = n
            return "arange"
        if function and t is operator.setitem and of == ["inverse, unfilled", PERM, "arange"]:
            self.label[args[0]] = INVERSE  # read after this node: the inverse permutation
            return "filled"
        if function and _is_grouped_mm(t):
            if (
                _rows(of[0]) == SORTED
                and all(o is None for o in of[1:])
                and kw.get("offs") == COUNTS
            ):
                self._free(*args[1:])
                return SORTED
        if method and t == "chunk" and of[0] is not None:
            if n.kwargs.get("dim", args[2] if len(args) > 2 else 0) not in (
                0,
                -len(shape_of(args[0])),
            ):
                return of[0] + " in chunks"
        if t is operator.getitem and of[0] is not None and of[0].endswith(" in chunks"):
            return of[0].removesuffix(" in chunks")
        if method and t == "unsqueeze" and of[0] is not None and args[1] != 0:
            return of[0]
        if n is self.view and of[0] == PAIRS and shape_of(n)[:2] == (self.N, self.k):
            return CHOICES
        if method and t == "sum" and of[0] == CHOICES:
            return TOKENS
        if (function and t in POINTWISE_FUNCTIONS) or (method and t in POINTWISE_METHODS):
            operands = [*args, *n.kwargs.values()]
            orders = [*of, *kw.values()]
            kinds = {_rows(o) for o in orders if o is not None}
            out = shape_of(n)
            if len(kinds) == 1 and kinds <= {SORTED, PAIRS, TOKENS} and out is not None:
                # operands without rows broadcast against them (a parameter, a scalar)
                free = [
                    a for a, o in zip(operands, orders) if o is None and shape_of(a) is not None
                ]
                if all(len(shape_of(a)) < len(out) or shape_of(a)[0] == 1 for a in free):
                    self._free(*free)
                    return kinds.pop()
        raise _NotDispatch(f"{n.name} ({n.op} {getattr(t, '__name__', t)}) is not understood")

    def _resized(self, n: Node, copy: Node, env: dict) -> None:
        if n is self.arange:  # arange(N·k): as many as the pairs
            with copy.graph.inserting_before(copy):
                pairs = copy.graph.call_method("size", (env[self.perm], 0))
            copy.args = (pairs,)
        if n is self.view:  # (N, k, ...): as many tokens as there are
            copy.args = (copy.args[0], -1, *shape_of(n)[1:])


class _Repeated(_Region):
    """One candidate: rows repeated once per expert, ``x.repeat(E, 1)`` (Llama 4), each expert's
    copy weighted, computed as (E, N, ...) with batched matmuls and summed over the experts."""

    what = "a mixture-of-experts block (every token through every expert)"

    def __init__(self, repeat: Node):
        super().__init__()
        self.repeat = repeat
        rows = shape_of(repeat.args[0])
        if not (len(repeat.args) == 3 and isinstance(repeat.args[1], int) and repeat.args[2] == 1
                and rows is not None and len(rows) == 2):  # fmt: skip
            raise _NotCandidate("not rows repeated once per expert")
        self.E, self.N = repeat.args[1], rows[0]

    def _per_expert_view(self, n: Node) -> bool:
        """A view as (E, N, ...), the rows' count left to -1."""
        return (n.op == "call_method" and n.target in _RESHAPES and n.args[1:3] == (self.E, -1)
                and shape_of(n)[:2] == (self.E, self.N))  # fmt: skip

    def find(self) -> tuple[list[Node], Node]:
        order = {n: i for i, n in enumerate(self.repeat.graph.nodes)}
        after: set[Node] = {self.repeat}
        for n in self.repeat.graph.nodes:
            if n is not self.repeat and any(a in after for a in n.all_input_nodes):
                after.add(n)
        outs = [n for n in after if n.op == "call_method" and n.target == "sum"
                and (n.args[1:] == (0,) or (n.args[1:] == () and n.kwargs.get("dim") == 0))
                and self._per_expert_view(n.args[0])]  # fmt: skip
        if not outs:
            raise _NotCandidate("the experts' copies are not summed")
        out = min(outs, key=order.__getitem__)  # this block's: later layers' come after it
        region, stack = set(), [out]
        while stack:
            n = stack.pop()
            region.add(n)
            for a in n.all_input_nodes:
                # a per-expert weight: the (N, E) weights transposed and flattened
                weights = (a.op == "call_method" and a.target in _RESHAPES
                           and a.args[1:] in ((-1, 1), (-1,)))  # fmt: skip
                transposed = (a.op == "call_method" and a.target == "transpose"
                              and n in region and n.args[0] is a and a.users.keys() <= {n})  # fmt: skip
                if a not in region and (a in after or weights or transposed):
                    stack.append(a)
        region = sorted(region, key=order.__getitem__)
        members = set(region)
        for n in region:
            self.label[n] = self._label(n, members)
        self._check_inputs()
        for n in region:
            if n is not out and any(u not in members for u in n.users):
                raise _NotDispatch(f"{n.name} is used outside the experts")
        return region, out

    def _label(self, n: Node, members) -> str:
        t, args = n.target, n.args
        of = [self._of(a, members) for a in args]
        kw = [self._of(v, members) for v in n.kwargs.values()]
        method, function = n.op == "call_method", n.op == "call_function"
        shape = shape_of(n)
        if n is self.repeat and of[0] is None:
            self.row_inputs.add(args[0])
            return "repeated"
        if method and t == "transpose" and of[0] is None and {args[1], args[2]} == {0, 1}:
            if shape_of(args[0]) == (self.N, self.E):  # a weight per (token, expert)
                self.row_inputs.add(args[0])
                return "per expert"
        if method and t in _RESHAPES:
            if of[0] == "per expert" and args[1:] in ((-1, 1), (-1,)):
                return "repeated"
            if of[0] == "repeated" and self._per_expert_view(n):
                return "by expert"
            if of[0] == "by expert" and args[1] == -1 and shape[0] == self.E * self.N:
                return "repeated"
        if function and t is torch.bmm and of[0] == "by expert" and of[1] is None:
            if shape_of(args[1])[0] == self.E:
                self._free(args[1])
                return "by expert"
        if method and t == "chunk" and of[0] == "by expert":
            if n.kwargs.get("dim", args[2] if len(args) > 2 else 0) in (-1, len(shape) - 1):
                return "by expert, in chunks"
        if t is operator.getitem and of[0] == "by expert, in chunks":
            return "by expert"
        if method and t in _KEEP_ORDER and of[0] in ("repeated", "by expert"):
            return of[0]
        if method and t == "sum" and of[0] == "by expert" and shape[0] == self.N:
            return TOKENS
        if (function and t in POINTWISE_FUNCTIONS) or (method and t in POINTWISE_METHODS):
            orders = {o for o in [*of, *kw] if o is not None}
            free = [
                a
                for a, o in zip([*args, *n.kwargs.values()], [*of, *kw])
                if o is None and shape_of(a) is not None
            ]
            if len(orders) == 1 and orders <= {"repeated", "by expert"}:
                if all(len(shape_of(a)) <= 1 for a in free):  # scalars, a vector over features
                    self._free(*free)
                    return orders.pop()
        raise _NotDispatch(f"{n.name} ({n.op} {getattr(t, '__name__', t)}) is not understood")


def run(ctx: RingContext) -> None:
    if not ctx.seq_len:
        return
    gm = ctx.gm
    candidates = [
        (n, _Dispatch) for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.sort
    ]
    candidates += [
        (n, _Repeated) for n in gm.graph.nodes if n.op == "call_method" and n.target == "repeat"
    ]
    for i, (anchor, form) in enumerate(candidates):
        try:
            region = form(anchor)
            nodes, out = region.find()
        except _NotCandidate:
            continue
        except _NotDispatch as why:
            ctx.report.fallbacks.append(
                f"{anchor.name} at {source_line(anchor)}: not outlined as {form.what}: {why}"
            )
            continue
        where = source_line(out)
        call = region.outline(gm, nodes, out, f"experts_{i}")
        ctx.report.rows.append(
            f"{call.target}: {form.what}, over {region.N} rows ({len(nodes)} nodes) at {where}"
        )

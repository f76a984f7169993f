"""``dims.dim_map``, one table per rule: where each op sends an input's sequence dim.

Each row is a tiny function, traced as the passes see it (Dynamo's graph with its example values,
in pass 1's one spelling), and for one input's dim the output dim ``dim_map`` sends it to — or
``CUT`` (understood, but that dim is split, merged, sliced, reduced or made afresh: not carried)
or ``REFUSED`` (``dim_map`` is None: the op is not understood). The node a row checks is the last
one its rule maps, so every row also checks the dispatch by target. The sequence is dim 1 of
(2, S, 4) unless a row says otherwise; S = 8 equals no other size, except where a row makes it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from ringcompile.passes import normalize
from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import DIM_RULES, dim_map, dim_rule, made_from_sizes, rule_of

S = 8
CUT, REFUSED = "cut", "refused"
RULES = {rule.__name__.lstrip("_"): rule for rule in DIM_RULES.values()}


@dataclass(frozen=True)
class In:
    """A graph input to make: its shape and dtype (integers below ``high``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int = 2

    def make(self) -> torch.Tensor:
        if self.dtype.is_floating_point or self.dtype.is_complex:
            return torch.randn(self.shape, dtype=self.dtype)
        return torch.randint(0, self.high, self.shape).to(self.dtype)


X = In((2, S, 4))
W = In((6, 4))


@dataclass(frozen=True)
class Row:
    rule: str | None  # the rule's name (``dims._transpose`` is "transpose"); None: no rule
    case: str
    fn: Callable
    inputs: tuple[In, ...]
    dim: int  # the input's sequence dim
    want: Any  # the output dim, CUT or REFUSED
    of: str | None = None  # which input: a parameter of fn or a node's name; None: fn's first

    def param(self):
        of = f"-{self.of}" if self.of else ""
        return pytest.param(self, id=f"{self.rule or 'no_rule'}-{self.case}-dim{self.dim}{of}")

    def input_of(self, gm: torch.fx.GraphModule):
        """The input node ``of`` names (Dynamo orders graph inputs by first use, and names the
        one of parameter ``x`` ``l_x_``)."""
        name = self.of or next(iter(inspect.signature(self.fn).parameters))
        nodes = {n.name: n for n in gm.graph.nodes}
        return nodes.get(name, nodes.get(f"l_{name}_"))


def rows(rule: str | None, case: str, fn: Callable, inputs, *checks) -> list:
    """One row per ``(dim, want)`` or ``(dim, want, of)`` in ``checks``, all on one graph."""
    return [Row(rule, case, fn, tuple(inputs), *c).param() for c in checks]


def setitem_last_dim(x, v):
    x[..., :2] = v


def setitem_sequence(x, v):
    x[:, 2:] = v


def setitem_int(x, v):
    x[0] = v


def setitem_by_tensor(x, i, v):
    x[i] = v


def first_chunk(x):
    return x.chunk(2, dim=-1)[0]


def top_values(x):
    return torch.topk(x, 2, dim=-1).values


def top_along(x):
    return torch.topk(x, 2, 1)[0]


def scores(q, k):
    return q @ k.transpose(-1, -2)


def index_put_rows(x, i, v):
    return x.index_put_((i,), v)


def index_put_through_a_view(x, i, v):  # (test_in_place's: the buffer read through a transpose)
    return x.transpose(0, 1).index_put((i,), v)


ROWS = [
    *rows("pointwise", "bias broadcast", lambda x, b: x + b, [X, In((4,))], (1, 1), (0, 2, "b")),
    *rows(
        "pointwise",
        "size 1 broadcast",
        lambda x, y: x * y,
        [X, In((2, 1, 4))],
        (1, 1),
        (1, CUT, "y"),
    ),
    *rows("pointwise", "in place add_", lambda x, y: x.add_(y), [X, X], (1, 1), (1, 1, "y")),
    *rows(
        "pointwise",
        "copy_ right-aligned",
        lambda x, y: x.copy_(y),
        [X, In((S, 4))],
        (1, 1),
        (0, 1, "y"),
    ),
    *rows(
        "pointwise",
        "where",
        lambda m, x: torch.where(m, x, 0.0),
        [In((S, 4), torch.bool), X],
        (0, 1),
        (1, 1, "x"),
    ),
    *rows("pointwise", "silu", lambda x: F.silu(x), [X], (2, 2)),
    *rows("cast", "to", lambda x: x.to(torch.float64), [X], (1, 1)),
    *rows(
        "cast",
        "type_as",
        lambda x, y: x.type_as(y),
        [X, In((2, S, 4), torch.float64)],
        (1, 1),
        (1, CUT, "y"),
    ),
    *rows("getitem", "slice of the sequence", lambda x: x[:, 2:], [X], (1, CUT), (2, 2)),
    *rows("getitem", "full slice", lambda x: x[:, :S], [X], (1, 1)),
    *rows("getitem", "int drops a dim", lambda x: x[0], [X], (1, 0)),
    *rows("getitem", "negative int", lambda x: x[:, -1], [X], (1, CUT), (2, 1)),
    *rows("getitem", "None adds a dim", lambda x: x[:, None], [X], (1, 2)),
    *rows(
        "getitem",
        "ellipsis and a list",
        lambda x: x[..., [-2], :],
        [In((2, S, 3, 4))],
        (1, 1),
        (2, CUT),
    ),
    *rows("getitem", "tensor index", lambda x, i: x[i], [X, In((2,), torch.long)], (1, REFUSED)),
    *rows("getitem", "element of a chunk", first_chunk, [X], (1, 1, "chunk")),
    *rows(
        "setitem",
        "last dim sliced",
        setitem_last_dim,
        [X, In((2, S, 2))],
        (1, 1),
        (2, CUT),
        (1, 1, "v"),
    ),
    *rows("setitem", "sequence sliced", setitem_sequence, [X, In((2, S - 2, 4))], (1, CUT)),
    *rows("setitem", "int index", setitem_int, [X, In((S, 4))], (1, 1), (0, 1, "v")),
    *rows(
        "setitem",
        "tensor index",
        setitem_by_tensor,
        [X, In((1,), torch.long), In((1, S, 4))],
        (1, REFUSED),
    ),
    *rows(
        "cat",
        "along the sequence",
        lambda x, y: torch.cat([x, y], dim=1),
        [X, X],
        (1, CUT),
        (2, 2, "y"),
    ),
    *rows("cat", "negative dim", lambda x, y: torch.cat((x, y), -1), [X, X], (1, 1), (1, 1, "y")),
    *rows(
        "stack", "before the sequence", lambda x, y: torch.stack([x, y], 1), [X, X], (1, 2), (0, 0)
    ),
    *rows("stack", "negative dim", lambda x, y: torch.stack([x, y], dim=-1), [X, X], (1, 1)),
    *rows(
        "addmm",
        "rows of mat1",
        lambda b, mat1, mat2: torch.addmm(b, mat1, mat2),
        [In((6,)), In((S, 4)), In((4, 6))],
        (0, 0, "mat1"),
        (1, CUT, "mat2"),
    ),
    *rows("softmax", "method, last dim", lambda x: x.softmax(-1), [X], (1, 1), (2, CUT)),
    *rows("softmax", "function, by keyword", lambda x: F.softmax(x, dim=1), [X], (1, CUT)),
    *rows(
        "softmax", "log_softmax, negative", lambda x: x.log_softmax(dim=-2), [X], (1, CUT), (2, 2)
    ),
    *rows("topk", "last dim", top_values, [X], (1, 1), (2, CUT)),
    *rows("topk", "along the sequence", top_along, [X], (1, CUT)),
    *rows("norm", "layer_norm", lambda x: F.layer_norm(x, (4,)), [X], (1, 1), (2, CUT)),
    *rows("norm", "rms_norm over two dims", lambda x: F.rms_norm(x, (S, 4)), [X], (1, CUT)),
    *rows(
        "last_dim_replaced",
        "linear",
        lambda x, weight: F.linear(x, weight),
        [X, W],
        (1, 1),
        (2, CUT),
        (0, CUT, "weight"),
    ),
    *rows(
        "last_dim_replaced",
        "view_as_complex",
        lambda x: torch.view_as_complex(x),
        [In((2, S, 4, 2))],
        (1, 1),
        (3, CUT),
    ),
    *rows(
        "leading",
        "embedding",
        lambda x, w: F.embedding(x, w),
        [In((2, S), torch.long, 6), W],
        (1, 1),
    ),
    *rows(
        "leading",
        "view_as_real",
        lambda x: torch.view_as_real(x),
        [In((2, S, 4), torch.complex64)],
        (1, 1),
        (2, 2),
    ),
    *rows(
        "leading",
        "sdpa",
        lambda q, k: F.scaled_dot_product_attention(q, k, k, is_causal=True),
        [In((1, 2, S, 4)), In((1, 2, S, 4))],
        (2, 2),
        (2, CUT, "k"),
    ),
    *rows("matmul", "by a weight", lambda x, w: x @ w, [X, In((4, 6))], (1, 1), (1, 2, "w")),
    *rows(
        "matmul",
        "q @ k^T",
        scores,
        [X, X],
        (1, 1),
        (2, CUT),
        (2, 2, "transpose"),
        (1, CUT, "transpose"),
    ),
    *rows(
        "matmul", "bmm", lambda x, y: torch.bmm(x, y), [X, In((2, 4, 6))], (1, 1), (0, 0), (2, CUT)
    ),
    *rows(
        "matmul",
        "broadcast batch",
        lambda a, b: a @ b,
        [In((1, S, 4)), In((3, 4, 6))],
        (0, CUT),
        (1, 1),
    ),
    *rows(
        "index_put",
        "rows picked",
        index_put_rows,
        [In((4, S, 2)), In((2,), torch.long, 4), In((2, S, 2))],
        (1, 1),
        (0, CUT),
        (1, 1, "v"),
    ),
    *rows(
        "index_put",
        "through a view",
        index_put_through_a_view,
        [In((S, 2, 4)), In((1,), torch.long), In((1, S, 4))],
        (1, 1, "transpose"),
        (0, CUT, "transpose"),
        (1, 1, "v"),
    ),
    *rows("creation", "new_empty", lambda x: x.new_empty(2, S, 4), [X], (1, CUT)),
    *rows("creation", "new_zeros", lambda x: x.new_zeros((2, S)), [X], (1, CUT)),
    *rows("creation", "new_full", lambda x: x.new_full((S, 4), 0.5), [X], (1, CUT)),
    *rows("transpose", "(1, 2)", lambda x: x.transpose(1, 2), [X], (1, 2), (2, 1), (0, 0)),
    *rows("transpose", "negative dims", lambda x: x.transpose(-1, -2), [X], (1, 2)),
    *rows("transpose", "torch.transpose", lambda x: torch.transpose(x, 0, 1), [X], (1, 0)),
    *rows("transpose", "equal sizes", lambda x: x.transpose(1, 2), [In((2, S, S))], (1, 2)),
    *rows("permute", "varargs", lambda x: x.permute(2, 0, 1), [X], (1, 2), (2, 0)),
    *rows("permute", "a tuple, negative", lambda x: x.permute((0, -1, 1)), [X], (1, 2)),
    *rows(
        "reshape",
        "view splits the sequence",
        lambda x: x.view(2, 2, S // 2, 4),
        [X],
        (1, CUT),
        (2, 3),
        (0, 0),
    ),
    *rows(
        "reshape",
        "view merges heads",
        lambda x: x.view(2, S, 8),
        [In((2, S, 2, 4))],
        (1, 1),
        (2, CUT),
    ),
    *rows("reshape", "merges batch and sequence", lambda x: x.reshape(-1, 4), [X], (1, CUT)),
    *rows(
        "reshape",
        "length equals head dim",
        lambda x: x.view(2, S, 2, S // 2),
        [In((2, S, S))],
        (1, 1),
        (2, CUT),
    ),
    *rows("reshape", "unsqueeze", lambda x: x.unsqueeze(1), [X], (1, 2), (0, 0)),
    *rows("reshape", "squeeze", lambda x: x.squeeze(1), [In((2, 1, S))], (2, 1)),
    *rows("reshape", "flatten", lambda x: x.flatten(2), [In((2, S, 2, 4))], (1, 1), (3, CUT)),
    *rows("reshape", "unflatten", lambda x: x.unflatten(-1, (2, 2)), [X], (1, 1)),
    *rows("expand", "a size-1 dim", lambda x: x.expand(2, 3, S), [In((2, 1, S))], (2, 2), (1, CUT)),
    *rows("expand", "new leading dims", lambda x: x.expand(3, S, 4), [In((S, 4))], (0, 1)),
    *rows(
        "scatter",
        "along the last dim",
        lambda x, i, v: x.scatter(-1, i, v),
        [X, In((2, S, 1), torch.long, 4), In((2, S, 1))],
        (1, 1),
        (2, CUT),
        (1, 1, "i"),
        (1, 1, "v"),
    ),
    *rows(
        "scatter",
        "in place, along the sequence",
        lambda x, i: x.scatter_(1, i, 0.0),
        [X, In((2, 1, 4), torch.long)],
        (1, CUT),
        (2, 2),
    ),
    *rows("split", "chunk, negative", lambda x: x.chunk(2, dim=-1), [X], (1, 1), (2, CUT)),
    *rows("split", "split along the sequence", lambda x: x.split(4, dim=1), [X], (1, CUT)),
    *rows("split", "tensor_split, default dim", lambda x: x.tensor_split(2), [X], (1, 1)),
    *rows("unbind", "dim 0", lambda x: x.unbind(0), [In((3, 2, S, 4))], (2, 1), (0, CUT)),
    *rows("unbind", "negative", lambda x: x.unbind(-1), [X], (1, 1)),
    *rows("reduction", "sum, last dim", lambda x: x.sum(-1), [X], (1, 1)),
    *rows("reduction", "mean before it", lambda x: x.mean(0), [X], (1, 0)),
    *rows("reduction", "keepdim", lambda x: x.mean(0, keepdim=True), [X], (1, 1)),
    *rows("reduction", "amax over two", lambda x: x.amax((0, -1)), [X], (1, 0)),
    *rows("reduction", "along the sequence", lambda x: x.sum(1), [X], (1, CUT), (2, 1)),
    *rows("reduction", "everything", lambda x: x.sum(), [X], (1, CUT)),
    # unbiased where keepdim stands in other reductions: the output's rank says what was kept
    *rows("reduction", "var with unbiased", lambda x: x.var(0, True), [X], (1, 0), (2, 1)),
    *rows(
        "reduction",
        "std with unbiased, keepdim",
        lambda x: x.std(0, False, True),
        [X],
        (1, 1),
        (2, 2),
    ),
    *rows("reduction", "empty dims", lambda x: x.sum(()), [X], (1, CUT)),
    *rows(None, "cumsum", lambda x: x.cumsum(1), [X], (1, REFUSED)),
    *rows(None, "flip", lambda x: x.flip(-1), [X], (1, REFUSED)),
    *rows(None, "roll", lambda x: x.roll(1, 1), [X], (1, REFUSED)),
]

_graphs: dict = {}


def graph_of(row: Row) -> torch.fx.GraphModule:
    """``row.fn``'s Dynamo graph after pass 1 (one per function and inputs)."""
    key = (row.fn, row.inputs)
    if key not in _graphs:
        captured = []

        def capture(gm, example_inputs):
            captured.append(gm)
            return gm

        torch._dynamo.reset()
        torch.compile(row.fn, backend=capture, fullgraph=True)(*(i.make() for i in row.inputs))
        (gm,) = captured
        normalize.run(RingContext(gm=gm, group=None, layout_name="striped"))
        _graphs[key] = gm
    return _graphs[key]


def node_of(gm: torch.fx.GraphModule, rule: str | None):
    """The last node ``rule`` maps; with no rule, the last call, which must have none."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    if rule is None:
        assert rule_of(calls[-1]) is None, calls[-1].format_node()
        return calls[-1]
    mapped = [n for n in calls if rule_of(n) is RULES[rule]]
    assert mapped, f"no node of rule {rule}:\n{gm.graph}"
    return mapped[-1]


@pytest.mark.parametrize("row", ROWS)
def test_dim_map(row: Row):
    gm = graph_of(row)
    node = node_of(gm, row.rule)
    src = row.input_of(gm)
    assert src is not None, f"no input {row.of}:\n{gm.graph}"
    mapping = dim_map(node)
    if row.want == REFUSED:
        assert mapping is None, mapping
        return
    assert mapping is not None, node.format_node()
    got = {o for inp, m in mapping if inp is src for d, o in m.items() if d == row.dim}
    assert got == ({row.want} if row.want != CUT else set()), (node.format_node(), mapping)


def test_every_rule_has_rows():
    """A rule added without a table of its own fails here."""
    assert set(RULES) <= {p.values[0].rule for p in ROWS}


@pytest.mark.parametrize(("fn", "want"), [
    (lambda x: x.new_empty(2, S, 4), True),
    (lambda x: x.new_zeros((2, S)), True),
    (lambda x: x.new_ones(size=(2, S)), False),  # (sizes by keyword: not read)
])  # fmt: skip
def test_creations_are_made_from_their_sizes(fn, want):
    """A creation maps no dims (``CUT`` above); plan_sequence makes it at the local length where
    its sizes are positional (``made_from_sizes``)."""
    gm = graph_of(Row("creation", "", fn, (X,), 1, CUT))
    assert made_from_sizes(node_of(gm, "creation")) is want


def test_a_target_has_one_rule():
    with pytest.raises(ValueError, match="two dim rules"):
        dim_rule("transpose")(lambda node, out: None)

"""Reading a dense boolean mask's FX graph back as rules and per-token facts.

``read_mask(mask, batch, seq_len)`` follows the nodes that compute an attention mask and returns
the ``AttentionMask`` (position rules, key padding, document ids) that computes it exactly, or
raises ``NotLiftable`` with the reason. The mask is read symbolically, so the result is the same
function, not a guess. Used by ``lift_masks`` (prefill) and ``decode_attention`` (decode steps),
on graphs in one spelling (``normalize``).

What is understood, over mask dims (batch, head, query, key): ``arange(S) + c`` placed on the query
or key dim; comparisons of two such (``kv <= q``, ``kv > q - w``); ``T[batch, kv]`` of a (B, S)
bool tensor (key padding); ``D[batch, q] == D[batch, kv]`` of a (B, S) tensor (documents);
``|q - kv| <= w`` (a window both ways); ``q - kv <= w`` or ``kv - q < w`` (a bound on one side); ``q // c == kv // c`` (chunks, of indices, or of position
ids that are the indices: Llama 4; with a per-row shift, ``(P - lp[batch]) // c``, chunks that
start after each row's padding, as document ids: ``ChunkIds``); ``T[batch]`` of a constant (B,)
tensor of one number; an index against a constant that every index passes (``q >= 0``: no rule);
comparisons of position ids, ``P[batch, kv] <= P[batch, q]`` or ``P[batch, kv] > P[batch, q] - w``,
when the documents are ``cumsum(diff(P) != 1)`` (then within a document positions rise by one per
token, so comparing positions is comparing indices: causality, a sliding window); ``&``, ``.to``,
``expand`` and ``new_ones((), dtype=bool)``. A prefix (prefix-LM, flex's ``or_masks(causal,
prefix)``): ``rules | (kv < p)`` of position rules alone (``new_zeros((), dtype=bool) | ...``,
or_masks' start, is nothing), and-ed only with facts other than position rules.

Float masks, transformers' way: ``where(rules, 0, finfo.min)``, compared back to a boolean
(``< -1``: hidden), and ``bias.masked_fill(hidden, finfo.min)`` of a bias that depends on the key
alone, (B|1, H|1, 1, S) (Falcon's ALiBi): the rules, the bias as a per-token fact, and rows the
rules leave with no key averaging every value, as SDPA gives them under a finfo.min fill.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
from torch.fx import Node

from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.passes.dims import example, shape_of

__all__ = ["ChunkIds", "NotLiftable", "constant_value", "one_document", "positions_of_documents",
           "read_mask", "under_views"]  # fmt: skip

_AXES = {0: "b", 2: "q", 3: "k"}  # mask dims: (batch, head, query, key)


class NotLiftable(Exception):
    pass


@dataclass(frozen=True)
class _Vec:  # arange(n) + offset, not yet placed on a mask dim
    n: int
    offset: int = 0


@dataclass(frozen=True)
class _Index:  # an index of one mask axis, plus a constant
    axis: str
    offset: int = 0


@dataclass(frozen=True)
class _Gathered:  # T[batch, axis] + offset: a per-token value of a (B, S) tensor
    tensor: Node
    axis: str
    offset: int = 0


@dataclass(frozen=True)
class _Diff:  # sign * (query index - key index) + offset
    sign: int
    offset: int = 0


@dataclass(frozen=True)
class _AbsDiff:  # |query index - key index|
    pass


@dataclass(frozen=True)
class _KeyBelow:  # kv < bound: a prefix every query sees, once or-ed with position rules
    bound: int


@dataclass(frozen=True)
class _Nothing:  # a boolean False: no pair (or_masks starts from it)
    pass


@dataclass(frozen=True)
class _PerBatch:  # T[batch] of a (B,) tensor: one value per batch row
    tensor: Node


@dataclass(frozen=True)
class _Shifted:  # an _Index or _Gathered less a per-batch value
    base: object
    shift: Node


@dataclass(frozen=True)
class _Chunked:  # an _Index, _Gathered or _Shifted, floor-divided by a chunk size
    base: object
    size: int


@dataclass(frozen=True)
class _Filled:  # a float mask: 0 (or a key bias) where ``facts`` allow, ``fill`` elsewhere
    facts: _Facts
    fill: float
    bias: Node | None = None


@dataclass(frozen=True)
class _Hidden:  # a boolean, True exactly where ``facts`` forbid
    facts: _Facts


@dataclass(frozen=True)
class ChunkIds:
    """Document ids that are each token's chunk, ``(P[b, t] - shift[b]) // size`` (P: the
    ``positions`` node, or the token index where None): chunks whose boundaries move with each
    row's left padding, as documents. Not yet in the graph: ``lift_masks`` computes them."""

    positions: Node | None
    shift: Node
    size: int


@dataclass
class _Facts:
    left: int | None = None  # key >= query - left
    right: int | None = None  # key <= query + right
    valid: list[Node] = field(default_factory=list)
    docs: list[Node] = field(default_factory=list)
    # left/right also bound these position ids P: index rules only where P rises one by one
    positions: list[Node] = field(default_factory=list)
    chunk: int | None = None  # query // chunk == key // chunk
    # the chunks are of these position ids P: index chunks only where P is the index itself
    chunk_positions: list[Node] = field(default_factory=list)
    chunk_ids: list[ChunkIds] = field(default_factory=list)  # chunks shifted per row
    prefix: int | None = None  # or-ed with the position rules above: key < prefix

    @property
    def by_position(self) -> bool:
        """Whether position rules say anything (what a prefix is or-ed with)."""
        return (self.left is not None or self.right is not None or self.chunk is not None
                or bool(self.positions or self.chunk_positions or self.chunk_ids))  # fmt: skip

    def __and__(self, other: _Facts) -> _Facts:
        def tighter(a, b):
            return b if a is None else a if b is None else min(a, b)

        if None not in (self.chunk, other.chunk) and self.chunk != other.chunk:
            raise NotLiftable(f"chunks of {self.chunk} and of {other.chunk} at once")
        if (self.prefix and other.by_position) or (other.prefix and self.by_position):
            # (rules | prefix) & more rules is no (rules | prefix) form
            raise NotLiftable("position rules and-ed with a prefix or-ed with other rules")

        return _Facts(
            tighter(self.left, other.left),
            tighter(self.right, other.right),
            self.valid + other.valid,
            self.docs + other.docs,
            self.positions + other.positions,
            self.chunk if self.chunk is not None else other.chunk,
            self.chunk_positions + other.chunk_positions,
            self.chunk_ids + other.chunk_ids,
            self.prefix or other.prefix,
        )

    def __or__(self, prefix: _KeyBelow) -> _Facts:
        if not self.by_position:
            return self  # every key already (with the same other facts)
        if self.valid or self.docs or self.positions or self.chunk_positions or self.chunk_ids:
            raise NotLiftable("a prefix or-ed with more than position rules of indices")
        return replace(self, prefix=max(self.prefix or 0, prefix.bound))


_FLIP = {
    operator.le: operator.ge,
    operator.lt: operator.gt,
    operator.ge: operator.le,
    operator.gt: operator.lt,
}


_NOT = {
    operator.le: operator.gt,
    operator.lt: operator.ge,
    operator.ge: operator.lt,
    operator.gt: operator.le,
}


def under_views(node: Node) -> Node:
    """The tensor under ``expand``/``to`` wrappers."""
    while node.op == "call_method" and node.target in ("expand", "to"):
        node = node.args[0]
    return node


def positions_of_documents(doc: Node) -> Node | None:
    """The position ids P if ``doc`` is ``cumsum(diff(P, prepend=...) != 1, -1)`` (how
    transformers finds packed documents), else None. Element i of such a diff is P[i] - P[i-1], so
    a restart counts from its own token; ``append`` (or ``n`` > 1) would move every restart, and
    is not this."""
    doc = under_views(doc)
    if not (doc.op == "call_method" and doc.target == "cumsum" and doc.args[1:] in ((-1,), (1,))):
        return None
    ne = doc.args[0]
    if not (isinstance(ne, Node) and ne.op == "call_function" and ne.target is operator.ne
            and ne.args[1] == 1):  # fmt: skip
        return None
    diff = ne.args[0]
    if (
        isinstance(diff, Node)
        and diff.op == "call_method"
        and diff.target == "diff"
        and len(diff.args) == 1
        and "prepend" in diff.kwargs
        and set(diff.kwargs) <= {"prepend", "dim", "n"}
        and diff.kwargs.get("n", 1) == 1
        and diff.kwargs.get("dim", -1) in (-1, 1)
    ):
        return under_views(diff.args[0])
    return None


def _is_document_ids_of(doc: Node, positions: Node,
                        derived: dict[Node, set[Node]] | None = None) -> bool:  # fmt: skip
    """``doc`` is derived from the position ids ``positions`` (``positions_of_documents``), here
    or, as ``derived`` says, in an earlier graph (``ringcompile.derived_documents``: document ids'
    input -> the position ids' inputs)."""
    if derived and under_views(positions) in derived.get(under_views(doc), ()):
        return True
    return positions_of_documents(doc) is under_views(positions)


def _as_read(mask: AttentionMask[Node], dtype: torch.dtype) -> object:
    """What reading a mask that ``mask`` computes gives (a mask an earlier graph left as facts)."""
    r = mask.rules
    facts = _Facts(
        left=r.window_left if r.window_left >= 0 else None,
        right=0 if r.causal else (r.window_right if r.window_right >= 0 else None),
        valid=[mask.key_padding_mask] if mask.key_padding_mask is not None else [],
        docs=[mask.document_ids] if mask.document_ids is not None else [],
        chunk=r.chunk or None,
        prefix=r.prefix or None,
    )
    # a float mask is transformers': the bias (or 0) where allowed, finfo.min elsewhere
    return (
        _Filled(facts, torch.finfo(dtype).min, mask.key_bias) if dtype.is_floating_point else facts
    )


class _Reader:
    def __init__(self, batch: int, seq_len: int, wide_padding: bool = False,
                 known: dict[Node, AttentionMask[Node]] | None = None):  # fmt: skip
        self.B, self.S = batch, seq_len
        self.wide_padding = wide_padding
        self.memo: dict[Node, object] = {
            n: _as_read(m, example(n).dtype) for n, m in (known or {}).items()
        }

    def read(self, node) -> object:
        if not isinstance(node, Node):
            return node
        if node not in self.memo:
            self.memo[node] = self._read(node)
        return self.memo[node]

    def _read(self, n: Node) -> object:
        op, t = n.op, n.target
        if op == "call_function" and t is torch.arange:
            if len(n.args) != 1 or n.args[0] not in (self.B, self.S):
                raise NotLiftable(f"{n.name}: an arange other than arange(S) or arange(B)")
            return _Vec(n.args[0])
        if op == "call_method" and t == "new_ones" and n.args[1:] in ((()), ((),)):
            if n.kwargs.get("dtype") is torch.bool:
                return _Facts()
        if op == "call_method" and t == "new_zeros" and n.args[1:] in ((()), ((),)):
            if n.kwargs.get("dtype") is torch.bool:
                return _Nothing()
        if op == "call_method" and t in ("to", "expand", "bool"):
            return self.read(n.args[0])
        if op == "call_function" and t in (operator.add, operator.sub):
            a, c = self.read(n.args[0]), self.read(n.args[1])
            if isinstance(a, (_Vec, _Index, _Gathered, _Diff)) and isinstance(c, int):
                return replace(a, offset=a.offset + (c if t is operator.add else -c))
            if (
                t is operator.sub
                and isinstance(a, _Index)
                and isinstance(c, _Index)
                and {a.axis, c.axis} == {"q", "k"}
            ):
                return _Diff(1 if a.axis == "q" else -1, a.offset - c.offset)
            if (
                t is operator.sub
                and isinstance(a, (_Index, _Gathered))
                and isinstance(c, _PerBatch)
            ):
                return _Shifted(a, c.tensor)
        if op == "call_function" and t is operator.floordiv:
            a, c = self.read(n.args[0]), self.read(n.args[1])
            if isinstance(a, (_Index, _Gathered, _Shifted)) and isinstance(c, int) and c > 0:
                return _Chunked(a, c)
        if op == "call_function" and t is operator.abs:
            a = self.read(n.args[0])
            if isinstance(a, _Diff) and a.offset == 0:
                return _AbsDiff()
        if op == "call_function" and t is operator.getitem:
            return self._index(n)
        if op == "call_function" and t is torch.where and len(n.args) == 3:
            cond, kept, fill = self.read(n.args[0]), _number(n.args[1]), _number(n.args[2])
            if isinstance(cond, _Facts) and kept == 0 and fill is not None:
                return _Filled(cond, fill)
        if op == "call_method" and t == "masked_fill" and len(n.args) == 3:
            bias, hidden, fill = n.args[0], self.read(n.args[1]), _number(n.args[2])
            if isinstance(hidden, _Hidden) and fill is not None:
                return _Filled(hidden.facts, fill, self._key_bias(n, bias))
        if op == "call_function" and t in _FLIP:
            a, c = self.read(n.args[0]), _number(n.args[1])
            if isinstance(a, _Filled) and a.bias is None and c is not None:
                # 0 where allowed, fill elsewhere: below a bound between them is "hidden"
                if (t is operator.lt and a.fill < c <= 0) or (t is operator.le and a.fill <= c < 0):
                    return _Hidden(a.facts)
        if op == "call_function" and t in (operator.invert, torch.logical_not):
            inner = n.args[0]
            if isinstance(inner, Node) and inner.op == "call_function" and inner.target in _NOT:
                # ~(a < b) is a >= b, for the integer indices a rule compares
                flipped = _NOT[inner.target]
                return self._compare(n, flipped, self.read(inner.args[0]), self.read(inner.args[1]))
        if op == "call_function" and t in (operator.and_, torch.logical_and):
            a, b = self.read(n.args[0]), self.read(n.args[1])
            if isinstance(a, _Facts) and isinstance(b, _Facts):
                return a & b
        if op == "call_function" and t in (operator.or_, torch.logical_or):
            a, b = self.read(n.args[0]), self.read(n.args[1])
            if isinstance(a, _Nothing):
                return b
            if isinstance(b, _Nothing):
                return a
            if isinstance(a, _KeyBelow):
                a, b = b, a
            if isinstance(a, _Facts) and isinstance(b, _KeyBelow):
                return a | b
            if isinstance(a, _KeyBelow) and isinstance(b, _KeyBelow):
                return _KeyBelow(max(a.bound, b.bound))
        if op == "call_function" and t in _FLIP:
            return self._compare(n, t, self.read(n.args[0]), self.read(n.args[1]))
        if op == "call_function" and t is operator.eq:
            a, b = self.read(n.args[0]), self.read(n.args[1])
            if (
                isinstance(a, _Chunked)
                and isinstance(b, _Chunked)
                and a.size == b.size
                and isinstance(a.base, _Shifted)
                and isinstance(b.base, _Shifted)
                and a.base.shift is b.base.shift
            ):
                return self._shifted_chunks(n, a.base.base, b.base.base, a.base.shift, a.size)
            if (
                isinstance(a, _Chunked)
                and isinstance(b, _Chunked)
                and a.size == b.size
                and type(a.base) is type(b.base)
                and a.base.offset == b.base.offset == 0
                and {a.base.axis, b.base.axis} == {"q", "k"}
            ):
                if isinstance(a.base, _Index):
                    return _Facts(chunk=a.size)
                if a.base.tensor is b.base.tensor:
                    return _Facts(chunk=a.size, chunk_positions=[a.base.tensor])
            if (
                isinstance(a, _Gathered)
                and isinstance(b, _Gathered)
                and a.tensor is b.tensor
                and {a.axis, b.axis} == {"q", "k"}
                and a.offset == b.offset
            ):
                return _Facts(docs=[a.tensor])
        raise NotLiftable(f"{n.name} ({n.op} {getattr(t, '__name__', t)}) is not an index rule")

    def _index(self, n: Node) -> object:
        src, idx = n.args
        if isinstance(src, Node) and shape_of(src) == (self.B,) and self.read(idx) == _Index("b"):
            # a per-batch value: one number for every row (transformers' zero left padding when
            # there is no attention mask) is that number
            value = constant_value(src)
            if value is not None and bool((value == value[0]).all()):
                return int(value[0])
            return _PerBatch(src)
        try:
            base = self.read(src)
        except NotLiftable:
            base = None  # an ordinary tensor, indexed by token below
        if isinstance(base, _Vec) and isinstance(idx, tuple) and len(idx) == 4:
            placed = [d for d, i in enumerate(idx) if i == slice(None)]
            if len(placed) == 1 and all(i is None for d, i in enumerate(idx) if d != placed[0]):
                axis = _AXES.get(placed[0])
                size = self.B if axis == "b" else self.S
                if axis is not None and base.n == size:
                    return _Index(axis, base.offset)
        if isinstance(src, Node) and base is None and isinstance(idx, tuple) and len(idx) == 2:
            b, tok = (self.read(i) for i in idx)
            shape = shape_of(src)
            is_bool = src.meta["example_value"].dtype == torch.bool
            if (
                self.wide_padding
                and is_bool
                and b == _Index("b")
                and tok == _Index("k")
                and shape[0] == self.B
                and shape[1] >= self.S
            ):
                return _Facts(valid=[src])
            if (
                b == _Index("b")
                and isinstance(tok, _Index)
                and tok.offset == 0
                and tok.axis in "qk"
                and shape == (self.B, self.S)
            ):
                if is_bool:
                    if tok.axis != "k":
                        raise NotLiftable(f"{n.name}: a padding mask read by query")
                    return _Facts(valid=[src])
                return _Gathered(src, tok.axis)
        raise NotLiftable(f"{n.name}: indexing that is not T[batch, q or kv]")

    def _distance(self, n: Node, op, a: _Diff, b: int) -> _Facts:
        """``sign * (q - kv) + offset  op  b`` (flex's ``q_idx - kv_idx <= w``): a bound on one
        side of the diagonal."""
        t = b - a.offset
        if a.sign < 0:  # -(q - kv) op t  is  (q - kv) mirrored-op -t
            op, t = _FLIP[op], -t
        left = {operator.lt: t - 1, operator.le: t}.get(op)  # kv >= q - left
        right = {operator.gt: -t - 1, operator.ge: -t}.get(op)  # kv <= q + right
        if (left is not None and left < 0) or (right is not None and right < 0):
            raise NotLiftable(f"{n.name}: a window that excludes the diagonal")
        return _Facts(left=left, right=right)

    def _key_bias(self, n: Node, bias) -> Node:
        """``bias`` when it is a float (B|1, H|1, 1, S) tensor without gradient: one value per
        key and head."""
        shape, value = shape_of(bias), example(bias)
        if (
            shape is None
            or len(shape) != 4
            or shape[2:] != (1, self.S)
            or shape[0] not in (1, self.B)
            or not value.dtype.is_floating_point
        ):
            raise NotLiftable(f"{n.name}: a bias other than (B, H, 1, S), one value per key")
        if value.requires_grad:
            raise NotLiftable(f"{n.name}: a bias that requires grad")
        return bias

    def _shifted_chunks(self, n: Node, a, b, shift: Node, size: int) -> _Facts:
        """``(a - shift[b]) // size == (b - shift[b]) // size`` of a query and a key value."""
        same = type(a) is type(b) and a.offset == b.offset == 0 and {a.axis, b.axis} == {"q", "k"}
        if same and isinstance(a, _Index):
            return _Facts(chunk_ids=[ChunkIds(None, shift, size)])
        if same and a.tensor is b.tensor:
            return _Facts(chunk_ids=[ChunkIds(a.tensor, shift, size)])
        raise NotLiftable(f"{n.name}: chunks of other than one token's query and key values")

    def _compare(self, n: Node, op, a, b) -> _Facts:
        if isinstance(a, int) and not isinstance(b, int):
            a, b, op = b, a, _FLIP[op]
        if isinstance(a, _AbsDiff) and isinstance(b, int):
            # |q - k| <= w: a window of w on both sides
            w = {operator.le: b, operator.lt: b - 1}.get(op)
            if w is None or w < 0:
                raise NotLiftable(f"{n.name}: a distance bound other than |q - kv| <= w")
            return _Facts(left=w, right=w)
        if isinstance(a, _Diff) and isinstance(b, int):
            return self._distance(n, op, a, b)
        if isinstance(a, _Index) and isinstance(b, int):
            # an index against a constant (``q_idx >= 0``: transformers' bidirectional mask): no
            # rule if it holds for every index, which a monotone comparison shows at both ends
            n_idx = self.B if a.axis == "b" else self.S
            if all(op(i + a.offset, b) for i in (0, n_idx - 1)):
                return _Facts()
            if a.axis == "k" and op in (operator.lt, operator.le):
                # the keys before a bound: a prefix, where or-ed with position rules
                return _KeyBelow(b - a.offset + (op is operator.le))
            raise NotLiftable(f"{n.name}: a comparison of an index with a constant that cuts it")
        on_indices = isinstance(a, _Index) and isinstance(b, _Index)
        on_positions = (
            isinstance(a, _Gathered) and isinstance(b, _Gathered) and a.tensor is b.tensor
        )
        if not ((on_indices or on_positions) and {a.axis, b.axis} == {"q", "k"}):
            raise NotLiftable(f"{n.name}: a comparison other than key vs query position")
        if a.axis == "q":
            a, b, op = b, a, _FLIP[op]
        c = b.offset - a.offset  # key  op  query + c
        right = {operator.le: c, operator.lt: c - 1}.get(op)
        left = {operator.ge: -c, operator.gt: -c - 1}.get(op)
        if (right is not None and right < 0) or (left is not None and left < 0):
            raise NotLiftable(f"{n.name}: a window that excludes the diagonal")
        return _Facts(left=left, right=right, positions=[a.tensor] if on_positions else [])


def read_mask(mask: Node, batch: int, seq_len: int, wide_padding: bool = False,
              known: dict[Node, AttentionMask[Node]] | None = None,
              derived: dict[Node, set[Node]] | None = None) -> AttentionMask[Node]:  # fmt: skip
    """The per-token facts that compute ``mask`` exactly, or NotLiftable with the reason.

    ``wide_padding`` (decode steps): a (B, N) boolean key padding mask with N >= seq_len counts
    too, read at its first columns; the caller must give that reading its meaning. ``known``:
    nodes whose mask is known already (graph inputs an earlier graph left as facts); ``derived``:
    document ids among the graph's inputs derived from position ids among them."""
    ms = shape_of(mask)
    if ms is None or len(ms) != 4 or ms[2:] != (seq_len, seq_len):
        raise NotLiftable(f"mask shape {ms} is not (B, H, S, S)")
    dtype = example(mask).dtype
    facts = _Reader(batch, seq_len, wide_padding, known).read(mask)
    bias, empty_rows_mean = None, False
    if dtype.is_floating_point and isinstance(facts, _Filled):
        if facts.fill != torch.finfo(dtype).min:
            # (a row hidden everywhere averages every value only where its scores round to fill)
            raise NotLiftable(f"a float mask that hides keys with {facts.fill}, not finfo.min")
        facts, bias, empty_rows_mean = facts.facts, facts.bias, True
    elif dtype != torch.bool:
        raise NotLiftable("not a boolean mask, nor a float one made from one")
    if ms[1] != 1 and (bias is None or shape_of(bias)[1] != ms[1]):
        raise NotLiftable(f"mask shape {ms}: per-head values other than a key bias")
    if not isinstance(facts, _Facts):
        raise NotLiftable("the mask is not a conjunction of index rules")
    if len(facts.valid) > 1 or len(facts.docs) > 1:
        raise NotLiftable("several padding masks or document ids")
    for p in facts.positions:
        # comparing P[kv] with P[q] is comparing kv with q only inside documents where P rises one
        # by one
        if not (facts.docs and _is_document_ids_of(facts.docs[0], p, derived)):
            raise NotLiftable(
                f"a comparison of position ids {p.name} without documents derived from them"
            )
    if facts.chunk_ids:
        if len(facts.chunk_ids) > 1 or (facts.docs and not one_document(facts.docs[0])):
            raise NotLiftable("chunks shifted per row beside other documents")
    for p in facts.chunk_positions:
        # chunks of position ids are chunks of indices where P is the index: one document
        if not (
            facts.docs
            and _is_document_ids_of(facts.docs[0], p, derived)
            and one_document(facts.docs[0])
        ):
            raise NotLiftable(f"chunks of position ids {p.name} over packed documents")
    causal = facts.right == 0
    rules = PositionRules(
        causal,
        facts.left if facts.left is not None else -1,
        -1 if causal or facts.right is None else facts.right,
        facts.chunk or 0,
        facts.prefix or 0,
    )
    return AttentionMask(
        rules,
        document_ids=(facts.chunk_ids or facts.docs or [None])[0],
        key_padding_mask=facts.valid[0] if facts.valid else None,
        key_bias=bias,
        empty_rows_mean=empty_rows_mean,
    )


def constant_value(node: Node) -> torch.Tensor | None:
    """The value of ``node`` when it is computed from constants alone (no graph input, parameter
    or module), evaluated now; else None."""
    order: list[Node] = []
    seen: set[Node] = set()

    def visit(n: Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        if n.op not in ("call_function", "call_method"):
            return False
        if not all(visit(a) for a in n.all_input_nodes):
            return False
        order.append(n)
        return True

    if not visit(node):
        return None
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for n in order:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[node])
    try:
        value = torch.fx.GraphModule(torch.nn.Module(), graph)()
    except Exception:  # anything it cannot run now stays a rule
        return None
    return value if isinstance(value, torch.Tensor) else None


def _number(x) -> float | None:
    """A Python number, or the value of a constant one-element tensor node; else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, Node) and shape_of(x) == ():
        value = constant_value(x)
        return float(value) if value is not None else None
    return None


def one_document(doc: Node) -> bool:
    value = constant_value(doc)
    return value is not None and bool((value == value.reshape(-1)[0]).all())

"""Values that stay sharded between compiled graphs (a model with graph breaks).

A graph break ends one compiled graph and starts another: the hidden state the first returns is
the second's input. Gathered on its way out, every break would move S × hidden over the ring and
hold it on every rank. So a sequence-sharded output leaves a graph as a ``SequenceShard``: a tensor
of the full (global) shape that holds only this rank's tokens (``local``, in layout order) and
what they are (the sequence dim, the layout, the rank and the group's name).

- The next compiled graph takes it as it is: the backend unwraps ``local`` and the passes start
  that input on this rank's tokens (``find_attention`` checks the layout is the graph's own;
  another layout arrives gathered).
- Python code outside any graph that reads it (``print(h.norm())``, ``.item()``, indexing, a
  loss written outside the model) sees the full tensor: the first such read gathers it, once,
  and keeps the result. Every rank must read it alike, as every rank runs the same program: the
  gather is a collective.
- A change in place from Python (an experts loop's ``index_add_`` into a buffer a graph made)
  changes the gathered copy, and this rank's tokens are taken from it; a change through a view
  of the gathered copy is found where a graph next takes the tokens (``synced_local``).
- Pickled (``torch.save``), it is the full tensor, once read on every rank; before, saving
  raises (one rank saving alone would keep its tokens only, and gathering there would hang).
- Gradients: what reaches a ``SequenceShard`` from the next graph is this rank's tokens' gradient
  (a ``SequenceShard`` itself); a full gradient from Python code, which every rank computes alike,
  gives each rank its tokens' rows. No communication either way.

An attention mask a graph builds from indices (transformers builds it once, before the layers)
leaves as a ``MaskAsFacts``: the rules and per-token facts it was read back as (``lift_masks``),
never the S x S tensor; a later graph's attention lifts it as if it had built it, and Python code
that reads it gets the dense mask, computed from the facts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.distributed_c10d import _get_default_store, _resolve_process_group
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ringcompile.errors import RingCompileError
from ringcompile.layout import Layout
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.runtime import RingGather

__all__ = ["SequenceShard", "MaskAsFacts", "GraphBoundary", "recording_gathers"]

# explain's record of the gathers Python code made (None: not recording)
_gathers_log: list[str] | None = None


@contextlib.contextmanager
def recording_gathers():
    """Within it, each gather a read from Python code makes is listed (what and which read)."""
    global _gathers_log
    outer, _gathers_log = _gathers_log, []
    try:
        yield _gathers_log
    finally:
        _gathers_log = outer


# how many reads from Python code each group's ranks have gathered (every rank counts alike)
_reads: dict[str, int] = {}


def gather_timeout() -> float:
    """Seconds a rank waits for every other rank to come to a gather that Python code asked for
    (``RINGCOMPILE_GATHER_TIMEOUT``, default 300)."""
    return float(os.environ.get("RINGCOMPILE_GATHER_TIMEOUT", "300"))


def _every_rank_reads(group, what: str, reader: str) -> None:
    """Before a gather that Python code asked for: wait, on the store and with no collective,
    until every rank of ``group`` has come to the same gather, or raise naming the ranks that did
    not (a read on one rank alone, ``if rank == 0: print(out.sum())``, would otherwise hang the
    gather). Each rank leaves a key per read; a rank at read n removes its key of read n - 2,
    which every rank has seen by then. A read that raises is not counted."""
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) == 1:
        return
    store = _get_default_store()
    n = _reads[group.group_name] = _reads.get(group.group_name, 0) + 1
    key = functools.partial("ringcompile/read/{}/{}/{}".format, group.group_name)
    store.set(key(n, dist.get_rank()), b"")
    if n > 2:
        store.delete_key(key(n - 2, dist.get_rank()))
    others = [key(n, r) for r in ranks if r != dist.get_rank()]
    try:
        store.wait(others, datetime.timedelta(seconds=gather_timeout()))
    except (RuntimeError, dist.DistStoreError) as e:
        missing = [r for r in ranks if r != dist.get_rank() and not store.check([key(n, r)])]
        # the read did not happen: the count and the key go back, and the ranks stay in step
        store.delete_key(key(n, dist.get_rank()))
        _reads[group.group_name] = n - 1
        raise RingCompileError(
            f"{what} was read by {reader} on rank {dist.get_rank()}, which gathers it from every "
            f"rank of its ring, but rank(s) {missing} did not read it within "
            f"{gather_timeout():.0f} s (RINGCOMPILE_GATHER_TIMEOUT). Every rank runs the same "
            "program: read it on every rank (then print on one), or compile with "
            "options={'gather_outputs': True} to get full tensors back."
        ) from e


class SequenceShard(torch.Tensor):
    """A full tensor of which this rank holds its tokens of dim ``dim`` (see the module)."""

    local: torch.Tensor  # (Tensor's own ``dim`` and ``layout`` name other things)
    seq_dim: int
    seq_layout: Layout

    @staticmethod
    def __new__(cls, local, dim, layout, rank, group_name, origin="", cache=None):
        shape = list(local.shape)
        shape[dim] = layout.seq_len
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=local.dtype, device=local.device,
            requires_grad=local.requires_grad,
        )  # fmt: skip

    def __init__(self, local, dim, layout, rank, group_name, origin="", cache=None):
        self.local, self.seq_dim, self.seq_layout = local, dim, layout
        # the group by name: guards copy what identifies the tensor, and groups do not copy
        self.rank, self.group_name = rank, group_name
        self.origin = origin  # what made it, for explain and errors (not part of its identity)
        # the gathered tensor, once read: shared with the tensors ``detach`` gives
        self._cache: dict = cache if cache is not None else {}

    # -- what Dynamo needs to take it as a graph input --------------------------------------------
    def __tensor_flatten__(self):
        return ["local"], (self.seq_dim, self.seq_layout, self.rank, self.group_name)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return SequenceShard(inner["local"], *meta)

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # no collective: a rank may print alone
        return (
            f"SequenceShard(shape={tuple(self.shape)}, dim={self.seq_dim}, layout={self.seq_layout!r}, "
            f"rank={self.rank}, {self.origin or 'sharded'}; local={self.local!r})"
        )

    def __reduce_ex__(self, protocol):
        # Pickled (torch.save), it is the full tensor: this rank's tokens alone, saved by one
        # rank, would be a silent loss of the others'. Gathering here would hang where one rank
        # saves alone, so the full tensor must have been read on every rank already.
        cache = self._cache
        if "full" not in cache or cache["local_version"] != self.local._version:
            raise RingCompileError(
                f"saving {self.origin or 'a sequence-sharded value'}, of which this rank holds its "
                "tokens only (gather_outputs='lazy'): gather it on every rank first "
                "(x = x.clone(), or any read), then save the full tensor from one; or compile "
                "with options={'gather_outputs': True}"
            )
        return cache["full"].__reduce_ex__(protocol)

    @torch._disable_dynamo  # reads: eager code, as the dispatch below
    def tolist(self):
        return self.full("tolist").tolist()

    @torch._disable_dynamo
    def numpy(self, *, force: bool = False):
        return self.full("numpy").numpy(force=force)

    # -- the full tensor -------------------------------------------------------------------------
    def full(self, reader: str = "Python code") -> torch.Tensor:
        """The full tensor in natural order: gathered on the first call (a collective every rank
        must make), kept for later reads while this rank's tokens stay as they were."""
        cache = self._cache
        if "full" in cache and cache["local_version"] == self.local._version:
            return cache["full"]
        local = self.local.detach()
        if is_fake(local):  # tracing: the shape is all there is
            return local.new_empty(self.shape)
        group = _resolve_process_group(self.group_name)
        _every_rank_reads(group, self.origin or "a sequence-sharded value", reader)
        cache["full"] = RingGather(self.seq_layout, self.rank, group)(local, self.seq_dim)
        cache["local_version"] = local._version
        if _gathers_log is not None:
            _gathers_log.append(f"{self.origin or 'a sequence-sharded value'}: read by {reader}")
        return cache["full"]

    def synced_local(self) -> torch.Tensor:
        """This rank's tokens, after any change Python code made to the gathered full tensor.
        A write through a view of it (``x[0].add_(1)``: the view came from this class's dispatch,
        below autograd, so no version counter links it to the full tensor) shows only in the
        values: they are compared where Python code took a view of the full tensor (a compare
        waits for the device; other reads need none)."""
        cache = self._cache
        if "full" not in cache:
            return self.local
        if cache["local_version"] != self.local._version:  # the tokens changed since: they hold
            del cache["full"]
        elif cache.get("viewed") and not torch.equal(
            self.seq_layout.shard(cache["full"], self.seq_dim, self.rank), self.local
        ):
            self.take_tokens_from_full()
        return self.local

    def take_tokens_from_full(self) -> None:
        """Every rank's Python changed its full copy alike: this rank's tokens are its share."""
        cache = self._cache
        with torch.no_grad():  # (the gradient flows through this tensor's own autograd)
            self.local.copy_(self.seq_layout.shard(cache["full"], self.seq_dim, self.rank))
        cache["local_version"] = self.local._version

    @classmethod
    @torch._disable_dynamo  # eager code, never a frame for Dynamo to compile
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default:
            (x,) = args
            return SequenceShard(
                x.local.detach(), x.seq_dim, x.seq_layout, x.rank, x.group_name, x.origin, x._cache
            )
        # Python code reads (and may write) the full tensor: a write in place changes the
        # gathered copy, and this rank's tokens follow it where they are next read
        # (``synced_local``); the op returns the tensor it wrote, as for a plain one.
        reader = f"{func} outside the compiled graphs"
        shards = {}

        def full(a):
            if not isinstance(a, cls):
                return a
            shards[id(a.full(reader))] = a
            return a.full(reader)

        full_args = tree_map(full, (args, kwargs))
        out = func(*full_args[0], **full_args[1])
        if any(r.alias_info is not None for r in func._schema.returns):
            for shard in shards.values():  # a view of a full tensor may be written through
                shard._cache["viewed"] = True
        if func._schema.is_mutable:
            # (below autograd the write bumps no version counter: the tokens follow it now)
            for shard in _written(func, args, kwargs):
                shard.take_tokens_from_full()
            out = tree_map(lambda o: shards.get(id(o), o) if isinstance(o, torch.Tensor) else o,
                           out)  # fmt: skip
        return out


def _written(func, args, kwargs) -> list[SequenceShard]:
    """The ``SequenceShard`` arguments ``func`` writes in place (by its schema)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write:
            written += [v for v in tree_flatten(value)[0] if isinstance(v, SequenceShard)]
    return written


_FACTS = ("document_ids", "key_padding_mask", "key_bias")


class MaskAsFacts(torch.Tensor):
    """A dense attention mask (B|1, H|1, S, S), boolean or transformers' float, held as the rules
    and full per-token facts that compute it exactly (see the module)."""

    anchor: torch.Tensor  # empty, on the mask's device: a pure position rule has no facts

    @staticmethod
    def __new__(cls, shape, dtype, rules, facts, empty_rows_mean, anchor):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=anchor.device)

    def __init__(self, shape, dtype, rules, facts, empty_rows_mean, anchor):
        self.rules, self.facts, self.empty_rows_mean = rules, facts, empty_rows_mean
        self.anchor = anchor
        self.names = tuple(n for n in _FACTS if n in facts)
        for name in self.names:
            setattr(self, name, facts[name])

    def __tensor_flatten__(self):
        return ["anchor", *self.names], (self.rules, self.empty_rows_mean, self.dtype, self.names)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        rules, empty_rows_mean, dtype, _ = meta
        facts = {n: t for n, t in inner.items() if n != "anchor"}
        return MaskAsFacts(outer_size, dtype, rules, facts, empty_rows_mean, inner["anchor"])

    __torch_function__ = torch._C._disabled_torch_function_impl

    def mask(self) -> AttentionMask[torch.Tensor]:
        return AttentionMask(self.rules, empty_rows_mean=self.empty_rows_mean, **self.facts)

    def __repr__(self) -> str:
        return f"MaskAsFacts(shape={tuple(self.shape)}, {self.rules}, facts={list(self.names)})"

    def dense(self) -> torch.Tensor:
        """The mask itself, from the facts (exactly the tensor the graph would have returned)."""
        B, _, S, _ = self.shape
        device = self.device
        pos = torch.arange(S, device=device)
        ok = self.rules.allows(pos[:, None], pos[None, :], S)[None, None]
        docs, valid = self.facts.get("document_ids"), self.facts.get("key_padding_mask")
        if docs is not None:
            ok = ok & (docs[:, None, :, None] == docs[:, None, None, :])
        if valid is not None:
            ok = ok & valid[:, None, None, :].bool()
        if self.dtype == torch.bool:
            return ok.expand(self.shape).clone()
        bias = self.facts.get("key_bias")
        kept = bias.to(self.dtype) if bias is not None else torch.zeros((), dtype=self.dtype,
                                                                         device=device)  # fmt: skip
        hidden = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=device)
        return torch.where(ok, kept, hidden).expand(self.shape).clone()

    @classmethod
    @torch._disable_dynamo
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def dense(a):
            if not isinstance(a, cls):
                return a
            if is_fake(a.anchor):  # tracing
                return a.anchor.new_empty(a.shape, dtype=a.dtype)
            return a.dense()

        full = tree_map(dense, (args, kwargs))
        return func(*full[0], **full[1])


class _Leave(torch.autograd.Function):
    """A graph's local output becomes a ``SequenceShard``; its gradient becomes local again."""

    @staticmethod
    def forward(ctx, local, dim, layout, rank, group_name, origin):
        ctx.meta = (dim, layout, rank)
        return SequenceShard(local.view_as(local), dim, layout, rank, group_name, origin)

    @staticmethod
    def backward(ctx, grad):
        dim, layout, rank = ctx.meta
        if isinstance(grad, SequenceShard):
            return grad.local, None, None, None, None, None
        # a full gradient, which every rank's Python code computed alike: this rank's rows
        return layout.shard(grad, dim, rank), None, None, None, None, None


class _Arrive(torch.autograd.Function):
    """A ``SequenceShard`` enters a graph as its local tokens; their gradient leaves sharded."""

    @staticmethod
    def forward(ctx, shard):
        ctx.meta = (shard.seq_dim, shard.seq_layout, shard.rank, shard.group_name)
        local = shard.synced_local()
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad):
        return SequenceShard(grad, *ctx.meta)


class _ArriveFull(torch.autograd.Function):
    """A ``SequenceShard`` enters a graph that wants it full (another layout): gathered. The
    graph sums a full input's gradient over the ring, so this rank's rows of it are its own."""

    @staticmethod
    def forward(ctx, shard):
        ctx.meta = (shard.seq_dim, shard.seq_layout, shard.rank, shard.group_name)
        return shard.full("a compiled graph with another layout").clone()

    @staticmethod
    def backward(ctx, grad):
        dim, layout, rank, group_name = ctx.meta
        return SequenceShard(layout.shard(grad, dim, rank), dim, layout, rank, group_name)


def leave(local: torch.Tensor, dim: int, layout: Layout, rank: int, group_name: str, origin: str):
    return _Leave.apply(local, dim, layout, rank, group_name, origin)


@dataclasses.dataclass(frozen=True)
class MaskLeaving:
    """A mask output left as facts: its shape and dtype, the rules, and where the inner graph puts
    the facts it returns in its place (appended after the graph's own outputs, in ``names``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    rules: PositionRules
    empty_rows_mean: bool
    names: tuple[str, ...]
    at: tuple[int, ...]


class GraphBoundary:
    """A compiled graph whose inputs may arrive as ``SequenceShard``s or ``MaskAsFacts`` and whose
    sequence outputs and masks leave as ones.

    ``arrive[i]``: how input i enters: "local" (the graph takes its tokens), "full" (gathered),
    "mask facts" (its facts, appended to the inputs in order; the mask itself is not read) or
    "mask dense" (the same, and the mask computed from them). ``leave[j] = (dim, origin)`` for the
    j-th output leaf that holds this rank's tokens; ``masks[j]`` for a mask output left as facts
    (the leaf holds an empty anchor on its device, the facts follow the graph's outputs)."""

    def __init__(self, compiled, arrive: dict[int, str], leave: dict[int, tuple[int, str]],
                 masks: dict[int, MaskLeaving], outputs: int, layout: Layout | None, rank: int,
                 group):  # fmt: skip
        self.compiled, self.arrive, self.leave, self.masks = compiled, arrive, leave, masks
        self.outputs = outputs  # the graph's own outputs (before the masks' facts)
        self.layout, self.rank = layout, rank
        self.group_name = group.group_name if group is not None else ""

    def __call__(self, *args):
        out = self.compiled(*taken_inputs(args, self.arrive))
        if not (self.leave or self.masks):
            return out
        leaves, spec = tree_flatten(out)
        for j, (dim, origin) in self.leave.items():
            leaves[j] = leave(leaves[j], dim, self.layout, self.rank, self.group_name, origin)
        for j, m in self.masks.items():
            facts = {n: leaves[k] for n, k in zip(m.names, m.at)}
            leaves[j] = MaskAsFacts(m.shape, m.dtype, m.rules, facts, m.empty_rows_mean, leaves[j])
        if self.masks:
            return type(out)(leaves[: self.outputs])
        return tree_unflatten(leaves, spec)


def taken_inputs(args, arrive: dict[int, str], example: bool = False) -> list:
    """The inputs as the compiled graph takes them (``GraphBoundary.arrive``): each in its place,
    then the facts of the masks that arrive as facts. ``example``: the compiler's example inputs
    (no autograd, no collective)."""

    def taken(x, how):
        if how == "local" and isinstance(x, SequenceShard):
            return x.local if example else _Arrive.apply(x)
        if how == "full" and isinstance(x, SequenceShard):
            if example:
                return x.local.new_empty(x.shape).requires_grad_(x.requires_grad)
            return _ArriveFull.apply(x)
        if how == "mask facts":
            return x.anchor
        if how == "mask dense":
            return x.dense()
        return x

    taken_args = [taken(a, arrive.get(i)) for i, a in enumerate(args)]
    for i, a in enumerate(args):
        if arrive.get(i, "").startswith("mask"):
            taken_args += [a.facts[n] for n in a.names]
    return taken_args

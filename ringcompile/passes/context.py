"""What the passes share: the graph, the ring, what each pass found, and the report they write.

Each pass's result has one place on ``RingContext``, written by that pass alone and read by the
passes after it (``run_passes`` checks that a pass's producers ran before it):

- the backend: ``arriving``, the graph inputs an earlier graph left sharded (``SequenceShard``);
  ``arriving_masks`` (masks left as facts) and ``derived_documents`` (document ids an earlier graph
  derived from position ids);
- ``find_attention``: ``sites`` and ``seq_len`` (then ``layout``, made once), and ``arrived``: the
  arriving inputs the graph takes as this rank's tokens;
- ``lift_masks``: each site's ``lifted_mask``; ``masks_leaving``, the mask outputs it returns as
  facts;
- ``plan_sequence``: ``plan`` (a read-only ``SequencePlan``);
- ``shard_sequence``: ``local`` / ``local_only`` (which shard_reductions extends as it rewrites),
  each site's ``local_facts``;
- ``shard_reductions``: ``loss_inputs``.

``node.meta["val"]`` stays the example value Dynamo traced: after ``shard_sequence`` it is the
*global* shape of a node that now computes on local tokens (and absent on the nodes the passes
added). Passes after it read dtypes, devices and non-sequence sizes from it, never a sequence
length; those come from ``seq_len`` and ``layout``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.distributed as dist
from torch.fx import GraphModule, Node

from ringcompile.group import TwoLevel
from ringcompile.layout import Layout, make_layout
from ringcompile.masks import AttentionMask
from ringcompile.passes.aliases import written_tensors
from ringcompile.report import GraphReport
from ringcompile.runtime import (
    RingCrossEntropy,
    RingGather,
    RingShard,
    RingSum,
    SdpaOnRing,
    SumGradOverRing,
    TreeDecode,
)
from ringcompile.sequence_shard import MaskLeaving


def _functorch_levels():
    """functorch's level bookkeeping, which Dynamo records around a ``vmap`` (``create_block_mask``
    vmaps a flex ``mask_mod``): no result is used, but a region that lost them batches its values
    at levels that do not exist."""
    import torch._functorch.predispatch as predispatch

    names = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "_jvp_increment_nesting",
             "_jvp_decrement_nesting", "_grad_increment_nesting", "_grad_decrement_nesting",
             "_func_increment_nesting", "_func_decrement_nesting", "lazy_load_decompositions")  # fmt: skip
    return frozenset(getattr(m, n) for m in (predispatch, torch._C._functorch) for n in names
                     if hasattr(m, n))  # fmt: skip


_FUNCTORCH_LEVELS = _functorch_levels()


def unread(node: Node) -> list[Node] | None:
    """``node`` and every node downstream of it, if none of them reaches the graph's output or
    has an effect (what dead-code elimination would remove once ``node`` is dead); else None."""
    found: dict[Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in found:
            continue
        if n.op == "output" or n.is_impure() or _mutates(n):
            return None
        found[n] = None
        stack.extend(n.users)
    return list(found)


def _mutates(node: Node) -> bool:
    """In-place changes (``x.add_(y)``, ``x[i] = v``, ``x += y``, ``out=``), and ops whose schema
    mutates an argument (FX on torch 2.11 deems those pure too: a cache append or an ``out=``
    whose result is unused would vanish)."""
    t = node.target
    if written_tensors(node):
        return True
    if node.op == "call_method":
        return t == "requires_grad_"
    if node.op == "call_function":
        if t in _FUNCTORCH_LEVELS:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket):
            return any(getattr(t, o)._schema.is_mutable for o in t.overloads())
        if isinstance(t, torch._ops.OpOverload):
            return t._schema.is_mutable
    return False


@dataclass
class AttentionSite:
    node: Node
    q: Node
    k: Node
    v: Node
    attn_mask: Node | None
    is_causal: bool
    seq_len: int
    # set when lift_masks turns the dense mask into rules and per-token facts (full (B, S) nodes)
    lifted_mask: AttentionMask[Node] | None = None
    # set by shard_sequence: the local versions of the lifted mask's facts, by name
    local_facts: dict[str, Node] = field(default_factory=dict)


@dataclass(frozen=True)
class SequencePlan:
    """What the analysis (``plan_sequence``) decided, read-only for the passes that rewrite."""

    # nodes computed on local tokens: the sequence dim of their output
    demand: Mapping[Node, int]
    # full tensors sharded where they enter the local region: their sequence dim ...
    shard_points: Mapping[Node, int]
    # ... and what each holds ("input", "positions", ...)
    shard_kinds: Mapping[Node, str]
    # the graph inputs those come from, which every rank must be given alike (graph order)
    sequence_inputs: tuple[Node, ...]

    @classmethod
    def of(cls, demand: dict, shard_points: dict, shard_kinds: dict,
           sequence_inputs) -> SequencePlan:  # fmt: skip
        return cls(
            MappingProxyType(dict(demand)),
            MappingProxyType(dict(shard_points)),
            MappingProxyType(dict(shard_kinds)),
            tuple(sequence_inputs),
        )


@dataclass
class RingContext:
    gm: GraphModule
    group: dist.ProcessGroup | None
    layout_name: str
    # True: sequence outputs gathered as the graph returns; False: this rank's tokens; "lazy":
    # this rank's tokens, which the backend returns as ``SequenceShard``s
    gather_outputs: bool | str = True
    kernels: str | None = None  # the block kernel choice (ringcompile.kernels); None: the default
    strategy: str = "auto"  # ring, ulysses, two-level or auto (ringcompile.strategy)
    # a group in two levels (``group`` is then its ``whole``): the layout splits over its heads dim
    two_level: TwoLevel | None = None
    report: GraphReport = field(default_factory=GraphReport)
    # inputs that arrive sharded: their sequence dim and layout
    arriving: dict[Node, tuple[int, Layout]] = field(default_factory=dict)
    # inputs that arrive as masks held as facts: the mask over the placeholders of its facts
    arriving_masks: dict[Node, AttentionMask[Node]] = field(default_factory=dict)
    # inputs that are document ids an earlier graph derived from position ids among the inputs
    # (``ringcompile.derived_documents``): documents -> the position ids' inputs
    derived_documents: dict[Node, set[Node]] = field(default_factory=dict)

    # find_attention
    sites: list[AttentionSite] = field(default_factory=list)
    seq_len: int = 0
    arrived: dict[Node, int] = field(default_factory=dict)  # taken as local: their sequence dim
    # plan_sequence
    plan: SequencePlan = SequencePlan.of({}, {}, {}, ())
    # lift_masks: mask outputs that leave as facts (by output leaf), after the graph's own outputs
    masks_leaving: dict[int, MaskLeaving] = field(default_factory=dict)
    own_outputs: int = 0
    # shard_reductions: the graph inputs behind the losses' targets, read on this rank's rows
    loss_inputs: tuple[Node, ...] = ()
    # shard_sequence: output leaves (pytree order) that hold this rank's tokens: (dim, origin)
    leaving: dict[int, tuple[int, str]] = field(default_factory=dict)
    # shard_sequence: local version of a node and its sequence dim
    local: dict[Node, tuple[Node, int]] = field(default_factory=dict)
    # nodes whose only value is the local one (no full version exists)
    local_only: set[Node] = field(default_factory=set)
    # keyed by the last in-place change of the memory they read (None: as it was made)
    _shards: dict[tuple[Node, int, Node | None], Node] = field(default_factory=dict)
    _gathers: dict[tuple[Node, Node | None], Node] = field(default_factory=dict)
    _callables: dict[type, object] = field(default_factory=dict)
    gather_reasons: dict[Node, str] = field(default_factory=dict)
    # swap_attention: the sites that share one table of ring steps
    reported_steps: dict[tuple, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.report.world_size = self.world_size  # the ring's size, whatever the passes find

    @property
    def site_of(self) -> dict[Node, AttentionSite]:
        return {s.node: s for s in self.sites}

    @property
    def gathered(self) -> dict[Node, Node]:
        """``{gather node: the local node it gathers}``."""
        return {g: src for (src, _), g in self._gathers.items()}

    # -- the ring -------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.group.size() if self.group is not None else 1

    @property
    def rank(self) -> int:
        return self.group.rank() if self.group is not None else 0

    @functools.cached_property
    def layout(self) -> Layout:
        """The layout of the graph's sequence (read only once ``find_attention`` set it)."""
        if not self.seq_len:
            raise RuntimeError("RingContext.layout read before find_attention found a sequence")
        name = self.layout_name
        if self.two_level is not None:
            name = self.two_level.layout_name(name)
        return make_layout(name, self.seq_len, self.world_size)

    def sequence_inputs(self) -> list[Node]:
        """The graph inputs each rank reads its own tokens of, in graph order: the sharded ones
        and those behind the losses' targets. Every rank must be given them alike."""
        found = set(self.plan.sequence_inputs) | set(self.loss_inputs)
        return [n for n in self.gm.graph.find_nodes(op="placeholder")
                if n in found and n not in self.arrived]  # fmt: skip

    @property
    def communicates(self) -> bool:
        """Whether the rewritten graph calls anything that talks to the other ranks."""
        return any(cls is not RingShard for cls in self._callables)

    def talks(self, node: Node) -> bool:
        """Whether ``node`` calls one of the ring's callables that talks to the other ranks."""
        return node.op == "call_function" and any(
            node.target is f for cls, f in self._callables.items() if cls is not RingShard
        )

    def _bound(self, cls):
        # one object per kind, so the graph's code calls one name (ring_shard, not ring_shard_3)
        if cls not in self._callables:
            self._callables[cls] = cls(self.layout, self.rank, self.group)
        return self._callables[cls]

    def tree_decode(self) -> TreeDecode:
        # needs no layout: decode graphs have no sharded sequence
        if TreeDecode not in self._callables:
            self._callables[TreeDecode] = TreeDecode(self.group)
        return self._callables[TreeDecode]

    def ring_attention(self) -> SdpaOnRing:
        if SdpaOnRing not in self._callables:
            self._callables[SdpaOnRing] = SdpaOnRing(self.layout, self.rank, self.group,
                                                     self.kernels, self.two_level)  # fmt: skip
        return self._callables[SdpaOnRing]

    def ring_cross_entropy(self) -> RingCrossEntropy:
        return self._bound(RingCrossEntropy)

    def ring_sum(self) -> RingSum:
        return self._bound(RingSum)

    def sum_grad_over_ring(self) -> SumGradOverRing:
        return self._bound(SumGradOverRing)

    # -- graph edits shared by the passes --------------------------------------------------------
    def remove_dead_code(self) -> None:
        """Dead-code elimination that keeps in-place tensor methods: Dynamo records ``x.add_(1)``
        as a call_method, which FX deems pure, so a counter bumped in a forward would vanish."""
        self.gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _mutates(n))

    def shard_of(self, node: Node, dim: int, after: Node | None = None) -> Node:
        """``ring_shard(node, dim)``, inserted once right after ``node``, or after ``after``: the
        last in-place change of ``node``'s memory that its reader sees (``aliases.Writes``)."""
        key = (node, dim, after)
        if key not in self._shards:
            with self.gm.graph.inserting_after(after or node):
                self._shards[key] = self.gm.graph.call_function(self._bound(RingShard), (node, dim))
        return self._shards[key]

    def gather_of(self, node: Node, reason: str, after: Node | None = None) -> Node:
        """``ring_gather(local, dim)`` of a local-only node, inserted once right after it, or
        after ``after``: the last in-place change of its memory that its reader sees."""
        key = (node, after)
        if key not in self._gathers:
            local, dim = self.local[node]
            with self.gm.graph.inserting_after(after or local):
                self._gathers[key] = self.gm.graph.call_function(
                    self._bound(RingGather), (local, dim)
                )
            self.gather_reasons[self._gathers[key]] = f"{node.name} (dim {dim}): {reason}"
        return self._gathers[key]

"""One rank's part of one ring call: what the forward and backward schedules share.

``RankCall`` holds the ring, the layout, this rank's steps (``plan.py``) and the mask's facts in
the form the kernels read: positions come from the layout, document ids and key validity travel
with K/V (``traveling``), and each step's ``BlockMask`` is made from what arrived.

Key validity that hides no key on any rank (a tokenizer's all-ones ``attention_mask``) is dropped
before the first block (``settle_padding``), so the blocks are plain and go to the fastest kernel.
Whether this rank's validity hides a key is computed once per tensor of it (a model's layers and
their backward share one, ``_HIDES``, a ``TensorKeyedCache``), so that asking every rank waits for that small all-gather
alone, not for the GPU's queued work; on a ring of one the answer itself is kept, and only the
first call of a tensor waits for the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from ringcompile.blocks import layout_progression
from ringcompile.group import resolve_group_name
from ringcompile.layout import Layout, make_layout
from ringcompile.mask_mod import evaluate
from ringcompile.masks import AttentionMask, BlockMask, PositionRules
from ringcompile.ring import events
from ringcompile.ring.comm import GroupRing, LocalRing, Ring, on_the_wire, record_event
from ringcompile.ring.plan import Step, first_hop_dtype, rank_steps
from ringcompile.tensor_cache import MISSING, TensorKeyedCache

__all__ = ["RankCall", "positions"]


@functools.lru_cache(maxsize=256)
def positions(layout: Layout, rank: int, device: torch.device) -> torch.Tensor:
    """A rank's global positions on ``device``, made once (read-only: BlockMasks share them)."""
    return layout.positions(rank, device)


class PaddingHides(NamedTuple):
    """Whether this rank's key validity hides a key: (1,) int64 on the device, the event after
    which it holds it (None off CUDA), and every rank's answer once known where no other rank
    takes part (None: ask the ring)."""

    mine: torch.Tensor
    ready: torch.cuda.Event | None
    anywhere: bool | None = None


# PaddingHides by (key validity tensor, the layout, the rank)
_HIDES = TensorKeyedCache(64)


@dataclass
class RankCall:
    ring: Ring
    layout: Layout
    mask: AttentionMask
    dense_offset: torch.Tensor | None  # (B|1, H|1, S_local) of an additive dense mask (BlockMask)
    facts: torch.Tensor | None  # (2, B, S_local) int64: document id, key validity (they travel)
    key_bias: torch.Tensor | None  # (B|1, H|1, 1, S_local): AttentionMask.key_bias (it travels)
    kernels: str  # the kernel choice (``ringcompile.kernels.select_kernels``)
    heads: int  # query heads: what a mask_mod's ``h`` ranges over
    # the tensor whose identity keys the varlen segments (``BlockMask.documents_source``); None:
    # the mask's document ids
    documents_source: torch.Tensor | None = None
    _steps: tuple[AttentionMask, tuple[Step, ...]] | None = field(default=None, repr=False)

    @classmethod
    def make(cls, q, mask: AttentionMask, layout_name: str, seq_len: int, group_name: str,
             kernels: str) -> RankCall:  # fmt: skip
        """This process's call, on the ring of the group ``group_name`` (none: a ring of one)."""
        pg = resolve_group_name(group_name)
        ring = GroupRing(pg) if pg is not None else LocalRing()
        return cls.on(ring, q, mask, make_layout(layout_name, seq_len, ring.size), kernels)

    @classmethod
    def on(cls, ring: Ring, q, mask: AttentionMask, layout: Layout, kernels: str) -> RankCall:
        """``ring.rank``'s call in ``layout``'s ring (a ``LocalRing``: one rank of the ring
        computed alone, as the benchmarks time it)."""
        facts = _token_facts(mask, q.shape[0], q.shape[2], q.device)
        offset = None
        if mask.dense is not None and mask.dense.dtype != torch.bool:
            offset = _row_offsets(mask.dense, layout, ring.rank, mask.rules)
        bias = mask.key_bias.contiguous() if mask.key_bias is not None else None
        return cls(ring=ring, layout=layout, mask=mask, dense_offset=offset, facts=facts,
                   key_bias=bias, kernels=kernels, heads=q.shape[1])  # fmt: skip

    @property
    def rank(self) -> int:
        return self.ring.rank

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def steps(self) -> tuple[Step, ...]:
        """This rank's steps, as the mask now stands (``settle_padding`` may make them plain)."""
        # kept with the mask they were made for: a call reads them at every step
        if self._steps is None or self._steps[0] is not self.mask:
            self._steps = (self.mask, rank_steps(self.layout, self.mask.rules, self.mask.masked,
                                                 self.rank))  # fmt: skip
        return self._steps[1]

    def computed_steps(self) -> list[int]:
        return [s.index for s in self.steps if s.computed]

    def padding_hides(self) -> PaddingHides | None:
        """Whether this rank's key validity hides a key (None without one)."""
        kp = self.mask.key_padding_mask
        if kp is None:
            return None
        if (hit := _HIDES.get(kp, self.layout, self.rank)) is not MISSING:
            return hit
        # a layout's padding slots (past seq_len) are no keys: the rules hide them anyway
        real = positions(self.layout, self.rank, kp.device) < self.seq_len
        mine = (~kp & real).any().to(torch.int64).reshape(1)
        hides = PaddingHides(mine, record_event(mine))
        _HIDES.put(kp, self.layout, self.rank, value=hides)
        return hides

    def settle_padding(self, every_rank: torch.Tensor | None = None) -> None:
        """Drop the key validity if it hides no key on any rank. ``every_rank``: each rank's
        ``padding_hides()`` as the agreement gathered them; else the ring is asked now (one tiny
        all-gather; the host waits for it alone), or, on a ring of one, the answer kept for this
        tensor is taken. Called before anything travels."""
        if every_rank is None:
            hides = self.padding_hides()
            if hides is None:
                return
            if hides.anywhere is not None:
                every_rank = torch.tensor([hides.anywhere])
            else:
                every_rank = self.ring.start_agreement([], [], hides.mine.device,
                                                       extra=hides.mine, ready=hides.ready)()  # fmt: skip
                if self.ring.alone:
                    _HIDES.put(self.mask.key_padding_mask, self.layout, self.rank,
                               value=hides._replace(anywhere=bool(every_rank.any())))  # fmt: skip
        if not bool(every_rank.any()):
            # the blocks are what the other facts make them (plain under position rules alone),
            # and only document ids travel, if any
            self.mask = replace(self.mask, key_padding_mask=None)
            self.facts = _token_facts(self.mask, *self.facts.shape[1:], self.facts.device)
            events.record("idle_padding_dropped")

    def traveling(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """What goes round the ring: K, V and the keys' per-token facts."""
        return [k, v] + [t for t in (self.facts, self.key_bias) if t is not None]

    def pass_on(self, blocks: list[torch.Tensor]):
        """Send ``blocks`` (``traveling``'s list) to the next rank and receive the previous
        rank's into new tensors of the same layouts (K/V may be token-major: every rank's are,
        as the agreement checks): ``(works, incoming)``."""
        incoming = [torch.empty_like(t) for t in blocks]
        works = self.ring.exchange([on_the_wire(t) for t in blocks],
                                   [on_the_wire(t) for t in incoming],
                                   self.ring.peer(1), self.ring.peer(-1))  # fmt: skip
        return works, incoming

    def block_mask(self, step: int, blocks: list[torch.Tensor], device) -> BlockMask:
        """Step ``step``'s mask, over the keys of ``blocks`` (``traveling``'s list as it came)."""
        src = self.steps[step].source
        device = torch.device(device)
        k_pos = positions(self.layout, src, device)
        k_facts = blocks[2] if self.facts is not None else None
        dense = None
        if self.mask.dense is not None:
            # global columns of the source rank's keys; padding keys are masked by seq_len anyway
            dense = self.mask.dense.index_select(-1, k_pos.clamp(max=self.seq_len - 1))
        elif self.key_bias is not None:
            dense = blocks[-1]  # (B|1, H|1, 1, Sk): the keys' bias, the same for every query
        q_pos = positions(self.layout, self.rank, device)
        if self.mask.mask_mod is not None:  # this block's, never the rows over every key
            dense = evaluate(self.mask.mask_mod, self.mask.mask_buffers, blocks[0].shape[0],
                             self.heads, q_pos, k_pos, self.seq_len)  # fmt: skip
        return BlockMask(
            q_pos=q_pos,
            k_pos=k_pos,
            seq_len=self.seq_len,
            rules=self.mask.rules,
            q_doc=self.facts[0] if self.facts is not None else None,
            k_doc=k_facts[0] if k_facts is not None else None,
            # (all ones without a padding mask: no fact)
            k_valid=k_facts[1] if self.mask.key_padding_mask is not None else None,
            dense=dense,
            dense_offset=self.dense_offset,
            positions_key=(self.layout, self.rank, src),
            pieces=self.steps[step].pieces,
            progression=layout_progression(self.layout, self.rank, src),
            documents_source=(
                self.documents_source
                if self.documents_source is not None
                else self.mask.document_ids
            ),
            softcap=self.mask.softcap,
        )

    def first_hop_dtype(self, sender: int, fused_plain: bool, dtype: torch.dtype,
                        acc: torch.dtype) -> torch.dtype:  # fmt: skip
        """The dtype of the dK/dV accumulator ``sender`` passes on after step 1
        (``plan.first_hop_dtype``)."""
        step = rank_steps(self.layout, self.mask.rules, self.mask.masked, sender)[1]
        return first_hop_dtype(step, fused_plain, dtype, acc)


def _token_facts(mask: AttentionMask, B: int, S: int, device) -> torch.Tensor | None:
    """(2, B, S_local) int64 document ids and key validity, which travel with K/V (None
    without either)."""
    doc, ok = mask.document_ids, mask.key_padding_mask
    if doc is None and ok is None:
        return None
    doc = doc if doc is not None else torch.zeros((B, S), dtype=torch.int64, device=device)
    ok = ok if ok is not None else torch.ones((B, S), dtype=torch.bool, device=device)
    return torch.stack([doc.to(torch.int64), ok.to(torch.int64)])


def _row_offsets(dense: torch.Tensor, layout: Layout, rank: int,
                 rules: PositionRules) -> torch.Tensor:  # fmt: skip
    """Each row's largest additive mask value over the keys the position rules let it see (0
    where it sees none, or only -inf): ``BlockMask.dense_offset``."""
    device = dense.device
    q_pos = positions(layout, rank, device)
    seq_len = layout.seq_len
    seen = rules.allows(q_pos[:, None], torch.arange(seq_len, device=device)[None, :], seq_len)
    top = dense.masked_fill(~seen, float("-inf")).amax(-1)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))

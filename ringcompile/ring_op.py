"""The ring attention op: exact SDPA over a sequence sharded across a process group.

Each rank holds its queries, keys and values for its tokens of the global sequence (which tokens is
the layout's business). K/V blocks travel around the ring (rank r sends to r+1, receives from r-1)
while each rank merges attention of its queries over every block it sees, through log-sum-exp.

The whole ring, forward and backward, is one ``torch.library`` op with its own autograd, so every
rank issues the same sends and receives in the same order whatever the compiler does around it:

- forward (``ringcompile::ring_attention``): a small all-gather checks that every rank agrees on
  shapes and options (a mismatch raises on every rank instead of hanging a send; the host waits
  for it while the rank's own block computes), then for each ring step the next block is already
  in flight (double-buffered ``batch_isend_irecv``) while this one is computed;
- backward (``ringcompile::ring_attention_backward``): K/V travel again, and fp32 dK/dV
  accumulators travel one step behind them; after the last step each accumulator goes straight to
  the rank that owns its block. The own block's contribution never travels: it is computed in two
  parts, one while the first remote block arrives and one while the accumulators' last hop
  travels, so no transfer waits alone at either end.

The mask is one ``AttentionMask`` (``ringcompile.masks``), encoded as the op's two mask arguments:
positions come from the layout, document ids and key validity travel with K/V. Key validity that
hides no key on any rank (a tokenizer's all-ones ``attention_mask``) is dropped before the first
block (the agreement's all-gather carries each rank's answer, waited for first; the backward asks
again), so the blocks are plain and go to the fastest kernel. Each step's block
also says what it is (``ringcompile.blocks``): under position rules alone it is a few plain pieces
(full, or causal on a square), which the kernels (``ringcompile.kernels``) hand to fused SDPA
kernels; otherwise it is masked. Steps the position rules prove empty on every rank (a causal or
sliding-window ring) are neither computed nor sent: the ring runs only as many steps as the
farthest rank needs. That plan is a function of the layout and mask options alone, so all ranks
agree on it without talking.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ringcompile.blocks import describe_block, disjoint, layout_block_pieces
from ringcompile.group import all_gather_single, resolve_group_name
from ringcompile.kernels import accumulation_dtype, kernels_fuse_plain, select_kernels
from ringcompile.kernels.grad_sum import GradSum
from ringcompile.layout import Layout, make_layout
from ringcompile.masks import AttentionMask, BlockMask, PositionRules

__all__ = ["comm_stats", "describe_steps", "reset_comm_stats", "ring_attention_op", "StepPlan",
           "step_plan"]


# -- bookkeeping that tests and `explain` read ---------------------------------------------------
@dataclass
class CommStats:
    """Counts of what this process's ring ops did (``reset_comm_stats`` zeroes them)."""

    forward_calls: int = 0
    backward_calls: int = 0
    kv_blocks_sent: int = 0  # K/V blocks this rank sent (forward and backward)
    dkv_blocks_sent: int = 0  # dK/dV accumulators this rank sent
    steps_computed: int = 0
    steps_skipped: int = 0
    idle_padding_dropped: int = 0  # calls (forward or backward) whose key validity hid nothing


comm_stats = CommStats()


def reset_comm_stats() -> None:
    comm_stats.__init__()


# -- which steps run ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    num_steps: int  # ring steps run (K/V sent num_steps - 1 times)
    compute: tuple[tuple[bool, ...], ...]  # compute[rank][step]: whether the block can be seen


@functools.lru_cache(maxsize=128)
def step_plan(layout: Layout, rules: PositionRules) -> StepPlan:
    """Which ring steps hold any (query, key) pair the position rules allow, for every rank."""
    W = layout.world_size
    compute = tuple(
        tuple(
            rules.any_allowed(layout.positions(r), layout.positions((r - s) % W), layout.seq_len)
            for s in range(W)
        )
        for r in range(W)
    )
    needed = [s for s in range(W) if any(compute[r][s] for r in range(W))]
    num_steps = needed[-1] + 1 if needed else 1
    return StepPlan(num_steps, compute)


def describe_steps(layout: Layout, rank: int, mask: AttentionMask, plain_kernel: str | None,
                   masked_kernel: str) -> list[str]:  # fmt: skip
    """Each ring step of ``rank``: the block it computes, what kind it is and which kernel runs
    it (``explain``'s lines; the op decides the same way per step). Only which of ``mask``'s
    parts are present matters, so the passes describe theirs over graph nodes."""
    plan = step_plan(layout, mask.rules)
    W, n = layout.world_size, layout.local_len
    lines = []
    for s in range(plan.num_steps):
        src = (rank - s) % W
        where = "own block" if s == 0 else f"keys of rank {src}"
        if not plan.compute[rank][s]:
            lines.append(f"step {s} ({where}): empty, skipped")
            continue
        pieces = _block_pieces(layout, rank, src, mask)
        kind = describe_block(pieces, n, n)
        kernel = plain_kernel if pieces is not None and plain_kernel is not None else masked_kernel
        lines.append(f"step {s} ({where}): {kind} -> {kernel}")
    if mask.key_padding_mask is not None and not replace(mask, key_padding_mask=None).masked:
        lines.append("(key padding that hides no key on any rank is dropped at run time: the "
                     "steps are then plain)")
    return lines


def _block_pieces(layout: Layout, rank: int, src: int, mask: AttentionMask):
    """The block's plain pieces, or None where only per-element rules describe it."""
    if mask.masked:
        return None
    return layout_block_pieces(layout, rank, src, mask.rules.causal)


# -- communication -----------------------------------------------------------------------------
class _Ring:
    def __init__(self, pg: dist.ProcessGroup):
        self.pg = pg
        self.size = pg.size()
        self.rank = pg.rank()

    def peer(self, offset: int) -> int:
        return (self.rank + offset) % self.size

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], to: int, frm: int):
        ops = [dist.P2POp(dist.isend, t, group=self.pg, group_peer=to) for t in send]
        ops += [dist.P2POp(dist.irecv, t, group=self.pg, group_peer=frm) for t in recv]
        return dist.batch_isend_irecv(ops)

    def start_agreement(self, meta: list[int], what: list[str], device: torch.device,
                        extra: torch.Tensor | None = None):  # fmt: skip
        """Start a small all-gather of every rank's ``meta``; the returned function waits for it
        (on the host) and raises on every rank if any rank's differs, instead of hanging a send.
        ``extra``: int64 values computed on the device that ranks may differ in, gathered along;
        the function returns every rank's (W, len(extra)) on the host (None without).

        Waiting later lets the GPU work meanwhile: the host waits for the all-gather alone, not
        for the kernels queued before or after it (with ``extra``, also for the work before it)."""
        nccl = dist.get_backend(self.pg) == "nccl"
        mine = torch.tensor(meta, dtype=torch.int64)
        n_extra = 0 if extra is None else extra.numel()
        ready = _record_event(extra) if extra is not None and nccl else None
        # On NCCL, issued from the side stream: NCCL orders a collective after the work queued on
        # the issuing stream, which on the current stream is everything queued so far (calls back
        # to back: the previous call's whole backward), and the host would wait for all of it
        # (measured: 0.1-0.3 ms per call at W = 2).
        side = torch.cuda.stream(_side_stream(device)) if nccl else contextlib.nullcontext()
        with side:
            if nccl:
                mine = mine.to(device, non_blocking=True)
            if extra is not None:
                if ready is not None:
                    _side_stream(device).wait_event(ready)
                    extra.record_stream(_side_stream(device))
                mine = torch.cat([mine, extra.reshape(-1)])
            table = mine.new_empty(self.size * mine.numel())  # flat: gloo takes no other shape
            work = all_gather_single(table, mine, group=self.pg, async_op=True)

        def verify() -> torch.Tensor | None:
            if nccl:
                # A copy, no kernel: a kernel would queue behind the attention kernel's programs.
                with torch.cuda.stream(_side_stream(device)):
                    work.wait()
                    host = table.cpu()
            else:
                work.wait()
                host = table
            host = host.view(self.size, len(meta) + n_extra)
            self._raise_on_disagreement(host[:, :len(meta)], what)
            return host[:, len(meta):] if extra is not None else None

        return verify

    def _raise_on_disagreement(self, table: torch.Tensor, what: list[str]) -> None:
        bad = (table != table[0]).any(0)
        if bad.any():
            rows = ", ".join(
                f"{what[i]}: " + " / ".join(f"rank {r}={int(table[r, i])}" for r in range(self.size))
                for i in bad.nonzero().flatten().tolist()
            )
            raise ValueError(
                "ring_attention: ranks of the ring disagree on "
                + rows
                + ". Every rank must call it with the same shapes and options (shard the sequence "
                "with one Layout so every rank holds the same number of tokens)."
            )


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=-1)


def _record_event(t: torch.Tensor) -> torch.cuda.Event | None:
    """An event at the current point of ``t``'s stream (None off CUDA: gloo is synchronous)."""
    if not t.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


@contextlib.contextmanager
def _issued_after(event: torch.cuda.Event | None, device: torch.device):
    """Issue collectives from a side stream that has waited for ``event`` only, so they depend on
    the work before it and not on kernels queued since."""
    if event is None:
        yield
        return
    stream = _side_stream(device)
    stream.wait_event(event)
    with torch.cuda.stream(stream):
        yield


@functools.lru_cache(maxsize=256)
def _positions(layout: Layout, rank: int, device: torch.device) -> torch.Tensor:
    """A rank's global positions on ``device``, made once (read-only: BlockMasks share them)."""
    return layout.positions(rank, device)


def _wait(works) -> None:
    for w in works or ():
        w.wait()


# -- one call's context --------------------------------------------------------------------------
def _dtype_code(dtype: torch.dtype) -> int:
    return [torch.float16, torch.bfloat16, torch.float32, torch.float64].index(dtype)


@dataclass
class _Call:
    """What forward and backward share: the ring, the layout, the plan, the mask facts."""

    ring: _Ring | None
    layout: Layout
    plan: StepPlan
    rank: int
    seq_len: int
    mask: AttentionMask
    dense_offset: torch.Tensor | None  # (B|1, H|1, S_local) of an additive dense mask (BlockMask)
    facts: torch.Tensor | None  # (2, B, S_local) int64: document id, key validity (they travel)
    key_bias: torch.Tensor | None  # (B|1, H|1, 1, S_local): AttentionMask.key_bias (it travels)
    kernels: str  # the kernel choice (``ringcompile.kernels.select_kernels``)

    @classmethod
    def make(cls, q, mask: AttentionMask, layout_name: str, seq_len: int, group_name: str,
             kernels: str) -> _Call:  # fmt: skip
        pg = resolve_group_name(group_name)
        ring = _Ring(pg) if pg is not None else None
        layout = make_layout(layout_name, seq_len, ring.size if ring else 1)
        return cls.at_rank(q, mask, layout, ring.rank if ring else 0, kernels, ring)

    @classmethod
    def at_rank(cls, q, mask: AttentionMask, layout: Layout, rank: int, kernels: str,
                ring: _Ring | None = None) -> _Call:  # fmt: skip
        """``rank``'s call in ``layout``'s ring (``ring`` None: one rank's part computed alone,
        as the benchmarks simulate it)."""
        seq_len = layout.seq_len
        facts = _token_facts(mask, q.shape[0], q.shape[2], q.device)
        offset = None
        if mask.dense is not None and mask.dense.dtype != torch.bool:
            offset = _row_offsets(mask.dense, layout, rank, seq_len, mask.rules)
        bias = mask.key_bias.contiguous() if mask.key_bias is not None else None
        return cls(ring=ring, layout=layout, plan=step_plan(layout, mask.rules), rank=rank,
                   seq_len=seq_len, mask=mask, dense_offset=offset, facts=facts, key_bias=bias,
                   kernels=kernels)

    def source(self, step: int) -> int:
        return (self.rank - step) % self.layout.world_size

    def padding_hides(self) -> torch.Tensor | None:
        """(1,) int64 on the device: whether this rank's key validity hides a key (None without
        one)."""
        kp = self.mask.key_padding_mask
        if kp is None:
            return None
        # a layout's padding slots (past seq_len) are no keys: the rules hide them anyway
        real = _positions(self.layout, self.rank, kp.device) < self.seq_len
        return (~kp & real).any().to(torch.int64).reshape(1)

    def drop_idle_padding(self) -> None:
        """No rank's key validity hides a key: the blocks are what the other facts make them
        (plain under position rules alone), and only document ids travel, if any. Called before
        anything travels."""
        self.mask = replace(self.mask, key_padding_mask=None)
        self.facts = _token_facts(self.mask, *self.facts.shape[1:], self.facts.device)
        comm_stats.idle_padding_dropped += 1

    def settle_padding(self, every_rank: torch.Tensor | None = None) -> None:
        """Drop the key validity if it hides no key on any rank. ``every_rank``: each rank's
        ``padding_hides()`` as the agreement gathered them; else the ring is asked now (one tiny
        all-gather; the host waits for it)."""
        if every_rank is None:
            every_rank = self.padding_hides()
            if every_rank is None:
                return
            if self.ring is not None:
                every_rank = self.ring.start_agreement([], [], every_rank.device,
                                                       extra=every_rank)()  # fmt: skip
        if not bool(every_rank.any()):
            self.drop_idle_padding()

    def traveling(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """What goes round the ring: K, V and the keys' per-token facts."""
        return [k, v] + [t for t in (self.facts, self.key_bias) if t is not None]

    def block_mask(self, step: int, blocks: list[torch.Tensor], device) -> BlockMask:
        """Step ``step``'s mask, over the keys of ``blocks`` (``traveling``'s list as it came)."""
        src = self.source(step)
        k_pos = _positions(self.layout, src, torch.device(device))
        k_facts = blocks[2] if self.facts is not None else None
        dense = None
        if self.mask.dense is not None:
            # global columns of the source rank's keys; padding keys are masked by seq_len anyway
            dense = self.mask.dense.index_select(-1, k_pos.clamp(max=self.seq_len - 1))
        elif self.key_bias is not None:
            dense = blocks[-1]  # (B|1, H|1, 1, Sk): the keys' bias, the same for every query
        return BlockMask(
            q_pos=_positions(self.layout, self.rank, torch.device(device)),
            k_pos=k_pos,
            seq_len=self.seq_len,
            rules=self.mask.rules,
            q_doc=self.facts[0] if self.facts is not None else None,
            k_doc=k_facts[0] if k_facts is not None else None,
            k_valid=k_facts[1] if k_facts is not None else None,
            dense=dense,
            dense_offset=self.dense_offset,
            positions_key=(self.layout, self.rank, src),
            pieces=self.block_pieces(self.rank, src),
        )

    def block_pieces(self, rank: int, src: int):
        """The plain pieces of ``rank``'s block of ``src``'s keys, or None (masked)."""
        return _block_pieces(self.layout, rank, src, self.mask)

    def first_hop_dtype(self, sender: int, fused: bool, dtype: torch.dtype,
                        acc: torch.dtype) -> torch.dtype:  # fmt: skip
        """The dtype of the dK/dV accumulator ``sender`` passes on after ring step 1. It holds at
        most one contribution per element when that step's block is skipped, or is plain pieces
        over disjoint keys for a fused kernel, which returns them in the inputs' dtype: sent as
        they are, the hop carries the same values in half the bytes. Every rank works it out
        for its sender the same way, from the layout alone."""
        if not fused or dtype == acc:
            return acc
        if not self.plan.compute[sender][1]:
            return dtype  # zeros
        pieces = self.block_pieces(sender, (sender - 1) % self.layout.world_size)
        if pieces is None:
            return acc
        return dtype if disjoint((p.key_start, p.key_stop) for p in pieces) else acc

    def computed_steps(self) -> list[int]:
        row = self.plan.compute[self.rank]
        return [s for s in range(self.plan.num_steps) if row[s]]


def _token_facts(mask: AttentionMask, B: int, S: int, device) -> torch.Tensor | None:
    """(2, B, S_local) int64 document ids and key validity, which travel with K/V (None
    without either)."""
    doc, ok = mask.document_ids, mask.key_padding_mask
    if doc is None and ok is None:
        return None
    doc = doc if doc is not None else torch.zeros((B, S), dtype=torch.int64, device=device)
    ok = ok if ok is not None else torch.ones((B, S), dtype=torch.bool, device=device)
    return torch.stack([doc.to(torch.int64), ok.to(torch.int64)])


def _row_offsets(dense: torch.Tensor, layout: Layout, rank: int, seq_len: int,
                 rules: PositionRules) -> torch.Tensor:  # fmt: skip
    """Each row's largest additive mask value over the keys the position rules let it see (0
    where it sees none, or only -inf): ``BlockMask.dense_offset``."""
    device = dense.device
    q_pos = _positions(layout, rank, device)
    seen = rules.allows(q_pos[:, None], torch.arange(seq_len, device=device)[None, :], seq_len)
    top = dense.masked_fill(~seen, float("-inf")).amax(-1)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


# -- forward -----------------------------------------------------------------------------------
def _ring_forward(q, k, v, mask: AttentionMask, scale, layout, seq_len, group_name, kernels):
    call = _Call.make(q, mask, layout, seq_len, group_name, kernels)
    ring = call.ring
    verify = None
    if ring is not None:
        B, H, S, D = q.shape
        agree = [("batch", B), ("heads", H), ("kv_heads", k.shape[1]),
                 ("local sequence length", S), ("head dim", D), ("dtype", _dtype_code(q.dtype)),
                 ("seq_len", seq_len), *mask.agreement()]  # fmt: skip
        hides = call.padding_hides()
        verify = ring.start_agreement([v for _, v in agree], [w for w, _ in agree], q.device,
                                      extra=hides)  # fmt: skip
        if hides is not None:
            # Settled before the own block, which would otherwise run on the masked kernel: the
            # host then waits for the GPU's earlier work, a far smaller cost (a launch's gap)
            call.settle_padding(verify())
            verify = None
    else:
        call.settle_padding()
    kernels = select_kernels(q, call.kernels)
    state = kernels.forward_init(q)
    computed = call.computed_steps()
    blocks = call.traveling(k, v)
    n = call.plan.num_steps
    comm_stats.forward_calls += 1

    def compute(s: int) -> None:
        if s in computed:
            mask = call.block_mask(s, blocks, q.device)
            kernels.forward_step(state, q, blocks[0], blocks[1], mask, scale, last=s == computed[-1])
            comm_stats.steps_computed += 1
        else:
            comm_stats.steps_skipped += 1

    for s in range(n):
        # Step 0 is this rank's own block: it computes while the agreement check completes, and
        # nothing is sent before the check has passed.
        check_first = s == 0 and verify is not None
        # The receive buffers come before the step's kernels. The first receive runs on the side
        # stream, ordered after the inputs only: a buffer allocated after the own block's kernels
        # were queued could reuse memory they still use (their temporaries, freed when queued, as
        # the caching allocator sees one stream), and NCCL would write into it under them.
        incoming = [torch.empty_like(t) for t in blocks] if s + 1 < n else None
        if check_first:
            inputs_ready = _record_event(q)
            compute(s)
            verify()
        works = None
        if s + 1 < n:
            # NCCL waits for the work queued on the issuing stream: issued after the own block's
            # kernel, the first send would wait for it and then run alone.
            with _issued_after(inputs_ready if check_first else None, q.device):
                works = ring.exchange(blocks, incoming, ring.peer(1), ring.peer(-1))
            comm_stats.kv_blocks_sent += 1
        if not check_first:
            compute(s)
        if works is not None:
            _wait(works)
            blocks = incoming
    out, lse = kernels.forward_finish(state, q.dtype)
    if mask.empty_rows_mean:
        out = _EmptyRows(call, q, k, v, lse).forward(out)
    return out, lse


# -- rows that see no key, under a mask that gives them the mean of every value ----------------
class _EmptyRows:
    """Rows the facts leave with no key, where SDPA under a mask that fills hidden keys with
    finfo.min rounds every score of the row to that one value: uniform weights over all keys.

    The ring gives such rows 0 and lse -inf; this adds what SDPA gives, from sums over every key
    of the sequence, each one all-reduced over the ring (rows are few, so no kernel needs to know):
    forward, the mean of V; backward, with P = 1/S and dS = P (dO . v - dO . out), as SDPA's
    backward differentiates through the rounded add: dq = scale/S (dO V^T K - (dO . out) sum K),
    dk_j = scale/S (sum_i (dO_i . v_j) q_i - sum_i (dO_i . out_i) q_i), dv_j = 1/S sum_i dO_i.
    """

    def __init__(self, call: _Call, q, k, v, lse):
        self.call, self.q, self.k, self.v = call, q, k, v
        self.acc = accumulation_dtype(q.dtype)
        pos = _positions(call.layout, call.rank, q.device)
        self.real = (pos < call.seq_len)[:, None].to(self.acc)  # (S_local, 1): keys (and rows) < seq_len
        B, H, S = lse.shape
        self.G = H // k.shape[1]
        # (B, Hkv, G, S, 1): this rank's empty rows (layout padding rows are dropped anyway)
        empty = torch.isneginf(lse) & (pos < call.seq_len)
        self.empty = empty.view(B, k.shape[1], self.G, S, 1).to(self.acc)

    def _sum(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each of ``parts`` summed over the ring (one all-reduce)."""
        flat = torch.cat([p.reshape(-1) for p in parts])
        if self.call.ring is not None:
            dist.all_reduce(flat, group=self.call.ring.pg)
        return list(flat.split([p.numel() for p in parts]))

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        B, H, S, D = t.shape
        return t.to(self.acc).view(B, H // self.G, self.G, S, D)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        v = self.v.to(self.acc) * self.real
        (total,) = self._sum([v.sum(2)])
        mean = total.view(v.shape[0], v.shape[1], 1, 1, v.shape[3]) / self.call.seq_len
        filled = self._grouped(out) * (1 - self.empty) + mean * self.empty
        return filled.view(out.shape).to(out.dtype)

    def backward(self, dout, out, scale: float, dq: torch.Tensor, dk: torch.Tensor,
                 dv: torch.Tensor) -> None:  # fmt: skip
        """Adds the empty rows' gradients to the accumulators ``dq``, ``dk``, ``dv`` in place."""
        q, o = self._grouped(self.q), self._grouped(out)
        k, v = self.k.to(self.acc) * self.real, self.v.to(self.acc) * self.real
        do = self._grouped(dout) * self.empty
        delta = (do * o).sum(-1, keepdim=True)  # (B, Hkv, G, S, 1)
        vk, k_sum, q_do, dq_sum, do_sum = self._sum([
            torch.einsum("bhsv,bhsk->bhvk", v, k), k.sum(2), torch.einsum("bhgsk,bhgsv->bhkv", q, do),
            (delta * q).sum((2, 3)), do.sum((2, 3))])  # fmt: skip
        B, Hkv, _, S, D = q.shape
        vk, q_do = vk.view(B, Hkv, -1, D), q_do.view(B, Hkv, D, -1)
        c = scale / self.call.seq_len
        dq += (c * (torch.einsum("bhgsv,bhvk->bhgsk", do, vk)
                    - delta * k_sum.view(B, Hkv, 1, 1, D))).view(dq.shape)  # fmt: skip
        dk += self.real * c * (torch.einsum("bhkv,bhsv->bhsk", q_do, v)
                               - dq_sum.view(B, Hkv, 1, D))  # fmt: skip
        dv += self.real * do_sum.view(B, Hkv, 1, -1) / self.call.seq_len


# -- backward ----------------------------------------------------------------------------------
def _own_block_parts(seq: int) -> list[tuple[int, int]]:
    """Key ranges of the own block's two backward parts: the later keys (less work under causal
    masks) first, while the first remote block arrives; the rest last, while the accumulators'
    last hop travels. Split at a multiple of 128 (a kernel tile) where there is room."""
    half = seq // 2
    if half >= 128:
        half -= half % 128
    if half == 0:
        return [(0, seq)]
    return [(half, seq), (0, half)]


def _own_block_head_parts(kv_heads: int) -> list[tuple[int, int]]:
    """KV-head ranges of the own block's two backward parts when the block goes whole to a fused
    kernel: cut by keys, a causal block becomes three fused calls and the engine's passes between
    them (3.46 ms against 2.82 for the one call, 8k tokens, H200); cut by heads, each half is one
    call on its own rows of dq and its own dK/dV."""
    half = kv_heads // 2
    return [(0, half), (half, kv_heads)] if half else [(0, kv_heads)]


def _own_parts(kernels, own_mask: BlockMask, kv_shape, n: int) -> list[tuple[int, int, int, int]]:
    """The own block's backward parts as (first KV head, last KV head + 1, first key, last key +
    1): by heads where the block is plain pieces for a fused kernel, else by keys; one part when
    the ring has one step."""
    Hkv, Sk = kv_shape[1], kv_shape[2]
    if n == 1:
        return [(0, Hkv, 0, Sk)]
    if own_mask.pieces is not None and kernels_fuse_plain(kernels) and Hkv >= 2:
        return [(h0, h1, 0, Sk) for h0, h1 in _own_block_head_parts(Hkv)]
    return [(0, Hkv, lo, hi) for lo, hi in _own_block_parts(Sk)]


def _own_part_backward(kernels, part, q, k, v, dout, out, lse, prepared, own_mask: BlockMask,
                       scale: float, dq: GradSum, own_dk: GradSum, own_dv: GradSum) -> None:  # fmt: skip
    """One part of the own block's backward, into the sums of dq and of the own block's dK/dV."""
    kh0, kh1, lo, hi = part
    Hkv = k.shape[1]
    if (kh0, kh1) == (0, Hkv):
        keys = (slice(None), slice(None), slice(lo, hi))
        kernels.backward_step(q, k[keys], v[keys], dout, lse, prepared, own_mask.keys(lo, hi),
                              scale, dq, own_dk.part(keys), own_dv.part(keys))  # fmt: skip
        return
    G = q.shape[1] // Hkv
    qh, kvh = (slice(None), slice(kh0 * G, kh1 * G)), (slice(None), slice(kh0, kh1))
    kernels.backward_step(q[qh], k[kvh], v[kvh], dout[qh], lse[qh],
                          kernels.backward_prepare(out[qh], dout[qh]), own_mask, scale,
                          dq.part(qh), own_dk.part(kvh), own_dv.part(kvh))  # fmt: skip


def _dkv_sums(k: torch.Tensor, v: torch.Tensor, acc: torch.dtype) -> list[GradSum]:
    return [GradSum(k.shape, acc, k.device), GradSum(v.shape, acc, v.device)]


def _ring_backward(dout, q, k, v, out, lse, mask: AttentionMask, scale, layout, seq_len,
                   group_name, kernels):
    call = _Call.make(q, mask, layout, seq_len, group_name, kernels)
    call.settle_padding()  # (as the forward settled it: the same facts)
    ring = call.ring
    kernels = select_kernels(q, call.kernels)
    acc = accumulation_dtype(q.dtype)
    dout = dout.contiguous()
    prepared = kernels.backward_prepare(out, dout)
    # Gradients are sums over steps (kernels.grad_sum): a fused kernel's contributions stay as it
    # returned them until a sum needs a pass, so at W = 2 each element is summed in one.
    dq = GradSum(q.shape, acc, q.device)
    computed = call.computed_steps()
    blocks = call.traveling(k, v)
    n = call.plan.num_steps
    comm_stats.backward_calls += 1

    # The own block's dK/dV never travels: its contribution is computed in two parts, the first
    # before any remote block and the last after, and it receives the other ranks' sum at the end.
    own_mask = call.block_mask(0, blocks, q.device) if 0 in computed else None
    own_dkv = _dkv_sums(k, v, acc)
    own_parts = _own_parts(kernels, own_mask, k.shape, n) if own_mask is not None else []

    def own_part(i: int) -> None:
        if i < len(own_parts):
            _own_part_backward(kernels, own_parts[i], q, k, v, dout, out, lse, prepared, own_mask,
                               scale, dq, *own_dkv)  # fmt: skip

    def exchange_blocks(s: int):
        if s + 1 >= n:
            return None, None
        incoming = [torch.empty_like(t) for t in blocks]
        comm_stats.kv_blocks_sent += 1
        return ring.exchange(blocks, incoming, ring.peer(1), ring.peer(-1)), incoming

    kv_works, kv_incoming = exchange_blocks(0)
    own_part(0)
    if own_mask is not None:
        comm_stats.steps_computed += 1
    else:
        comm_stats.steps_skipped += 1
    # The accumulators of block b start on rank b + 1 (step 1) and gather one contribution per
    # step; after step n - 1 they go home to rank b.
    chain_works, chain_incoming = None, None
    fused = kernels_fuse_plain(kernels)
    for s in range(1, n):
        _wait(kv_works)
        blocks = kv_incoming
        kv_works, kv_incoming = exchange_blocks(s)
        dkv = _dkv_sums(k, v, acc)
        if s in computed:
            mask = call.block_mask(s, blocks, q.device)
            kernels.backward_step(q, blocks[0], blocks[1], dout, lse, prepared, mask, scale, dq,
                                  *dkv)  # fmt: skip
            comm_stats.steps_computed += 1
        else:
            comm_stats.steps_skipped += 1
        if s > 1:  # the previous rank's accumulators, waited for after this step's kernels
            _wait(chain_works)
            for d, came in zip(dkv, chain_incoming):
                d.add(came)
        # the first hop may travel in the inputs' dtype (first_hop_dtype), later ones in fp32
        hop = call.first_hop_dtype(call.rank, fused, q.dtype, acc) if s == 1 else acc
        send = [d.result(hop) for d in dkv]
        # what arrives: the sender's first hop at step 1, accumulators after
        sender = ring.peer(-1) if s + 1 < n else ring.peer(n - 1)
        dtype = call.first_hop_dtype(sender, fused, q.dtype, acc) if s == 1 else acc
        chain_incoming = [torch.empty(t.shape, dtype=dtype, device=t.device) for t in (k, v)]
        if s + 1 < n:
            chain_works = ring.exchange(send, chain_incoming, ring.peer(1), ring.peer(-1))
        else:  # home: the block came from rank - (n - 1)
            chain_works = ring.exchange(send, chain_incoming, ring.peer(1 - n), ring.peer(n - 1))
        comm_stats.dkv_blocks_sent += 1
    own_part(1)
    if call.mask.empty_rows_mean:  # (into the own block's dK/dV, while the last hop travels)
        _EmptyRows(call, q, k, v, lse).backward(dout, out, scale, dq.accumulator(),
                                                *(d.accumulator() for d in own_dkv))  # fmt: skip
    dq = dq.result(q.dtype)
    if n > 1:
        _wait(chain_works)
        for d, came in zip(own_dkv, chain_incoming):
            d.add(came)
    dk, dv = (d.result(k.dtype) for d in own_dkv)  # distinct sums: the outputs alias nothing
    return dq, dk, dv


# -- the torch.library ops ---------------------------------------------------------------------
# Not for CUDA graphs: the ring waits on the host for its agreement check and issues its sends
# from Python. Tagged, inductor's "reduce-overhead" leaves them out of its graphs.
_NOT_CUDAGRAPHS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)


# The mask crosses this boundary encoded (``AttentionMask.encode``): its tensors, then its rules.
@torch.library.custom_op("ringcompile::ring_attention", mutates_args=(), tags=_NOT_CUDAGRAPHS)
def ring_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_tensors: list[torch.Tensor | None],
    mask_rules: list[int],
    scale: float,
    layout: str,
    seq_len: int,
    group_name: str,
    kernels: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention on local shards; returns (out, lse). Use ``ringcompile.ring_attention``."""
    return _ring_forward(q, k, v, AttentionMask.decode(mask_tensors, mask_rules), scale, layout,
                         seq_len, group_name, kernels)


@ring_attention_op.register_fake
def _(q, k, v, *rest):
    B, H, S, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("ringcompile::ring_attention_backward", mutates_args=(),
                         tags=_NOT_CUDAGRAPHS)
def ring_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask_tensors: list[torch.Tensor | None],
    mask_rules: list[int],
    scale: float,
    layout: str,
    seq_len: int,
    group_name: str,
    kernels: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ring_backward(dout, q, k, v, out, lse, AttentionMask.decode(mask_tensors, mask_rules),
                          scale, layout, seq_len, group_name, kernels)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask_tensors, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *mask_tensors)
    ctx.options = options
    ctx.num_inputs = len(inputs)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *mask_tensors = ctx.saved_tensors
    dq, dk, dv = ring_attention_backward_op(dout, q, k, v, out, lse, mask_tensors, *ctx.options)
    # the mask and options get no gradient (an additive dense mask is treated as a constant)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)

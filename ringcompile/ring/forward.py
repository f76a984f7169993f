"""The forward schedule: this rank's queries against every rank's keys, one ring step at a time.

A small all-gather first checks that every rank agrees on shapes and options (a mismatch raises
on every rank instead of hanging a send; the host waits for it while the rank's own block
computes). Then for each step the next block is already in flight (double-buffered exchanges)
while this one is computed, and each block is merged into the running (out, lse).
"""

from __future__ import annotations

import torch

from ringcompile.kernels import select_kernels
from ringcompile.masks import AttentionMask
from ringcompile.ring import balance, events
from ringcompile.ring.call import RankCall
from ringcompile.ring.comm import issued_after, record_event, token_major, wait_all
from ringcompile.ring.empty_rows import EmptyRows

__all__ = ["agreement", "ring_forward"]

_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def agreement(q, k, seq_len: int, mask: AttentionMask) -> list[tuple[str, int]]:
    """What every rank of a call must state alike, as (what, value)."""
    B, H, S, D = q.shape
    return [("batch", B), ("heads", H), ("kv_heads", k.shape[1]), ("local sequence length", S),
            ("head dim", D), ("dtype", _DTYPE_CODES.index(q.dtype)), ("seq_len", seq_len),
            ("K/V laid out (B, S, H, D)", int(token_major(k))), *mask.agreement()]  # fmt: skip


def in_layout_of(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` with ``q``'s strides (``torch.empty_like(q)``'s, what the op's fake returns): a
    model that gave its queries token-major reads the output token-major, with no copy."""
    if out.stride() == q.stride():
        return out
    return torch.empty_like(q).copy_(out)


def ring_forward(call: RankCall, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    ring, mask = call.ring, call.mask
    verify = None
    if ring.size > 1:
        agree = agreement(q, k, call.seq_len, mask)
        hides = call.padding_hides()
        verify = ring.start_agreement([v for _, v in agree], [w for w, _ in agree], q.device,
                                      extra=hides.mine if hides else None,
                                      ready=hides.ready if hides else None)  # fmt: skip
        if hides is not None:
            # Settled before the own block, which would otherwise run on the masked kernel: the
            # host waits for the all-gather, which waits for the GPU's work only up to the point
            # where this tensor's answer was first computed (``RankCall.padding_hides``)
            call.settle_padding(verify())
            verify = None
    else:
        call.settle_padding()
    if balance.listening() and ring.size > 1 and call.facts is not None:
        balance.record(ring, call.layout, call.mask, call.facts)
    kernels = select_kernels(q, call.kernels)
    state = kernels.forward_init(q)
    computed = call.computed_steps()
    blocks = call.traveling(k, v)
    n = len(call.steps)
    events.record("forward_calls")

    def compute(s: int) -> None:
        if s in computed:
            block = call.block_mask(s, blocks, q.device)
            kernels.forward_step(state, q, blocks[0], blocks[1], block, scale,
                                 last=s == computed[-1])  # fmt: skip
            events.record("steps_computed")
        else:
            events.record("steps_skipped")

    inputs_ready = None
    for s in range(n):
        # Step 0 is this rank's own block: it computes while the agreement check completes, and
        # nothing is sent before the check has passed.
        check_first = s == 0 and verify is not None
        # The receive buffers come before the step's kernels. The first receive runs on the side
        # stream, ordered after the inputs only: a buffer allocated after the own block's kernels
        # were queued could reuse memory they still use (their temporaries, freed when queued, as
        # the caching allocator sees one stream), and NCCL would write into it under them.
        if check_first:
            inputs_ready = record_event(q)
            compute(s)
            verify()
        works = incoming = None
        if s + 1 < n:
            # NCCL waits for the work queued on the issuing stream: issued after the own block's
            # kernel, the first send would wait for it and then run alone.
            with issued_after(inputs_ready if check_first else None, q.device):
                works, incoming = call.pass_on(blocks)
            events.record("kv_blocks_sent")
        if not check_first:
            compute(s)
        if works is not None:
            wait_all(works)
            blocks = incoming
    out, lse = kernels.forward_finish(state, q.dtype)
    if mask.empty_rows_mean:
        out = EmptyRows(call, q, k, v, lse).forward(out)
    return in_layout_of(out, q), lse

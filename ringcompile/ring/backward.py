"""The backward schedule: K/V travel again, and fp32 dK/dV accumulators travel one step behind.

After the last step each accumulator goes straight to the rank that owns its block. The own
block's contribution never travels: it is computed in two parts, one while the first remote block
arrives and one while the accumulators' last hop travels, so no transfer waits alone at either
end. Gradients are sums over steps (``kernels.grad_sum``): a fused kernel's contributions stay as
it returned them until a sum needs a pass, so at W = 2 each element is summed in one.
"""

from __future__ import annotations

import torch

from ringcompile.kernels import BlockEngine, accumulation_dtype, select_kernels
from ringcompile.kernels.grad_sum import GradSum
from ringcompile.masks import BlockMask
from ringcompile.ring import events
from ringcompile.ring.call import RankCall
from ringcompile.ring.comm import token_major, wait_all
from ringcompile.ring.empty_rows import EmptyRows

__all__ = ["dkv_sums", "own_part_backward", "own_parts", "ring_backward"]


def ring_backward(call: RankCall, dout, q, k, v, out, lse, scale: float):
    call.settle_padding()  # (as the forward settled it: the same facts)
    ring = call.ring
    kernels = select_kernels(q, call.kernels)
    acc = accumulation_dtype(q.dtype)
    if not (dout.is_contiguous() or token_major(dout)):
        dout = dout.contiguous()
    prepared = kernels.backward_prepare(out, dout)
    computed = call.computed_steps()
    blocks = call.traveling(k, v)
    n = len(call.steps)
    # On a ring of one the own block's single kernel call is the whole of each gradient: a
    # kernel that overwrites one may write it in the inputs' dtype (``GradSum``'s sole_dtype).
    sole = q.dtype if n == 1 and not call.mask.empty_rows_mean else None
    dq = GradSum(q.shape, acc, q.device, sole)
    events.record("backward_calls")

    # The own block's dK/dV never travels: its contribution is computed in two parts, the first
    # before any remote block and the last after, and it receives the other ranks' sum at the end.
    own_mask = call.block_mask(0, blocks, q.device) if 0 in computed else None
    own_dkv = dkv_sums(k, v, acc, sole)
    parts = own_parts(kernels, own_mask, k.shape, n) if own_mask is not None else []

    def own_part(i: int) -> None:
        if i < len(parts):
            own_part_backward(kernels, parts[i], q, k, v, dout, out, lse, prepared, own_mask, scale,
                              dq, *own_dkv)  # fmt: skip

    def exchange_blocks(s: int):
        if s + 1 >= n:
            return None, None
        events.record("kv_blocks_sent")
        return call.pass_on(blocks)

    kv_works, kv_incoming = exchange_blocks(0)
    own_part(0)
    if own_mask is not None:
        events.record("steps_computed")
    else:
        events.record("steps_skipped")
    # The accumulators of block b start on rank b + 1 (step 1) and gather one contribution per
    # step; after step n - 1 they go home to rank b.
    chain_works, chain_incoming = None, None
    fused = kernels.fused_plain
    for s in range(1, n):
        wait_all(kv_works)
        blocks = kv_incoming
        kv_works, kv_incoming = exchange_blocks(s)
        dkv = dkv_sums(k, v, acc)
        if s in computed:
            mask = call.block_mask(s, blocks, q.device)
            kernels.backward_step(q, blocks[0], blocks[1], dout, lse, prepared, mask, scale, dq,
                                  *dkv)  # fmt: skip
            events.record("steps_computed")
        else:
            events.record("steps_skipped")
        if s > 1:  # the previous rank's accumulators, waited for after this step's kernels
            wait_all(chain_works)
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
        events.record("dkv_blocks_sent")
    own_part(1)
    if call.mask.empty_rows_mean:  # (into the own block's dK/dV, while the last hop travels)
        EmptyRows(call, q, k, v, lse).backward(dout, out, scale, dq.accumulator(),
                                               *(d.accumulator() for d in own_dkv))  # fmt: skip
    dq = dq.result(q.dtype)
    if n > 1:
        wait_all(chain_works)
        for d, came in zip(own_dkv, chain_incoming):
            d.add(came)
    dk, dv = (d.result(k.dtype) for d in own_dkv)  # distinct sums: the outputs alias nothing
    return dq, dk, dv


def own_block_key_parts(seq: int) -> list[tuple[int, int]]:
    """Key ranges of the own block's two backward parts: the later keys (less work under causal
    masks) first, while the first remote block arrives; the rest last, while the accumulators'
    last hop travels. Split at a multiple of 128 (a kernel tile) where there is room."""
    half = seq // 2
    if half >= 128:
        half -= half % 128
    if half == 0:
        return [(0, seq)]
    return [(half, seq), (0, half)]


def own_block_head_parts(kv_heads: int) -> list[tuple[int, int]]:
    """KV-head ranges of the own block's two backward parts when the block goes whole to a fused
    kernel: cut by keys, a causal block becomes three fused calls and the engine's passes between
    them (slower than the one call: benchmarks/RESULTS.md); cut by heads, each half is one call on
    its own rows of dq and its own dK/dV."""
    half = kv_heads // 2
    return [(0, half), (half, kv_heads)] if half else [(0, kv_heads)]


def own_parts(kernels: BlockEngine, own_mask: BlockMask, kv_shape,
              n: int) -> list[tuple[int, int, int, int]]:  # fmt: skip
    """The own block's backward parts as (first KV head, last KV head + 1, first key, last key +
    1): by heads where the block goes whole to a fused kernel (plain pieces, or a varlen block for a
    varlen kernel, whose segments then serve both parts), else by keys; one part when the ring
    has one step."""
    Hkv, Sk = kv_shape[1], kv_shape[2]
    if n == 1:
        return [(0, Hkv, 0, Sk)]
    if kernels.fused(own_mask) and Hkv >= 2:
        return [(h0, h1, 0, Sk) for h0, h1 in own_block_head_parts(Hkv)]
    return [(0, Hkv, lo, hi) for lo, hi in own_block_key_parts(Sk)]


def own_part_backward(kernels: BlockEngine, part, q, k, v, dout, out, lse, prepared,
                      own_mask: BlockMask, scale: float, dq: GradSum, own_dk: GradSum,
                      own_dv: GradSum) -> None:  # fmt: skip
    """One part of the own block's backward, into the sums of dq and of the own block's dK/dV."""
    kh0, kh1, lo, hi = part
    Hkv = k.shape[1]
    if (kh0, kh1) == (0, Hkv):
        keys = (slice(None), slice(None), slice(lo, hi))
        mask = own_mask if (lo, hi) == (0, k.shape[2]) else own_mask.keys(lo, hi)
        kernels.backward_step(q, k[keys], v[keys], dout, lse, prepared, mask, scale, dq,
                              own_dk.part(keys), own_dv.part(keys))  # fmt: skip
        return
    G = q.shape[1] // Hkv
    qh, kvh = (slice(None), slice(kh0 * G, kh1 * G)), (slice(None), slice(kh0, kh1))
    kernels.backward_step(q[qh], k[kvh], v[kvh], dout[qh], lse[qh],
                          kernels.backward_prepare(out[qh], dout[qh]), own_mask, scale,
                          dq.part(qh), own_dk.part(kvh), own_dv.part(kvh))  # fmt: skip


def dkv_sums(k: torch.Tensor, v: torch.Tensor, acc: torch.dtype,
             sole_dtype: torch.dtype | None = None) -> list[GradSum]:  # fmt: skip
    return [GradSum(t.shape, acc, t.device, sole_dtype) for t in (k, v)]

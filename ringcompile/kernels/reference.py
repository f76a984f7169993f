"""Block attention in plain PyTorch: any dtype and device, the reference the Triton kernels answer to.

Scores are materialised per (query block, key block) pair, so memory is B*H*Sq*Sk of the
accumulation dtype per step; the ring op calls it with local blocks only.
"""

from __future__ import annotations

import torch

from ringcompile.kernels.grad_sum import accumulators
from ringcompile.kernels.interface import ForwardState, finish_forward
from ringcompile.masks import BlockMask


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    # (B, H, S, D) -> (B, Hkv, G, S, D): query head i reads KV head i // G, as SDPA's enable_gqa.
    B, H, S, D = q.shape
    return q.reshape(B, hkv, H // hkv, S, D)


def _scores(q, k, mask: BlockMask, scale: float,
            acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Masked scores (B, Hkv, G, Sq, Sk), disallowed pairs -inf; and under a soft cap the cap's
    derivative per score (None without one)."""
    hkv = k.shape[1]
    s = torch.matmul(_grouped(q.to(acc), hkv), k.to(acc)[:, :, None].transpose(-1, -2)) * scale
    cap_grad = None
    if mask.softcap:
        t = torch.tanh(s / mask.softcap)
        s, cap_grad = t * mask.softcap, 1 - t * t
    allowed = mask.allowed()[:, None, None]  # (B|1, 1, 1, Sq, Sk)
    if mask.dense is not None:
        dense = mask.dense
        Bm, Hm = dense.shape[:2]
        dense = dense.reshape(Bm, hkv, Hm // hkv, *dense.shape[2:]) if Hm > 1 else dense[:, :, None]
        if dense.dtype == torch.bool:
            allowed = allowed & dense
        else:
            s = s + dense.to(acc)
            if mask.dense_offset is not None:
                off = mask.dense_offset
                Bo, Ho = off.shape[:2]
                off = off.reshape(Bo, hkv, Ho // hkv, -1) if Ho > 1 else off[:, :, None]
                s = s - off.to(acc)[..., None]
    return s.masked_fill(~allowed, float("-inf")), cap_grad


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # Rows that see no key have lse = -inf; their probabilities are 0, not NaN.
    p = torch.exp(s - lse[..., None])
    return p.nan_to_num_(0.0)


class ReferenceKernels:
    def forward_init(self, q: torch.Tensor) -> ForwardState:
        B, H, S, _ = q.shape
        return ForwardState(q_shape=q.shape, lse=q.new_empty((B, H, S), dtype=_acc(q.dtype)))

    def forward_step(self, state, q, k, v, mask, scale, last):
        acc = _acc(q.dtype)
        B, H, S, D = q.shape
        if state.steps == 0:  # nothing seen yet
            state.out = q.new_zeros((B, H, S, D), dtype=acc)
            state.lse.fill_(float("-inf"))
        s, _ = _scores(q, k, mask, scale, acc)
        lse_blk = torch.logsumexp(s, dim=-1)  # -inf on rows with no key
        out_blk = torch.matmul(_probs(s, lse_blk), v.to(acc)[:, :, None])
        lse_blk = lse_blk.reshape(B, H, S)
        out_blk = out_blk.reshape(B, H, S, D)
        lse_new = torch.logaddexp(state.lse, lse_blk)
        w_old = torch.exp(state.lse - lse_new).nan_to_num_(0.0)[..., None]
        w_blk = torch.exp(lse_blk - lse_new).nan_to_num_(0.0)[..., None]
        state.out = state.out * w_old + out_blk * w_blk
        state.lse.copy_(lse_new)
        state.steps += 1

    def forward_finish(self, state, dtype):
        return finish_forward(state, dtype)

    def backward_prepare(self, out, dout):
        acc = _acc(out.dtype)
        return (dout.to(acc) * out.to(acc)).sum(-1)

    def backward_step(self, q, k, v, dout, lse, delta, mask, scale, dq, dk, dv, dkv_fresh=False):
        dq, dk, dv, dkv_fresh, _ = accumulators(dq, dk, dv, dkv_fresh)
        acc = dq.dtype
        hkv = k.shape[1]
        s, cap_grad = _scores(q, k, mask, scale, acc)
        p = _probs(s, _grouped(lse[..., None], hkv)[..., 0])  # (B, Hkv, G, Sq, Sk)
        do = _grouped(dout.to(acc), hkv)
        dv_blk = torch.matmul(p.transpose(-1, -2), do).sum(2)
        dp = torch.matmul(do, v.to(acc)[:, :, None].transpose(-1, -2))
        ds = p * (dp - _grouped(delta[..., None], hkv))
        if cap_grad is not None:
            ds = ds * cap_grad
        dq += torch.matmul(ds, k.to(acc)[:, :, None]).reshape(dq.shape) * scale
        dk_blk = torch.matmul(ds.transpose(-1, -2), _grouped(q.to(acc), hkv)).sum(2) * scale
        if dkv_fresh:
            dk.copy_(dk_blk)
            dv.copy_(dv_blk)
        else:
            dk += dk_blk
            dv += dv_blk

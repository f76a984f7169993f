"""Rows that see no key, under a mask that gives them the mean of every value
(``AttentionMask.empty_rows_mean``): the forward's and backward's correction, after the blocks."""

from __future__ import annotations

import torch

from ringcompile.kernels import accumulation_dtype
from ringcompile.ring.call import RankCall, positions

__all__ = ["EmptyRows"]


class EmptyRows:
    """Rows the facts leave with no key, where SDPA under a mask that fills hidden keys with
    finfo.min rounds every score of the row to that one value: uniform weights over all keys.

    The ring gives such rows 0 and lse -inf; this adds what SDPA gives, from sums over every key
    of the sequence, each one all-reduced over the ring (rows are few, so no kernel needs to know):
    forward, the mean of V; backward, with P = 1/S and dS = P (dO . v - dO . out), as SDPA's
    backward differentiates through the rounded add: dq = scale/S (dO V^T K - (dO . out) sum K),
    dk_j = scale/S (sum_i (dO_i . v_j) q_i - sum_i (dO_i . out_i) q_i), dv_j = 1/S sum_i dO_i.
    """

    def __init__(self, call: RankCall, q, k, v, lse):
        self.call, self.q, self.k, self.v = call, q, k, v
        self.acc = accumulation_dtype(q.dtype)
        pos = positions(call.layout, call.rank, q.device)
        self.real = (pos < call.seq_len)[:, None].to(
            self.acc
        )  # (S_local, 1): keys (and rows) < seq_len
        B, H, S = lse.shape
        self.G = H // k.shape[1]
        # (B, Hkv, G, S, 1): this rank's empty rows (layout padding rows are dropped anyway)
        empty = torch.isneginf(lse) & (pos < call.seq_len)
        self.empty = empty.view(B, k.shape[1], self.G, S, 1).to(self.acc)

    def _sum(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each of ``parts`` summed over the ring (one all-reduce)."""
        flat = torch.cat([p.reshape(-1) for p in parts])
        self.call.ring.all_reduce(flat)
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

"""What the rewritten graph calls: shard, gather, ring attention and the gradient fix-ups.

Each is a small callable object bound to one ring (group, layout, rank) so the rewritten graph
reads plainly (``ring_shard(x, 1)``, ``ring_gather(x, 1)``). They are traced by the inner compiler
like any PyTorch code: collectives are torch's functional collectives (kept alive by their uses,
ordered identically on every rank), and the ring attention is the ``ringcompile::ring_attention``
op with its own autograd.

Gradients. Every rank runs the same program on its own tokens, and a tensor that is not sharded
(a "full" tensor) is computed by every rank alike. The backend keeps one invariant: **the gradient
a rank computes for anything full is its share, and the shares of the ring sum to the true
gradient.** Full graph outputs get ``scale_grad(x, 1/W)`` (each rank owns 1/W of the loss's
gradient); ``ring_gather``'s backward reduce-scatters (sums the shares, then keeps this rank's
slice); ``ring_shard``'s backward scatters this rank's slice into zeros (its share). Parameter and
input gradients are then shares too, and ``sum_grad_over_ring`` all-reduces each exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

from ringcompile.attention import ring_attention as _ring_attention
from ringcompile.group import TwoLevel
from ringcompile.layout import Layout
from ringcompile.mask_mod import keep
from ringcompile.tree_decode import decode_over_shards

# torch 2.13 renamed all_gather_tensor_autograd (same arguments) and warns on the old name, which
# older torch has alone.
_all_gather_autograd = (
    getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
)


class _Bound:
    """A callable bound to one ring; FX names the call after ``__name__``."""

    __name__ = ""

    def __init__(self, layout: Layout, rank: int, group: dist.ProcessGroup | None):
        self.layout, self.rank, self.group = layout, rank, group

    def __repr__(self) -> str:
        return f"{self.__name__}({self.layout!r}, rank={self.rank})"


class RingShard(_Bound):
    """This rank's tokens of a full tensor along ``dim`` (pads, then selects; no communication)."""

    __name__ = "ring_shard"

    def __call__(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self.layout.shard(x, dim, self.rank)


class RingGather(_Bound):
    """The full, natural-order tensor from every rank's shard along ``dim`` (all-gather)."""

    __name__ = "ring_gather"

    def __call__(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.group is None:
            return self.layout.unshard(x, dim)
        full = _all_gather_autograd(x.contiguous(), dim % x.dim(), self.group)
        return self.layout.unshard(full, dim)


class SdpaOnRing(_Bound):
    """``F.scaled_dot_product_attention``'s signature, computed by the ring op on local rows."""

    __name__ = "ring_attention"

    def __init__(self, layout: Layout, rank: int, group: dist.ProcessGroup | None,
                 kernels: str | None = None, two_level: TwoLevel | None = None):  # fmt: skip
        super().__init__(layout, rank, group)
        self.kernels, self.two_level = kernels, two_level

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, window=None, chunk=None, prefix=None, document_ids=None,
                 key_padding_mask=None, key_bias=None, empty_rows="zero", softcap=None,
                 mask_mod=None, mask_buffers=(), strategy="ring"):  # fmt: skip
        if mask_mod is not None:
            # the graph's mask_mod (a submodule), as the compiler traces it: its compiled calls
            # carry only its key
            keep(mask_mod)
        return _ring_attention(
            q,
            k,
            v,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            group=self.two_level or self.group,
            layout=self.layout,
            window=window,
            chunk=chunk,
            prefix=prefix,
            document_ids=document_ids,
            key_padding_mask=key_padding_mask,
            key_bias=key_bias,
            empty_rows=empty_rows,
            softcap=softcap,
            mask_mod=mask_mod,
            mask_buffers=mask_buffers,
            kernels=self.kernels,
            strategy=strategy,
        )


class TreeDecode:
    """A decode step's attention: replicated queries over the ring's KV shards, causal by global
    position (``tree_attn_decode``)."""

    __name__ = "tree_decode"

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def __repr__(self) -> str:
        return "tree_decode()"

    def __call__(
        self,
        q,
        k,
        v,
        q_positions,
        k_positions,
        scale=None,
        enable_gqa=False,
        padding_by_position=None,
    ):
        valid = None
        if padding_by_position is not None:
            # (B, N) keep-mask whose column p is global position p (transformers' 2-D
            # attention_mask over every token so far): read it at each key's position
            N = padding_by_position.shape[1]
            torch._assert_async(
                (q_positions < N).all(),
                "decode: the 2-D attention_mask must cover every token so far, the new ones too",
            )
            valid = padding_by_position.gather(1, k_positions.clamp(max=N - 1)) & (k_positions < N)
        # (a compiled graph's step, traced even where this torch says it is not compiling)
        return decode_over_shards(
            q,
            k,
            v,
            self.group,
            scale,
            enable_gqa,
            valid,
            q_positions,
            k_positions,
            True,
            functional=True,
        )


def padding_table_of_mask(mask: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """The (B|1, N) key padding by global position that a decode step's (B|1, 1, T, N) bool mask
    holds, when its column p is global position p (what ``generate()`` builds for a compileable
    ``ShardedKVCache``): the last query's row. Every row must be causality by position and that
    padding; checked on the device, so a mask of another kind fails the step instead of being
    misread."""
    table = mask[:, 0, -1]
    qp = q_positions if q_positions.dim() == 2 else q_positions[None]  # (B|1, T)
    keys = torch.arange(mask.shape[-1], device=mask.device)
    expected = (keys <= qp[..., None]) & table[:, None]  # (B|1, T, N)
    torch._assert_async(
        (mask[:, 0] == expected).all(),
        "decode: the 4-D attention mask over global positions is more than causality and key "
        "padding, which decoding over a sharded cache does not support",
    )
    return table


class _SumOverRing(torch.autograd.Function):
    """The ring's sum of per-rank partials, the same full value on every rank. Its gradient on
    each rank is the sum of the ranks' shares of the sum's gradient (the invariant above)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return fc.all_reduce(x.contiguous(), "sum", group)

    @staticmethod
    def backward(ctx, g):
        return fc.all_reduce(g.contiguous(), "sum", ctx.group), None


def _sum_over_ring(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverRing.apply(x, group) if group is not None else x


class RingSum(_Bound):
    """``x.sum()`` or ``x.sum(dim)`` of a full tensor, from this rank's tokens of it (sharded along
    ``seq_dim``): the local sum over real tokens, summed over the ring."""

    __name__ = "ring_sum"

    def __call__(self, x: torch.Tensor, seq_dim: int, dim: int | None = None, keepdim=False):
        if self.layout.pad:  # (no pass over x where there is no padding)
            real = self.layout.real(self.rank, x.device)
            shape = [1] * x.dim()
            shape[seq_dim] = real.numel()
            # where, not a product: a padded token's value may be anything, inf and NaN too
            x = torch.where(real.view(shape), x, x.new_zeros(()))
        part = x.sum() if dim is None else x.sum(dim, keepdim=keepdim)
        return _sum_over_ring(part, self.group)


class RingCrossEntropy(_Bound):
    """``F.cross_entropy(logits, target, ignore_index=, reduction="mean" | "sum")`` over the whole
    sequence, from this rank's rows of ``logits`` and the full ``target``: rows (N, C) and (N,),
    or with ``batch`` (B·N, C) and (B·N,), the sequence inner. The local sum over this rank's rows,
    summed over the ring; a mean divides by the count of targets that are not ignored, read from
    the full target (no communication)."""

    __name__ = "ring_cross_entropy"

    def __call__(self, logits, target, ignore_index: int = -100, reduction: str = "mean",
                 batch: int = 1):  # fmt: skip
        # padded rows get the ignored target: they add nothing
        local = self.layout.shard(target.view(batch, -1), 1, self.rank, fill=ignore_index)
        local = local.reshape(-1)
        part = F.cross_entropy(logits, local, ignore_index=ignore_index, reduction="sum")
        total = _sum_over_ring(part, self.group)
        if reduction == "sum":
            return total
        return total / (target != ignore_index).sum()


class _OnBackward(torch.autograd.Function):
    """Identity forward; the backward applies ``fn`` to the gradient."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.fn(g), None


class SumGradOverRing(_Bound):
    """Identity forward; the backward sums this tensor's gradient over the ring (once)."""

    __name__ = "sum_grad_over_ring"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        return _OnBackward.apply(x, lambda g: fc.all_reduce(g.contiguous(), "sum", group))


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (a full output's share: 1/W)."""
    return _OnBackward.apply(x, lambda g: g * factor)

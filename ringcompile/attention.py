"""``ring_attention``: the user-facing entry to the ring op, with SDPA's signature and checks.

It validates on each rank what can be validated locally (with errors that name the fix), turns
SDPA-style arguments into the op's (scale, GQA, masks) and calls ``ringcompile::ring_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ringcompile.checks import check_gqa, check_qkv
from ringcompile.group import SINGLE, group_name_of, resolve_group, resolve_two_level
from ringcompile.kernels import resolve_kernel_choice
from ringcompile.layout import Layout, SplitLayout, make_layout
from ringcompile.mask_mod import anchor
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.ring import ring_attention_op
from ringcompile.ring.comm import token_major
from ringcompile.ulysses import HeadSplit, ulysses_attention_op

__all__ = ["ring_attention"]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    group=None,
    mesh_dim: int | str | tuple[str, str] | None = None,
    layout: str | Layout = "contiguous",
    window: tuple[int, int] | None = None,
    chunk: int | None = None,
    prefix: int | None = None,
    document_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    empty_rows: str = "zero",
    softcap: float | None = None,
    mask_mod: Callable | None = None,
    mask_buffers: Sequence[torch.Tensor] = (),
    kernels: str | None = None,
    strategy: str = "ring",
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over a sequence sharded across the ranks of a ring.

    Args:
        q: (B, H, S_local, D) this rank's queries; k: (B, Hkv, S_local, D) its keys; v:
            (B, Hkv, S_local, Dv) its values (Dv may differ from D, as in MLA).
        attn_mask: dense fallback mask whose rows are this rank's queries and whose columns are the
            *global* keys in natural order: broadcastable to (B, H, S_local, seq_len); boolean
            (True = attend) or additive float (treated as a constant: no gradient).
        dropout_p: must be 0 (dropout is not supported).
        is_causal: causal by global position (not by local index).
        scale: softmax scale, default ``1/sqrt(D)``.
        enable_gqa: allow Hkv < H; query head i uses KV head ``i // (H // Hkv)`` as SDPA does.
            Only the Hkv heads travel around the ring.
        group: None (the world), a ProcessGroup, a DeviceMesh (with ``mesh_dim``) or a
            ``(DeviceMesh, dim)`` pair: the ring. None without torch.distributed is one process.
            Two mesh dims, ``mesh_dim=("cp_a2a", "cp_ring")`` (or a ``TwoLevel``), make the
            ranks of both one group for ``strategy="two-level"``.
        layout: which global positions each rank holds: a name ("contiguous", "striped",
            "zigzag"; then ``seq_len = S_local * ring size``; over two mesh dims, that layout over
            the ring dim, each rank's tokens split over the heads dim: ``SplitLayout``) or a
            :class:`Layout` (which may pad).
            The default is "contiguous", what ``x.chunk(W, dim)[rank]`` gives, since here the
            caller shards; the backend, which shards for itself, defaults to "striped" for load
            balance.
        window: ``(left, right)`` sliding window by position: query p sees keys in
            ``[p - left, p + right]``; -1 is unbounded. A Mistral-style ``sliding_window=w`` with
            ``is_causal`` is ``(w - 1, 0)``.
        chunk: chunked attention (Llama 4's ``attention_chunk_size``): query p sees keys in
            its chunk of positions, ``[p // chunk * chunk, (p // chunk + 1) * chunk)``.
        prefix: prefix-LM: every query also sees the keys at positions below ``prefix``, whatever
            ``is_causal``, ``window`` and ``chunk`` say (documents, padding and bias still apply).
        document_ids: (B, S_local) integer document of each local token (packed sequences):
            tokens see only keys of their own document.
        key_padding_mask: (B, S_local) bool, False marks padding keys no query may see.
        key_bias: float broadcastable to (B, H, S_local) (or (B, H, 1, S_local), an SDPA mask's
            shape over one query): added to every score of each local key
            (ALiBi's ``slope_h * position``: the query's share, which a softmax ignores, left
            out); it travels with the keys, as a constant (no gradient). Not with ``attn_mask``.
        empty_rows: what a query that sees no key gets: "zero" (SDPA's math backend under a
            boolean mask) or "mean", the mean of every value of the sequence with SDPA's
            gradients, what SDPA gives under an additive mask that fills hidden keys with
            ``finfo.min`` (every score of such a row rounds to that value).
        softcap: caps every score ``s`` (scaled, before the mask) to ``softcap * tanh(s /
            softcap)``, as Gemma 2's ``attn_logit_softcapping``; the blocks then go to the masked
            kernels (Triton on the GPU). Not with ``empty_rows="mean"``.
        mask_mod: flex_attention's ``mask_mod(b, h, q_idx, kv_idx, *mask_buffers) -> bool`` at
            global positions, and-ed with the rest of the mask. Each ring step evaluates it on
            its own block, so no rank holds its rows over every key. It is called on broadcast
            index tensors (``b`` (B, 1, 1, 1), ``h`` (1, H, 1, 1), ``q_idx`` (1, 1, Sq, 1),
            ``kv_idx`` (1, 1, 1, Sk)), which flex's mask functions written with tensor ops and
            indexing take as they are (``ringcompile.mask_mod``). Not with ``attn_mask``,
            ``key_bias`` or ``empty_rows="mean"``; ring strategy only.
        mask_buffers: the full tensors (every position, on every rank alike) that ``mask_mod``
            reads, indexed by global positions: document ids, per-key flags.
        kernels: which kernels compute the ring's blocks: "auto" (plain full and causal blocks
            on cuDNN where it runs, masked blocks on Triton), "triton" (every block in Triton)
            or "reference" (plain PyTorch); None reads ``RINGCOMPILE_KERNELS``, else "auto".
        strategy: "ring" (K/V travel around the ring while each rank keeps its queries) or
            "ulysses" (an all-to-all gives each rank every token of H/W of the heads, one-GPU
            attention runs there, and an all-to-all brings the output back: ``ringcompile.ulysses``).
            Ulysses needs W to divide H, and W and Hkv to divide one another; it takes no
            ``attn_mask``. "two-level" (two mesh dims): Ulysses inside each group of the first
            dim, whose ranks together hold one ring rank's tokens, and a ring of such groups
            along the second; the first dim's size must split the heads.

    Returns:
        (B, H, S_local, Dv): this rank's rows of SDPA over the global sequence.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"ring_attention does not support dropout (got dropout_p={dropout_p}): pass "
            "dropout_p=0.0 (model.eval(), or set the model's attention dropout to 0)"
        )
    check_qkv("ring_attention", q, k, v, "S_local")
    B, H, S, D = q.shape
    if k.shape[2] != S:
        raise ValueError(
            f"ring_attention is self-attention over one sharded sequence: q has {S} local tokens "
            f"but k/v have {k.shape[2]} (for decoding over a sharded KV cache use "
            "ringcompile.tree_attn_decode)"
        )
    check_gqa(H, k.shape[1], enable_gqa)
    kernels = resolve_kernel_choice(kernels)

    pg = resolve_group(group, mesh_dim)
    two = resolve_two_level(group, mesh_dim)
    world = pg.size() if pg is not None else 1
    if two is not None and isinstance(layout, str) and "/" not in layout:
        layout = two.layout_name(layout)
    if isinstance(layout, Layout):
        seq_len = layout.seq_len
        layout_obj = make_layout(layout, seq_len, world)
        if layout_obj.local_len != S:
            raise ValueError(
                f"{layout!r} gives each rank {layout_obj.local_len} tokens but q has {S}: shard "
                "with layout.shard(x, dim, rank)"
            )
    else:
        seq_len = S * world
        layout_obj = make_layout(layout, seq_len, world)
        if layout_obj.local_len != S:
            raise ValueError(
                f"layout {layout!r} over {world} ranks needs S_local to be a multiple of "
                f"{layout_obj.granularity}; got {S}. Pass a Layout object to pad."
            )

    dense = _dense_mask(attn_mask, B, H, S, seq_len, q.device)
    for name, t in (("document_ids", document_ids), ("key_padding_mask", key_padding_mask)):
        if t is not None and (t.shape != (B, S) or t.device != q.device):
            raise ValueError(
                f"{name} must be (batch, S_local) = ({B}, {S}) on {q.device}; got "
                f"{tuple(t.shape)} on {t.device}"
            )
    if document_ids is not None and (
        document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool
    ):
        raise TypeError(f"document_ids must be integers, got {document_ids.dtype}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}"
        )

    if key_bias is not None:
        if attn_mask is not None:
            raise ValueError("key_bias and attn_mask at once: add the bias to attn_mask")
        if not key_bias.dtype.is_floating_point or key_bias.device != q.device:
            raise TypeError(f"key_bias must be floating on {q.device}, got {key_bias.dtype} on "
                            f"{key_bias.device}")  # fmt: skip
        bias = key_bias
        if bias.dim() == 4 and bias.shape[2] == 1:  # an SDPA mask's shape, over one query
            bias = bias.squeeze(2)
        bias = bias.reshape((1,) * (3 - bias.dim()) + tuple(bias.shape))
        if bias.dim() != 3 or bias.shape[2] != S or any(
                a not in (1, b) for a, b in zip(bias.shape[:2], (B, H))):  # fmt: skip
            raise ValueError(f"key_bias of shape {tuple(key_bias.shape)} does not broadcast to "
                             f"(batch, heads, S_local) = ({B}, {H}, {S})")  # fmt: skip
        key_bias = bias.unsqueeze(2)  # (B|1, H|1, 1, S_local): a dense mask over one query
    if empty_rows not in ("zero", "mean"):
        raise ValueError(f'empty_rows must be "zero" or "mean", got {empty_rows!r}')
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    Dv = v.shape[3]
    if Dv != D:
        # Values of another head dim (MLA) go round the ring padded with zeros to one head dim:
        # zero dims add nothing to q . k, their output columns are zero and are cut off, and
        # their gradients are dropped, so every kernel takes them as they are.
        width = max(D, Dv)
        q, k, v = (F.pad(t, (0, width - t.shape[3])) for t in (q, k, v))
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap!r}")
    if chunk is not None and int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of positions, got {chunk}")
    if prefix is not None and int(prefix) < 0:
        raise ValueError(f"prefix must be a number of positions >= 0, got {prefix}")
    if mask_mod is None and mask_buffers:
        raise ValueError("mask_buffers without a mask_mod to read them")
    for t in mask_buffers:
        if not isinstance(t, torch.Tensor) or t.device != q.device:
            raise TypeError(f"mask_buffers must be tensors on {q.device} (the full ones, indexed "
                            "by global positions)")  # fmt: skip
    mask = AttentionMask(PositionRules.of(is_causal, window, chunk, prefix),
                         document_ids=document_ids,
                         key_padding_mask=key_padding_mask, key_bias=key_bias, dense=dense,
                         empty_rows_mean=empty_rows == "mean",
                         softcap=float(softcap or 0.0), mask_mod=mask_mod,
                         mask_buffers=tuple(mask_buffers))  # fmt: skip
    if strategy not in ("ring", "ulysses", "two-level"):
        raise ValueError(f'strategy must be "ring", "ulysses" or "two-level", got {strategy!r}')
    op, groups = ring_attention_op, ()
    if strategy != "ring":
        if mask_mod is not None:
            raise ValueError(f"strategy={strategy!r} takes no mask_mod: use strategy='ring'")
        if dense is not None:
            raise ValueError(
                f"strategy={strategy!r} takes no attn_mask (each rank would hold every row of it): "
                "pass the mask as facts (is_causal, window, chunk, prefix, document_ids, "
                "key_padding_mask, key_bias), or use strategy='ring'"
            )
        op, groups = ulysses_attention_op, (group_name_of(pg), SINGLE)
    if strategy == "two-level":
        _check_two_level(two, layout_obj)
        groups = (group_name_of(two.heads), group_name_of(two.ring))
    if strategy != "ring":
        # (raises, naming the heads and the fix)
        HeadSplit.of(H, k.shape[1], two.heads.size() if strategy == "two-level" else world)
    # The ring takes q, k and v token-major as a model's projections give them (its varlen and
    # fused kernels read them so, and its output comes back in q's layout); Ulysses' exchanges
    # take them contiguous.
    q, k, v = (t if strategy == "ring" and token_major(t) else t.contiguous() for t in (q, k, v))
    out, *_ = op(
        q,
        k,
        v,
        *mask.encode(),
        scale,
        layout_obj.name,
        seq_len,
        group_name_of(pg),
        kernels,
        *groups,
    )
    if mask_mod is not None:
        anchor(out, mask_mod)
    return out[..., :Dv].contiguous() if Dv != D else out


def _check_two_level(two, layout: Layout) -> None:
    if two is None:
        raise ValueError(
            "strategy='two-level' needs two mesh dims: group=mesh, mesh_dim=('cp_a2a', 'cp_ring') "
            "(an all-to-all over heads along the first, a ring along the second)"
        )
    if not isinstance(layout, SplitLayout) or layout.name != two.layout_name(layout.inner.name):
        raise ValueError(
            f"strategy='two-level' over {two.heads.size()} x {two.ring.size()} ranks needs the "
            f"layout split over each head group: a layout name, or make_layout("
            f"{two.layout_name('striped')!r}, seq_len, {two.whole.size()}); got {layout!r}"
        )


def _dense_mask(mask, B, H, S, seq_len, device) -> torch.Tensor | None:
    """The dense mask as 4-D (B|1, H|1, S_local, seq_len), checked against SDPA's broadcasting."""
    if mask is None:
        return None
    if mask.device != device:
        raise ValueError(f"attn_mask is on {mask.device}, q on {device}")
    if mask.dim() > 4 or mask.dim() < 2:
        raise ValueError(f"attn_mask must have 2 to 4 dims, got shape {tuple(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    want = (B, H, S, seq_len)
    if m.shape[-2:] != (S, seq_len) or any(a not in (1, b) for a, b in zip(m.shape[:2], want)):
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, "
            f"S_local, seq_len) = {want}: its rows are this rank's queries and its columns are "
            "all keys of the global sequence in natural order"
        )
    if m.dtype != torch.bool and not m.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or floating, got {m.dtype}")
    return m.contiguous()

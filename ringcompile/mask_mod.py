"""A mask given as a function of indices (flex_attention's ``mask_mod``), evaluated block by block.

``mask_mod(b, h, q_idx, kv_idx, *buffers) -> bool`` says whether query ``q_idx`` of batch row
``b`` and head ``h`` sees key ``kv_idx``, at global positions; ``buffers`` are the full tensors it
reads (a document id per token, a per-key flag), indexed by those positions. A function that
returns floats gives an additive mask instead: a bias added to each score, -inf where hidden
(``MaskWithBias``: flex's ``mask_mod`` with a ``score_mod`` that adds a bias). The ring evaluates it
on each step's block only, over that step's query and key positions, in the forward and again in
the backward, so no rank ever holds its rows over every key (S_local x S) as a dense mask would.

The function is called on broadcast index tensors, not under vmap: ``b`` (B, 1, 1, 1), ``h``
(1, H, 1, 1), ``q_idx`` (1, 1, Sq, 1), ``kv_idx`` (1, 1, 1, Sk), int64. Written with tensor ops
and indexing, as flex's mask functions are, it gives the same values either way. Positions past
the sequence (a layout's padding) are clamped to its last one: the ring hides them anyway.

The op crosses ``torch.library`` with integers only, so the function travels as a key into this
process's table (``register``). The table holds a function only while something else does (the
caller; the autograd graph of the call, until its backward: ``anchor``), or for good where a
compiled graph's calls carry only its key (``keep``), so closures made per call do not pile up.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

__all__ = ["MaskWithBias", "anchor", "evaluate", "keep", "lookup", "register"]

_TABLE: weakref.WeakValueDictionary[int, Callable] = weakref.WeakValueDictionary()
_KEPT: dict[int, Callable] = {}


def register(fn: Callable) -> int:
    """The key of ``fn`` (its id: no live object shares it)."""
    key = id(fn)
    try:
        _TABLE[key] = fn
    except TypeError:  # (an object that takes no weak reference: held for good)
        _KEPT[key] = fn
    return key


def keep(fn: Callable) -> None:
    """Hold ``fn`` for good: a compiled graph's mask_mod, whose calls carry only its key."""
    _KEPT[id(fn)] = fn


def anchor(out: torch.Tensor, fn: Callable) -> None:
    """Hold ``fn`` as long as the autograd graph that made ``out`` (its backward evaluates it
    again)."""
    if out.grad_fn is not None:
        out.grad_fn.metadata["ringcompile_mask_mod"] = fn


def lookup(key: int) -> Callable:
    fn = _KEPT.get(key) or _TABLE.get(key)
    if fn is None:
        raise RuntimeError(
            "ring_attention: the mask_mod of this call is gone (nothing holds it any more); "
            "keep a reference to it until the call's backward has run"
        )
    return fn


def evaluate(fn: Callable, buffers: Sequence[torch.Tensor], batch: int, heads: int,
             q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: int) -> torch.Tensor:  # fmt: skip
    """``fn`` over the block of queries at ``q_pos`` and keys at ``k_pos``: a bool (or additive
    float) (B|1, H|1, Sq, Sk) mask, contiguous over its last two dims."""
    device = q_pos.device
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    q = q_pos.clamp(max=seq_len - 1).view(1, 1, -1, 1)
    kv = k_pos.clamp(max=seq_len - 1).view(1, 1, 1, -1)
    m = fn(b, h, q, kv, *buffers)
    if isinstance(m, (tuple, list)):  # (a traced subgraph returns its outputs as a tuple)
        (m,) = m
    m = torch.as_tensor(m, device=device)
    if m.dtype != torch.bool and not m.dtype.is_floating_point:
        raise TypeError(f"a mask_mod must return booleans (or a float bias), got {m.dtype}")
    if m.dim() > 4:
        raise ValueError(f"a mask_mod gave a mask of shape {tuple(m.shape)}: more than 4 dims")
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    Sq, Sk = q.shape[2], kv.shape[3]
    if any(a not in (1, n) for a, n in zip(m.shape, (batch, heads, Sq, Sk))):
        raise ValueError(
            f"a mask_mod gave a mask of shape {tuple(m.shape)}, which does not broadcast to "
            f"(batch, heads, queries, keys) = {(batch, heads, Sq, Sk)}"
        )
    return m.expand(m.shape[0], m.shape[1], Sq, Sk).contiguous()


class MaskWithBias(torch.nn.Module):
    """flex's ``mask_mod`` and a ``score_mod`` that adds a bias to the score, as one function of
    the indices: the bias (the ``score_mod`` on a score of zero) where the mask keeps a pair,
    -inf elsewhere, in ``dtype``. ``buffers``: the mask_mod's ``n_mask`` first, then the
    score_mod's."""

    def __init__(self, mask_mod: Callable, score_mod: Callable, n_mask: int, dtype: torch.dtype):
        super().__init__()
        self.mask_mod, self.score_mod, self.n_mask, self.dtype = mask_mod, score_mod, n_mask, dtype

    def forward(self, b, h, q_idx, kv_idx, *buffers):
        keep = self.mask_mod(b, h, q_idx, kv_idx, *buffers[: self.n_mask])
        zero = torch.zeros((), dtype=self.dtype, device=b.device)
        bias = self.score_mod(zero, b, h, q_idx, kv_idx, *buffers[self.n_mask :])
        keep, bias = (x[0] if isinstance(x, (tuple, list)) else x for x in (keep, bias))
        hidden = torch.full((), float("-inf"), dtype=self.dtype, device=b.device)
        return torch.where(keep, torch.as_tensor(bias).to(self.dtype), hidden)

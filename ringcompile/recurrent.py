"""A gated delta rule (Qwen3-Next's linear attention) over a sequence sharded across ranks.

The rule's state (B, H, Dk, Dv) evolves as ``S_t = M_t S_{t-1} + beta_t k_t v_t^T`` with
``M_t = exp(g_t) (I - beta_t k_t k_t^T)``, and each output is ``q_t^T S_t``: linear in the state a
run of tokens starts from. So each rank runs the model's own chunked kernel once on each run of
its tokens, from a state whose first Dv columns are zero and last Dk columns the identity, with
the values widened by Dk zero columns. That one call gives the run's outputs from a zero state,
``q_t^T A_t`` (A_t: the product of the M's so far), the run's own final state and its transition
A. One all-gather of every run's (state, transition) lets each rank compose them in sequence order
(a scan of W small matrix products) into the state each of its runs starts from, and correct its
outputs by ``q_t^T A_t S_in``. Exact (up to rounding) and parallel: the ranks' chunked calls run at
once; what crosses is (Dk + Dv) x Dk per head and run. The all-gather's backward is one all-reduce.

A rank's tokens must lie in a few runs of consecutive positions (contiguous: one; zigzag: two);
striped layouts, one token per run, are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ringcompile.group import resolve_group
from ringcompile.layout import Layout, make_layout

__all__ = ["ring_gated_delta_rule"]

_MAX_RUNS = 2


def _runs(positions: torch.Tensor, seq_len: int) -> list[tuple[int, int, int]]:
    """(first local index, last + 1, first global position) of each run of consecutive real
    positions (padding slots past ``seq_len`` belong to none)."""
    pos = positions.tolist()
    runs, start = [], None
    for i, p in enumerate(pos + [None]):
        real = p is not None and p < seq_len
        if start is not None and (not real or p != pos[i - 1] + 1):
            runs.append((start, i, pos[start]))
            start = None
        if real and start is None:
            start = i
    return runs


class _GatherSummaries(torch.autograd.Function):
    """Every rank's tensor, stacked; the backward sums the gradients over ranks (one
    all-reduce) and keeps this rank's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def ring_gated_delta_rule(
    chunk_fn: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    group=None,
    mesh_dim: int | str | None = None,
    layout: str | Layout = "contiguous",
    **chunk_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_fn`` (a chunked gated delta rule with transformers' signature, such as
    ``torch_chunk_gated_delta_rule`` of ``transformers.models.qwen3_next``) over the sequence whose
    tokens this rank holds.

    Args:
        chunk_fn: ``chunk_fn(query, key, value, g=, beta=, initial_state=, output_final_state=True,
            **chunk_kwargs) -> (out, final_state)``, the model's own kernel; it must accept an
            initial state.
        query, key: (B, S_local, Hk, Dk); value: (B, S_local, Hv, Dv); g, beta: (B, S_local, Hv):
            this rank's tokens, in ``layout``.
        initial_state: (B, Hv, Dk, Dv), the state before the sequence's first token (the same on
            every rank), or None (zeros).
        output_final_state: also return the state after the sequence's last token (on every rank).
        group, mesh_dim: the ranks, as ``ring_attention`` takes them.
        layout: which positions each rank holds (a name or a :class:`Layout`); each rank's must
            lie in at most two runs of consecutive positions ("contiguous", "zigzag").
    Returns:
        (B, S_local, Hv, Dv) this rank's outputs (zeros on a layout's padding slots), and the final
        state or None.
    """
    pg = resolve_group(group, mesh_dim)
    world = pg.size() if pg is not None else 1
    B, S, _, Dk = key.shape
    Hv, Dv = value.shape[-2:]
    if world == 1 and not isinstance(layout, Layout):
        return chunk_fn(query, key, value, g=g, beta=beta, initial_state=initial_state,
                        output_final_state=output_final_state, **chunk_kwargs)  # fmt: skip
    seq_len = layout.seq_len if isinstance(layout, Layout) else S * world
    lay = make_layout(layout, seq_len, world)
    if lay.local_len != S:
        raise ValueError(f"layout {layout!r} gives each rank {lay.local_len} tokens, but the "
                         f"inputs have {S}")  # fmt: skip
    every_rank = [_runs(lay.positions(r), seq_len) for r in range(world)]
    n_runs = max(len(r) for r in every_rank)
    if n_runs > _MAX_RUNS:
        raise ValueError(
            f"ring_gated_delta_rule: layout {lay.name!r} gives a rank {n_runs} runs of "
            "consecutive positions, and the recurrence passes its state from run to run; use "
            "layout='contiguous' or 'zigzag'"
        )
    rank = dist.get_rank(pg) if pg is not None else 0
    dtype, device = value.dtype, value.device
    # the state's first Dv columns start at zero, its last Dk at the identity; the values get Dk
    # zero columns, so the last Dk columns of the state and outputs carry A_t and q_t^T A_t
    start = torch.cat([torch.zeros(B, Hv, Dk, Dv, dtype=dtype, device=device),
                       torch.eye(Dk, dtype=dtype, device=device).expand(B, Hv, Dk, Dk)], -1)  # fmt: skip
    wide = torch.cat([value, value.new_zeros(B, S, Hv, Dk)], -1)
    pieces, summaries = [], []
    for lo, hi, _ in every_rank[rank]:
        cut = slice(lo, hi)
        out, state = chunk_fn(query[:, cut], key[:, cut], wide[:, cut], g=g[:, cut],
                              beta=beta[:, cut], initial_state=start, output_final_state=True,
                              **chunk_kwargs)  # fmt: skip
        pieces.append(out)
        summaries.append(state.to(dtype))
    for _ in range(n_runs - len(summaries)):  # (a run of padding only: the identity)
        summaries.append(start)
    stacked = torch.stack(summaries)
    # (W, runs, B, Hv, Dk, Dv + Dk); one process (a padded layout of one rank) gathers nothing
    every = _GatherSummaries.apply(stacked, pg) if pg is not None else stacked[None]
    # compose every run in sequence order into the state each starts from
    order = sorted(
        (p0, r, i) for r, runs in enumerate(every_rank) for i, (_, _, p0) in enumerate(runs)
    )
    state = initial_state.to(dtype) if initial_state is not None else start[..., :Dv]
    entering = {}
    for _, r, i in order:
        entering[(r, i)] = state
        own, transition = every[r, i, ..., :Dv], every[r, i, ..., Dv:]
        state = transition @ state + own
    parts = []
    for i, ((lo, hi, _), out) in enumerate(zip(every_rank[rank], pieces)):
        s_in = entering[(rank, i)]
        corrected = out[..., :Dv] + torch.einsum("blhk,bhkv->blhv", out[..., Dv:], s_in)
        parts.append((lo, hi, corrected.to(dtype)))
    if len(parts) == 1 and parts[0][:2] == (0, S):
        result = parts[0][2]
    else:
        result = torch.cat(_fill(parts, S, value.new_zeros(B, S, Hv, Dv)), 1)
    return result, (state if output_final_state else None)


def _fill(parts, S: int, zeros: torch.Tensor) -> list[torch.Tensor]:
    """The runs' outputs and the padding slots' zeros between them, in local order."""
    pieces, at = [], 0
    for lo, hi, t in sorted(parts, key=lambda p: p[0]):
        if lo > at:
            pieces.append(zeros[:, at:lo])
        pieces.append(t)
        at = hi
    if at < S:
        pieces.append(zeros[:, at:S])
    return pieces

"""The sequence plan, graph by graph: which nodes compute on this rank's tokens and where full
tensors enter, and what the later passes gather or reduce because of it.

Each row of ``GRAPHS`` is a small function around one SDPA (an attention block, heads split by a
view, a reduction over the sequence, ops that mix along it, positions the model makes, rows that
merge batch and sequence, a refusal) with the ``SequencePlan`` that ``plan_sequence`` must give:
``demand`` (node -> the sequence dim it computes locally), ``shard_points`` (node -> dim and kind)
and ``sequence_inputs``, by node name. The function is captured by Dynamo (a recording backend)
and ``run_passes`` runs every pass on it on one process (no ring: W = 1); beside the plan, the
report's gathers (which value, along which dim), sharded reductions and fallbacks are compared:
what the plan makes the later passes do. Float64 inputs; B=2, S=8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from ringcompile.passes import RingContext, run_passes

B, H, S, Dh = 2, 2, 8, 4
D = H * Dh
SDPA = "scaled_dot_product_attention"


@dataclass(frozen=True)
class Planned:
    demand: dict[str, int]
    shard_points: dict[str, tuple[int, str]]
    sequence_inputs: tuple[str, ...]
    # what the later passes do with it, from the report (source locations left out): the values
    # gathered (name and dim), the reductions kept sharded
    gathered: tuple[str, ...] = (f"{SDPA} (dim 2)",)
    reduced: tuple[str, ...] = ()
    fallback: str | None = None  # words of the one fallback reported, if any


def _randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- graphs ----------------------------------------------------------------------------------------
# Heads are split inline (``x.view(B, S, H, Dh).transpose(1, 2)``), so that Dynamo names the nodes
# as the table does: ``view`` then ``q``.


def plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def heads_split_by_view(x, wq, wk, wv):
    q = (x @ wq).view(B, S, H, Dh).transpose(1, 2)
    k = (x @ wk).view(B, S, H, Dh).transpose(1, 2)
    v = (x @ wv).view(B, S, H, Dh).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def reductions_over_sequence(q):
    o = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return o.sum(dim=2), o.amax(dim=2)  # a sum shards (partials + one all-reduce), amax gathers


def cumsum_along_sequence(x):
    q = x.cumsum(dim=1).view(B, S, H, Dh).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def diff_along_sequence(x):
    q = torch.diff(x, dim=1, prepend=x[:, :1]).view(B, S, H, Dh).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def rotary_from_model_arange(x, inv_freq):
    angles = torch.arange(S)[:, None].float() * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    q = x.view(B, S, H, Dh).transpose(1, 2) * cos
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def rotary_from_position_input(x, where, inv_freq):
    # an integer input is positions by use (cast, times the frequencies), whatever its name
    angles = where[..., None].float() * inv_freq
    rotated = x * torch.cat([angles.cos(), angles.sin()], -1).to(x.dtype)
    q = rotated.view(B, S, H, Dh).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def rotary_table_sliced(x, cos_cached):
    q = x.view(B, S, H, Dh).transpose(1, 2) * cos_cached[:S]
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def rows_merged_row_by_row(x, w):
    # GPT-2/OPT: (B, S, D) flattened to rows and back; linear + relu read each row alone
    h = torch.relu(F.linear(x.view(B * S, D), w)).view(B, S, D)
    split = h.view(B, S, H, Dh)
    q = split.transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def rows_merged_and_mixed(x, w):
    # a softmax over all rows mixes batch and sequence: the rows stay whole
    h = torch.softmax(F.linear(x.view(B * S, D), w), dim=0).view(B, S, D)
    split = h.view(B, S, H, Dh)
    q = split.transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def dense_mask_input(q, mask):
    return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def lifted_key_padding(q, am):
    i = torch.arange(S)
    b, qi, ki = torch.arange(B)[:, None, None, None], i[None, None, :, None], i[None, None, None, :]
    return F.scaled_dot_product_attention(q, q, q, attn_mask=(ki <= qi) & am.bool()[b, ki])


def cross_attention(q, kv):
    return F.scaled_dot_product_attention(q, kv, kv)


def dropout(q):
    return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5, is_causal=True)


GRAPHS = [
    pytest.param(
        plain,
        lambda: (
            _randn(B, H, S, Dh, seed=0),
            _randn(B, H, S, Dh, seed=1),
            _randn(B, H, S, Dh, seed=2),
        ),
        Planned(
            {SDPA: 2},
            {"l_q_": (2, "input"), "l_k_": (2, "input"), "l_v_": (2, "input")},
            ("l_q_", "l_k_", "l_v_"),
        ),
        id="plain-attention",
    ),
    pytest.param(
        heads_split_by_view,
        lambda: (_randn(B, S, D), _randn(D, D), _randn(D, D), _randn(D, D)),
        Planned(
            {
                SDPA: 2,
                "q": 2,
                "k": 2,
                "v": 2,
                "view": 1,
                "view_1": 1,
                "view_2": 1,
                "matmul": 1,
                "matmul_1": 1,
                "matmul_2": 1,
            },
            {"l_x_": (1, "input")},
            ("l_x_",),
        ),
        id="heads-split-by-view-transpose",
    ),
    pytest.param(
        reductions_over_sequence,
        lambda: (_randn(B, H, S, Dh),),
        Planned(
            {"o": 2},
            {"l_q_": (2, "input")},
            ("l_q_",),
            gathered=("o (dim 2)",),  # for amax
            reduced=(
                "sum_1 (sum over dim 2): each rank's rows of o (dim 2), summed over the " + "ring",
            ),
        ),
        id="reduction-over-sequence",
    ),
    pytest.param(
        cumsum_along_sequence,
        lambda: (_randn(B, S, D),),
        # computed whole, sharded after; every rank computes it from its own x, so x is compared
        Planned({SDPA: 2, "q": 2, "view": 1}, {"cumsum": (1, "value")}, ("l_x_",)),
        id="cumsum-stays-full",
    ),
    pytest.param(
        diff_along_sequence,
        lambda: (_randn(B, S, D),),
        Planned({SDPA: 2, "q": 2, "view": 1}, {"diff": (1, "value")}, ("l_x_",)),
        id="diff-stays-full",
    ),
    pytest.param(
        rotary_from_model_arange,
        lambda: (_randn(B, S, D), _randn(Dh // 2).float()),
        Planned(
            {
                SDPA: 2,
                "q": 2,
                "transpose": 2,
                "view": 1,
                # (S, Dh) angles and cos: the sequence is their dim 0
                "getitem": 0,
                "float_1": 0,
                "angles": 0,
                "cos": 0,
                "cos_1": 0,
                "cat": 0,
                "cos_2": 0,
            },
            {"arange": (0, "positions"), "l_x_": (1, "input")},
            ("l_x_",),
        ),
        id="model-made-arange-positions",
    ),
    pytest.param(
        rotary_from_position_input,
        lambda: (_randn(B, S, D), torch.arange(S).expand(B, S) * 2, _randn(Dh).float()),
        Planned(
            {
                SDPA: 2,
                "q": 2,
                "view": 1,
                "rotated": 1,
                "to": 1,
                "cat": 1,
                "cos": 1,
                "sin": 1,
                "angles": 1,
                "float_1": 1,
                "getitem": 1,
            },
            {"l_where_": (1, "positions"), "l_x_": (1, "input")},
            ("l_where_", "l_x_"),
        ),
        id="position-input-by-use",
    ),
    pytest.param(
        rotary_table_sliced,
        lambda: (_randn(B, S, D), _randn(2 * S, Dh)),
        Planned(
            {SDPA: 2, "q": 2, "transpose": 2, "view": 1},
            {"getitem": (0, "table"), "l_x_": (1, "input")},
            ("l_x_", "l_cos_cached_"),
        ),
        id="table-sliced-to-length",
    ),
    pytest.param(
        rows_merged_row_by_row,
        lambda: (_randn(B, S, D), _randn(D, D)),
        Planned(
            {SDPA: 2, "q": 2, "split": 1, "h": 1, "relu": 1, "linear": 1},
            {"l_x_": (1, "input")},
            ("l_x_",),
        ),
        id="batch-and-sequence-merged-row-by-row",
    ),
    pytest.param(
        rows_merged_and_mixed,
        lambda: (_randn(B, S, D), _randn(D, D)),
        Planned({SDPA: 2, "q": 2, "split": 1}, {"h": (1, "value")}, ("l_x_", "l_w_")),
        id="batch-and-sequence-merged-then-mixed",
    ),
    pytest.param(
        dense_mask_input,
        lambda: (_randn(B, H, S, Dh), _randn(B, 1, S, S) > 0),
        Planned(
            {SDPA: 2},
            {"l_q_": (2, "input"), "l_mask_": (2, "input")},
            ("l_q_", "l_mask_"),
            fallback="dense mask kept",
        ),
        id="dense-mask-sharded-by-rows",
    ),
    pytest.param(
        lifted_key_padding,
        lambda: (_randn(B, H, S, Dh), torch.ones(B, S, dtype=torch.long)),
        Planned(
            {SDPA: 2, "bool_1": 1}, {"l_q_": (2, "input"), "l_am_": (1, "input")}, ("l_am_", "l_q_")
        ),
        id="lifted-key-padding-sharded-by-token",
    ),
    pytest.param(
        cross_attention,
        lambda: (_randn(B, H, S, Dh), _randn(B, H, S // 2, Dh)),
        Planned({}, {}, (), gathered=(), fallback="is not self-attention over one sequence"),
        id="refused-cross-attention",
    ),
    pytest.param(
        dropout,
        lambda: (_randn(B, H, S, Dh),),
        Planned({}, {}, (), gathered=(), fallback="dropout_p=0.5 (the ring op has no dropout)"),
        id="refused-dropout",
    ),
]


def _run(fn, inputs) -> tuple[Planned, list[str]]:
    """Dynamo's graph of ``fn`` through every pass, as the backend runs them: the plan (which
    ``plan_sequence`` alone writes), what the report says came of it, and the fallbacks."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, fullgraph=True)(*inputs)
    ctx = RingContext(gm=graphs[0], group=None, layout_name="striped")
    run_passes(ctx)
    plan = ctx.plan
    got = Planned(
        {n.name: d for n, d in plan.demand.items()},
        {n.name: (d, plan.shard_kinds[n]) for n, d in plan.shard_points.items()},
        tuple(n.name for n in plan.sequence_inputs),
        gathered=tuple(why.split(":")[0] for why in ctx.report.gathers),
        reduced=tuple(re.sub(r" at \S+:\d+", "", why) for why in ctx.report.reductions),
    )
    return got, ctx.report.fallbacks


@pytest.mark.parametrize("fn, make_inputs, expected", GRAPHS)
def test_plan(fn, make_inputs, expected):
    got, fallbacks = _run(fn, make_inputs())
    assert got.demand == expected.demand
    assert got.shard_points == expected.shard_points
    assert got.sequence_inputs == expected.sequence_inputs
    assert got.gathered == expected.gathered
    assert got.reduced == expected.reduced
    if expected.fallback is None:
        assert fallbacks == []
    else:
        assert len(fallbacks) == 1 and expected.fallback in fallbacks[0], fallbacks

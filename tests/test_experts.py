"""Pass 7 (``outline_experts``): a mixture-of-experts dispatch becomes one op that computes each
token row alone, so the experts run on each rank's tokens (issue 21, item 5).

The dispatch below is transformers' grouped-matmul experts (``integrations/moe.py``), written out:
the (token, choice) pairs sorted by expert, the tokens gathered in that order, grouped matmuls
whose offsets count each expert's rows, the inverse permutation and the sum over the k choices.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline

from ringcompile.backend import _compile
from ringcompile.passes import find_attention, normalize, outline_experts
from ringcompile.passes.context import RingContext
from ringcompile.passes.rowwise_region import RowwiseRegion

transformers = pytest.importorskip("transformers")
grouped_mm = pytest.importorskip("transformers.integrations.moe")  # registers its fallback op

E, K, D, F_ = 4, 2, 8, 12
TOL = 1e-10


def dispatch(x, top_w, top_i, w_up, w_down, pairs_in_token_order=False):
    N, k = top_i.shape
    ids, weights = top_i.reshape(-1), top_w.reshape(-1)
    ids_sorted, perm = torch.sort(ids)
    x_sorted = x[perm // k]
    # a wrong model pairs the sorted rows with weights still in token order
    w_sorted = weights if pairs_in_token_order else weights[perm]
    counts = torch.histc(ids_sorted.float(), bins=E, min=0, max=E - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up = torch.ops.transformers.grouped_mm_fallback(x_sorted, w_up, offs=offsets)
    gate, lin = up.chunk(2, dim=-1)
    y = torch.ops.transformers.grouped_mm_fallback(F.silu(gate) * lin, w_down, offs=offsets)
    y = y * w_sorted.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0))
    return y[inverse].view(N, k, -1).sum(dim=1)


class MoELayer(torch.nn.Module):
    """Causal self-attention, then a top-k routed experts block on the rows (B·S, D)."""

    def __init__(self, pairs_in_token_order=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def p(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64) / 3)

        self.qkv, self.router = p(3 * D, D), p(E, D)
        self.w_up, self.w_down = p(E, D, 2 * F_), p(E, F_, D)
        self.pairs_in_token_order = pairs_in_token_order

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = F.linear(x, self.qkv).view(B, S, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        h = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(
            B, S, D
        )
        rows = h.view(-1, D)
        probs = F.softmax(F.linear(rows, self.router), dim=-1)
        top_w, top_i = torch.topk(probs, K, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = dispatch(rows, top_w, top_i, self.w_up, self.w_down, self.pairs_in_token_order)
        return h + out.view(B, S, D)


def _captured(model, x):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(x)
    return graphs[0]


def test_dispatch_becomes_one_op_that_computes_each_row_alone():
    """The pass alone: the dispatch's nodes become one call, the values do not change, and the
    outlined op given any subset of the rows gives those rows' results."""
    model = MoELayer()
    x = torch.randn(2, 8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gm = _captured(model, x)
    args = [x] + [p for _, p in model.named_parameters()]  # (Dynamo's inputs, in this order)
    want = gm(*args)[0]
    ctx = RingContext(gm=gm, group=None, layout_name="striped")
    for p in (normalize, find_attention, outline_experts):
        p.run(ctx)
    gm.recompile()
    code = "\n".join(ln.strip() for ln in gm.code.splitlines() if "experts_" in ln)
    assert_expected_inline(
        code,
        """\
experts_0 = self.experts_0(top_i, top_w_1, rows, l_self_parameters_w_up_, l_self_parameters_w_down_);  top_i = top_w_1 = rows = l_self_parameters_w_up_ = l_self_parameters_w_down_ = None
view_3 = experts_0.view(2, 8, 8);  experts_0 = None""",
    )
    assert ctx.report.rows == [ctx.report.rows[0]] and "over 16 rows" in ctx.report.rows[0]
    assert torch.equal(gm(*args)[0], want)
    region = gm.experts_0
    assert isinstance(region, RowwiseRegion) and region.row_inputs == (0, 1, 2)
    # each row alone: the odd rows by themselves give the odd rows of the whole
    B, S, _ = x.shape  # the rows the dispatch reads, recomputed as the model does
    q, k, v = F.linear(x, model.qkv).view(B, S, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
    h = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, D)
    rows = h.view(-1, D)
    top_w, top_i = torch.topk(F.softmax(F.linear(rows, model.router), dim=-1), K, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    full = region(top_i, top_w, rows, model.w_up, model.w_down)
    odd = region(top_i[1::2], top_w[1::2], rows[1::2], model.w_up, model.w_down)
    assert (odd - full[1::2]).abs().max() < 1e-12


def test_rows_in_two_orders_are_not_outlined():
    """A dispatch that pairs sorted rows with weights in token order mixes two row orders: not a
    row-by-row op, left as it is, and said why."""
    model = MoELayer(pairs_in_token_order=True)
    x = torch.randn(1, 8, D, dtype=torch.float64)
    gm = _captured(model, x)
    ctx = RingContext(gm=gm, group=None, layout_name="striped")
    for p in (normalize, find_attention, outline_experts):
        p.run(ctx)
    assert not any(isinstance(m, RowwiseRegion) for m in gm.modules())
    assert ctx.report.rows == []
    assert any(
        "not outlined as a mixture-of-experts dispatch" in f and "is not understood" in f
        for f in ctx.report.fallbacks
    ), ctx.report.fallbacks


def moe_layer_errors(rank, world, batch, pairs_in_token_order):
    torch._dynamo.reset()
    model = MoELayer(pairs_in_token_order)
    x = torch.randn(batch, 16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(batch, 16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def step(m):
        model.zero_grad()
        xr = x.clone().requires_grad_()
        out = m(xr)
        (out * w).sum().backward()
        return [out.detach(), xr.grad] + [p.grad.clone() for p in model.parameters()]

    ref = step(model)
    reports = []
    got = step(_compile(model, {"compiler": "aot_eager"}, {}, reports))
    errs = [float((a - b).norm() / b.norm()) for a, b in zip(got, ref)]
    return errs, reports[0].rows, reports[0].gathers


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("pairs_in_token_order", [False, True])
def test_experts_run_on_each_ranks_tokens(gloo, batch, pairs_in_token_order):
    """W = 2, float64: output, the input's and every parameter's gradient as in eager; the
    dispatch runs on local tokens (only the output is gathered) where it is one, and on the whole
    sequence (gathered rows) where its orders mix."""
    for errs, rows, gathers in gloo(2).run(moe_layer_errors, batch, pairs_in_token_order):
        assert max(errs) < TOL, errs
        outlined = any("experts_0" in r for r in rows)
        assert outlined == (not pairs_in_token_order), rows
        if outlined:
            assert all("graph output" in g for g in gathers), gathers
        else:
            assert any("read by" in g for g in gathers), gathers

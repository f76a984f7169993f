"""Pass 2 (``eager_attention``): attention written out (matmul, softmax, matmul), soft-capped or
not, becomes SDPA; chains it cannot take exactly stay as they are."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from expecttest import assert_expected_inline

from ringcompile.passes import PASSES, run_passes
from ringcompile.passes.context import RingContext
from ringcompile.passes.fx_utils import is_sdpa

B, H, S, D = 1, 2, 8, 4


def _written_out(q, k, v, mask, cap=None, p=0.0, weights=False, training=True):
    """transformers' eager attention (Gemma 2's with ``cap``)."""
    s = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
    if cap is not None:
        s = s / cap
        s = torch.tanh(s)
        s = s * cap
    s = s + mask
    w = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=p, training=training)
    out = torch.matmul(w, v)
    return (out, w) if weights else out


def _after_pass(fn, *args):
    """``fn``'s Dynamo graph after passes 0-2: its code (assignments only) and the graph."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    (gm,) = graphs
    ctx = RingContext(gm=gm, group=None, layout_name="striped")
    run_passes(ctx, PASSES[:3])
    gm.recompile()
    code = "\n".join(ln.strip() for ln in gm.code.splitlines() if " = " in ln and " = L_" not in ln)
    return code, gm, ctx


def _call(gm, q, k, v, mask):
    """The graph on these inputs (Dynamo orders its inputs by first use)."""
    given = {"l_q_": q, "l_k_": k, "l_v_": v, "l_mask_": mask}
    return gm(*[given[n.name] for n in gm.graph.nodes if n.op == "placeholder"])[0]


def _inputs(sq=S):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, sq, D, generator=g, dtype=torch.float64) * 4
    k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(B, 1, sq, S, dtype=torch.float64)
    mask[..., :, -2:] = torch.finfo(torch.float64).min
    return q, k, v, mask


def test_soft_capped_chain_becomes_one_call():
    """Gemma 2's chain, ops before and after: one ``sdpa_soft_capped`` call with the scale and
    the cap read from the graph, the float mask as SDPA's; the same values (here the softmax
    runs at the inputs' float64, where eager's runs in float32)."""
    args = _inputs()

    def f(q, k, v, mask):
        return _written_out(q, k, v, mask, cap=2.0)

    code, gm, ctx = _after_pass(f, *args)
    assert_expected_inline(
        code,
        """\
sdpa_soft_capped = ringcompile_soft_cap_sdpa_soft_capped(l_q_, l_k_, l_v_, attn_mask = l_mask_, scale = 0.5, softcap = 2.0);  l_q_ = l_k_ = l_v_ = l_mask_ = None""",
    )
    (line,) = ctx.report.lifted
    assert "attention written out" in line and "soft-capped at 2" in line, line
    q, k, v, mask = args
    s = 2.0 * torch.tanh(q @ k.transpose(2, 3) * 0.5 / 2.0) + mask
    torch.testing.assert_close(_call(gm, *args), s.softmax(-1) @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_plain_chain_becomes_sdpa(training):
    """Without a cap: plain SDPA; dropout that drops nothing (p = 0, or a model in eval mode)
    is no obstacle."""
    args = _inputs()

    def f(q, k, v, mask):
        return _written_out(q, k, v, mask, p=0.0 if training else 0.1, training=training)

    code, gm, _ = _after_pass(f, *args)
    (sdpa,) = [n for n in gm.graph.nodes if is_sdpa(n)]
    assert sdpa.target is torch._C._nn.scaled_dot_product_attention, code
    assert sdpa.kwargs == {"attn_mask": sdpa.kwargs["attn_mask"], "scale": 0.5}, sdpa.kwargs
    q, k, v, mask = args
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(D))
    torch.testing.assert_close(_call(gm, *args), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    ["weights_returned", "dropout", "decode_step", "cap_of_another_number"],
)
def test_chains_it_cannot_take_stay(case):
    """The attention weights read elsewhere (``output_attentions``), dropout that drops, queries
    over another length of keys (a decode step), a division and a product by different numbers:
    the chain stays as it was, softmax and all."""
    args = _inputs(sq=1 if case == "decode_step" else S)

    def f(q, k, v, mask):
        if case == "cap_of_another_number":
            s = torch.tanh(q @ k.transpose(2, 3) / 3.0) * 2.0 + mask
            return F.softmax(s, dim=-1) @ v
        return _written_out(q, k, v, mask, p=0.5 if case == "dropout" else 0.0,
                            weights=case == "weights_returned")  # fmt: skip

    code, gm, ctx = _after_pass(f, *args)
    assert not any(is_sdpa(n) for n in gm.graph.nodes), code
    assert "softmax" in code and ctx.report.lifted == []


class _NanoGPTAttention(torch.nn.Module):
    """nanoGPT's attention without flash: a causal buffer sliced to the length, masked_fill."""

    def __init__(self, dim=16, heads=2, max_len=32):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        tril = torch.tril(torch.ones(max_len, max_len))
        self.register_buffer("bias", tril.view(1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


def nanogpt_step(rank, world):
    """The compiled module's error (output and every gradient) against eager, and its report."""
    from ringcompile.backend import _compile

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _NanoGPTAttention().double()
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    w = torch.randn(2, 24, 16, dtype=torch.float64)

    def step(m):
        model.zero_grad()
        out = m(x)
        (out * w).sum().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters()]

    ref = step(model)
    reports = []
    got = step(_compile(model, {"compiler": "aot_eager"}, {}, reports))
    errs = [float((a - b).norm() / b.norm()) for a, b in zip(got, ref)]
    return errs, reports


def test_nanogpt_attention_is_sharded(gloo):
    """masked_fill(hidden, -inf) is SDPA's boolean mask ~hidden: nanoGPT's attention runs as a
    ring, exact; its mask (a buffer, not indices) stays dense, this rank's rows."""
    for errs, reports in gloo(2).run(nanogpt_step):
        assert max(errs) < 1e-10, errs
        (graph,) = reports
        assert len(graph.attention) == 1 and "dense mask" in graph.attention[0], graph.attention
        assert any("attention written out" in x for x in graph.lifted), graph.lifted

"""The ``ring`` backend: compiled models match eager on one process, outputs and every gradient."""

from __future__ import annotations

import difflib
import functools

import pytest
import torch
import torch._dynamo
from expecttest import assert_expected_inline

import ringcompile
from ringcompile.testing_models import TinyTransformer

TOL = 1e-10


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def compare_with_eager(rank, world, rope, layout, compiler, S, fullgraph=False):
    """Relative errors of the compiled model against eager: logits, then every parameter grad."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer(rope=rope).double()
    tokens = torch.randint(0, 64, (2, S))
    w = torch.randn(2, S, 64, dtype=torch.float64)

    ref = model(tokens)
    (ref * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(
        model, backend="ring", fullgraph=fullgraph, options={"layout": layout, "compiler": compiler}
    )
    out = compiled(tokens)
    (out * w).sum().backward()
    errs = {"logits": _rel(out.detach(), ref.detach())}
    errs.update({n: _rel(p.grad, ref_grads[n]) for n, p in model.named_parameters()})
    return errs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["striped", "zigzag", "contiguous"])
@pytest.mark.parametrize("rope", ["computed", "cached"])
def test_matches_eager(gloo, world, rope, layout):
    results = gloo(world).run(compare_with_eager, rope, layout, "aot_eager", 16, True)
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"rank {rank}: {bad}"


def test_uneven_length_matches_eager(gloo):
    results = gloo(3).run(compare_with_eager, "computed", "zigzag", "aot_eager", 13)
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"rank {rank}: {bad}"


def test_inductor_matches_eager(gloo):
    results = gloo(2).run(compare_with_eager, "cached", "striped", "inductor", 16)
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"rank {rank}: {bad}"


def train_steps_without_recompiling(rank, world):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer().double()
    counter = CompileCounterWithBackend("eager")
    from ringcompile.backend import ring_backend

    def backend(gm, ex):
        counter(gm, ex)  # counts frames and ops
        return ring_backend(gm, ex, options={"compiler": "aot_eager"})

    compiled = torch.compile(model, backend=backend, dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = compiled(torch.randint(0, 64, (2, 16))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return counter.frame_count


def test_no_recompiles_across_steps(gloo):
    assert gloo(2).run(train_steps_without_recompiling) == [1, 1]


def rewritten_graph(rank, world, rope):
    torch._dynamo.reset()
    torch.manual_seed(0)  # every rank of the ring is given the same tokens
    model = TinyTransformer(rope=rope, layers=1).double()
    report = ringcompile.explain(
        model, torch.randint(0, 64, (2, 16)), options={"compiler": "aot_eager"}
    )
    return str(report)


def _body(report: str) -> str:
    """The report minus its first lines' file paths, which differ between machines."""
    import re

    return re.sub(r" at \S+/ringcompile/", " at ringcompile/", report)


def _changes(before: str, after: str) -> str:
    """The lines ``after`` changes in ``before``, hunk by hunk (``-`` gone, ``+`` new), without
    line numbers, which move whenever a line above changes."""
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return "\n".join(
        "@@" if line.startswith("@@") else line
        for line in diff
        if not line.startswith(("---", "+++"))
    )


def test_snapshot_rotary_computed_and_cached(gloo):
    """The whole report of one layer with rotary angles computed from an arange (the arange is
    sharded as positions), then what changes with angles read from cos/sin tables sliced to the
    length (the slices are sharded as tables, the arange code is gone): one snapshot each, so a
    change common to both is accepted once."""
    computed, cached = (
        _body(gloo(2).run(rewritten_graph, rope)[0]) for rope in ("computed", "cached")
    )
    assert_expected_inline(
        computed,
        """\
=== graph 1 of 1 ===
ring graph: sequence of 16 tokens over 2 ranks, striped layout
attention replaced: 1
  - out at ringcompile/testing_models.py:34: is_causal=True, no mask; ring: plain blocks hide the K/V transfers (auto)
ring steps of this rank (out; torch.float64 on cpu, head dim 8):
  - step 0 (own block): causal diagonal -> flash (CPU)
  - step 1 (keys of rank 1): strictly causal -> flash (CPU)
attention inputs recognised: none
rows kept as (batch, sequence): none
positions fixed: 1
  - arange (dim 0, positions) at ringcompile/testing_models.py:72
sharded where they enter: 1
  - l_tokens_ (dim 1, input) at ringcompile/testing_models.py:78
inputs compared across the ring (first call): 2
  - tokens (l_tokens_)
  - the model's 13 parameters and buffers (on the first call)
gathered: none
reductions kept sharded: none
fallbacks: none
left for a later graph: 1
  - linear_5 (dim 1): a SequenceShard, gathered only where Python code reads it
gradients: 1
  - 12 input(s) requiring grad sum their gradient over the ring
rewritten graph:
def forward(self, *inputs):  # 14 inputs
    sum_grad_over_ring = sum_grad_over_ring(l_self_modules_embed_parameters_weight_)
    ring_shard = ring_shard(l_tokens_, 1)
    sum_grad_over_ring_1 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_norm1_parameters_weight_)
    sum_grad_over_ring_2 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_attn_modules_q_parameters_weight_)
    sum_grad_over_ring_3 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_attn_modules_kv_parameters_weight_)
    sum_grad_over_ring_4 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_attn_modules_o_parameters_weight_)
    sum_grad_over_ring_5 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_norm2_parameters_weight_)
    sum_grad_over_ring_6 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_weight_)
    sum_grad_over_ring_7 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_mlp_modules_0_parameters_bias_)
    sum_grad_over_ring_8 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_weight_)
    sum_grad_over_ring_9 = sum_grad_over_ring(l_self_modules_blocks_modules_0_modules_mlp_modules_2_parameters_bias_)
    sum_grad_over_ring_10 = sum_grad_over_ring(l_self_modules_norm_parameters_weight_)
    sum_grad_over_ring_11 = sum_grad_over_ring(l_self_modules_head_parameters_weight_)
    x = torch.nn.functional.embedding(ring_shard, sum_grad_over_ring, None, None, 2.0, False, False)
    arange = torch.arange(16, device = device(type='cpu'))
    ring_shard_1 = ring_shard(arange, 0)
    pos = ring_shard_1.float()
    getitem = pos[(slice(None, None, None), None)]
    getitem_1 = l_self_buffers_inv_freq_[(None, slice(None, None, None))]
    freqs = getitem * getitem_1
    emb = torch.cat((freqs, freqs), dim = -1)
    cos = emb.cos()
    cos_1 = cos.to(torch.float64)
    sin = emb.sin()
    sin_1 = sin.to(torch.float64)
    rms_norm = torch.rms_norm(x, (32,), sum_grad_over_ring_1, None)
    linear = torch._C._nn.linear(rms_norm, sum_grad_over_ring_2, None)
    view = linear.view(2, 8, 4, 8)
    q = view.transpose(1, 2)
    linear_1 = torch._C._nn.linear(rms_norm, sum_grad_over_ring_3, None)
    view_1 = linear_1.view(2, 8, 2, 2, 8)
    unbind = view_1.unbind(2)
    k = unbind[0]
    v = unbind[1]
    k_1 = k.transpose(1, 2)
    v_1 = v.transpose(1, 2)
    mul_1 = q * cos_1
    chunk = q.chunk(2, dim = -1)
    x1 = chunk[0]
    x2 = chunk[1]
    neg = -x2
    cat_1 = torch.cat((neg, x1), dim = -1)
    mul_2 = cat_1 * sin_1
    q_1 = mul_1 + mul_2
    mul_3 = k_1 * cos_1
    chunk_1 = k_1.chunk(2, dim = -1)
    x1_1 = chunk_1[0]
    x2_1 = chunk_1[1]
    neg_1 = -x2_1
    cat_2 = torch.cat((neg_1, x1_1), dim = -1)
    mul_4 = cat_2 * sin_1
    k_2 = mul_3 + mul_4
    out = ring_attention(q_1, k_2, v_1, is_causal = True, enable_gqa = True)
    transpose_3 = out.transpose(1, 2)
    reshape = transpose_3.reshape(2, 8, -1)
    linear_2 = torch._C._nn.linear(reshape, sum_grad_over_ring_4, None)
    x_1 = x + linear_2
    rms_norm_1 = torch.rms_norm(x_1, (32,), sum_grad_over_ring_5, None)
    input_1 = torch._C._nn.linear(rms_norm_1, sum_grad_over_ring_6, sum_grad_over_ring_7)
    input_2 = torch.nn.functional.silu(input_1, inplace = False)
    input_3 = torch._C._nn.linear(input_2, sum_grad_over_ring_8, sum_grad_over_ring_9)
    x_2 = x_1 + input_3
    rms_norm_2 = torch.rms_norm(x_2, (32,), sum_grad_over_ring_10, None)
    linear_5 = torch._C._nn.linear(rms_norm_2, sum_grad_over_ring_11, None)
    return (linear_5,)""",
    )
    assert_expected_inline(
        _changes(computed, cached),
        """\
@@
-positions fixed: 1
-  - arange (dim 0, positions) at ringcompile/testing_models.py:72
+positions fixed: 2
+  - getitem_1 (dim 0, table sliced to the length) at ringcompile/testing_models.py:71
+  - getitem (dim 0, table sliced to the length) at ringcompile/testing_models.py:71
@@
-  - the model's 13 parameters and buffers (on the first call)
+  - the model's 14 parameters and buffers (on the first call)
@@
-def forward(self, *inputs):  # 14 inputs
+def forward(self, *inputs):  # 15 inputs
@@
-    arange = torch.arange(16, device = device(type='cpu'))
-    ring_shard_1 = ring_shard(arange, 0)
-    pos = ring_shard_1.float()
-    getitem = pos[(slice(None, None, None), None)]
-    getitem_1 = l_self_buffers_inv_freq_[(None, slice(None, None, None))]
-    freqs = getitem * getitem_1
-    emb = torch.cat((freqs, freqs), dim = -1)
-    cos = emb.cos()
-    cos_1 = cos.to(torch.float64)
-    sin = emb.sin()
-    sin_1 = sin.to(torch.float64)
+    getitem = l_self_buffers_cos_cached_[slice(None, 16, None)]
+    ring_shard_2 = ring_shard(getitem, 0)
+    cos = ring_shard_2.to(torch.float64)
+    getitem_1 = l_self_buffers_sin_cached_[slice(None, 16, None)]
+    ring_shard_1 = ring_shard(getitem_1, 0)
+    sin = ring_shard_1.to(torch.float64)
@@
-    mul_1 = q * cos_1
+    mul = q * cos
@@
-    cat_1 = torch.cat((neg, x1), dim = -1)
-    mul_2 = cat_1 * sin_1
-    q_1 = mul_1 + mul_2
-    mul_3 = k_1 * cos_1
+    cat = torch.cat((neg, x1), dim = -1)
+    mul_1 = cat * sin
+    q_1 = mul + mul_1
+    mul_2 = k_1 * cos
@@
-    cat_2 = torch.cat((neg_1, x1_1), dim = -1)
-    mul_4 = cat_2 * sin_1
-    k_2 = mul_3 + mul_4
+    cat_1 = torch.cat((neg_1, x1_1), dim = -1)
+    mul_3 = cat_1 * sin
+    k_2 = mul_2 + mul_3""",
    )


@pytest.mark.parametrize(
    "options, words",
    [
        ({"layout": "spiral"}, "layout='spiral'"),
        ({"compiler": "tvm"}, "compiler='tvm'"),
        ({"rings": 2}, "unknown option"),
        ({"gather_outputs": "yes"}, "gather_outputs"),
        ({"group": 3}, "group must be"),
        ({"kernels": "cudnn"}, "kernels='cudnn' is not one of"),
        ({"mode": "fast"}, "mode='fast' is not one of"),
        ({"strategy": "a2a"}, "strategy='a2a' is not one of"),
        ({"mode": "reduce-overhead", "compiler": "aot_eager"}, "it needs compiler='inductor'"),
    ],
)
def test_bad_options(options, words):
    """Our error with our message alone at the first call (not Dynamo's BackendCompilerFailed and
    its "reporting a bug to PyTorch"); ring_shard raises it at once."""
    torch._dynamo.reset()
    model = TinyTransformer(layers=1)
    compiled = torch.compile(model, backend="ring", options=options)
    with pytest.raises(ringcompile.RingCompileError, match=words) as raised:
        compiled(torch.randint(0, 64, (1, 8)))
    assert "PyTorch" not in str(raised.value) and "TORCHDYNAMO" not in str(raised.value)
    # the traceback goes from the call straight to the backend, without Dynamo's frames
    assert not any("symbolic_convert" in str(entry.path) for entry in raised.traceback)
    with pytest.raises(ringcompile.RingCompileError, match=words):
        ringcompile.ring_shard(model, **options)


def test_mode_reaches_inductor(monkeypatch):
    """``torch.compile(model, backend="ring", mode="reduce-overhead")`` (torch allows no options
    beside a mode) hands the mode to the backend, whose inductor gets the mode's settings: CUDA
    graphs."""
    import ringcompile.backend as backend

    seen, real = [], backend._inner_compiler

    def inner(name, mode=None):
        seen.append((name, mode))
        seen.append(real(name, mode).keywords)
        return real("aot_eager")  # (the graph runs without compiling it for CUDA graphs)

    monkeypatch.setattr(backend, "_inner_compiler", inner)
    torch._dynamo.reset()
    model = TinyTransformer(layers=1)
    tokens = torch.randint(0, 64, (1, 8))
    torch.compile(model, backend="ring", mode="reduce-overhead")(tokens)
    assert seen == [
        ("inductor", "reduce-overhead"),
        {"config_patches": {"triton.cudagraphs": True}},
    ]


def test_normalize_makes_unseen_in_place_changes_out_of_place():
    """Pass 1: an in-place method on a tensor the graph made, which no view shares, becomes its
    out-of-place form and the readers after it read the result; on a graph input, or on a tensor
    a view shares, it stays in place. Values unchanged."""
    from ringcompile.passes import normalize
    from ringcompile.passes.context import RingContext

    def f(x, inp):
        a = x * 2
        a.mul_(3)
        b = a + 1
        c = x * 4
        view = c.view(-1)
        c.sub_(1)  # the view sees this change: kept
        inp.add_(1)  # a graph input: kept
        return b, view, inp

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    args = (torch.randn(2, 3), torch.randn(2, 3))
    torch.compile(f, backend=capture, fullgraph=True)(*(a.clone() for a in args))
    gm = graphs[0]
    want = gm(*(a.clone() for a in args))
    normalize.run(RingContext(gm=gm, group=None, layout_name="striped"))
    gm.recompile()
    code = "\n".join(ln.strip() for ln in gm.code.splitlines() if " = " in ln and " = L_" not in ln)
    assert_expected_inline(
        code,
        """\
a = l_x_ * 2
mul_ = a * 3;  a = None
b = mul_ + 1;  mul_ = None
c = l_x_ * 4;  l_x_ = None
view = c.view(-1)
sub_ = c.sub_(1);  c = sub_ = None
add_ = l_inp_.add_(1);  l_inp_ = add_ = None""",
    )
    for got, ref in zip(gm(*(a.clone() for a in args)), want):
        assert torch.equal(got, ref)


def test_ring_shard_forms():
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 8))
    model = TinyTransformer(layers=1).double()
    want = model(tokens)

    @ringcompile.ring_shard
    def bare(t):
        return model(t)

    @ringcompile.ring_shard(layout="zigzag", compiler="aot_eager")
    def with_options(t):
        return model(t)

    @ringcompile.ring_shard(compiler="aot_eager")
    class Tiny(TinyTransformer):
        pass

    cls_model = Tiny(layers=1).double()
    cls_model.load_state_dict(model.state_dict())
    instance = ringcompile.ring_shard(model, compiler="aot_eager")
    for got in (bare(tokens), with_options(tokens), cls_model(tokens), instance(tokens)):
        torch.testing.assert_close(got, want)


class _CountingAttention(torch.nn.Module):
    """Bumps a buffer in place on every call, its result unused (a counter, as some models keep)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, q, k, v):
        self.calls.add_(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_in_place_updates_survive_the_passes():
    """The passes' dead-code elimination keeps in-place methods whose result nobody reads."""
    torch._dynamo.reset()
    m = _CountingAttention()
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    compiled = torch.compile(m, backend="ring", options={"compiler": "eager"})
    out = compiled(q, q, q)
    compiled(q, q, q)
    assert int(m.calls) == 2
    torch.testing.assert_close(
        out,
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True),
        rtol=1e-12,
        atol=1e-12,
    )


def lengths_change(rank, world):
    """torch.compile's default (dynamic=None) makes the length symbolic once it changes; the
    backend then compiles that graph per length: each length exact, outputs and grads."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer(rope=True).double()
    reports = []
    compiled = torch.compile(
        model,
        backend=functools.partial(
            ringcompile.ring_backend, options={"compiler": "aot_eager"}, _reports=reports
        ),
    )
    errs = []
    for S in (16, 24, 20):
        tokens = torch.randint(0, 64, (2, S), generator=torch.Generator().manual_seed(S))
        w = torch.randn(2, S, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(S))
        model.zero_grad()
        ref = model(tokens)
        (ref * w).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        out = compiled(tokens)
        (out * w).sum().backward()
        errs.append(
            max(
                [_rel(out.detach(), ref.detach())]
                + [_rel(p.grad, ref_grads[n]) for n, p in model.named_parameters()]
            )
        )
    return errs, [r.seq_len for r in reports]


def test_changing_lengths_with_default_dynamic(gloo):
    for errs, lengths in gloo(2).run(lengths_change):
        assert all(e < TOL for e in errs), errs
        assert lengths == [16, 24, 20], lengths  # each length's graph went through the passes


def test_dead_code_elimination_keeps_mutating_ops(monkeypatch):
    """What ``remove_dead_code`` keeps when FX calls every node pure (torch 2.11 does so for
    custom ops with a mutable schema, and dropped the KV cache's append on the GPU image)."""
    from ringcompile.passes.context import _mutates

    monkeypatch.setattr(torch.fx.Node, "is_impure", lambda self, *a, **k: False)
    g = torch.fx.Graph()
    keys, values, positions, new = (g.placeholder(n) for n in ("keys", "values", "pos", "new"))
    new_pos = g.placeholder("new_pos")
    append = g.call_function(torch.ops.ringcompile.kv_cache_append.default,
                             (keys, values, positions, new, new, new_pos, 0, 2))  # fmt: skip
    bump = g.call_method("add_", (new_pos, 1))
    g.call_function(torch.ops.aten.mul.Tensor, (new, 2))  # dead and pure
    g.call_method("__eq__", (new, new))  # dead, and a dunder is not in-place
    g.output(new)
    g.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or _mutates(n))
    kept = [n for n in g.nodes if n.op in ("call_function", "call_method")]
    assert kept == [append, bump]


def _ring_against_eager(fn, inputs, leaves, w):
    """``fn`` on the ring (``aot_eager`` inside) against eager: relative errors of the output and
    of the gradients of ``(out * w).sum()`` with respect to ``leaves``, the output, and explain's
    report."""
    ref = fn(*inputs)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
    report = ringcompile.explain(fn, *inputs, options={"compiler": "aot_eager"})
    out = torch.compile(fn, backend="ring", options={"compiler": "aot_eager"})(*inputs)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    errs = [_rel(out.detach(), ref.detach())] + [_rel(a, b) for a, b in zip(grads, ref_grads)]
    return errs, out, report


def in_place_updates(rank, world):
    """``x.add_(y)`` is read later through ``x``: a local ``x`` changes on this rank's tokens, a
    full one on the full tensor (the local operand gathered); neither may change a copy."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 2, 16, 8, dtype=torch.float64, generator=g)

    def attend(q):
        h = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        local = torch.zeros_like(h)
        local.add_(h)  # h is local: so are zeros_like(h) and the update
        total = torch.zeros(1, 2, 16, 8, dtype=torch.float64)
        total.add_(h * 2)  # a full tensor made in the graph, changed by a local one
        return local + total

    errs, _, report = _ring_against_eager(attend, (q,), (q,), w)
    return errs, str(report)


def test_in_place_updates_change_the_tensor_later_reads_see(gloo):
    for rank, (errs, report) in enumerate(gloo(2).run(in_place_updates)):
        assert max(errs) < 1e-12, (rank, errs, report)


def one_kv_head_broadcast(rank, world):
    """SDPA broadcasts one K/V head against every query head without ``enable_gqa`` (Falcon-7B's
    multi-query attention): the ring does the same, exactly, and replaces the attention."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 16, 8, dtype=torch.float64, generator=g, requires_grad=True)
    kv = torch.randn(1, 1, 16, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 4, 16, 8, dtype=torch.float64, generator=g)

    def attend(q, kv):
        return torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True)

    errs, _, report = _ring_against_eager(attend, (q, kv), (q, kv), w)
    return errs, str(report)


def test_one_kv_head_broadcasts_without_enable_gqa(gloo):
    for rank, (errs, report) in enumerate(gloo(2).run(one_kv_head_broadcast)):
        assert max(errs) < TOL, f"rank {rank}: {errs}"
        assert "attention replaced: 1" in report and "fallbacks: none" in report, report


def value_head_dim_differs(rank, world, dq, dv, heads):
    """Values of another head dim than queries and keys (MLA: DeepSeek-V2/V3, Kimi-K2,
    MiniCPM3), causal, through the backend: errors against eager and the report."""
    torch._dynamo.reset()
    H, Hkv = heads
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, H, 16, dq, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, Hkv, 16, dq, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, Hkv, 16, dv, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, H, 16, dv, dtype=torch.float64, generator=g)

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=H != Hkv
        )

    errs, out, report = _ring_against_eager(attend, (q, k, v), (q, k, v), w)
    return errs, tuple(out.shape), str(report)


@pytest.mark.parametrize("dq, dv, heads", [(12, 6, (2, 2)), (8, 16, (4, 2))])
def test_value_head_dim_may_differ(gloo, dq, dv, heads):
    for rank, (errs, shape, report) in enumerate(
        gloo(2).run(value_head_dim_differs, dq, dv, heads)
    ):
        assert max(errs) < TOL, f"rank {rank}: {errs}"
        assert shape == (1, heads[0], 16, dv)
        assert "attention replaced: 1" in report and "fallbacks: none" in report, report


class RowsMLP(torch.nn.Module):
    """Attention whose input comes from a block that flattens (batch, sequence) into rows and
    back, as GPT-2's Conv1D and OPT's MLP do."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.w1 = torch.nn.Parameter(torch.randn(d, 2 * d))
        self.b1 = torch.nn.Parameter(torch.randn(2 * d))
        self.fc = torch.nn.Linear(2 * d, 3 * d)

    def forward(self, x):
        B, S, D = x.shape
        rows = x.view(-1, D)
        h = torch.addmm(self.b1, rows, self.w1)
        h = torch.softmax(torch.nn.functional.gelu(h), dim=1) + h
        qkv = self.fc(h).view(B, S, 3 * D)
        q, k, v = (
            t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in qkv.split(D, dim=-1)
        )
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def rows_kept_as_batch_and_sequence(rank, world):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = RowsMLP().double()
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    w = torch.randn(2, 2, 16, 4, dtype=torch.float64)
    errs, _, report = _ring_against_eager(model, (x,), list(model.parameters()), w)
    report = report.graphs[0]
    return errs, report.rows, report.gathers, report.code


def test_rows_flattened_with_the_batch_stay_sharded(gloo):
    for rank, (errs, rows, gathers, code) in enumerate(
        gloo(2).run(rows_kept_as_batch_and_sequence)
    ):
        assert max(errs) < TOL, f"rank {rank}: {errs}"
        assert len(rows) == 1 and rows[0].startswith("rows (batch 2): 5 row-by-row op(s)"), rows
        assert gathers == [], gathers  # the output leaves sharded
        # the flatten is gone, addmm became bias + matmul on (batch, local sequence, D)
        assert "addmm" not in code and " @ " in code and ".view(-1, 8)" not in code, code


class RotaryByAnotherName(torch.nn.Module):
    """Rotary angles from an input of positions that is not called "position...": it is
    recognised by use (cast to floating point, multiplied by the frequencies), not by name."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, d // 2) / (d // 2)))

    def forward(self, x, where):
        B, S, D = x.shape
        angles = where[:, :, None].float() * self.inv_freq  # (B, S, D/2)
        cos, sin = (torch.cat([t, t], dim=-1) for t in (angles.cos(), angles.sin()))
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k = q * cos + k * sin, k * cos - q * sin
        q, k, v = (t[:, None].to(x.dtype) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def positions_by_use(rank, world):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = RotaryByAnotherName().double()
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    where = torch.arange(16).expand(2, 16) * 3
    report = ringcompile.explain(model, x, where, options={"compiler": "aot_eager"}).graphs[0]
    out = torch.compile(model, backend="ring", options={"compiler": "aot_eager"})(x, where)
    return _rel(out, model(x, where)), report.positions, report.shards


def test_positions_recognised_by_use_not_name(gloo):
    for rank, (err, positions, shards) in enumerate(gloo(2).run(positions_by_use)):
        assert err < TOL, f"rank {rank}: {err}"
        assert [p.split(" at ")[0] for p in positions] == ["l_where_ (dim 1, positions)"], positions
        assert [s.split(" at ")[0] for s in shards] == ["l_x_ (dim 1, input)"], shards


def test_passes_import_helpers_not_each_other():
    """Each pass module imports the shared helper modules, never another pass (what two passes
    share belongs in a helper), and nothing above the passes (the backend)."""
    import ast
    import importlib
    import inspect

    from ringcompile.passes import PASSES

    passes = {p.run.__module__ for p in PASSES}
    assert len(passes) == len(PASSES) == 14
    for name in passes:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & (passes - {name}), (name, imported & passes)
        assert "ringcompile.backend" not in imported, name


def test_passes_run_after_the_passes_they_read():
    from ringcompile.passes import PASSES, RingContext, run_passes

    ctx = RingContext(torch.fx.symbolic_trace(lambda x: x + 1), None, "striped")
    skipped = tuple(p for p in PASSES if p.name != "plan_sequence")
    with pytest.raises(
        RuntimeError,
        match=r"pass shard_sequence reads the results of "
        r"\['plan_sequence'\], which did not run",
    ):
        run_passes(ctx, skipped)


def test_normalize_gives_one_spelling_per_op():
    """Pass 1 alone, ops before and after: operators (dunders, torch functions, methods with two
    operands) become ``operator`` functions, torch functions that are tensor methods become the
    methods, and SDPA's options are bound by name; each value is unchanged."""
    from ringcompile.passes import normalize
    from ringcompile.passes.context import RingContext

    def f(x, y, q):
        a = torch.transpose(x, 1, 2)
        b = torch.eq(torch.sum(a, -1), 0)
        c = x.__eq__(y) & x.__rmul__(2.0).gt(y)
        d = x.mul(y).add(y, alpha=2)  # add with alpha is no operator: kept
        o = torch.nn.functional.scaled_dot_product_attention(q, q, q, None, 0.0, True)
        return a, b, c, d, o

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    args = (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(1, 2, 8, 4))
    torch.compile(f, backend=capture, fullgraph=True)(*args)
    gm = graphs[0]
    want = gm(*args)
    normalize.run(RingContext(gm=gm, group=None, layout_name="striped"))
    gm.recompile()
    # (how Dynamo spells them before differs between torch versions; after, it does not)
    code = "\n".join(ln.strip() for ln in gm.code.splitlines() if " = " in ln and " = L_" not in ln)
    assert_expected_inline(
        code,
        """\
a = l_x_.transpose(1, 2)
sum_1 = a.sum(-1)
b = sum_1 == 0;  sum_1 = None
eq_1 = l_x_ == l_y_
rmul = 2.0 * l_x_
gt = rmul > l_y_;  rmul = None
c = eq_1 & gt;  eq_1 = gt = None
mul = l_x_ * l_y_;  l_x_ = None
d = mul.add(l_y_, alpha = 2);  mul = l_y_ = None
o = torch._C._nn.scaled_dot_product_attention(l_q_, l_q_, l_q_, attn_mask = None, dropout_p = 0.0, is_causal = True);  l_q_ = None""",
    )
    for got, ref in zip(gm(*args), want):
        assert torch.equal(got, ref)

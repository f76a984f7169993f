"""flex_attention under the ring backend (pass 0, ``flex_attention``): a call whose ``score_mod``
adds a bias or nothing, to the score or to its soft cap, becomes SDPA (with that cap) with the
mask its ``mask_mod`` describes, which the ring then
shards as any model's mask (lifted to per-token facts where it reads one, a dense mask otherwise);
any other call attends over the gathered sequence on every rank, listed among the fallbacks.

Dynamo records ``create_block_mask``'s vmapped ``mask_mod`` with functorch's level bookkeeping,
calls whose results nobody reads; dead-code elimination must keep them. Flex runs forward only on
the CPU (Dynamo refuses inputs that need gradients), so these compare forwards: in float64 against
SDPA under the same dense mask, and transformers' flex models in float32 against themselves.
"""

from __future__ import annotations

import pytest
import torch

from ringcompile.backend import _compile

flex = pytest.importorskip("torch.nn.attention.flex_attention")

S, H, HKV, D = 16, 4, 2, 8
DOC = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])  # (B, S), as torchtitan's document masks
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)


def causal(b, h, q, kv):
    return kv <= q


def documents(b, h, q, kv):  # reads a captured tensor
    return DOC[b, q] == DOC[b, kv]


def window(b, h, q, kv):  # flex's spelling of a sliding window
    return q - kv < 4


def prefix(b, h, q, kv):  # prefix-LM's prefix, seen by every query
    return kv < 6


def same_head_parity(b, h, q, kv):  # no rule: a tensor read by head and by both indices
    return (DOC[b, q] + DOC[b, kv] + h) % 2 == 0


def strided(b, h, q, kv):  # no rule either: every third key, and the query's own
    return (kv % 3 == 0) | (kv == q)


def alibi(score, b, h, q, kv):
    return score + SLOPES[h] * (kv - q)


def soft_cap(score, b, h, q, kv):
    return 20 * torch.tanh(score / 20)


def soft_cap_inside(score, b, h, q, kv):  # the bias under the cap: not what the ring computes
    return 20 * torch.tanh((score + SLOPES[h] * (kv - q)) / 20)


CASES = {
    "causal": (causal, None),
    "documents": (flex.and_masks(causal, documents), None),
    "window": (flex.and_masks(causal, window), None),
    "prefix_lm": (flex.or_masks(causal, prefix), None),
    "head_parity": (flex.and_masks(causal, same_head_parity), None),
    "strided_soft_cap": (strided, soft_cap),
    "alibi": (causal, alibi),
    "soft_cap": (causal, soft_cap),
    "soft_cap_inside": (causal, soft_cap_inside),
}


def _reference(q, k, v, case):
    """The case's attention in plain float64 arithmetic."""
    mask_mod, score_mod = CASES[case]
    qi, kv = torch.arange(S)[:, None], torch.arange(S)[None]
    allowed = mask_mod(torch.zeros((), dtype=torch.long), torch.arange(H)[:, None, None], qi, kv)
    k, v = (t.repeat_interleave(H // HKV, 1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / D**0.5
    if score_mod is alibi:
        scores = scores + SLOPES[:, None, None] * (kv - qi)
    if score_mod is soft_cap:
        scores = 20 * torch.tanh(scores / 20)
    if score_mod is soft_cap_inside:
        scores = 20 * torch.tanh((scores + SLOPES[:, None, None] * (kv - qi)) / 20)
    # a row the mask hides everywhere gives zeros, as flex gives
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0) @ v


def flex_function(rank, world, case, dtype=torch.float64, layout="striped", lse=None):
    """A function that builds its block mask and calls flex_attention, compiled with the ring:
    its error against the reference (float64) and its report. ``lse``: "unread", the call asks
    for its log-sum-exp and casts it, which nothing reads (transformers on the GPU); "read", the
    function returns it too."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, S, D, dtype=dtype, generator=g)
    k, v = (torch.randn(1, HKV, S, D, dtype=dtype, generator=g) for _ in range(2))
    mask_mod, score_mod = CASES[case]

    def attend(q, k, v):
        block_mask = flex.create_block_mask(mask_mod, 1, None, S, S, device="cpu")
        if lse is None:
            return flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                       enable_gqa=True)  # fmt: skip
        out, aux = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                       enable_gqa=True, return_aux=flex.AuxRequest(lse=True))  # fmt: skip
        weights = aux.lse.to(q.dtype)
        return out if lse == "unread" else (out, weights)

    reports = []
    out = _compile(attend, {"compiler": "aot_eager", "layout": layout}, {}, reports)(q, k, v)
    out = out if lse != "read" else out[0]
    (report,) = reports
    ref = _reference(q.double(), k.double(), v.double(), case)
    return float((out.double() - ref).abs().max()), report


@pytest.mark.parametrize("world, layout", [(1, "striped"), (3, "zigzag"), (4, "contiguous")])
@pytest.mark.parametrize("case", ["documents", "head_parity", "alibi"])
def test_flex_attention_on_other_rings(gloo, world, layout, case):
    """Lifted to facts (documents) or evaluated per step (a mask_mod that is no rule; ALiBi's
    bias), on rings of 1, 3 and 4 in every layout (16 tokens: the zigzag ring of 3 pads)."""
    for err, _ in gloo(world).run(flex_function, case, torch.float64, layout):
        assert err < 1e-10, err


@pytest.mark.parametrize("lse", ["unread", "read"])
def test_a_log_sum_exp_nothing_reads_is_dropped(gloo, lse):
    """transformers asks flex for its log-sum-exp on the GPU and casts it, into attention weights
    its layers drop: the call still goes to the ring. A log-sum-exp the function returns keeps
    flex, over the gathered sequence."""
    for err, report in gloo(2).run(flex_function, "documents", torch.float64, "striped", lse):
        assert err < 1e-10, err
        fell_back = [f for f in report.fallbacks if "log-sum-exp is read" in f]
        assert (len(fell_back), len(report.attention)) == ((0, 1) if lse == "unread" else (1, 0))


def test_a_float64_bias_on_float32_inputs(gloo):
    """ALiBi's slopes in float64 on float32 queries: the bias is evaluated in float32 (what SDPA
    and the ring's blocks take), not promoted."""
    for err, report in gloo(2).run(flex_function, "alibi", torch.float32):
        assert err < 1e-5, err
        assert "mask_with_bias_0" in report.attention[0], report.attention


@pytest.mark.parametrize("case, what", [
    ("causal", "is_causal=True, per-token mask facts; ring"),
    ("documents", "is_causal=True, per-token mask facts; ulysses"),
    ("window", "is_causal=True, per-token mask facts; ring"),
    ("prefix_lm", "is_causal=True, per-token mask facts; ring"),
    ("head_parity", "is_causal=False, flex mask_mod mask_fn_0 evaluated on each step's block; ring"),
    ("strided_soft_cap", "is_causal=False, flex mask_mod mask_fn_0 evaluated on each step's block, "
                         "scores soft-capped at 20; ring"),
    ("alibi", "is_causal=False, flex mask_mod and score_mod's bias mask_with_bias_0 evaluated on "
              "each step's block; ring"),
    ("soft_cap", "is_causal=True, per-token mask facts, scores soft-capped at 20; ring"),
    ("soft_cap_inside", None),
])  # fmt: skip
def test_flex_attention_on_two_ranks(gloo, case, what):
    for err, report in gloo(2).run(flex_function, case):
        assert err < 1e-10, err
        if what is None:  # a score_mod of another form: flex stays, over the gathered sequence
            assert report.attention == [], report.attention
            (line,) = report.fallbacks
            assert "test_flex.py" in line and "not a bias added to the score" in line, line
        else:  # the line is the user's call, not flex_attention's module
            (line,) = report.attention
            assert "test_flex.py" in line and what in line, line
        # the mask_mod (with the score_mod's bias: one function of both) and the tensors they
        # read go to the ring, which builds no S x S mask
        calls = {"head_parity": "mask_mod = mask_fn_0, mask_buffers = [g_doc_]",
                 "alibi": "mask_mod = mask_with_bias_0, mask_buffers = [g_slopes_]"}  # fmt: skip
        if case in calls:
            (call,) = [c for c in report.code.split("\n") if "ring_attention(" in c]
            assert calls[case] in call and "attn_mask" not in call, call


def flex_llama(rank, world, data):
    """transformers' Llama with attn_implementation="flex_attention", compiled: the error of its
    logits against the same model uncompiled (float32), and the reports."""
    from test_transformers import V, _model

    torch._dynamo.reset()
    model = _model("llama").float().eval()
    model.set_attn_implementation("flex_attention")
    B = 2 if data == "padded" else 1
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "use_cache": False}
    if (
        data == "packed"
    ):  # two documents: transformers derives their ids from the restarting positions
        kw["position_ids"] = torch.cat([torch.arange(6), torch.arange(10)])[None]
    if data == "padded":  # row 0 left-padded by 5
        kw["attention_mask"] = torch.ones(B, S, dtype=torch.long)
        kw["attention_mask"][0, :5] = 0
    with torch.no_grad():
        ref = model(**kw).logits
        reports = []
        out = _compile(model, {"compiler": "aot_eager"}, {}, reports)(**kw).logits
    return float((out - ref).abs().max()), reports


@pytest.mark.parametrize("world, data", [(1, "causal"), (2, "packed"), (2, "padded")])
def test_transformers_flex_model(gloo, world, data):
    for err, reports in gloo(world).run(flex_llama, data):
        assert err < 1e-5, err
        (body,) = [r for r in reports if r.attention]
        assert len(body.attention) == 2 and body.fallbacks == [], body
        assert all("per-token mask facts" in a for a in body.attention), body.attention
        if data == "padded":  # its mask reads as causality and key padding
            continue
        # the block mask is built in a graph of its own (create_block_mask breaks the graph): the
        # layers' graph gets position ids and the document ids an earlier graph derived from them
        # as inputs, and reads its mask as causality inside those documents
        assert all("-> causal, document_ids=" in x for x in body.lifted), body.lifted
        assert len(body.arrived) == 1 and "derived from the position ids" in body.arrived[0]


def test_pass_alone_ops_before_and_after():
    """Pass 0 on the causal function's Dynamo graph: the flex call is gone, one SDPA reads the
    inlined mask_mod on aranges, and the block mask's construction is left for dead-code
    elimination (its vmap bookkeeping kept)."""
    from ringcompile.passes import PASSES, RingContext, run_passes
    from ringcompile.passes.flex_attention import is_flex
    from ringcompile.passes.fx_utils import is_sdpa, sdpa_args

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    q = torch.randn(1, H, S, D)
    k, v = (torch.randn(1, HKV, S, D) for _ in range(2))

    def attend(q, k, v):
        block_mask = flex.create_block_mask(causal, 1, None, S, S, device="cpu")
        return flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

    torch._dynamo.reset()
    want = torch.compile(attend, backend=capture)(q, k, v)
    (gm,) = graphs
    assert sum(map(is_flex, gm.graph.nodes)) == 1 and not any(map(is_sdpa, gm.graph.nodes))
    ctx = RingContext(gm=gm, group=None, layout_name="striped")
    run_passes(ctx, PASSES[:1])
    assert not any(map(is_flex, gm.graph.nodes)) and ctx.report.fallbacks == []
    (sdpa,) = [n for n in gm.graph.nodes if is_sdpa(n)]
    a = sdpa_args(sdpa)
    assert a["enable_gqa"] is True and a["scale"] == pytest.approx(D**-0.5)
    assert a["attn_mask"].target.__name__ == "le"  # kv_idx <= q_idx, inlined
    ctx.remove_dead_code()
    levels = [n.target.__name__ for n in gm.graph.nodes if "nesting" in str(n.target)]
    assert levels.count("_vmap_increment_nesting") == levels.count("_vmap_decrement_nesting") > 0
    gm.recompile()
    torch.testing.assert_close(gm(q, k, v)[0], want)  # SDPA's float32 rounding, not flex's


@pytest.mark.gpu
def test_transformers_flex_model_trains_on_the_gpu():
    """On the GPU flex has a backward: the compiled flex Llama (one process) against the same
    model eager, logits and every parameter gradient in float32."""
    import transformers

    torch._dynamo.reset()
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation="flex_attention")  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, 128, (1, 256), device="cuda")
    positions = torch.cat([torch.arange(100), torch.arange(156)])[None].cuda()

    def step(m):
        model.zero_grad()
        out = m(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref, ref_grads = step(model)
    reports = []
    out, grads = step(_compile(model, {"compiler": "aot_eager"}, {}, reports))
    errs = [float((a - b).norm() / b.norm()) for a, b in zip([out, *grads], [ref, *ref_grads])]
    assert max(errs) < 1e-4, errs
    # every flex call went to the ring (transformers asks for the log-sum-exp on the GPU, and
    # reads it for nothing), its mask read as causality inside the derived documents
    assert sum(len(r.attention) for r in reports) >= 2, [r.attention for r in reports]
    assert not [f for r in reports for f in r.fallbacks if "flex_attention" in f]

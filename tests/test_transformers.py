"""Hugging Face transformers models run unmodified through the ``ring`` backend, exactly.

Tiny random Llama, Mistral and Qwen2 models in float64: logits, the loss transformers computes from
``labels`` and every parameter gradient match eager, and the report shows that transformers' masks
became per-token facts and that only the KV heads travel.
"""

from __future__ import annotations

import contextlib
import operator
import re
import unittest.mock

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringcompile.backend import _compile, ring_backend
from ringcompile.report import readable_code

transformers = pytest.importorskip("transformers")

TOL = 1e-10
V, S = 64, 16


def _rel(a, b):
    # (a gradient that vanishes mathematically, such as OPT's key bias under a softmax that
    # ignores a shift common to a row, is rounding noise of ~1e-17 on both sides: absolute there)
    return float((a - b).norm() / b.norm().clamp_min(1e-6))


def _model(arch: str):
    if arch.startswith("falcon"):  # Falcon-7B's attention: one K/V head, fused qkv, parallel MLP
        config = transformers.FalconConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            multi_query=True, new_decoder_architecture=False, parallel_attn=True,
            alibi=arch == "falcon-alibi", max_position_embeddings=64,
            attn_implementation="sdpa")  # fmt: skip
        torch.manual_seed(0)
        return transformers.FalconForCausalLM(config).double()
    if arch == "opt":  # its MLP runs on rows flattened from (batch, sequence)
        config = transformers.OPTConfig(
            vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0,
            attention_dropout=0.0, attn_implementation="sdpa")  # fmt: skip
        torch.manual_seed(0)
        model = transformers.OPTForCausalLM(config).double()
        model.loss_type = (
            "ForCausalLM"  # unset, transformers logs a warning, which breaks the graph
        )
        return model
    if arch == "gemma2":  # eager attention only (SDPA has no soft cap), windows in layer 0
        config = transformers.Gemma2Config(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            attn_implementation="eager")  # fmt: skip
        torch.manual_seed(0)
        return transformers.Gemma2ForCausalLM(config).double()
    if arch == "llama-eager":
        model = _model("llama")
        model.set_attn_implementation("eager")
        return model
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[arch]
    # windows shorter than S, so they really cut; Qwen2 windows layer 1 only: two masks, one graph
    extra = {
        "mistral": {"sliding_window": 5},
        "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    }.get(arch, {})
    config = config_cls(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        **extra,
    )
    torch.manual_seed(0)
    return model_cls(config).double()


def _inputs(seq_len: int, mask: str, use_cache: bool | None) -> dict:
    ids = torch.randint(0, V, (2, seq_len))
    kw = {"input_ids": ids, "labels": ids.clone()}
    if use_cache is not None:
        kw["use_cache"] = use_cache
    if mask in ("left", "right"):
        am = torch.ones(2, seq_len, dtype=torch.long)
        pad = slice(None, 3) if mask == "left" else slice(seq_len - 4, None)
        am[0, pad] = 0
        kw["attention_mask"] = am
        kw["labels"][0, pad] = -100
    elif mask == "packed":
        # two documents in row 0, three in row 1: transformers derives document ids from these
        cut0, cut1 = seq_len * 3 // 8, seq_len // 4
        row0 = torch.cat([torch.arange(cut0), torch.arange(seq_len - cut0)])
        row1 = torch.cat([torch.arange(cut1), torch.arange(cut1), torch.arange(seq_len - 2 * cut1)])
        kw["position_ids"] = torch.stack([row0, row1])
    elif mask == "dense":
        # an arbitrary 4-D mask (diagonal kept so every row sees a key): nothing to lift
        dense = torch.rand(2, 1, seq_len, seq_len) < 0.5
        kw["attention_mask"] = dense | torch.eye(seq_len, dtype=torch.bool)
    return kw


def compare_hf(rank, world, arch, seq_len, mask, use_cache, embeds=False, options=None,
               reference_context=None):  # fmt: skip
    """Relative errors of the compiled model against eager (logits, loss, every parameter grad and,
    with ``embeds``, the grad of ``inputs_embeds``), and the backend's reports of the same run (one
    per graph, what ``explain`` shows). ``options``: the backend's, beside aot_eager;
    ``reference_context``: a context manager factory the eager run alone enters."""
    torch._dynamo.reset()
    model = _model(arch)
    torch.manual_seed(1)
    kw = _inputs(seq_len, mask, use_cache)
    leaves = dict(model.named_parameters())
    if embeds:
        tokens = kw.pop("input_ids")
        kw["inputs_embeds"] = model.get_input_embeddings()(tokens).detach().requires_grad_()
        leaves["inputs_embeds"] = kw["inputs_embeds"]
    # the logits term makes every gradient O(1), so the tolerance below says something
    w = torch.randn(2, seq_len, V, dtype=torch.float64)

    def step(m):
        for t in leaves.values():
            t.grad = None
        out = m(**kw)
        (out.loss + (out.logits * w).sum()).backward()
        return out, {n: t.grad.clone() for n, t in leaves.items() if t.grad is not None}

    # Falcon-ALiBi's rows that left padding hides everywhere: SDPA's CPU flash kernel (which it
    # takes once K/V are expanded, as transformers 5.25 does) differentiates them from an lse
    # that lost log(n) in rounding, n times off its own forward's weights; its math backend
    # differentiates what the forward computes, as the ring does
    with (sdpa_kernel(SDPBackend.MATH) if arch == "falcon-alibi" else contextlib.nullcontext(),
          reference_context() if reference_context else contextlib.nullcontext()):  # fmt: skip
        ref, ref_grads = step(model)
    reports = []
    out, grads = step(_compile(model, {"compiler": "aot_eager", **(options or {})}, {}, reports))
    errs = {
        "logits": _rel(out.logits.detach(), ref.logits.detach()),
        "loss": _rel(out.loss.detach(), ref.loss.detach()),
    }
    errs.update(
        {n: _rel(grads[n], g) if n in grads else float("inf") for n, g in ref_grads.items()}
    )
    return errs, reports


def _facts(arch: str, mask: str, layer: int) -> str:
    """The per-token facts transformers' mask for this layer must become, as a regex."""
    parts = ["causal"]
    if arch == "mistral" or (arch == "qwen2" and layer == 1):
        parts.append(r"window \(4, -1\)")  # kv > q - 5, sliding_window=5
    if mask in ("left", "right"):
        parts.append(r"key_padding_mask=\w+")
    if mask == "packed":
        parts.append(r"document_ids=\w+")
    return r"mask \w+ -> " + ", ".join(parts) + "$"


# transformers computes its loss in float32 (``logits.float()``) even for a float64 model, and the
# ring adds the ranks' partial losses in another order: the loss agrees to float32 rounding, the
# gradients (which do not depend on that order) to float64's
LOSS_TOL = 1e-6


def _only_left(graph, name: str) -> None:
    """Nothing gathered inside the graph; ``name`` alone leaves it, sharded (gathered where read)."""
    assert graph.gathers == [], graph.gathers
    assert [x.split(" (")[0] for x in graph.left] == [name], graph.left


def _assert_exact(results) -> None:
    for rank, (errs, _) in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v < (LOSS_TOL if k == "loss" else TOL)}
        assert not bad, f"rank {rank}: {bad}"


# W=2 for every mask and cache mode; W=4 for Llama and Qwen2 (Mistral's W=4 case was cut for the
# suite's time). S=15: a length the ring does not divide. Packed sequences need use_cache=False: transformers reads documents only without a cache.
CASES = [
    ("llama", 2, 16, "left", False),
    ("llama", 2, 16, "right", None),
    ("llama", 4, 15, "packed", False),
    ("mistral", 2, 16, "packed", False),
    ("mistral", 2, 15, "right", None),
    ("mistral", 2, 16, "left", None),
    ("qwen2", 2, 15, "left", False),
    ("qwen2", 2, 16, "packed", False),
    ("qwen2", 4, 16, "right", None),
]


@pytest.mark.parametrize(
    "arch, world, seq_len, mask, use_cache",
    CASES,
    ids=[f"{a}-W{w}-S{s}-{m}-{'nocache' if c is False else 'cache'}" for a, w, s, m, c in CASES],
)
def test_matches_eager_and_lifts_masks(gloo, arch, world, seq_len, mask, use_cache):
    """Exact against eager, with every mask lifted to per-token facts and only KV heads sent."""
    results = gloo(world).run(compare_hf, arch, seq_len, mask, use_cache)
    _assert_exact(results)
    (graph,) = results[0][1]  # one graph: no graph breaks
    assert graph.fallbacks == [], graph.fallbacks
    # documents attend by Ulysses (heads 4 and KV heads 2 split over 2 and 4 ranks), windows
    # (Mistral's on both layers, Qwen2's on layer 1) from 4 ranks on, key padding alone on the ring
    windowed = [arch == "mistral", arch in ("mistral", "qwen2")]
    strategies = ["ulysses" if mask == "packed" or (w and world >= 4) else "ring" for w in windowed]
    assert [a.split("; ")[0].split(": ", 1)[1] for a in graph.attention] == [
        "is_causal=True, per-token mask facts"
    ] * 2, graph.attention
    assert [a.split("; ")[1].split(":")[0] for a in graph.attention] == strategies, graph.attention
    # per layer: the repeat_kv expansion undone, the dense mask replaced by its facts
    expanded = [x for x in graph.lifted if "K/V expanded 2x by repeat_kv; 2 KV heads travel" in x]
    masks = [x for x in graph.lifted if "-> " in x]
    assert len(expanded) == 2 and len(masks) == 2, graph.lifted
    assert all(re.search(_facts(arch, mask, i), x) for i, x in enumerate(masks)), masks
    # rotary cos/sin follow the sequence back to the one tensor of positions (position_ids when
    # given, else an arange); a KV cache concatenated along the sequence is no positions
    want = "l_kwargs_position_ids_ (dim 1" if mask == "packed" else "arange (dim 0"
    assert [p.split(")")[0] for p in graph.positions] == [f"{want}, positions"], graph.positions
    # the labels= loss (batch 2: logits flattened with the batch) reads each rank's rows
    assert [r.split(" (")[0] for r in graph.reductions] == ["loss"], graph.reductions
    assert not any("loss_utils" in g for g in graph.gathers), graph.gathers


@pytest.mark.parametrize("use_cache", [None, False], ids=["cache", "nocache"])
def test_causal_without_mask(gloo, use_cache):
    """No padding, no packing: transformers passes ``is_causal`` and ``enable_gqa`` itself (with
    a cache) or a causal mask with document ids of its own positions (without: training)."""
    results = gloo(2).run(compare_hf, "llama", S, "none", use_cache)
    _assert_exact(results)
    (graph,) = results[0][1]
    # transformers versions differ: some skip the mask, others build one (lifted to causal)
    assert graph.fallbacks == []
    assert len(graph.attention) == 2 and all(
        a.endswith(
            (
                "is_causal=True, no mask; ring: plain blocks hide the K/V transfers (auto)",
                "is_causal=True, per-token mask facts; ring: plain blocks hide the K/V transfers (auto)",
            )
        )
        for a in graph.attention
    ), graph.attention
    # document ids transformers derives from positions it made itself (an arange) are one
    # document: no rule, so every ring block stays plain (for the fused kernels)
    assert not any("document_ids" in x for x in graph.lifted), graph.lifted
    assert graph.steps and all(
        "masked" not in line for *_, lines in graph.steps for line in lines
    ), graph.steps


def test_inputs_embeds_gradient(gloo):
    """``inputs_embeds`` that require grad: a graph input both sharded and gradient-synced."""
    results = gloo(2).run(compare_hf, "mistral", S, "left", False, True)
    _assert_exact(results)
    assert all("inputs_embeds" in errs for errs, _ in results)


def test_unliftable_mask_falls_back_exactly(gloo):
    """An arbitrary 4-D boolean attention_mask is no index rule: it stays dense, exactly."""
    results = gloo(2).run(compare_hf, "llama", S, "dense", False)
    _assert_exact(results)
    (graph,) = results[0][1]
    assert len(graph.fallbacks) == 2 and all(
        "dense mask kept (this rank's rows over all keys)" in f for f in graph.fallbacks
    ), graph.fallbacks
    assert len(graph.attention) == 2 and all(
        "dense mask (local rows x global keys); ring: " in a for a in graph.attention
    ), graph.attention
    assert sum("K/V expanded" in x for x in graph.lifted) == 2, graph.lifted


def _masked_attention(q, k, v, padding, extra):
    """Attention as transformers writes it: a causal sliding-window mask with key padding, built
    from aranges, and K/V expanded by ``repeat_kv``; then the same mask and an arbitrary one."""
    B, _, L, D = q.shape
    b, idx = torch.arange(B), torch.arange(L)
    q_idx, kv_idx = idx[None, None, :, None], idx[None, None, None, :]
    mask = (kv_idx <= q_idx) & (kv_idx > q_idx - 3) & padding[b[:, None, None, None], kv_idx]
    mask = mask.expand(B, -1, L, L)
    k = k[:, :, None].expand(B, 2, 2, L, D).reshape(B, 4, L, D)
    v = v[:, :, None].expand(B, 2, 2, L, D).reshape(B, 4, L, D)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.nn.functional.scaled_dot_product_attention(out, k, v, attn_mask=mask & extra)


def mask_passes_before_after(rank, world):
    """The Dynamo graph before the passes and the backend's report after them."""
    torch._dynamo.reset()
    before, reports = [], []

    def backend(gm, example_inputs):
        before.append(readable_code(gm))
        return ring_backend(gm, example_inputs, {"compiler": "aot_eager"}, reports)

    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 8, 8, dtype=torch.float64) for _ in range(2))
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[0, -2:] = False
    extra = (torch.rand(8, 8) < 0.7) | torch.eye(8, dtype=torch.bool)
    got = torch.compile(_masked_attention, backend=backend, dynamic=False)(q, k, v, padding, extra)
    want = _masked_attention(q, k, v, padding, extra)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (report,) = reports
    return f"before:\n{before[0]}\n\nafter:\n{report}"


def test_snapshot_mask_passes(gloo):
    """unexpand_kv and lift_masks, ops before and after: both SDPAs read the KV heads unexpanded;
    the first gets causal + window + key padding facts for its mask, the second (that mask and an
    arbitrary one) keeps this rank's dense rows and the report says why."""
    text = gloo(2).run(mask_passes_before_after)[0]
    assert_expected_inline(
        re.sub(r" at \S+:\d+", "", text),
        """\
before:
def forward(self, *inputs):  # 5 inputs
    b = torch.arange(2)
    idx = torch.arange(8)
    q_idx = idx[(None, None, slice(None, None, None), None)]
    kv_idx = idx[(None, None, None, slice(None, None, None))]
    le = kv_idx <= q_idx
    sub = q_idx - 3
    gt = kv_idx > sub
    and_ = le & gt
    getitem_2 = b[(slice(None, None, None), None, None, None)]
    getitem_3 = l_padding_[(getitem_2, kv_idx)]
    mask = and_ & getitem_3
    mask_1 = mask.expand(2, -1, 8, 8)
    getitem_4 = l_k_[(slice(None, None, None), slice(None, None, None), None)]
    expand_1 = getitem_4.expand(2, 2, 2, 8, 8)
    k = expand_1.reshape(2, 4, 8, 8)
    getitem_5 = l_v_[(slice(None, None, None), slice(None, None, None), None)]
    expand_2 = getitem_5.expand(2, 2, 2, 8, 8)
    v = expand_2.reshape(2, 4, 8, 8)
    out = torch._C._nn.scaled_dot_product_attention(l_q_, k, v, attn_mask = mask_1)
    and__2 = mask_1 & l_extra_
    scaled_dot_product_attention_1 = torch._C._nn.scaled_dot_product_attention(out, k, v, attn_mask = and__2)
    return (scaled_dot_product_attention_1,)

after:
ring graph: sequence of 8 tokens over 2 ranks, striped layout
attention replaced: 2
  - out: is_causal=True, per-token mask facts; ring: window on 2 ranks: 2 masked ring steps cost less than the all-to-alls (auto)
  - scaled_dot_product_attention_1: is_causal=False, dense mask (local rows x global keys); ring: a dense mask's rows would all have to reach every rank (auto)
ring steps of this rank (out, scaled_dot_product_attention_1; torch.float64 on cpu, head dim 8):
  - step 0 (own block): masked -> reference
  - step 1 (keys of rank 1): masked -> reference
attention inputs recognised: 3
  - out: K/V expanded 2x by repeat_kv; 2 KV heads travel
  - scaled_dot_product_attention_1: K/V expanded 2x by repeat_kv; 2 KV heads travel
  - out: mask mask_1 -> causal, window (2, -1), key_padding_mask=l_padding_
rows kept as (batch, sequence): none
positions fixed: 1
  - idx (dim 0, positions)
sharded where they enter: 5
  - l_extra_ (dim 0, input)
  - l_v_ (dim 2, input)
  - l_k_ (dim 2, input)
  - l_padding_ (dim 1, input)
  - l_q_ (dim 2, input)
inputs compared across the ring (first call): 5
  - q (l_q_)
  - padding (l_padding_)
  - k (l_k_)
  - v (l_v_)
  - extra (l_extra_)
gathered: none
reductions kept sharded: none
fallbacks: 1
  - scaled_dot_product_attention_1: dense mask kept (this rank's rows over all keys): l_extra_ (placeholder L_extra_) is not an index rule
left for a later graph: 1
  - scaled_dot_product_attention_1 (dim 2): a SequenceShard, gathered only where Python code reads it
gradients: none
rewritten graph:
def forward(self, *inputs):  # 5 inputs
    ring_shard_5 = ring_shard(l_q_, 2)
    ring_shard_4 = ring_shard(l_padding_, 1)
    ring_shard_3 = ring_shard(l_k_, 2)
    ring_shard_2 = ring_shard(l_v_, 2)
    ring_shard = ring_shard(l_extra_, 0)
    b = torch.arange(2)
    idx = torch.arange(8)
    ring_shard_1 = ring_shard(idx, 0)
    q_idx = ring_shard_1[(None, None, slice(None, None, None), None)]
    kv_idx = idx[(None, None, None, slice(None, None, None))]
    le = kv_idx <= q_idx
    sub = q_idx - 3
    gt = kv_idx > sub
    and_ = le & gt
    getitem_2 = b[(slice(None, None, None), None, None, None)]
    getitem_3 = l_padding_[(getitem_2, kv_idx)]
    mask = and_ & getitem_3
    mask_1 = mask.expand(2, -1, 4, 8)
    out = ring_attention(ring_shard_5, ring_shard_3, ring_shard_2, enable_gqa = True, is_causal = True, key_padding_mask = ring_shard_4, window = (2, -1))
    and__2 = mask_1 & ring_shard
    scaled_dot_product_attention_1 = ring_attention(out, ring_shard_3, ring_shard_2, attn_mask = and__2, enable_gqa = True)
    return (scaled_dot_product_attention_1,)""",
    )


def _document_attention(q, k, v, docs):
    """Causal attention within packed documents, the mask built from aranges and document ids."""
    B, _, L, _ = q.shape
    b, idx = torch.arange(B)[:, None, None, None], torch.arange(L)
    q_idx, kv_idx = idx[None, None, :, None], idx[None, None, None, :]
    mask = (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fn", ["window", "documents"])
def test_masks_recorded_as_dunder_methods_lift_too(fn):
    """torch 2.11's Dynamo records ``a == b``, ``a & b``, ``a <= b`` as ``call_method __eq__``
    and so on where 2.13 records ``operator.eq``: the same mask must give the same facts."""
    torch._dynamo.reset()
    dunder = {
        operator.le: "__le__",
        operator.gt: "__gt__",
        operator.and_: "__and__",
        operator.sub: "__sub__",
        operator.eq: "__eq__",
    }
    reports, rewritten = [], []

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in dunder:
                n.op, n.target = "call_method", dunder[n.target]
                rewritten.append(n.target)
        gm.recompile()
        return ring_backend(gm, example_inputs, {"compiler": "eager"}, reports)

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 8, dtype=torch.float64) for _ in range(3))
    if fn == "window":
        padding = torch.ones(2, 8, dtype=torch.bool)
        padding[0, -2:] = False
        k2, v2 = k[:, :2], v[:, :2]
        f, args, facts = (
            _masked_attention,
            (q, k2, v2, padding, torch.ones(8, 8, dtype=torch.bool)),
            "causal, window (2, -1), key_padding_mask=l_padding_",
        )
    else:
        docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 2, 2]])
        f, args, facts = _document_attention, (q, k, v, docs), "causal, document_ids=l_docs_"
    got = torch.compile(f, backend=backend, dynamic=False)(*args)
    torch.testing.assert_close(got, f(*args), rtol=1e-12, atol=1e-12)
    assert "__eq__" in rewritten or "__and__" in rewritten, rewritten
    assert any(x.endswith(f"-> {facts}") for x in reports[0].lifted), reports[0].lifted


def local_loss_matches(rank, world, layout):
    """``gather_outputs=False``: each rank gets its own tokens' logits (layout order), computes the
    loss over them, and the ring's summed loss and every parameter gradient equal one process's."""
    from ringcompile.layout import make_layout

    torch._dynamo.reset()
    model = _model("llama")
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(3))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)

    def loss_of(logits, labels):
        return (
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            / ids.numel()
        )

    ref_logits = model(input_ids=ids, use_cache=False).logits
    ref = loss_of(ref_logits, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    lay = make_layout(layout, S, world)
    compiled = _compile(
        model, {"compiler": "aot_eager", "layout": layout, "gather_outputs": False}, {}
    )
    logits = compiled(input_ids=ids, use_cache=False).logits
    local = loss_of(logits, lay.shard(labels, 1, rank))
    local.backward()
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    errs = {
        "logits": _rel(logits.detach(), lay.shard(ref_logits.detach(), 1, rank)),
        "loss": _rel(total, ref.detach()),
    }
    errs.update({n: _rel(p.grad, ref_grads[n]) for n, p in model.named_parameters()})
    return errs, []


@pytest.mark.parametrize("world, layout", [(2, "zigzag"), (4, "striped")])
def test_sharded_logits_and_per_rank_loss(gloo, world, layout):
    _assert_exact(gloo(world).run(local_loss_matches, layout))


def labels_loss_stays_sharded(rank, world, arch, seq_len, packed, num_items, gather_outputs):
    """Batch 1 (the logits' rows are the sequence): the model's own ``labels=`` loss against eager,
    loss and every gradient, with ignored labels, optionally packed documents and transformers'
    ``num_items_in_batch`` division; and what the backend gathered."""
    torch._dynamo.reset()
    model = _model(arch)
    torch.manual_seed(2)
    ids = torch.randint(0, V, (1, seq_len))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt the loss ignores
    kw = {"input_ids": ids, "labels": labels, "use_cache": False}
    if packed:
        cut = seq_len // 3
        kw["position_ids"] = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)])[None]
    if num_items:
        kw["num_items_in_batch"] = torch.tensor(seq_len + 5)

    def step(m):
        model.zero_grad()
        out = m(**kw)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = step(model)
    reports = []
    loss, grads = step(
        _compile(
            model,
            {"compiler": "aot_eager", "layout": "zigzag", "gather_outputs": gather_outputs},
            {},
            reports,
        )
    )
    errs = {"loss": _rel(loss, ref)}
    errs.update({n: _rel(grads[n], g) for n, g in ref_grads.items()})
    return errs, reports


@pytest.mark.parametrize(
    "arch, world, seq_len, packed, num_items, gather_outputs",
    [
        ("llama", 2, 16, False, False, True),
        ("llama", 4, 17, True, False, False),
        ("qwen2", 2, 15, False, True, False),
        ("mistral", 4, 16, True, True, True),
    ],
)
def test_labels_loss_stays_sharded(gloo, arch, world, seq_len, packed, num_items, gather_outputs):
    results = gloo(world).run(
        labels_loss_stays_sharded, arch, seq_len, packed, num_items, gather_outputs
    )
    _assert_exact(results)
    (graph,) = results[0][1]
    # the loss reads each rank's rows of the logits; only the returned logits are gathered
    assert [r.split(" (")[0] for r in graph.reductions] == ["loss"], graph.reductions
    assert "cross_entropy" in graph.reductions[0], graph.reductions
    want = ["logits (dim 1): graph output"] if gather_outputs else []
    assert graph.gathers == want, graph.gathers


def test_float32_norms_stay_sharded(gloo):
    """Gemma computes its norms in float32 and casts back with ``type_as(x)``: the cast reads its
    second argument for the dtype alone, so the norms and MLPs run on each rank's tokens (they
    were computed full from gathered inputs). The ranks' float32 weight-gradient partials add in
    another order than one process's: float32 rounding, not float64's."""
    results = gloo(2).run(compare_hf, "gemma", 16, "left", False)
    for rank, (errs, _) in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v < 1e-6}
        assert not bad, f"rank {rank}: {bad}"
    # two reports: Dynamo restarts this compile once (its float-scalar pass, in the second
    # attempt's log); plain aot_eager is called twice as well
    for graph in results[0][1]:
        assert len(graph.attention) == 2 and graph.fallbacks == [], graph.fallbacks
        _only_left(graph, "logits")


def test_multi_query_falcon(gloo):
    """Falcon-7B-style attention: K/V of one head broadcast by SDPA without ``enable_gqa`` (was
    refused), picked out of the fused qkv with ``qkv[..., [-2], :]`` (a list index on the head
    dim: the fused qkv was gathered in every layer). Exact, and nothing but the logits gathered."""
    results = gloo(2).run(compare_hf, "falcon-mq", 16, "none", False)
    _assert_exact(results)
    for graph in results[0][1]:
        assert len(graph.attention) == 2 and graph.fallbacks == [], graph.fallbacks
        _only_left(graph, "lm_logits")


def encoder_with_padding(rank, world, arch):
    """A bidirectional encoder with right padding: BERT's mask is ``q >= 0`` (always) and key
    padding; ModernBERT's local layers add ``|q - kv| <= w``. Errors against eager and reports."""
    torch._dynamo.reset()
    torch.manual_seed(0)  # the same weights on every rank
    common = dict(
        vocab_size=V,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    if arch == "bert":
        model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, **common))
    else:  # layers 0 and 3 global, 1 and 2 local windows of |q - kv| <= 2
        model = transformers.ModernBertModel(transformers.ModernBertConfig(
            num_hidden_layers=4, local_attention=4, global_attn_every_n_layers=3, pad_token_id=0,
            **common))  # fmt: skip
    model = model.double().eval()
    ids = torch.randint(1, V, (2, S))
    am = torch.ones(2, S, dtype=torch.long)
    am[0, -5:] = 0
    w = torch.randn(2, S, 32, dtype=torch.float64)

    def step(m):
        model.zero_grad()
        out = m(input_ids=ids, attention_mask=am).last_hidden_state
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None}  # fmt: skip

    ref, ref_grads = step(model)
    reports = []
    out, grads = step(_compile(model, {"compiler": "aot_eager"}, {}, reports))
    errs = {"out": _rel(out, ref)}
    errs.update({n: _rel(grads[n], g) if n in grads else float("inf")
                 for n, g in ref_grads.items()})  # fmt: skip
    return errs, reports


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_encoder_masks_lift(gloo, arch):
    """BERT and ModernBERT masks become per-token facts (key padding; ModernBERT's local layers a
    window both ways) instead of a dense mask: exact, every attention sharded, nothing gathered
    but the output."""
    results = gloo(2).run(encoder_with_padding, arch)
    _assert_exact(results)
    lifted = [line for graph in results[0][1] for line in graph.lifted]
    assert len(lifted) == (2 if arch == "bert" else 4), lifted
    assert all("bidirectional" in x and "key_padding_mask=" in x for x in lifted), lifted
    windows = [x for x in lifted if "window (2, 2)" in x]
    assert len(windows) == (0 if arch == "bert" else 2), lifted
    for graph in results[0][1]:
        assert graph.fallbacks == [], graph.fallbacks


def _labels_step_errors(model, compiler: str, left_padding: int = 0, batch: int = 2):
    """A causal LM's step on random tokens with its own ``labels=`` loss, eager against the ring
    (``compiler`` inside): relative errors of the logits, the loss and every parameter gradient,
    and the reports. ``left_padding``: that many padding tokens start row 0."""
    ids = torch.randint(0, V, (batch, S))
    w = torch.randn(batch, S, V, dtype=torch.float64)
    kw = {}
    if left_padding:
        kw["attention_mask"] = torch.ones(batch, S, dtype=torch.long)
        kw["attention_mask"][0, :left_padding] = 0

    def step(m):
        model.zero_grad()
        out = m(input_ids=ids, labels=ids, use_cache=False, **kw)
        (out.loss + (out.logits * w).sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = step(model)
    reports = []
    out, grads = step(_compile(model, {"compiler": compiler}, {}, reports))
    errs = {
        "logits": _rel(out.logits.detach(), ref.logits.detach()),
        "loss": _rel(out.loss.detach(), ref.loss.detach()),
    }
    errs.update({n: _rel(grads[n], g) if n in grads else float("inf")
                 for n, g in ref_grads.items()})  # fmt: skip
    return errs, reports


def llama4_chunks(rank, world, left_padding=0):
    """Llama 4 text: three chunked-attention layers (chunks of 4 positions) and one full. Errors
    of logits, loss and every gradient against eager, and the reports."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, attention_chunk_size=4, num_local_experts=2,
        num_experts_per_tok=1, no_rope_layers=[1, 1, 1, 0], attn_implementation="sdpa")  # fmt: skip
    config._experts_implementation = "eager"  # grouped_mm has no float64
    model = transformers.Llama4ForCausalLM(config).double()
    return _labels_step_errors(model, "aot_eager", left_padding)


def test_llama4_chunked_attention_lifts(gloo):
    """Llama 4's chunked attention (``q // c == kv // c`` over position ids that are the indices)
    becomes a position rule: exact, every attention sharded, and the ring skips the blocks no
    chunk spans (W = 2, striped: chunks of 4 span both ranks, so both steps run)."""
    results = gloo(2).run(llama4_chunks)
    _assert_exact(results)
    lifted = [line for graph in results[0][1] for line in graph.lifted]
    assert sum("causal, chunks of 4" in x for x in lifted) == 3, lifted
    for graph in results[0][1]:
        assert graph.fallbacks == [], graph.fallbacks
        # its complex rotary (view_as_complex, polar of ones_like) runs on local tokens, and its
        # experts (every token through every expert, outlined) on local rows at batch 2: only
        # the logits are gathered
        _only_left(graph, "logits")
        assert sum("every token through every expert" in r for r in graph.rows) == 4, graph.rows


def test_llama4_chunks_under_left_padding_lift_as_documents(gloo):
    """With left padding Llama 4's chunks start after each row's padding, ``(P - lp[b]) // c``:
    no position rule, but a per-token fact: the chunk ids become the document ids (computed from
    the positions and the padding, then sharded like them). Exact, nothing left dense."""
    results = gloo(2).run(llama4_chunks, 3)
    _assert_exact(results)
    lifted = [line for graph in results[0][1] for line in graph.lifted]
    chunked = [x for x in lifted if "chunks that start after each row's left padding" in x]
    assert len(chunked) == 3 and all("document_ids=" in x for x in chunked), lifted
    for graph in results[0][1]:
        assert graph.fallbacks == [], graph.fallbacks
        # (and the padding mask, whose cumsum gives each row's left padding)
        allowed = ("graph output", "(call_method cumsum)")
        assert all(any(a in g for a in allowed) for g in graph.gathers), graph.gathers


def gpt2_rows(rank, world, batch):
    """GPT-2 (its Conv1D layers: ``addmm`` on rows flattened from (batch, S, D)): errors against
    eager and the report."""
    torch._dynamo.reset()
    config = transformers.GPT2Config(
        vocab_size=V,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        attn_implementation="sdpa",
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()  # eval: its attention dropout
    model.loss_type = "ForCausalLM"  # unset, transformers logs a warning, which breaks the graph
    ids = torch.randint(0, V, (batch, S))
    w = torch.randn(batch, S, V, dtype=torch.float64)

    def step(m):
        model.zero_grad()
        out = m(input_ids=ids, labels=ids, use_cache=False)
        (out.loss + (out.logits * w).sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = step(model)
    reports = []
    out, grads = step(_compile(model, {"compiler": "aot_eager"}, {}, reports))
    errs = {
        "logits": _rel(out.logits.detach(), ref.logits.detach()),
        "loss": _rel(out.loss.detach(), ref.loss.detach()),
    }
    errs.update({n: _rel(grads[n], g) for n, g in ref_grads.items()})
    return errs, reports


@pytest.mark.parametrize("batch", [1, 2])
def test_gpt2_conv1d_rows_stay_sharded(gloo, batch):
    """GPT-2's Conv1D (``addmm`` on rows flattened from (batch, S, D)) is per token: every layer
    runs on this rank's tokens (each attention's input and output were gathered around the
    addmms). At batch 2 the rows mix batch and sequence: ``unflatten_rows`` keeps them as
    (batch, sequence), four Conv1D flattens a layer."""
    results = gloo(2).run(gpt2_rows, batch)
    _assert_exact(results)
    (graph,) = results[0][1]
    assert len(graph.attention) == 2 and graph.fallbacks == [], graph.fallbacks
    assert all(g.endswith("graph output") for g in graph.gathers), graph.gathers
    assert [r.split(" (")[0] for r in graph.reductions] == ["loss"], graph.reductions
    assert len(graph.rows) == (8 if batch == 2 else 0), graph.rows


@pytest.mark.parametrize("padding", ["left", "none"])
def test_alibi_lifts_as_a_key_bias(gloo, padding):
    """Falcon with ALiBi adds to its causal, padded mask a bias per head and key (``slope_h *
    position_k``), as a float mask: ``bias.masked_fill(hidden, finfo.min)``. It lifts: the rules,
    the bias as a per-token fact that travels with the keys, and the rows that left padding hides
    everywhere average every value with SDPA's gradients (its scores round to finfo.min). Exact;
    nothing dense, nothing gathered but the logits. (Before, the mask stayed dense; earlier still,
    the ring gave those rows the sum of its blocks' means: loss off by 2e-3.)"""
    results = gloo(2).run(compare_hf, "falcon-alibi", 16, padding, False)
    _assert_exact(results)
    (graph,) = results[0][1]
    facts = r"causal, (key_padding_mask=attention_mask, )?key_bias=\w+"
    masks = [x for x in graph.lifted if ": mask " in x]
    assert len(masks) == 2 and all(re.search(facts, x) for x in masks), graph.lifted
    # transformers 5.25 expands its one K/V head with repeat_kv (5.24 broadcast it): undone
    kv = [x for x in graph.lifted if x not in masks]
    assert all("repeat_kv; 1 KV heads travel" in x for x in kv), graph.lifted
    assert graph.fallbacks == [], graph.fallbacks
    _only_left(graph, "lm_logits")


def test_opt_mlp_rows_stay_sharded(gloo):
    """OPT flattens (batch, sequence) into rows for its MLP (layer norm, fc1, ReLU, fc2, the
    residual add) and views them back: ``unflatten_rows`` keeps them as (batch, sequence), so
    the MLP runs on this rank's tokens (it ran on the whole sequence, exactly)."""
    results = gloo(2).run(compare_hf, "opt", 16, "right", False)
    _assert_exact(results)
    (graph,) = results[0][1]
    assert len(graph.rows) == 2 and graph.fallbacks == [], (graph.rows, graph.fallbacks)
    _only_left(graph, "logits")


def qwen3_next(rank, world, batch=2):
    """Qwen3-Next: gated DeltaNet linear attention in three layers of four, SDPA in the fourth,
    experts as a loop. Plain ``aot_eager`` fails on it (transformers 5.24), so the ring's inner
    compiler is ``eager``; Dynamo breaks it into many graphs."""
    torch._dynamo.reset()
    config = transformers.Qwen3NextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        max_position_embeddings=64, attn_implementation="sdpa")  # fmt: skip
    config._experts_implementation = "eager"  # grouped mm takes no float64
    torch.manual_seed(0)
    return _labels_step_errors(
        transformers.Qwen3NextForCausalLM(config).double(), "eager", batch=batch
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_linear_attention_beside_sdpa_stays_exact(gloo, batch):
    """Qwen3-Next's one SDPA layer becomes ring attention; its DeltaNet layers stay as they are
    (each rank computes them on the whole sequence, exactly: a ring for a recurrence would pass
    each rank's final state on, README). At batch 1 the experts' loop (Python, after a graph
    break) adds into a buffer a graph made and left sharded (``index_add_``): the write reaches
    the gathered copy, and the next graph takes this rank's tokens from it."""
    results = gloo(2).run(qwen3_next, batch)
    for rank, (errs, _) in enumerate(results):  # its norms run in float32, as Gemma's
        bad = {k: v for k, v in errs.items() if not v < 1e-6}
        assert not bad, f"rank {rank}: {bad}"
    replaced = [g for g in results[0][1] if g.attention]
    assert len(replaced) == 1 and len(replaced[0].attention) == 1, [g.attention for g in replaced]


def moe_labels_step(rank, world, arch):
    """A tiny Mixtral or Qwen3-MoE step at batch 2 (experts as transformers' grouped matmuls, on
    its own loop of matmuls: torch's grouped mm takes no float64), errors and reports."""
    import transformers.integrations.moe as moe

    torch._dynamo.reset()
    torch.manual_seed(0)
    shape = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    if arch == "mixtral":
        model = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(
                intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **shape
            )
        )
    else:
        model = transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                head_dim=8,
                **shape,
            )
        )
    usable = moe._can_use_grouped_mm
    moe._can_use_grouped_mm = lambda *args, **kwargs: False
    try:
        return _labels_step_errors(model.double(), "aot_eager")
    finally:
        moe._can_use_grouped_mm = usable


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_run_on_each_ranks_tokens(gloo, arch):
    """Issue 21, item 5: each layer's experts (top-k routing, tokens sorted by expert, grouped
    matmuls, the inverse permutation) are one op that computes each row alone
    (``outline_experts``), kept in (batch, sequence) form at batch 2: the router and the experts
    run on each rank's tokens (they ran on the whole sequence on every rank). Exact: logits, loss
    and every gradient."""
    results = gloo(2).run(moe_labels_step, arch)
    _assert_exact(results)
    (graph,) = results[0][1]
    assert sum("mixture-of-experts dispatch" in r for r in graph.rows) == 2, graph.rows
    _only_left(graph, "logits")
    assert graph.fallbacks == [], graph.fallbacks


def moe_compiles(rank, world):
    """How many graphs plain ``aot_eager`` and the ring compile for a tiny Mixtral step (float32:
    its grouped-mm experts take no float64), and the ring's logits error."""
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    ids = torch.randint(0, V, (2, S))
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    torch.compile(model, backend=counting)(
        input_ids=ids, labels=ids, use_cache=False
    ).loss.backward()
    torch._dynamo.reset()
    reports = []
    ref = model(input_ids=ids, labels=ids, use_cache=False)
    out = _compile(model, {"compiler": "aot_eager"}, {}, reports)(input_ids=ids, labels=ids,
                                                                  use_cache=False)  # fmt: skip
    out.loss.backward()
    return len(calls), len(reports), _rel(out.logits.detach(), ref.logits.detach())


def test_mixture_of_experts_adds_no_graphs(gloo):
    """Issue 21: the ring compiles a mixture-of-experts model as often as plain aot_eager does."""
    for plain, ring, err in gloo(2).run(moe_compiles):
        assert ring == plain, (plain, ring)
        assert err < 1e-5, err


def latent_attention(rank, world, arch, experts, left_padding):
    """A tiny model with multi-head latent attention (MLA) at batch 2: low-rank q and kv with
    their norms, q/k head dim 6 + 4 of rotary against v's 4, its keys built as ``new_empty`` and
    two slice ``copy_``s. DeepSeek-V2 and V3 add routed and shared experts (V3's router in
    float32): ``experts`` "grouped" (transformers' grouped matmuls, on its own loop of matmuls:
    one graph) or "eager" (a Python loop over the experts: the graph breaks)."""
    import transformers.integrations.moe as moe

    torch._dynamo.reset()
    torch.manual_seed(0)
    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, q_lora_rank=8, kv_lora_rank=8,
                 qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=4, max_position_embeddings=64,
                 attn_implementation="sdpa")  # fmt: skip
    moe_shape = dict(
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
    )
    config_cls, model_cls = {
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "minicpm3": (transformers.MiniCPM3Config, transformers.MiniCPM3ForCausalLM),
    }[arch]
    config = config_cls(**shape, **({} if arch == "minicpm3" else moe_shape))
    if experts == "eager":
        config._experts_implementation = "eager"
    model = model_cls(config).double()
    usable = moe._can_use_grouped_mm
    moe._can_use_grouped_mm = lambda *args, **kwargs: False
    try:
        return _labels_step_errors(model, "aot_eager", left_padding)
    finally:
        moe._can_use_grouped_mm = usable


@pytest.mark.parametrize("arch, experts, left_padding", [
    ("deepseek_v3", "grouped", 0), ("deepseek_v3", "grouped", 3), ("deepseek_v3", "eager", 3),
    ("deepseek_v2", "grouped", 3), ("minicpm3", None, 3),
])  # fmt: skip
def test_latent_attention_keys_written_in_place(gloo, arch, experts, left_padding):
    """DeepSeek-V2/V3 and MiniCPM3 write their keys into a ``new_empty`` buffer through two
    slice ``copy_``s. The buffer is made on this rank's tokens and written there, and the ring
    attention reads it after both writes (before, a shard was taken as the buffer was made,
    uninitialised: DeepSeek-V3's gradients were 1.1-1.7 off). Exact: logits, loss and every
    gradient but the router's weight, which DeepSeek computes in float32 (rounding: 1e-7)."""
    results = gloo(2).run(latent_attention, arch, experts, left_padding)
    for rank, (errs, _) in enumerate(results):
        float32 = {"loss"} | {n for n in errs if n.endswith("mlp.gate.weight")}
        bad = {k: v for k, v in errs.items() if not v < (LOSS_TOL if k in float32 else TOL)}
        assert not bad, f"rank {rank}: {bad}"
    graphs = results[0][1]
    assert sum(len(graph.attention) for graph in graphs) == 2, [g.attention for g in graphs]
    # the keys' buffer and what is copied into it stay on this rank's tokens
    gathers = [g for graph in graphs for g in graph.gathers]
    assert not any("new_empty" in g or "copy_" in g for g in gathers), gathers


def softmax_at_input_precision():
    """transformers' eager attention takes its softmax in float32 even in a float64 model, where
    the ring (as SDPA) computes in float64: for the reference the softmax keeps its input's
    dtype, so the comparison says what the ring changes beyond that rounding."""
    softmax = F.softmax

    def at_input_precision(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim)

    return unittest.mock.patch("torch.nn.functional.softmax", at_input_precision)


# transformers computes Gemma 2's eager mask in a way that gives NaN in float64 under left padding
# (eager itself), so its padding case pads on the right
WRITTEN_OUT = [("gemma2", 2, 16, "packed"), ("gemma2", 4, 16, "none"), ("gemma2", 2, 15, "right"),
               ("llama-eager", 2, 16, "left")]  # fmt: skip


@pytest.mark.parametrize("arch, world, seq_len, mask", WRITTEN_OUT,
                         ids=[f"{a}-W{w}-S{s}-{m}" for a, w, s, m in WRITTEN_OUT])  # fmt: skip
def test_attention_written_out_is_taken_as_sdpa(gloo, arch, world, seq_len, mask):
    """Eager attention (matmul, softmax, matmul; Gemma 2's soft cap of the scores) becomes SDPA
    and then ring attention: exact, its masks lifted, nothing gathered. Under padding a soft
    cap keeps the dense mask (rows padding hides everywhere average every value, whose gradients
    through the cap the facts do not give)."""
    results = gloo(world).run(compare_hf, arch, seq_len, mask, False, False, None,
                              softmax_at_input_precision)  # fmt: skip
    for rank, (errs, _) in enumerate(results):
        # Gemma's float32 norms: their weights' gradient partials add in another order on the
        # ranks (float32 rounding; ``test_float32_norms_stay_sharded``); the rest float64's
        bad = {k: v for k, v in errs.items()
               if not v < (1e-6 if "norm" in k or k == "loss" else TOL)}  # fmt: skip
        assert not bad, f"rank {rank}: {bad}"
    # Gemma's graphs are compiled twice (Dynamo restarts once: ``test_float32_norms_...``)
    for graph in results[0][1]:
        _written_out_taken(graph, arch, mask)


def _written_out_taken(graph, arch: str, mask: str) -> None:
    written = [x for x in graph.lifted if "attention written out" in x]
    assert len(written) == 2, graph.lifted
    assert all(("soft-capped at 50" in x) == (arch == "gemma2") for x in written), written
    assert len(graph.attention) == 2, graph.attention
    if arch == "gemma2" and mask == "right":  # the dense mask's rows: its indices gathered
        assert len(graph.fallbacks) == 2 and all("dense mask kept" in f for f in graph.fallbacks)
        return
    assert graph.fallbacks == [] and graph.gathers == [], (graph.fallbacks, graph.gathers)
    facts = [x for x in graph.lifted if " -> " in x]
    assert len(facts) == 2 and all("causal" in x for x in facts), facts
    if arch == "gemma2":  # its layer 0 attends over a window of 5
        assert sum("window (4, -1)" in x for x in facts) == 1, facts

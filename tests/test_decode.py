"""The backend's decode path: a sharded prefill keeps its KV cache sharded, decode steps use tree
attention, and greedy generation equals one process.

``ShardedKV`` (the cache storage and its ops) is tested alone, the ``decode_attention`` pass by a
before/after snapshot, and the whole path on transformers' Llama and Qwen2 over gloo worlds of 1-4
ranks in float64 against the uncompiled model with transformers' own cache.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F
from expecttest import assert_expected_inline

from ringcompile.backend import _compile, ring_backend
from ringcompile.kv_cache import EMPTY, ShardedKV
from ringcompile.passes import RingContext, decode_attention
from ringcompile.report import readable_code

transformers = pytest.importorskip("transformers")
from test_transformers import _model  # noqa: E402

from ringcompile.hf_cache import ShardedKVCache  # noqa: E402  (needs transformers)

TOL = 1e-10
V = 64


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# -- the storage -------------------------------------------------------------------------------


def test_shards_are_striped_and_balanced():
    """Every rank's shard after a prefill of 7 and 5 appends of one token: slot 1 + p // W holds p.
    (A decode step's update also marks the shards for attention, which only the backend runs.)"""
    W, B, H, D = 3, 2, 2, 4
    full = torch.randn(B, H, 12, D, dtype=torch.float64)
    shards = [ShardedKV(max_length=12, rank=r, world_size=W) for r in range(W)]
    for s in shards:
        s.update(full[:, :, :7], full[:, :, :7] * 2)
        for p in range(7, 12):
            new = full[:, :, p : p + 1]
            torch.ops.ringcompile.kv_cache_append(
                s.keys, s.values, s.positions, new, new * 2, torch.tensor([[p], [p]]), s.rank, W
            )
    for r, s in enumerate(shards):
        mine = torch.arange(r, 12, W)
        assert s.positions.shape == (B, 1 + 4)
        assert s.positions[0, 0] == EMPTY  # the scratch slot never holds a token
        assert torch.equal(s.positions[:, 1 : 1 + len(mine)], mine.expand(B, -1))
        assert (s.positions[:, 1 + len(mine) :] == EMPTY).all()
        assert torch.equal(s.keys[:, :, 1 : 1 + len(mine)], full[:, :, mine])
        assert torch.equal(s.values[:, :, 1 : 1 + len(mine)], 2 * full[:, :, mine])


def test_prompt_longer_than_the_cache_is_refused():
    s = ShardedKV(max_length=8, rank=0, world_size=2)
    with pytest.raises(ValueError, match="max_length=8 tokens; the prompt has 9"):
        s.update(torch.zeros(1, 1, 9, 4), torch.zeros(1, 1, 9, 4))


def test_cache_allocated_up_front_refuses_other_shapes_and_resets():
    s = ShardedKV(max_length=8, rank=0, world_size=1)
    s.allocate(1, 2, 4, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="allocated for K/V"):
        s.update(torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 3, 4))
    keys = s.keys
    s.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert s.filled and int(s.length) == 3
    s.reset()
    assert not s.filled and int(s.length) == 0 and bool((s.positions == EMPTY).all())
    assert s.keys is keys  # the same slots, for a CUDA graph that writes them


def test_decode_outside_the_ring_backend_raises():
    """A decode step run eagerly (or by another backend) would attend over one shard: it raises."""
    s = ShardedKV(max_length=8, rank=0, world_size=1)
    s.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    k, v = torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="outside the ring backend.*backend='ring'"):
        s.update(k, v)


def test_ops_opcheck():
    keys, values = torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 3)
    positions = torch.full((2, 5), EMPTY)
    new = (torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 3), torch.tensor([[4, 5], [4, 5]]))
    torch.library.opcheck(
        torch.ops.ringcompile.kv_cache_append.default, (keys, values, positions, *new, 1, 2)
    )
    torch.ops.ringcompile.kv_cache_append(keys, values, positions, *new, 1, 2)
    # p = 5 is rank 1's (slot 1 + 5 // 2); p = 4 went to the scratch slot, which stays empty
    assert positions.tolist() == [[EMPTY, EMPTY, EMPTY, 5, EMPTY]] * 2
    assert torch.equal(keys[:, :, 3], new[0][:, :, 1])


# -- the pass ----------------------------------------------------------------------------------


def _attend_with_cache(q, k, v, cache: ShardedKV):
    k, v = cache.update(k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)


def test_decode_pass_snapshot():
    """The decode step's SDPA over marked shards becomes tree_decode over the buffers."""
    torch._dynamo.reset()
    cache = ShardedKV(max_length=16, rank=0, world_size=1)
    cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    graphs = []

    def backend(gm, example_inputs):
        before = readable_code(gm)
        ctx = RingContext(gm=gm, group=None, layout_name="striped")
        decode_attention.run(ctx)
        gm.recompile()
        graphs.append((before, readable_code(gm), ctx.report.attention))
        return gm

    with torch.no_grad():
        torch.compile(_attend_with_cache, backend=backend, fullgraph=True)(q, k, v, cache)
    before, after, attention = graphs[0]
    assert_expected_inline(
        before,
        """\
def forward(self, *inputs):  # 7 inputs
    arange = torch.arange(1, device = device(type='cpu'))
    add = l_cache_length + arange
    positions = add.expand(1, 1)
    add_ = l_cache_length.add_(1)
    kv_cache_append = torch.ops.ringcompile.kv_cache_append(l_cache_keys, l_cache_values, l_cache_positions, l_k_, l_v_, positions, 0, 1)
    k = torch.ops.ringcompile.sharded_kv(l_cache_keys, l_cache_positions, positions, 1)
    v = torch.ops.ringcompile.sharded_kv(l_cache_values, l_cache_positions, positions, 1)
    scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(l_q_, k, v, is_causal = False, enable_gqa = True)
    return (scaled_dot_product_attention,)""",
    )
    assert_expected_inline(
        after,
        """\
def forward(self, *inputs):  # 7 inputs
    arange = torch.arange(1, device = device(type='cpu'))
    add = l_cache_length + arange
    positions = add.expand(1, 1)
    add_ = l_cache_length.add_(1)
    kv_cache_append = torch.ops.ringcompile.kv_cache_append(l_cache_keys, l_cache_values, l_cache_positions, l_k_, l_v_, positions, 0, 1)
    scaled_dot_product_attention = tree_decode(l_q_, l_cache_keys, l_cache_values, q_positions = positions, k_positions = l_cache_positions, scale = None, enable_gqa = True)
    return (scaled_dot_product_attention,)""",
    )
    assert len(attention) == 1 and "decode, 1 replicated queries" in attention[0]


def sharded_speculative_decode(rank, world):
    """T = 3 new tokens at once (causal among themselves) over a cache sharded across the ring,
    against SDPA over the whole sequence; and the shard sizes afterwards."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    B, H, Hkv, D, S = 2, 4, 2, 8, 11
    q, k, v = (torch.randn(B, h, S, D, dtype=torch.float64) for h in (H, Hkv, Hkv))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cache = ShardedKV(max_length=S, rank=rank, world_size=world)
    step = _compile(_attend_with_cache, {"compiler": "aot_eager"}, {"fullgraph": True})
    with torch.no_grad():
        step(q[:, :, :8], k[:, :, :8], v[:, :, :8], cache)  # prefill
        out = step(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], cache)
    held = int((cache.positions[0] != EMPTY).sum())
    return _rel(out, ref[:, :, 8:]), held


@pytest.mark.parametrize("world", [1, 2, 3])
def test_speculative_decode_matches_sdpa(gloo, world):
    results = gloo(world).run(sharded_speculative_decode)
    assert all(err < TOL for err, _ in results), results
    held = [h for _, h in results]
    assert sum(held) == 11 and max(held) - min(held) <= 1, held


# -- transformers: greedy generation ------------------------------------------------------------


def _hf_model(arch: str):
    """Tiny random models; unlike test_transformers' Qwen2 this one has no sliding window (the
    sharded cache decodes full attention only), and Mistral keeps its window for the refusal."""
    if arch != "qwen2":
        return _model(arch).eval()
    config = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).double().eval()


def _cache_kw(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x)."""
    return (
        "cache"
        if "cache" in inspect.signature(model.model.forward).parameters
        else "past_key_values"
    )


def greedy(model, ids, steps, cache, positions=True):
    """Greedy tokens and each step's last logits; with ``positions`` the model is given the new
    tokens' global positions, else it asks the cache."""
    S = ids.shape[1]
    kw = {_cache_kw(model): cache, "use_cache": True}

    def pos(p):
        return {"position_ids": p} if positions else {}

    out = model(input_ids=ids, **pos(torch.arange(S)[None]), **kw)
    tokens, logits = [], []
    for i in range(steps):
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        if i + 1 < steps:
            out = model(input_ids=tokens[-1], **pos(torch.tensor([[S + i]])), **kw)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def generate_hf(rank, world, arch, layout, S, steps, positions=True, allocate=False,
                options=None):  # fmt: skip
    """Our greedy generation (ring prefill, sharded cache, tree-attention decode) against the
    uncompiled model with transformers' DynamicCache: tokens, per-step logits' error, how many
    tokens this rank's shard holds, and the reports. ``allocate``: the cache allocates its slots
    up front (static addresses), not in the prefill. ``options``: the backend's (its group is the
    cache's too)."""
    options = options or {}
    torch._dynamo.reset()
    model = _hf_model(arch)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(1))
    reports = []
    with torch.no_grad():
        ref_tokens, ref_logits = greedy(
            model, ids, steps, transformers.DynamicCache(config=model.config)
        )
        given = dict(batch_size=2, dtype=torch.float64, device="cpu") if allocate else {}
        group = {k: options[k] for k in ("group", "mesh_dim") if k in options}
        cache = ShardedKVCache(model.config, max_length=S + steps, **given, **group)
        if allocate:
            shard = cache.layers[0].shard
            assert all(
                getattr(t, "_dynamo_static_input_type", None)
                for t in (shard.keys, shard.values, shard.positions, shard.length)
            )
        compiled = _compile(model, {"compiler": "aot_eager", "layout": layout, **options}, {},
                            reports)  # fmt: skip
        tokens, logits = greedy(compiled, ids, steps, cache, positions)
    held = [int((layer.shard.positions[0] != EMPTY).sum()) for layer in cache.layers]
    return (
        bool(torch.equal(tokens, ref_tokens)),
        _rel(logits, ref_logits),
        held,
        [str(r) for r in reports],
    )


GENERATE = [
    ("llama", 1, "striped", 13, True),
    ("llama", 2, "striped", 13, True),
    ("llama", 3, "zigzag", 16, True),
    ("llama", 4, "striped", 16, False),
    ("qwen2", 2, "zigzag", 13, False),
    ("qwen2", 4, "contiguous", 13, True),
]


@pytest.mark.parametrize(
    "arch, world, layout, S, positions",
    GENERATE,
    ids=[
        f"{a}-W{w}-{lay}-S{s}-{'positions' if p else 'default positions'}"
        for a, w, lay, s, p in GENERATE
    ],
)
def test_greedy_generation_equals_one_process(gloo, arch, world, layout, S, positions):
    steps = 6
    results = gloo(world).run(generate_hf, arch, layout, S, steps, positions)
    for rank, (same, err, _held, reports) in enumerate(results):
        assert same and err < TOL, (rank, same, err)
        # two graphs for the whole generation: the prefill and one decode step reused
        assert len(reports) == 2, reports
        assert "over the sharded KV cache (tree attention)" in reports[1]
        assert "fallbacks: none" in reports[0] and "fallbacks: none" in reports[1]
        # striped and unpadded: each rank stores its own tokens, no K/V is gathered for the cache
        stored_locally = layout == "striped" and S % world == 0
        assert ("stored without a gather" in reports[0]) == stored_locally, reports[0]
        assert ("read by kv_cache_append" in reports[0]) == (not stored_locally), reports[0]
    # the prompt and the 5 tokens fed back, spread evenly over the ranks, in every layer
    for layer in zip(*(held for _, _, held, _ in results)):
        assert sum(layer) == S + steps - 1 and max(layer) - min(layer) <= 1, layer


def test_cache_allocated_up_front_generates_the_same(gloo):
    """Given the batch, dtype and device, ShardedKVCache allocates its slots before any compiled
    step, as static addresses (what a CUDA graph of the decode step needs): same tokens, two
    graphs."""
    for same, err, _, reports in gloo(2).run(generate_hf, "llama", "striped", 13, 6, True, True):
        assert same and err < TOL and len(reports) == 2, (same, err, len(reports))


@pytest.mark.parametrize("up_front", [False, True])
def test_cuda_graph_mode_warns_when_the_cache_moves(monkeypatch, up_front):
    """With ``mode="reduce-overhead"`` a decode step that writes slots the prefill allocated in
    its graph cannot be a CUDA graph: a warning names the fix (allocate up front), once; none
    when the cache was allocated up front. (Inductor is swapped for aot_eager: only the check
    runs here.)"""
    import ringcompile.backend as backend

    real = backend._inner_compiler
    monkeypatch.setattr(backend, "_inner_compiler", lambda name, mode=None: real("aot_eager"))
    torch._dynamo.reset()
    model = _hf_model("llama")
    given = dict(batch_size=2, dtype=torch.float64, device="cpu") if up_front else {}
    cache = ShardedKVCache(model.config, max_length=20, **given)
    compiled = torch.compile(model, backend="ring", dynamic=False,
                             options={"mode": "reduce-overhead"})  # fmt: skip
    ids = torch.randint(0, V, (2, 8))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        greedy(compiled, ids, 3, cache)
    moved = [w for w in caught if "cannot run as a CUDA graph" in str(w.message)]
    assert len(moved) == (0 if up_front else 1), [str(w.message) for w in caught]
    if moved:
        assert "batch_size=..., dtype=..., device=..." in str(moved[0].message)


def hf_decode_error(rank, world, case):
    torch._dynamo.reset()
    model = _hf_model("mistral" if case == "window" else "llama")
    ids = torch.randint(0, V, (1, 8))
    if case == "window":
        ShardedKVCache(model.config, max_length=16)
    group = None
    if case == "group":  # a cache made for a ring of one, used on the world's ring
        groups = [dist.new_group([r]) for r in range(world)]
        group = groups[rank]
    cache = ShardedKVCache(model.config, max_length=16, group=group)
    compiled = _compile(model, {"compiler": "aot_eager"}, {})
    kw = {_cache_kw(model): cache, "use_cache": True}
    with torch.no_grad():
        compiled(input_ids=ids, position_ids=torch.arange(8)[None], **kw)
        # a 4-D mask of the caller's (transformers passes it through): nothing to read it by
        compiled(
            input_ids=ids[:, :1],
            position_ids=torch.tensor([[8]]),
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool),
            **kw,
        )


@pytest.mark.parametrize(
    "case, words",
    [
        ("window", "sliding-window layers"),
        ("group", "rank 0 of 1 is used under a ring where this process is rank"),
        ("arbitrary mask", "cannot decode .* its mask is more than causality and key padding"),
    ],
)
def test_decode_errors_name_the_problem(gloo, case, words):
    with pytest.raises(AssertionError, match=words) as raised:
        gloo(2).run(hf_decode_error, case)
    if case != "window":  # the backend's refusals are its own errors, not BackendCompilerFailed
        assert "RingCompileError" in str(raised.value), str(raised.value)[-2000:]
        assert "BackendCompilerFailed" not in str(raised.value)


def _prompts(length: int, new: int, padded: bool):
    """Two prompts of ``length`` tokens (the first left-padded by 3 if ``padded``) and
    ``generate()``'s arguments for ``new`` greedy tokens with their logits."""
    ids = torch.randint(1, V, (2, length), generator=torch.Generator().manual_seed(length))
    am = torch.ones_like(ids)
    if padded:
        am[0, :3] = 0  # left padding, as batched prompts are
    return ids, dict(
        attention_mask=am,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )


def hf_generate(rank, world, padded):
    """transformers' own ``generate()`` with ``model.forward`` compiled (torch.compile's default
    dynamic shapes) and a ``ShardedKVCache``, against plain ``generate()`` on one process: tokens
    and every step's logits, for two prompts of different lengths; left padding optional."""
    torch._dynamo.reset()
    model = _hf_model("llama")
    reports, compiled_forward, results = [], None, []
    for length in (11, 7):
        ids, kw = _prompts(length, 10, padded)
        with torch.no_grad():
            if compiled_forward is not None:
                del model.forward  # the plain forward again, for the reference
            ref = model.generate(ids, **kw)
            if compiled_forward is None:
                compiled_forward = torch.compile(
                    model.forward,
                    backend=functools.partial(
                        ring_backend, options={"compiler": "aot_eager"}, _reports=reports
                    ),
                )
            model.forward = compiled_forward
            cache = ShardedKVCache(model.config, max_length=length + 10)
            out = model.generate(ids, **kw, **{_cache_kw(model): cache})
        results.append(
            (
                bool(torch.equal(out.sequences, ref.sequences)),
                _rel(torch.stack(out.logits), torch.stack(ref.logits)),
            )
        )
    return results, [str(r) for r in reports]


@pytest.mark.parametrize("world, padded", [(1, True), (2, False), (3, True)])
def test_transformers_generate_equals_one_process(gloo, world, padded):
    for results, reports in gloo(world).run(hf_generate, padded):
        assert all(same and err < TOL for same, err in results), results
        # a prefill graph per prompt length and the decode graph(s), not one per token
        decode = [r for r in reports if "over the sharded KV cache (tree attention)" in r]
        assert decode and len(reports) <= 5, [r.splitlines()[0] for r in reports]


def generate_static(rank, world, padded):
    """``generate()`` with ``model.forward`` compiled with ``dynamic=False`` (what a CUDA graph
    needs: one shape per graph): tokens and logits against plain ``generate()``, and the graphs
    compiled. ``max_length`` is not a multiple of W, so the cache holds more positions than it
    was asked for."""
    torch._dynamo.reset()
    model = _hf_model("llama")
    ids, kw = _prompts(11, 8, padded)
    reports = []
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.forward = torch.compile(
            model.forward,
            dynamic=False,
            backend=functools.partial(
                ring_backend, options={"compiler": "aot_eager"}, _reports=reports
            ),
        )
        cache = ShardedKVCache(
            model.config, max_length=11 + 8 + 1, batch_size=2, dtype=torch.float64, device="cpu"
        )
        out = model.generate(ids, **kw, **{_cache_kw(model): cache})
    return (
        bool(torch.equal(out.sequences, ref.sequences)),
        _rel(torch.stack(out.logits), torch.stack(ref.logits)),
        [str(r) for r in reports],
    )


@pytest.mark.parametrize("world, padded", [(2, False), (3, True)])
def test_generate_with_static_shapes_compiles_one_decode_graph(gloo, world, padded):
    """The 2-D attention_mask that generate() grows every token would be a new input shape, so a
    new graph, each step; the cache makes generate() build a mask of one shape instead (over
    every position it holds), read as key padding by global position. Two graphs: the prompt and
    one decode step for every token."""
    for same, err, reports in gloo(world).run(generate_static, padded):
        assert same and err < TOL, (same, err)
        assert len(reports) == 2, [r.splitlines()[0] for r in reports]
        assert "its mask given over global positions" in reports[1], reports[1]


def test_padding_table_of_mask_reads_the_last_row_and_checks_the_others():
    """A decode step's mask over global positions (B, 1, T, N) gives the key padding by position
    of its last query, exactly when every row is causality and that padding; else it fails."""
    from ringcompile.runtime import padding_table_of_mask

    N, q_positions = 10, torch.tensor([[6, 7], [6, 7]])
    pad = torch.ones(2, N, dtype=torch.bool)
    pad[1, :2] = False  # left padding
    keys = torch.arange(N)
    mask = ((keys <= q_positions[..., None]) & pad[:, None])[:, None]  # (2, 1, 2, N)
    table = padding_table_of_mask(mask, q_positions)
    assert torch.equal(table, pad & (keys <= 7))
    window = mask.clone()
    window[:, :, 1, :2] = False  # a sliding window on the last query: not causality and padding
    with pytest.raises(RuntimeError, match="more than causality and key padding"):
        padding_table_of_mask(window, q_positions)
    future = mask.clone()
    future[:, :, 0, 7] = True  # the first query sees the second: not causal
    with pytest.raises(RuntimeError, match="more than causality and key padding"):
        padding_table_of_mask(future, q_positions)


def generate_after_forward(rank, world, padded):
    """The README's ``generate()`` after the same compiled forward ran at another length (by
    keyword, as ``generate()`` passes it): Dynamo made the length symbolic, and a guard pinned it
    again while tracing the prefill, so only some of the graph's sizes stayed symbolic."""
    torch._dynamo.reset()
    model = _hf_model("llama")
    ids, kw = _prompts(16, 6, padded)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.forward = torch.compile(
            model.forward, backend="ring", options={"compiler": "aot_eager"}
        )
        model(input_ids=torch.randint(0, V, (2, 24)))
        cache = ShardedKVCache(model.config, max_length=22)
        out = model.generate(ids, **kw, **{_cache_kw(model): cache})
    return (
        bool(torch.equal(out.sequences, ref.sequences)),
        _rel(torch.stack(out.logits), torch.stack(ref.logits)),
    )


@pytest.mark.parametrize("padded", [False, True])
def test_generate_after_a_forward_at_another_length(gloo, padded):
    for same, err in gloo(2).run(generate_after_forward, padded):
        assert same and err < TOL, (same, err)

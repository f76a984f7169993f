"""ring_gated_delta_rule against the rule over the whole sequence, on gloo worlds: every rank
draws the same global problem, keeps its tokens in the layout, and its outputs, the final state
and every gradient (summed over ranks) must match one process's in float64."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ringcompile.layout import make_layout
from ringcompile.recurrent import ring_gated_delta_rule

TOL = 1e-10


def sequential_rule(query, key, value, g, beta, initial_state=None, output_final_state=False):
    """The gated delta rule one token at a time (transformers' recurrent form, without its
    normalisation), in the inputs' dtype."""
    B, S, Hk, Dk = key.shape
    Hv, Dv = value.shape[-2:]
    q, k = (x.repeat_interleave(Hv // Hk, 2) for x in (query, key))
    state = (initial_state if initial_state is not None
             else value.new_zeros(B, Hv, Dk, Dv))  # fmt: skip
    outs = []
    for t in range(S):
        state = state * g[:, t].exp()[..., None, None]
        remembered = (state * k[:, t, ..., None]).sum(-2)
        delta = (value[:, t] - remembered) * beta[:, t, ..., None]
        state = state + k[:, t, ..., None] * delta[..., None, :]
        outs.append((state * q[:, t, ..., None]).sum(-2) * Dk**-0.5)
    return torch.stack(outs, 1), (state if output_final_state else None)


def _problem(S=24, B=2, Hk=2, Hv=4, Dk=3, Dv=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q, k = r(B, S, Hk, Dk), r(B, S, Hk, Dk) * 0.5
    v = r(B, S, Hv, Dv)
    g = -torch.rand(B, S, Hv, generator=gen, dtype=dtype)  # decays in (0, 1]
    beta = torch.rand(B, S, Hv, generator=gen, dtype=dtype)
    state0 = r(B, Hv, Dk, Dv)
    weights = r(B, S, Hv, Dv), r(B, Hv, Dk, Dv)
    return (q, k, v, g, beta, state0), weights


class _Collectives(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _on_ranks(rank, world, layout, S, with_state, chunk_fn_name):
    """This rank's outputs and gradients (in global order over its tokens) against one process's
    over the whole sequence."""
    chunk_fn = sequential_rule if chunk_fn_name == "sequential" else _transformers_rule()
    dtype = torch.float64 if chunk_fn_name == "sequential" else torch.float32
    inputs, (w_out, w_state) = _problem(S=S, dtype=dtype)
    lay = make_layout(layout, S, world)
    full = [t.detach().requires_grad_() for t in inputs]
    init = full[5] if with_state else None
    out, state = chunk_fn(*full[:5], initial_state=init, output_final_state=True)
    ((out * w_out).sum() + (state * w_state).sum()).backward()
    mine = [lay.shard(t.detach(), 1, rank).requires_grad_() for t in inputs[:5]]
    init = inputs[5].detach().clone().requires_grad_() if with_state else None
    with _Collectives() as seen:
        r_out, r_state = ring_gated_delta_rule(chunk_fn, *mine, initial_state=init,
                                               output_final_state=True, layout=lay)  # fmt: skip
        loss = (r_out * lay.shard(w_out, 1, rank)).sum() + (r_state * w_state).sum() / world
        loss.backward()
    real = lay.real(rank)
    # per-token gradients on this rank's real tokens; the initial state's as it is
    grads = [(t.grad[:, real], lay.shard(f.grad, 1, rank)[:, real]) for t, f in zip(mine, full)]
    if with_state:
        grads.append((init.grad, full[5].grad))
    return dict(
        out=(r_out.detach()[:, real], lay.shard(out.detach(), 1, rank)[:, real]),
        state=(r_state.detach(), state.detach()),
        grads=grads,
        collectives=seen.ops,
    )


def _transformers_rule():
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")

    def rule(*args, **kwargs):
        return qwen3_next.torch_chunk_gated_delta_rule(*args, chunk_size=4,
                                                       use_qk_l2norm_in_kernel=True, **kwargs)  # fmt: skip

    return rule


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_the_rule_over_the_whole_sequence(gloo, world, layout, with_state):
    results = gloo(world).run(_on_ranks, layout, 24, with_state, "sequential")
    for res in results:
        for name in ("out", "state"):
            assert _rel(*res[name]) < TOL, name
        for i, (a, b) in enumerate(res["grads"]):
            if i == 5:  # the initial state's gradient: each rank holds its share of the sum
                continue
            assert _rel(a, b) < TOL, f"gradient {i}"
        # one all-gather forward, one all-reduce backward
        assert res["collectives"] == ["allgather_", "allreduce_"], res["collectives"]
    if with_state:
        total = sum(res["grads"][5][0] for res in results)
        assert _rel(total, results[0]["grads"][5][1]) < TOL


def test_padded_layout(gloo):
    """A sequence the ranks do not divide: the last rank's padding slots carry no state."""
    for res in gloo(4).run(_on_ranks, make_layout("zigzag", 21, 4), 21, False, "sequential"):
        assert _rel(*res["out"]) < TOL and _rel(*res["state"]) < TOL


def test_transformers_chunked_rule(gloo):
    """Qwen3-Next's own chunked kernel (float32 inside) as the rank's kernel, chunks of 4 cut by
    the ranks' runs."""
    for res in gloo(2).run(_on_ranks, "zigzag", 24, True, "transformers"):
        assert _rel(*res["out"]) < 1e-5 and _rel(*res["state"]) < 1e-5


def test_one_process_is_the_rule_itself():
    inputs, _ = _problem()
    out, state = ring_gated_delta_rule(sequential_rule, *inputs[:5], initial_state=inputs[5],
                                       output_final_state=True)  # fmt: skip
    ref_out, ref_state = sequential_rule(*inputs, output_final_state=True)
    assert torch.equal(out, ref_out) and torch.equal(state, ref_state)


def test_one_process_on_a_padded_layout():
    """One process given a layout that pads: the padding slots carry no state."""
    inputs, _ = _problem(S=21)
    lay = make_layout("zigzag", 21, 1)
    assert lay.local_len > 21
    mine = [lay.shard(t, 1, 0) for t in inputs[:5]]
    out, state = ring_gated_delta_rule(sequential_rule, *mine, output_final_state=True,
                                       layout=lay)  # fmt: skip
    ref_out, ref_state = sequential_rule(*inputs[:5], output_final_state=True)
    assert _rel(out[:, :21], ref_out) < TOL and _rel(state, ref_state) < TOL
    assert torch.equal(out[:, 21:], torch.zeros_like(out[:, 21:]))


def _striped(rank, world):
    inputs, _ = _problem()
    lay = make_layout("striped", 24, world)
    mine = [lay.shard(t, 1, rank) for t in inputs[:5]]
    with pytest.raises(ValueError, match="contiguous' or 'zigzag"):
        ring_gated_delta_rule(sequential_rule, *mine, layout="striped")
    return True


def test_striped_layout_is_refused(gloo):
    assert gloo(2).run(_striped) == [True, True]

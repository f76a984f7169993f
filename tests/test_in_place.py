"""In-place writes under sharding: each kind is exact or refused, never computed on a copy.

FX records no edge from an in-place change to the later readers of the memory it changes, so a
shard or gather taken where a tensor was made would miss every write after it (DeepSeek-V3 builds
its keys as ``new_empty`` plus two slice ``copy_``s: its gradients were off by 1.1-1.7). Each
function below attends over a value that is changed in place, through a view or not, on the full
tensor or on this rank's tokens; the ring (W = 2, float64, ``aot_eager`` inside) must give eager's
output and gradients, or raise ``RingCompileError`` naming the write.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import ringcompile

S, TOL = 16, 1e-10


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def slice_copies_into_new_empty(q):
    """DeepSeek-V3's keys: one buffer, its halves written by two ``copy_``s (a broadcast one)."""
    k = q.new_empty(q.shape)
    k[..., :4].copy_(q[..., :4] * 2)
    k[..., 4:].copy_(q[:, :1, :, 4:].sin())  # (1, 1, S, 4) broadcast over the heads
    return F.scaled_dot_product_attention(q, k, q, is_causal=True)


def index_put_through_a_view(q):
    """``index_put_`` on a transposed view of a buffer the graph made: the buffer changes."""
    k = q.new_zeros(q.shape)
    k.transpose(1, 2).index_put_((torch.tensor([0]),), q.transpose(1, 2).cos())
    return F.scaled_dot_product_attention(q, k, q, is_causal=True)


def masked_fill_on_a_view(q):
    """``masked_fill_`` on one head of a local tensor, its mask over (sequence, dim)."""
    k = q * 1.5
    hide = torch.arange(S)[:, None] % 3 == torch.arange(8)[None, :] % 3
    k[:, 1].masked_fill_(hide, 0.0)
    return F.scaled_dot_product_attention(q, k, q, is_causal=True)


def setitem_on_the_head_dim(q):
    """``k[..., :4] = v``: a slice of the head dim, assigned; the sequence stays whole."""
    k = q * 1.5
    k[..., :4] = q[..., 4:].exp()
    return F.scaled_dot_product_attention(q, k, q, is_causal=True)


def out_argument_into_a_full_buffer(q):
    """``torch.mul(x, 2, out=buf)`` into a buffer made full (``empty_like`` is not followed);
    out= takes no autograd, so x is detached."""
    buf = torch.empty_like(q)
    torch.mul(q.detach(), 2.0, out=buf)
    return F.scaled_dot_product_attention(q, buf + q, q, is_causal=True)


def out_argument_into_a_local_buffer(q):
    """The same into a buffer made from this rank's tokens (``zeros_like`` is followed)."""
    buf = torch.zeros_like(q)
    torch.mul(q.detach(), 2.0, out=buf)
    return F.scaled_dot_product_attention(q, buf + q, q, is_causal=True)


def changed_after_a_read(q):
    """A buffer read, then changed through a view, then read again: the first reader sees it
    unchanged, the second changed (a shard taken before the change serves one, a later one the
    other). The buffer holds no gradient, so eager's autograd allows the change."""
    k = q.new_zeros(q.shape)
    k[..., :8].copy_(q.detach().cos())
    before = k + q
    k[..., :4].mul_(3.0)
    return F.scaled_dot_product_attention(
        q, before, q, is_causal=True
    ) + F.scaled_dot_product_attention(q, k + q, q, is_causal=True)


def in_place_operator_on_a_local_view(q):
    """``v += 1`` on a view of a local tensor (Dynamo records ``operator.iadd``)."""
    k = q * 2
    v = k[:, 0]
    v += 1.0
    return F.scaled_dot_product_attention(q, k, q, is_causal=True)


EXACT = [slice_copies_into_new_empty, index_put_through_a_view, masked_fill_on_a_view,
         setitem_on_the_head_dim, out_argument_into_a_full_buffer, out_argument_into_a_local_buffer,
         changed_after_a_read,
         in_place_operator_on_a_local_view]  # fmt: skip


def zero_the_first_tokens(q):
    """``k[:, :, :4].zero_()``: a slice of the sequence of a local tensor. Its view is taken
    from the gathered sequence, so the write would reach a copy: refused."""
    k = q * 2
    k[:, :, :4].zero_()
    return F.scaled_dot_product_attention(q, k, q, is_causal=True)


def assign_to_the_first_tokens(q):
    """``k[:, :, :4] = v``: the same through ``setitem``: refused."""
    k = q * 2
    k[:, :, :4] = 0.0
    return F.scaled_dot_product_attention(q, k, q, is_causal=True)


REFUSED = [(zero_the_first_tokens, "zero_"), (assign_to_the_first_tokens, "setitem")]


def ring_against_eager(rank, world, name):
    torch._dynamo.reset()
    fn = globals()[name]
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, S, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 2, S, 8, dtype=torch.float64, generator=g)
    ref = fn(q)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), q)
    try:
        out = torch.compile(fn, backend="ring", options={"compiler": "aot_eager"})(q)
    except ringcompile.RingCompileError as e:
        return "refused", str(e)
    (grad,) = torch.autograd.grad((out * w).sum(), q)
    return "ran", [_rel(out.detach(), ref.detach()), _rel(grad, ref_grad)]


@pytest.mark.parametrize("fn", EXACT, ids=lambda f: f.__name__)
def test_in_place_writes_are_exact(gloo, fn):
    for rank, (what, errs) in enumerate(gloo(2).run(ring_against_eager, fn.__name__)):
        assert what == "ran", (rank, errs)
        assert max(errs) < TOL, (rank, errs)


@pytest.mark.parametrize("fn, op", REFUSED, ids=[f.__name__ for f, _ in REFUSED])
def test_writes_the_passes_cannot_follow_are_refused(gloo, fn, op):
    """The message names the write, the tensor, and the fix."""
    for rank, (what, message) in enumerate(gloo(2).run(ring_against_eager, fn.__name__)):
        assert what == "refused", (rank, message)
        assert f"cannot run {op}" in message and "in place" in message and " k" in message, message
        assert "Write it out of place" in message, message


def test_writes_know_views_and_the_last_change_a_reader_sees():
    """``aliases``: views lead back to the buffer (an advanced index copies: no view), and the
    last change before a reader is the one its shard must follow."""
    from ringcompile.passes.aliases import Writes, is_view, storage_root

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(q, idx):
        k = q.new_empty(q.shape)
        k[..., :4].copy_(q[..., :4])
        early = k * 1
        k[..., 4:].copy_(q[..., 4:])
        picked = q[:, :, idx]  # advanced indexing: a copy
        picked.zero_()
        return early, F.scaled_dot_product_attention(q, k, q), picked

    torch._dynamo.reset()
    torch.compile(f, backend=capture)(torch.randn(1, 2, S, 8), torch.tensor([0, 3]))
    (gm,) = graphs
    nodes = list(gm.graph.nodes)
    k = next(n for n in nodes if n.target == "new_empty")
    copies = [n for n in nodes if n.target == "copy_"]
    early = next(n for n in nodes if n.target is operator.mul)
    sdpa = next(n for n in nodes if n.target is F.scaled_dot_product_attention)
    picked = next(n for n in nodes if n.target == "zero_").args[0]
    writes = Writes(gm.graph)
    assert [storage_root(c.args[0]) for c in copies] == [k, k]
    assert writes.last_before(k, early) is copies[0] and writes.last_before(k, sdpa) is copies[1]
    assert writes.last_before(k, None) is None
    assert not is_view(picked) and storage_root(picked) is picked

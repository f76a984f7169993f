"""Blocks of packed documents as variable-length problems (``kernels.varlen``), checked on the
CPU.

FA2's varlen kernels run on CUDA only; here a dense emulation of what they compute (packed
problems with the causal diagonal and window at each one's bottom-right corner, +inf lse for a
row that sees no key) takes the varlen blocks, so the ``Segments`` the ring builds, the key
packing and the merge are checked in float64 against SDPA on the whole sequence, on gloo worlds.
``tests/test_kernels_gpu.py`` checks FA2 itself on the same segments.
"""

from __future__ import annotations

import pytest
import torch

from ringcompile import make_layout
from ringcompile.kernels import registry, varlen
from ringcompile.masks import AttentionMask, PositionRules
from ringcompile.ring import describe_steps
from tests.test_ring_attention import TOL, check_against_sdpa


def _packed_mask(seg: varlen.Segments, rows: int) -> torch.Tensor:
    """(rows, keys) bool: what FA2 lets each packed query row see."""
    cu_q, cu_k = seg.cu_q.long(), seg.cu_k.long()
    r, c = torch.arange(rows), torch.arange(seg.keys)
    sq = torch.searchsorted(cu_q[1:], r, right=True)
    sk = torch.searchsorted(cu_k[1:], c, right=True)
    t, u = r - cu_q[sq], c - cu_k[sk]
    corner = (cu_k.diff()[sq] - cu_q.diff()[sq])[:, None]  # Lk - Lq of each row's segment
    ok = sq[:, None] == sk[None, :]
    if seg.causal:
        ok &= u[None, :] <= t[:, None] + corner
    if seg.window_left >= 0:
        ok &= u[None, :] >= t[:, None] + corner - seg.window_left
    return ok


class EmulatedVarlen(varlen.VarlenBlocks):
    """FA2's varlen semantics in dense float64 (the CPU has no varlen kernel)."""

    name = "emulated varlen"
    calls = 0

    def _probs(self, q, k, seg, scale, lse=None):
        G = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(G, 1)
        s = torch.einsum("rhd,chd->hrc", q, k) * scale
        s = s.masked_fill(~_packed_mask(seg, q.shape[0]), float("-inf"))
        if lse is None:
            lse = torch.logsumexp(s, -1)
            lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # as FA2 writes it
        return torch.exp(s - lse[..., None]), lse

    def varlen_forward(self, q, k, v, seg, scale):
        type(self).calls += 1
        p, lse = self._probs(q, k, seg, scale)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return torch.einsum("hrc,chd->rhd", p, v), lse

    def varlen_backward(self, dout, q, k, v, out, lse, seg, scale):
        type(self).calls += 1
        Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
        p, _ = self._probs(q, k, seg, scale, lse)
        ve, ke = v.repeat_interleave(G, 1), k.repeat_interleave(G, 1)
        dv = torch.einsum("hrc,rhd->chd", p, dout)
        dp = torch.einsum("rhd,chd->hrc", dout, ve)
        ds = p * (dp - (dout * out).sum(-1).T[..., None])
        dq = torch.einsum("hrc,chd->rhd", ds, ke) * scale
        dk = torch.einsum("hrc,rhd->chd", ds, q) * scale
        fold = lambda t: t.view(t.shape[0], Hkv, G, -1).sum(2)  # noqa: E731
        return dq, fold(dk), fold(dv)


_SPEC = registry.KernelSpec("emulated varlen", frozenset({"varlen"}), frozenset({"cpu"}),
                            frozenset({torch.float64}), 2**31, False, EmulatedVarlen)  # fmt: skip


def with_emulated_varlen(rank, world, *args, **kwargs):
    """``check_against_sdpa`` with the emulation taking varlen blocks; also how many varlen
    calls it made on this rank."""
    kept = registry.KERNELS
    registry.KERNELS = (_SPEC,) + kept
    EmulatedVarlen.calls = 0
    try:
        return check_against_sdpa(rank, world, *args, **kwargs), EmulatedVarlen.calls
    finally:
        registry.KERNELS = kept


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("layout_name", ["striped", "contiguous"])
@pytest.mark.parametrize(
    "mask_kind",
    ["documents", "documents_bidirectional", "documents_window", "documents_chunk"],
)  # fmt: skip
@pytest.mark.parametrize("S", [24, 22])
def test_varlen_blocks_on_a_varlen_kernel_match_sdpa(gloo, world, layout_name, mask_kind, S):
    results = gloo(world).run(with_emulated_varlen, layout_name, mask_kind, 8, 2, S, 5)
    for rank, (errs, calls) in enumerate(results):
        assert max(errs) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {errs}"
        assert calls > 0, f"rank {rank}: no block went to the varlen kernel"


@pytest.mark.parametrize(
    "layout_name,mask_kind,calls",
    [
        # zigzag's rank 0 holds two chunks apart (no one progression; rank 1's two are adjacent:
        # its own block is one)
        ("zigzag", "documents", [0, 3]),
        ("striped", "documents_unsorted", [0, 0]),  # ids that come back along a row
        # windows and chunks without documents: Triton runs them faster
        ("striped", "window", [0, 0]),
        ("striped", "chunk", [0, 0]),
    ],
)
def test_blocks_varlen_cannot_take_go_to_the_masked_kernel(gloo, layout_name, mask_kind, calls):
    results = gloo(2).run(with_emulated_varlen, layout_name, mask_kind, 4, 2, 24, 3)
    for rank, (errs, _) in enumerate(results):
        assert max(errs) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {errs}"
    assert [n for _, n in results] == calls


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("layout_name", ["striped", "contiguous"])
def test_one_document_a_row_runs_the_plain_pieces(gloo, world, layout_name):
    """Document ids that hide nothing (each row one document: transformers' ids of unpacked rows,
    derived in an earlier graph) leave the varlen kernel out: the blocks run as the plain pieces
    of causality, on the plain kernel."""
    results = gloo(world).run(with_emulated_varlen, layout_name, "documents_one", 4, 2, 22, 3)
    for rank, (errs, calls) in enumerate(results):
        assert max(errs) < TOL, f"rank {rank}: rel errors (out, dq, dk, dv) = {errs}"
        assert calls == 0, f"rank {rank}: {calls} varlen calls"


def test_segments_of_a_striped_block():
    """Rank 1 of 2 (positions 1, 3, 5, ...) against rank 0's keys (0, 2, 4, ...), causal,
    documents [0, 5), [5, 12): each document's keys that its last query cannot see are cut,
    and the rest packed end to end."""
    layout = make_layout("striped", 12, 2)
    doc = (torch.arange(12) >= 5).long()[None]
    q_doc, k_doc = layout.shard(doc, 1, 1), layout.shard(doc, 1, 0)
    from ringcompile.masks import BlockMask

    mask = BlockMask(layout.positions(1), layout.positions(0), 12, PositionRules(True),
                     q_doc=q_doc, k_doc=k_doc, progression=(1, 0, 2))  # fmt: skip
    seg = varlen.segments(mask, 1)
    # queries 1 3 | 5 7 9 11, keys 0 2 4 | 6 8 10: queries 1, 3 see keys 0, 2 (key 4 no one:
    # cut); queries 5 .. 11 see keys 6, 8, 10 (query 5 none), the band j - i <= 0 with its edge
    # at each segment's bottom-right corner
    assert (seg.cu_q.tolist(), seg.cu_k.tolist(), seg.key_rows.tolist()) == (
        [0, 2, 6], [0, 2, 5], [0, 1, 3, 4, 5]
    )  # fmt: skip
    assert (seg.max_q, seg.max_k, seg.causal, seg.window_left) == (4, 3, True, -1)
    # rank 0 against rank 1's keys: queries 0 2 4 | 6 8 10, keys 1 3 | 5 7 9 11: keys strictly
    # before (j - i <= -1): 1, 3 | 5, 7, 9 (key 11 cut)
    mask = BlockMask(layout.positions(0), layout.positions(1), 12, PositionRules(True),
                     q_doc=k_doc, k_doc=q_doc, progression=(0, 1, 2))  # fmt: skip
    seg = varlen.segments(mask, 1)
    assert (seg.cu_q.tolist(), seg.cu_k.tolist(), seg.key_rows.tolist()) == (
        [0, 3, 6], [0, 2, 5], [0, 1, 2, 3, 4]
    )  # fmt: skip


def test_segments_are_made_once_per_tensor_of_document_ids(monkeypatch):
    made = []
    plan = varlen._plan
    monkeypatch.setattr(varlen, "_plan", lambda *a: made.append(1) or plan(*a))
    kept = registry.KERNELS
    monkeypatch.setattr(registry, "KERNELS", (_SPEC,) + kept)
    from ringcompile import ring_attention

    q, k, v = (torch.randn(1, 2, 16, 4, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    doc = (torch.arange(16) >= 7).long()[None]
    for _ in range(3):  # three layers of one call, then the backward
        out = ring_attention(q, k, v, is_causal=True, document_ids=doc)
    out.sum().backward()
    assert len(made) == 1
    doc.add_(0)  # changed in place: made again
    ring_attention(q, k, v, is_causal=True, document_ids=doc)
    assert len(made) == 2


def test_explain_names_the_varlen_kernel_and_its_fallback():
    plan = registry.KernelPlan((registry.KERNELS[1], _SPEC, registry.KERNELS[-1]))
    mask = AttentionMask(PositionRules(True, window_left=4), document_ids=torch.zeros(1, 8))
    lines = describe_steps(make_layout("striped", 16, 2), 1, mask, plan)
    assert lines == [
        "step 0 (own block): varlen (documents, window) -> emulated varlen (ids not sorted "
        "along a row: reference)",
        "step 1 (keys of rank 0): varlen (documents, window) -> emulated varlen (ids not sorted "
        "along a row: reference)",
    ]
    # zigzag: rank 0 holds two chunks apart, so no block of it is one progression
    zigzag = describe_steps(make_layout("zigzag", 16, 2), 0, mask, plan)
    assert zigzag == ["step 0 (own block): masked -> reference",
                      "step 1 (keys of rank 1): masked -> reference"]  # fmt: skip
    chunks = describe_steps(make_layout("striped", 16, 2), 0,
                            AttentionMask(PositionRules(True, chunk=4)), plan)  # fmt: skip
    # chunks alone are no varlen block: the same piece in every chunk goes to the plain kernel,
    # one batch of chunks
    assert chunks == [
        "step 0 (own block): causal in each of its 4 chunks -> flash (CPU), one batched call",
        "step 1 (keys of rank 1): strictly causal in each of its 4 chunks -> flash (CPU), one "
        "batched call",
    ]

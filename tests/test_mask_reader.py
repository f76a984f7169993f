"""The mask reader, idiom by idiom: how models build attention masks, and what ``lift_masks`` makes
of each.

Each row of ``IDIOMS`` is a small function that builds a dense mask the way real models do
(aranges compared, ``tril``, sliding windows, chunks, padding from an ``attention_mask``, packed
documents from ``position_ids`` restarts or from document ids, additive float masks filled with
``finfo.min``) and passes it to SDPA, with what the reader must make of it: the position rules and
per-token facts it lifts (``AttentionMask``), or ``Refused`` with the reason's words, where the
site keeps its dense mask. The function is captured by Dynamo (a recording backend) and
``run_passes`` runs the pass manager's passes on it up to ``lift_masks``, which calls
``mask_reader.read_mask`` as the backend does.

A lifted row is also checked by value: the rules and facts, evaluated on inputs with left and
right padding and packed documents, must give the dense mask exactly (a float mask: 0, or the
key bias, where allowed and ``finfo.min`` elsewhere). So a misreading fails even when its
description matches. Float64 throughout; B=2, S=8.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from ringcompile.passes import PASSES, RingContext, run_passes

B, H, S, D = 2, 2, 8, 4
MIN = torch.finfo(torch.float64).min


@dataclass(frozen=True)
class Refused:
    """Not lifted: the dense mask stays, and the fallback's reason contains ``words``."""

    words: str


# -- the inputs: padding on both sides, packed documents ------------------------------------------


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "q": torch.randn(B, H, S, D, dtype=torch.float64, generator=g),
        # row 0 padded on the left (generation), row 1 on the right (training batches)
        "am": torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]),
        # row 0: three documents packed (restarts at 3 and 7), row 1: one
        "pos": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7]]),
        "doc": torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 5, 5, 9, 9, 9, 9]]),
    }


# -- mask-building idioms --------------------------------------------------------------------------
# Each takes (q, am, pos, doc) and attends with its mask; Dynamo drops the inputs it does not use.


def _indices():
    """transformers' ``_non_vmap_expansion_sdpa``: batch, query and key indices on mask dims."""
    i = torch.arange(S)
    return torch.arange(B)[:, None, None, None], i[None, None, :, None], i[None, None, None, :]


def _attend(q, mask):
    return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def _packed_documents(pos):
    """transformers' ``find_packed_sequence_indices``: a new document where positions restart."""
    return (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)


def causal_kv_le_q(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, ki <= qi)


def causal_q_ge_kv(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, qi >= ki)


def causal_and_masks(q, am, pos, doc):
    # transformers' and_masks(causal, bidirectional): ``new_ones((), bool) & f(...).to(device)``
    _, qi, ki = _indices()
    m = qi.new_ones((), dtype=torch.bool)
    m = m & (ki <= qi).to(m.device)
    return _attend(q, m & (qi >= 0).to(m.device))


def causal_arange_start_stop(q, am, pos, doc):
    i = torch.arange(0, S)  # (cache_position's spelling: arange(past, past + S))
    return _attend(q, i[None, None, None, :] <= i[None, None, :, None])


def causal_tril(q, am, pos, doc):
    return _attend(q, torch.ones(S, S, dtype=torch.bool).tril()[None, None])


def causal_triu_additive(q, am, pos, doc):
    # GPT-style: finfo.min above the diagonal, added to the scores
    return _attend(q, torch.full((S, S), MIN, dtype=torch.float64).triu(1)[None, None])


def strictly_causal(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, ki < qi)


def sliding_window(q, am, pos, doc):
    # transformers' causal & sliding_window_overlay(3)
    _, qi, ki = _indices()
    return _attend(q, (ki <= qi) & (ki > qi - 3))


def hidden_above_diagonal(q, am, pos, doc):
    # masked_fill(kv > q, -inf), as attention written out hides keys: SDPA's mask ~(kv > q)
    _, qi, ki = _indices()
    return _attend(q, ~(ki > qi))


def window_both_ways(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, (qi - ki).abs() <= 2)


def window_as_distance(q, am, pos, doc):
    # flex's spelling: causal & (q_idx - kv_idx < 3)
    _, qi, ki = _indices()
    return _attend(q, (ki <= qi) & (qi - ki < 3))


def lookahead_as_distance(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, ki - qi <= 2)


def distance_excluding_the_diagonal(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, qi - ki >= 1)


def lookahead(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, ki <= qi + 2)


def chunked(q, am, pos, doc):
    # Llama 4's chunked attention, without padding
    _, qi, ki = _indices()
    return _attend(q, (ki <= qi) & (qi // 4 == ki // 4))


def chunked_after_left_padding(q, am, pos, doc):
    # transformers' chunked_overlay: chunks start after each row's left padding
    b, qi, ki = _indices()
    left = (am.cumsum(dim=-1) == torch.zeros_like(am)).sum(dim=-1)
    chunks = (ki - left[b]) // 4 == (qi - left[b]) // 4
    return _attend(q, (ki <= qi) & chunks & am.bool()[b, ki])


def padding_causal(q, am, pos, doc):
    b, qi, ki = _indices()
    return _attend(q, (ki <= qi) & am.bool()[b, ki])


def padding_compared_then_indexed(q, am, pos, doc):
    b, qi, ki = _indices()
    return _attend(q, (ki <= qi) & (am == 1)[b, ki])


def padding_bidirectional(q, am, pos, doc):
    # an encoder: transformers' bidirectional mask (``q_idx >= 0``) & padding
    b, qi, ki = _indices()
    return _attend(q, (qi >= 0) & am.bool()[b, ki])


def padding_read_by_query(q, am, pos, doc):
    b, qi, ki = _indices()
    return _attend(q, (ki <= qi) & am.bool()[b, qi] & am.bool()[b, ki])


def padding_broadcast(q, am, pos, doc):
    # BERT's spelling: the (B, S) mask broadcast as (B, 1, 1, S)
    _, qi, ki = _indices()
    return _attend(q, (ki <= qi) & am[:, None, None, :].bool())


def packed_documents(q, am, pos, doc):
    b, qi, ki = _indices()
    d = _packed_documents(pos)
    return _attend(q, (ki <= qi) & (d[b, qi] == d[b, ki]))


def packed_positions_compared(q, am, pos, doc):
    # causality read on position ids, inside documents derived from them
    b, qi, ki = _indices()
    d = _packed_documents(pos)
    return _attend(q, (pos[b, ki] <= pos[b, qi]) & (d[b, qi] == d[b, ki]))


def packed_sliding_window(q, am, pos, doc):
    b, qi, ki = _indices()
    d = _packed_documents(pos)
    window = (pos[b, ki] <= pos[b, qi]) & (pos[b, ki] > pos[b, qi] - 3)
    return _attend(q, window & (d[b, qi] == d[b, ki]))


def positions_without_documents(q, am, pos, doc):
    # P[kv] <= P[q] across restarts: a function of position values, not of token indices
    b, qi, ki = _indices()
    return _attend(q, pos[b, ki] <= pos[b, qi])


def positions_with_other_documents(q, am, pos, doc):
    # documents not derived from the positions compared: P need not rise by one inside them
    b, qi, ki = _indices()
    return _attend(q, (pos[b, ki] <= pos[b, qi]) & (doc[b, qi] == doc[b, ki]))


def packed_documents_diff_append(q, am, pos, doc):
    # diff with ``append``: each restart is counted one token early, so the last token of a
    # document joins the next one, and positions do not rise by one inside the "documents"
    b, qi, ki = _indices()
    d = (torch.diff(pos, append=pos[:, -1:] + 1, dim=-1) != 1).cumsum(-1)
    return _attend(q, (pos[b, ki] <= pos[b, qi]) & (d[b, qi] == d[b, ki]))


def document_ids_argument(q, am, pos, doc):
    b, qi, ki = _indices()
    return _attend(q, (ki <= qi) & (doc[b, qi] == doc[b, ki]))


def prefix_lm(q, am, pos, doc):
    # a prefix every query sees, causal after it (flex's or_masks(causal, prefix))
    b, qi, ki = _indices()
    return _attend(q, (b.new_zeros((), dtype=torch.bool) | (ki <= qi)) | (ki < 3))


def prefix_lm_window_padding(q, am, pos, doc):
    b, qi, ki = _indices()
    window = (ki <= qi) & (qi - ki < 2)
    return _attend(q, (window | (ki <= 1)) & am.bool()[b, ki])


def prefix_or_padding(q, am, pos, doc):
    # (rules & padding) | prefix: padded prefix keys are seen, no (rules | prefix) & facts form
    b, qi, ki = _indices()
    return _attend(q, ((ki <= qi) & am.bool()[b, ki]) | (ki < 3))


def prefix_then_window(q, am, pos, doc):
    # (causal | prefix) & window: the window cuts the prefix too
    b, qi, ki = _indices()
    return _attend(q, ((ki <= qi) | (ki < 3)) & (qi - ki < 2))


def one_document_from_arange(q, am, pos, doc):
    # transformers without position_ids: it makes them with an arange, so one document
    b, qi, ki = _indices()
    d = _packed_documents(torch.arange(S)[None].expand(B, S))
    return _attend(q, (ki <= qi) & (d[b, qi] == d[b, ki]))


def additive_finfo_min(q, am, pos, doc):
    # transformers' sdpa float mask: where(allowed, 0, finfo.min)
    b, qi, ki = _indices()
    allowed = (ki <= qi) & am.bool()[b, ki]
    return _attend(q, torch.where(allowed, torch.tensor(0.0, dtype=q.dtype), MIN))


def additive_minus_1e9(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, torch.where(ki <= qi, torch.tensor(0.0, dtype=q.dtype), -1e9))


def alibi_key_bias(q, am, pos, doc):
    # Falcon: slope_h * key position, masked_fill'ed where the float causal mask hides
    b, qi, ki = _indices()
    allowed = (ki <= qi) & am.bool()[b, ki]
    hidden = torch.where(allowed, torch.tensor(0.0, dtype=q.dtype), MIN) < -1
    slopes = torch.tensor([0.5, 0.25], dtype=q.dtype)
    bias = slopes[None, :, None, None] * torch.arange(S, dtype=q.dtype)[None, None, None, :]
    return _attend(q, bias.masked_fill(hidden, MIN))


def per_head_expanded(q, am, pos, doc):
    _, qi, ki = _indices()
    return _attend(q, (ki <= qi).expand(B, H, S, S))


def from_scores(q, am, pos, doc):
    # depends on the queries' values pair by pair: no per-token fact computes it
    return _attend(q, q @ q.transpose(-1, -2) > 0)


IDIOMS = [
    pytest.param(causal_kv_le_q, "causal", id="causal-kv-le-q"),
    pytest.param(causal_q_ge_kv, "causal", id="causal-q-ge-kv"),
    pytest.param(causal_and_masks, "causal", id="causal-transformers-and-masks"),
    pytest.param(
        causal_arange_start_stop,
        Refused("indexing that is not T[batch, q or kv]"),
        id="causal-arange-start-stop-refused",
    ),
    pytest.param(
        causal_tril, Refused("indexing that is not T[batch, q or kv]"), id="causal-tril-refused"
    ),
    pytest.param(
        causal_triu_additive,
        Refused("indexing that is not T[batch, q or kv]"),
        id="causal-triu-finfo-min-refused",
    ),
    pytest.param(
        strictly_causal,
        Refused("a window that excludes the diagonal"),
        id="strictly-causal-kv-lt-q-refused",
    ),
    pytest.param(sliding_window, "causal, window (2, -1)", id="sliding-window-3"),
    pytest.param(window_both_ways, "bidirectional, window (2, 2)", id="window-abs-q-minus-kv-le-2"),
    pytest.param(lookahead, "bidirectional, window (-1, 2)", id="lookahead-kv-le-q-plus-2"),
    pytest.param(window_as_distance, "causal, window (2, -1)", id="window-q-minus-kv-lt-3"),
    pytest.param(
        lookahead_as_distance, "bidirectional, window (-1, 2)", id="lookahead-kv-minus-q-le-2"
    ),
    pytest.param(
        distance_excluding_the_diagonal,
        Refused("a window that excludes the diagonal"),
        id="distance-q-minus-kv-ge-1-refused",
    ),
    pytest.param(chunked, "causal, chunks of 4", id="chunked-llama4"),
    pytest.param(
        chunked_after_left_padding,
        "causal, document_ids(am), key_padding_mask(am)",
        id="chunked-after-left-padding",
    ),
    pytest.param(padding_causal, "causal, key_padding_mask(am)", id="padding-am-bool-indexed-b-kv"),
    pytest.param(
        padding_compared_then_indexed,
        "causal, key_padding_mask(am)",
        id="padding-am-eq-1-indexed-b-kv",
    ),
    pytest.param(
        padding_bidirectional,
        "bidirectional, key_padding_mask(am)",
        id="padding-bidirectional-encoder",
    ),
    pytest.param(
        padding_read_by_query,
        Refused("a padding mask read by query"),
        id="padding-read-by-query-refused",
    ),
    pytest.param(
        padding_broadcast,
        Refused("indexing that is not T[batch, q or kv]"),
        id="padding-broadcast-am-none-none-refused",
    ),
    pytest.param(packed_documents, "causal, document_ids(pos)", id="packed-documents-diff-cumsum"),
    pytest.param(
        packed_positions_compared, "causal, document_ids(pos)", id="packed-positions-compared"
    ),
    pytest.param(
        packed_sliding_window,
        "causal, window (2, -1), document_ids(pos)",
        id="packed-sliding-window",
    ),
    pytest.param(
        positions_without_documents,
        Refused("without documents derived from them"),
        id="positions-compared-without-documents-refused",
    ),
    pytest.param(
        positions_with_other_documents,
        Refused("without documents derived from them"),
        id="positions-compared-other-documents-refused",
    ),
    pytest.param(
        packed_documents_diff_append,
        Refused("without documents derived from them"),
        id="packed-documents-diff-append-refused",
    ),
    pytest.param(document_ids_argument, "causal, document_ids(doc)", id="document-ids-argument"),
    pytest.param(hidden_above_diagonal, "causal", id="not-above-the-diagonal"),
    pytest.param(one_document_from_arange, "causal", id="one-document-from-arange"),
    pytest.param(prefix_lm, "causal, or a prefix of 3", id="prefix-lm-or-masks"),
    pytest.param(
        prefix_lm_window_padding,
        "causal, window (1, -1), or a prefix of 2, key_padding_mask(am)",
        id="prefix-lm-window-padding",
    ),
    pytest.param(
        prefix_or_padding,
        Refused("a prefix or-ed with more than position rules"),
        id="prefix-or-padding-refused",
    ),
    pytest.param(
        prefix_then_window,
        Refused("position rules and-ed with a prefix"),
        id="prefix-then-window-refused",
    ),
    pytest.param(
        additive_finfo_min,
        "causal, key_padding_mask(am), empty rows: mean of V",
        id="additive-where-finfo-min",
    ),
    pytest.param(additive_minus_1e9, Refused("not finfo.min"), id="additive-minus-1e9-refused"),
    pytest.param(
        alibi_key_bias,
        "causal, key_padding_mask(am), key_bias(constants), empty rows: mean of V",
        id="alibi-key-bias-masked-fill",
    ),
    pytest.param(
        per_head_expanded,
        Refused("per-head values other than a key bias"),
        id="per-head-expanded-refused",
    ),
    pytest.param(from_scores, Refused("is not an index rule"), id="from-scores-refused"),
]


# -- running the passes ----------------------------------------------------------------------------


def _through(name: str):
    """The pass manager's passes in order, up to and including the one called ``name``."""
    return PASSES[: [p.name for p in PASSES].index(name) + 1]


def _lift(fn, inputs):
    """Dynamo's graph of ``fn`` with the passes run through ``lift_masks``: the context, the one
    site, its dense mask node and the graph's example inputs."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, fullgraph=True)(*inputs.values())
    ((gm, example_inputs),) = graphs
    ctx = RingContext(gm=gm, group=None, layout_name="striped")
    run_passes(ctx, _through("lift_masks"))
    (site,) = ctx.sites
    # SDPA still reads the dense mask (swap_attention, which drops it, has not run)
    return ctx, site, site.node.kwargs["attn_mask"], example_inputs


def _behind(node) -> str:
    """The graph inputs a fact is computed from, by their names in the model (``constants``)."""
    seen, stack, found = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.add(n.name.removeprefix("l_").rstrip("_"))
        stack += n.all_input_nodes
    return ", ".join(sorted(found)) or "constants"


def _describe(mask) -> str:
    parts = [str(mask.rules)]
    parts += [f"{name}({_behind(node)})" for name, node in mask.token_facts.items()]
    if mask.empty_rows_mean:
        parts.append("empty rows: mean of V")
    return ", ".join(parts)


def _values(gm, example_inputs) -> dict:
    """Every node's value on the example inputs."""
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Record(gm).run(*example_inputs)
    return values


def _lifted_as_dense(mask, values, dtype) -> torch.Tensor:
    """The lifted rules and facts as the dense mask they stand for, (B, 1|H, S, S)."""
    i = torch.arange(S)
    ok = mask.rules.allows(i[:, None], i[None, :], None).expand(B, S, S)
    if mask.document_ids is not None:
        d = values[mask.document_ids]
        ok = ok & (d[:, :, None] == d[:, None, :])
    if mask.key_padding_mask is not None:
        ok = ok & values[mask.key_padding_mask][:, None, :]
    ok = ok[:, None]
    if not dtype.is_floating_point:
        return ok
    bias = values[mask.key_bias] if mask.key_bias is not None else torch.zeros((), dtype=dtype)
    return torch.where(ok, bias, MIN)


@pytest.mark.parametrize("fn, expected", IDIOMS)
def test_mask_idiom(fn, expected):
    ctx, site, dense, example_inputs = _lift(fn, _inputs())
    if isinstance(expected, Refused):
        # refused, not misread: the dense mask stays on the site and the report says why
        lifted = site.lifted_mask
        assert lifted is None and site.attn_mask is dense, lifted and _describe(lifted)
        (fallback,) = ctx.report.fallbacks
        assert "dense mask kept" in fallback and expected.words in fallback, fallback
        return
    assert site.attn_mask is None and site.lifted_mask is not None, ctx.report.fallbacks
    assert _describe(site.lifted_mask) == expected
    assert len(ctx.report.lifted) == 1 and not ctx.report.fallbacks
    # the facts compute the dense mask exactly, here with padding and packing that matter
    values = _values(ctx.gm, example_inputs)
    want = values[dense]
    got = _lifted_as_dense(site.lifted_mask, values, want.dtype)
    shape = torch.broadcast_shapes(got.shape, want.shape)
    differ = (got.expand(shape) != want.expand(shape)).nonzero().tolist()
    assert not differ, f"{len(differ)} entries differ, first (b, h, q, k): {differ[0]}"


def test_inputs_make_the_facts_matter():
    """The rows' inputs tell the facts apart: padding hides keys on both sides, the documents
    restart, the document ids differ from the packed ones; else a dropped fact would pass."""
    x = _inputs()
    assert (x["am"][0, 0] == 0) and (x["am"][1, -1] == 0)
    assert len(_packed_documents(x["pos"])[0].unique()) == 3
    assert not torch.equal(_packed_documents(x["pos"]), x["doc"])

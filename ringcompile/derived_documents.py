"""Document ids that an earlier compiled graph derived from position ids, recognised where a later
graph receives them.

Comparing position ids ``P[b, kv] <= P[b, q]`` is causality only inside documents where the
positions rise by one per token, which holds for the document ids transformers derives from them
(``cumsum(diff(P) != 1)``; ``mask_reader``). Within one graph the reader sees that derivation. With
``attn_implementation="flex_attention"``, ``create_block_mask`` breaks the graph between it and
the layers, which receive the position ids and the document ids as inputs and could not tell.

So a graph that returns such document ids marks them, on each call, with the tensors that carry
the position ids they came from (outputs with the same values, or the input itself), in a table
that holds the tensors weakly (``mark``). A later graph whose example inputs are so marked reads
the pair as derived (``derived_pairs``), and on each call checks that its inputs still are: the
same tensors, unchanged since (version counters), which costs no device work and no wait. Inputs
the table does not vouch for (made by Python code, or changed in place) are checked on their
values, once per call with a wait for the device, and a pair that is not so raises: the graph's
mask would be wrong for them.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch.fx import Node
from torch.utils.weak import WeakTensorKeyDictionary

from ringcompile.errors import RingCompileError
from ringcompile.passes.mask_reader import positions_of_documents, under_views

__all__ = [
    "DocumentsLeaving",
    "MarksDocuments",
    "ChecksDocuments",
    "derived_pairs",
    "documents_leaving",
]

# document ids -> (their version, [(position ids' tensor (weakly), its version)])
_TABLE = WeakTensorKeyDictionary()


class DocumentsLeaving(NamedTuple):
    """An output leaf of document ids and where the position ids they were derived from leave:
    output leaves, and the graph input they came in as (None if made inside the graph)."""

    documents: int
    positions: tuple[int, ...]
    input: int | None


def documents_leaving(gm: torch.fx.GraphModule, own: int, sharded) -> list[DocumentsLeaving]:
    """The graph's outputs that are document ids derived from position ids, with the outputs and
    the input that carry those position ids. ``own``: how many leading output leaves the caller
    receives (0: all); ``sharded``: the leaves that leave sharded, which are left out."""
    output = gm.graph.find_nodes(op="output")[0]
    leaves = output.args[0] if isinstance(output.args[0], (tuple, list)) else None
    if not leaves:
        return []
    leaves = leaves[:own] if own else leaves
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    roots = {j: under_views(n) for j, n in enumerate(leaves)
             if isinstance(n, Node) and j not in sharded}  # fmt: skip
    found = []
    for j, node in enumerate(leaves):
        if j not in roots:
            continue
        positions = positions_of_documents(node)
        if positions is None:
            continue
        outputs = tuple(k for k, r in roots.items() if r is positions and k != j)
        given = placeholders.index(positions) if positions in placeholders else None
        if outputs or given is not None:
            found.append(DocumentsLeaving(j, outputs, given))
    return found


def mark(documents: torch.Tensor, positions: list[torch.Tensor]) -> None:
    _TABLE[documents] = (documents._version, [(weakref.ref(p), p._version) for p in positions])


def vouched(documents, positions) -> bool:
    """Whether the table says ``documents`` were derived from ``positions``' values, and neither
    changed since."""
    if not (isinstance(documents, torch.Tensor) and isinstance(positions, torch.Tensor)):
        return False
    entry = _TABLE.get(documents)
    if entry is None or entry[0] != documents._version:
        return False
    return any(ref() is positions and version == positions._version for ref, version in entry[1])


def derived_pairs(placeholders: list[Node], example_inputs) -> dict[Node, set[Node]]:
    """``{document ids' input: the position ids' inputs}`` among the graph's inputs, as the
    table vouches for the example inputs."""
    pairs: dict[Node, set[Node]] = {}
    values = list(zip(placeholders, example_inputs))
    for d, dv in values:
        for p, pv in values:
            if p is not d and vouched(dv, pv):
                pairs.setdefault(d, set()).add(p)
    return pairs


def follow(documents: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether, on their values, ``positions`` rise by one per token inside each of the documents
    (each document one run of tokens): comparing positions there is comparing indices. One wait
    for the device."""
    d, p = torch.broadcast_tensors(documents, positions)
    step_d, step_p = d.diff(dim=-1), p.diff(dim=-1)
    return bool(((step_d >= 0) & ((step_d != 0) | (step_p == 1))).all())


class MarksDocuments:
    """A compiled graph that returns document ids derived from position ids: marks them on each
    call (``mark``)."""

    def __init__(self, compiled, leaving: list[DocumentsLeaving]):
        self.compiled, self.leaving = compiled, leaving

    def __call__(self, *args):
        out = self.compiled(*args)
        for d in self.leaving:
            carriers = [out[k] for k in d.positions]
            if d.input is not None:
                carriers.append(args[d.input])
            if isinstance(out[d.documents], torch.Tensor):
                mark(out[d.documents], [c for c in carriers if isinstance(c, torch.Tensor)])
        return out


class ChecksDocuments:
    """A compiled graph that read document ids among its inputs as derived from position ids
    among them (``pairs``: input indices and names): checks on each call that they still are."""

    def __init__(self, compiled, pairs: list[tuple[int, int, str, str]]):
        self.compiled, self.pairs = compiled, pairs

    def __call__(self, *args):
        for i_doc, i_pos, doc, pos in self.pairs:
            if not (vouched(args[i_doc], args[i_pos]) or follow(args[i_doc], args[i_pos])):
                raise RingCompileError(
                    f"backend='ring': this graph reads its attention mask's comparison of position "
                    f"ids {pos} as causality inside the documents {doc}, because when it was "
                    "compiled an earlier graph had derived those document ids from those position "
                    "ids (cumsum(diff(P) != 1)). On this call the positions do not rise by one "
                    "inside each document, so the mask would be read wrongly. Pass document ids "
                    "derived from the position ids, or compile anew (torch._dynamo.reset()) for "
                    "such inputs."
                )
        return self.compiled(*args)

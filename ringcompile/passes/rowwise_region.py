"""Regions of a graph outlined into one op whose output rows are its input rows' own results.

A mixture-of-experts dispatch (``passes/outline_experts.py``) sorts its rows by expert, computes
them in groups and puts them back: each node inside mixes rows, but the region's output row t
depends on its inputs' row t alone. Outlined as one ``call_module`` of :class:`RowwiseRegion`, it
is one op that ``dims`` maps rows through, so the later passes run it on any rows, this rank's
tokens among them.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

__all__ = ["RowwiseRegion", "rowwise_region_of"]


class RowwiseRegion(torch.nn.Module):
    """Runs ``graph_module`` (written for rows on dim 0) on inputs whose first ``lead`` dims are
    rows (``unflatten_rows`` makes it 2: (batch, sequence)). ``row_inputs``: which inputs carry
    rows; the others (parameters) are passed as they are."""

    def __init__(self, graph_module: GraphModule, row_inputs: tuple[int, ...], what: str):
        super().__init__()
        self.graph_module = graph_module
        self.row_inputs = row_inputs
        self.what = what
        self.lead = 1

    def extra_repr(self) -> str:
        return f"{self.what}, rows in inputs {self.row_inputs}"

    def forward(self, *inputs):
        if self.lead == 1:
            return self.graph_module(*inputs)
        lead_shape = inputs[self.row_inputs[0]].shape[: self.lead]
        flat = [x.flatten(0, self.lead - 1) if i in self.row_inputs else x
                for i, x in enumerate(inputs)]  # fmt: skip
        return self.graph_module(*flat).unflatten(0, lead_shape)


def rowwise_region_of(node: Node) -> RowwiseRegion | None:
    """The region ``node`` calls, if it calls one."""
    if node.op != "call_module":
        return None
    module = node.graph.owning_module.get_submodule(node.target)
    return module if isinstance(module, RowwiseRegion) else None

"""Graphs with symbolic sizes, compiled once per concrete size.

torch.compile's default makes a dimension symbolic once it changes between calls. The ring needs
the sequence length itself (to lay the tokens out over the ranks), so the backend hands such a
graph to ``PerShape``: on each call with sizes it has not seen, it copies the graph, propagates
fake tensors of the call's sizes through it (every node's ``example_value`` becomes static, as
Dynamo records it for ``dynamic=False``), puts the sizes it computes into the graph as constants
and compiles that copy with the backend; calls with
sizes seen before reuse it. The graph is never traced again, so nothing depends on Dynamo being
re-entered from inside a compiled frame (it is not).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Interpreter

from ringcompile.passes.fx_utils import remember_input_sources

__all__ = ["PerShape"]


class _RecordExamples(Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        n.meta["example_value"] = out
        return out


def static_copy(gm: GraphModule, args) -> GraphModule:
    """A copy of ``gm`` whose example values have the sizes of ``args``."""
    graph = torch.fx.Graph()
    copied: dict = {}
    out = graph.graph_copy(gm.graph, copied)
    graph.output(out)
    for old, new in copied.items():  # Dynamo's records too (where each input came from)
        new.meta = {**old.meta, **new.meta}
    copy = GraphModule(gm, graph)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        _RecordExamples(copy).run(*fake)
    # sizes are constants now: the passes read (and rewrite) sizes baked into views as integers
    for node in list(copy.graph.nodes):
        value = node.meta.get("example_value")
        if node.op != "output" and type(value) is int:
            node.replace_all_uses_with(value)
            if node.op != "placeholder":  # the call keeps its signature
                copy.graph.erase_node(node)
    copy.recompile()
    return copy


class PerShape:
    """``compile_static(static_gm, args)`` per distinct set of argument sizes."""

    def __init__(self, gm: GraphModule, compile_static):
        remember_input_sources(gm.graph)  # (the names the checks use, before Dynamo drops them)
        self.gm, self.compile_static = gm, compile_static
        self.compiled: dict[tuple, object] = {}

    def __call__(self, *args):
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = self.compile_static(static_copy(self.gm, args), list(args))
        return fn(*args)

"""FX helpers every pass may use, so that passes import this module and not each other.

- ``source_line(node)``: the ``file:line`` of the user code a node came from (for reports);
- ``is_sdpa(node)``: whether a node calls ``scaled_dot_product_attention`` (``SDPA_TARGETS``, with
  ``soft_cap.sdpa_soft_capped``: SDPA with a soft cap of the scores);
- ``sdpa_args(node)``: an SDPA call's arguments by name, positional or keyword;
- ``in_place_method(node)``: whether a node is a tensor method that changes its tensor's values;
- ``input_source(node)``: where Dynamo took a graph input from (``L['tokens']``), and
  ``is_module_state(node)``: whether that is a module's parameter or buffer;
- ``MASK_MOD``: the meta key of an SDPA that ``flex_attention`` made from a ``mask_mod`` alone:
  ``(the mask_mod's subgraph as a get_attr node, its buffers)``, which ``swap_attention`` gives
  the ring where the mask stays dense.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch.fx import Node

from ringcompile.soft_cap import sdpa_soft_capped

__all__ = [
    "MASK_MOD",
    "SDPA_TARGETS",
    "in_place_method",
    "inputs_behind",
    "input_source",
    "is_module_state",
    "is_sdpa",
    "remember_input_sources",
    "sdpa_args",
    "source_line",
]

SDPA_TARGETS = frozenset(
    {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention, sdpa_soft_capped}
)

MASK_MOD = "ringcompile_mask_mod"

_SDPA_SIGNATURE = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def input_source(node: Node) -> str | None:
    """Dynamo's record of where a graph input came from (``L['tokens']``,
    ``self._modules['norm']._parameters['weight']``), or None. Dynamo drops its records once the
    backend returns; a graph kept to compile later keeps this name (``remember_input_sources``)."""
    if "input_source" in node.meta:
        return node.meta["input_source"]
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name  # a method in older torch
    return name if isinstance(name, str) else None


_MODULE_STATE = re.compile(r"\._(?:parameters|buffers)\[")


def is_module_state(node: Node) -> bool:
    """Whether a graph input is a module's parameter or buffer (``..._parameters['weight']``)."""
    return bool(_MODULE_STATE.search(input_source(node) or ""))


def inputs_behind(node: Node) -> set[Node]:
    """The graph inputs ``node`` is computed from, through any op, but the model's parameters and
    buffers."""
    found, seen, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if not is_module_state(n):
                found.add(n)
            continue
        stack += n.all_input_nodes
    return found


def remember_input_sources(graph: torch.fx.Graph) -> None:
    """Keep each input's ``input_source`` in its own meta, where copies of the graph find it."""
    for node in graph.find_nodes(op="placeholder"):
        node.meta["input_source"] = input_source(node)


def source_line(node: Node) -> str:
    """``file:line`` of the user code a node came from."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return node.name
    last = frames[-1].split(",")
    return f"{last[0][6:].strip(chr(34))}:{last[1].strip().removeprefix('line ')}"


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def in_place_method(node: Node) -> bool:
    """``x.add_(y)``: a method that changes ``x``'s values (``requires_grad_`` changes none)."""
    t = node.target
    return (node.op == "call_method" and isinstance(t, str) and t.endswith("_")
            and not t.endswith("__") and t != "requires_grad_")  # fmt: skip


def sdpa_args(node: Node) -> dict:
    """``F.scaled_dot_product_attention``'s arguments of ``node`` by name."""
    bound = dict(zip(_SDPA_SIGNATURE, node.args))
    bound.update(node.kwargs)
    return bound

"""FX helpers every pass may use, so that passes import this module and not each other.

- ``source_line(node)``: the ``file:line`` of the user code a node came from (for reports);
- ``is_sdpa(node)``: whether a node calls ``scaled_dot_product_attention`` (``SDPA_TARGETS``);
- ``sdpa_args(node)``: an SDPA call's arguments by name, positional or keyword;
- ``in_place_method(node)``: whether a node is a tensor method that changes its tensor's values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["SDPA_TARGETS", "in_place_method", "is_sdpa", "sdpa_args", "source_line"]

SDPA_TARGETS = frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})

_SDPA_SIGNATURE = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


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

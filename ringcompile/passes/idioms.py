"""Recognisers of model idioms that several passes (and the backend) look for.

- ``unexpanded(node)``: K/V that ``repeat_kv`` expanded to the query heads, and their KV heads;
- ``sharded_kv_marks(sdpa_args)``: the ``ShardedKVCache`` marks an SDPA's keys and values are
  (a decode step), looking through such an expansion; ``reads_sharded_cache(sdpa)``;
- ``soft_capped(node)``: Gemma 2's soft cap ``c * tanh(x / c)``, its x and c (in the model's graph
  and in a flex ``score_mod``'s alike).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch.fx import Node

from ringcompile.kv_cache import MARK_OPS
from ringcompile.passes.dims import shape_of
from ringcompile.passes.fx_utils import sdpa_args

__all__ = ["SoftCap", "reads_sharded_cache", "sharded_kv_marks", "soft_capped", "unexpanded"]


class SoftCap(NamedTuple):
    x: Node
    cap: float
    nodes: tuple[Node, Node, Node]  # x / c, its tanh, and c times that


def soft_capped(node) -> SoftCap | None:
    """``node`` read as ``c * tanh(x / c)`` (either product order, a number c > 0), the three
    nodes Dynamo records for it; else None."""
    if not (isinstance(node, Node) and node.op == "call_function"
            and node.target in (operator.mul, torch.mul)):  # fmt: skip
        return None
    t, c = node.args[:2]
    if isinstance(c, Node):
        t, c = c, t
    if not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0
            and isinstance(t, Node) and _is_tanh(t)):  # fmt: skip
        return None
    inner = t.args[0]
    if (isinstance(inner, Node) and inner.op == "call_function"
            and inner.target in (operator.truediv, torch.div) and inner.args[1] == c
            and isinstance(inner.args[0], Node)):  # fmt: skip
        return SoftCap(inner.args[0], float(c), (inner, t, node))
    return None


def _is_tanh(node: Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.tanh, torch.Tensor.tanh)) or (
        node.op == "call_method" and node.target == "tanh"
    )


def _is_head_unsqueeze(node: Node) -> Node | None:
    """``x[:, :, None]`` (any spelling) of a 4-D x: the input x, else None."""
    if node.op == "call_method" and node.target == "unsqueeze" and node.args[1:] == (2,):
        return node.args[0]
    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1]
        full = slice(None)
        if (
            isinstance(idx, tuple)
            and idx[:3] == (full, full, None)
            and all(i == full or i is Ellipsis for i in idx[3:])
        ):
            return node.args[0]
    return None


def unexpanded(node: Node) -> tuple[Node, int] | None:
    """``(x, n)`` if ``node`` is ``x`` (B, Hkv, S, D) with each head repeated n times in place."""
    if not (node.op == "call_method" and node.target in ("reshape", "view")):
        return None
    expand = node.args[0]
    if not (isinstance(expand, Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    x = _is_head_unsqueeze(expand.args[0])
    if x is None:
        return None
    xs, es, out = shape_of(x), shape_of(expand), shape_of(node)
    if xs is None or len(xs) != 4 or len(es) != 5:
        return None
    B, hkv, S, D = xs
    n = es[2]
    if es != (B, hkv, n, S, D) or out != (B, hkv * n, S, D):
        return None
    return x, n


def _mark(node) -> tuple[Node, Node, Node] | None:
    """(buffer, positions, query positions) if ``node`` is a sharded-KV mark."""
    if isinstance(node, Node) and node.op == "call_function" and node.target in MARK_OPS:
        return tuple(node.args[:3])
    return None


def sharded_kv_marks(a: dict):
    """The sharded-KV marks an SDPA's key and value are (each None if not), looking through a
    ``repeat_kv`` expansion, and whether it is GQA."""
    k, v, enable_gqa = a["key"], a["value"], bool(a.get("enable_gqa", False))
    expanded = unexpanded(k), unexpanded(v)
    if all(e is not None for e in expanded):
        k, v, enable_gqa = expanded[0][0], expanded[1][0], True
    return _mark(k), _mark(v), enable_gqa


def reads_sharded_cache(sdpa: Node) -> bool:
    """This SDPA reads the sharded cache (a decode step): its sizes need not be static."""
    mk, mv, _ = sharded_kv_marks(sdpa_args(sdpa))
    return mk is not None or mv is not None

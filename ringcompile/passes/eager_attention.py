"""Pass 2: attention written out (matmul, softmax, matmul) becomes SDPA.

Expects: a graph in one spelling (pass 1): operators as ``operator`` functions.
Guarantees: each chain, over one sequence (4-D queries and keys of one length),

    s = q @ k.transpose(-2, -1)                 (any spelling of the last two dims)
    s = s * scale   or   s / d                  optional, a number
    s = tanh(s / c) * c                         optional, a number c: a soft cap (Gemma 2)
    s = s + mask                                optional, a mask of the queries' dtype
      or s.masked_fill(hidden, -inf)            (nanoGPT's: SDPA's boolean mask ~hidden)
    p = softmax(s, dim=-1[, dtype=...])
    p = p.to(dtype)                             optional
    p = dropout(p, p=0.0, ...)                  optional, with p = 0 or training=False
    out = p @ v

whose intermediates nothing else reads (so not where the model returns its attention weights),
becomes ``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)``, or with a soft
cap ``sdpa_soft_capped(..., softcap=c)`` (``ringcompile.soft_cap``): the same attention, which
later passes find, lift and ring as any SDPA call. Every other chain stays as it is. The scores'
matmul keeps the inputs' dtype here and the softmax its own (transformers' eager attention takes
the softmax in float32 even for a float64 model): the kernels compute both in their accumulation
dtype, so such a float64 model's result differs from eager by float32's rounding, not more.

    s = q @ k.transpose(2, 3); s = s * 0.125; s = s / 50.0; s = tanh(s); s = s * 50.0
    s = s + mask; p = softmax(s, dim=-1, dtype=float32); p = p.to(float64); out = p @ v
    -> out = sdpa_soft_capped(q, k, v, attn_mask=mask, scale=0.125, softcap=50.0)
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Node

from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import example
from ringcompile.passes.fx_utils import source_line
from ringcompile.passes.idioms import soft_capped
from ringcompile.soft_cap import sdpa_soft_capped

_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)


@dataclass
class _Attention:
    """One chain read back: its inputs and what it computes."""

    q: Node
    k: Node
    v: Node
    out: Node
    mask: Node | None = None
    hidden: Node | None = None  # a boolean of the pairs masked_fill hides (-inf), or None
    scale: float = 1.0
    softcap: float | None = None
    nodes: list[Node] = field(default_factory=list)  # the chain, from the scores to ``out``


def run(ctx: RingContext) -> None:
    for node in list(ctx.gm.graph.nodes):
        if _is(node, _SOFTMAX, "softmax"):
            found = _read(node)
            if found is not None:
                _replace(ctx, found)


def _is(node: Node, functions: tuple, method: str) -> bool:
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target == method
    )


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _sole_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _read(softmax: Node) -> _Attention | None:
    """The chain around ``softmax``, or None where it is not one this pass takes."""
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    scores = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    if not (isinstance(scores, Node) and isinstance(example(scores), torch.Tensor)
            and example(scores).dim() == 4):  # fmt: skip
        return None
    if dim not in (-1, 3):
        return None
    # forward: the probabilities' way to the values
    chain = [softmax]
    p = _sole_user(softmax)
    if p is not None and p.op == "call_method" and p.target == "to":
        chain.append(p)
        p = _sole_user(p)
    if p is not None and p.op == "call_function" and p.target is F.dropout:
        rate = p.kwargs.get("p", p.args[1] if len(p.args) > 1 else 0.5)
        training = p.kwargs.get("training", p.args[2] if len(p.args) > 2 else True)
        if rate not in (0, 0.0) and training is not False:
            return None
        chain.append(p)
        p = _sole_user(p)
    if not (p is not None and p.op == "call_function" and p.target is operator.matmul
            and p.args[0] is chain[-1] and isinstance(p.args[1], Node)):  # fmt: skip
        return None
    out, v = p, p.args[1]
    # backward: the scores' way from q and k
    found = _scores(scores)
    if found is None:
        return None
    q, k, scale, softcap, mask, hidden, before = found
    if any(len(n.users) != 1 for n in before):
        return None  # something else reads an intermediate (the scores, a capped score)
    qv, kv, vv, ov = (example(n) for n in (q, k, v, out))
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (qv, kv, vv)):
        return None
    if qv.shape[-2] != kv.shape[-2] or kv.shape[-2] != vv.shape[-2] or ov.dtype != qv.dtype:
        return None  # not one sequence (a decode step), or an output of another dtype
    if mask is not None and not (isinstance(example(mask), torch.Tensor)
                                 and example(mask).dtype == qv.dtype):  # fmt: skip
        return None  # SDPA takes a float mask of the queries' dtype only
    if hidden is not None and not (isinstance(example(hidden), torch.Tensor)
                                   and example(hidden).dtype == torch.bool):  # fmt: skip
        return None
    return _Attention(q, k, v, out, mask, hidden, scale, softcap, before + chain + [out])


def _scores(node: Node):
    """``(q, k, scale, softcap, mask, hidden, nodes)`` of ``node`` read as the masked scores
    (``mask`` added, or the pairs ``hidden`` filled with -inf), ``nodes`` the chain's nodes from
    the matmul up to ``node``; None if it is not such scores."""
    if node.op == "call_function" and node.target is operator.add:
        for s, m in (node.args, node.args[::-1]):
            found = isinstance(s, Node) and isinstance(m, Node) and _capped(s)
            if found:
                q, k, scale, softcap, nodes = found
                return q, k, scale, softcap, m, None, nodes + [node]
        return None
    if _is(node, (torch.masked_fill, torch.Tensor.masked_fill), "masked_fill"):
        s, hidden, value = (list(node.args) + [node.kwargs.get("value")])[:3]
        found = isinstance(s, Node) and isinstance(hidden, Node) and _capped(s)
        if found and value == float("-inf"):
            q, k, scale, softcap, nodes = found
            return q, k, scale, softcap, None, hidden, nodes + [node]
        return None
    found = _capped(node)
    return (*found[:4], None, None, found[4]) if found else None


def _capped(node: Node):
    """``(q, k, scale, softcap, nodes)`` of scaled scores, soft-capped or not; None if not."""
    cap = soft_capped(node)
    if cap is not None:
        found = _scaled(cap.x)
        if found:
            q, k, scale, nodes = found
            return q, k, scale, cap.cap, nodes + list(cap.nodes)
    found = _scaled(node)
    return (*found[:3], None, found[3]) if found else None


def _scaled(node) -> tuple[Node, Node, float, list[Node]] | None:
    """``(q, k, scale, nodes)`` of ``q @ k^T`` times a number (or over one); None if not."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    scale, nodes = 1.0, []
    if node.target in (operator.mul, operator.truediv):
        a, b = node.args
        if node.target is operator.mul and isinstance(b, Node):
            a, b = b, a
        c = _number(b)
        if c is None or not isinstance(a, Node) or c == 0:
            return None
        scale = c if node.target is operator.mul else 1.0 / c
        nodes, node = [node], a
    if not (node.op == "call_function" and node.target is operator.matmul):
        return None
    q, kt = node.args
    if not (isinstance(kt, Node) and kt.op == "call_method" and kt.target == "transpose"):
        return None
    if {d % 4 for d in kt.args[1:]} != {2, 3} or len(kt.users) != 1:
        return None
    return q, kt.args[0], scale, [kt, node] + nodes


def _replace(ctx: RingContext, a: _Attention) -> None:
    graph = ctx.gm.graph
    mask = a.mask
    if a.hidden is not None:  # SDPA keeps where its boolean mask is True
        with graph.inserting_before(a.out):
            mask = graph.call_function(operator.invert, (a.hidden,))
        hidden = example(a.hidden)
        with getattr(hidden, "fake_mode", contextlib.nullcontext()):
            mask.meta = {**a.hidden.meta, "example_value": ~hidden}
    kwargs = {"attn_mask": mask, "scale": a.scale} if mask is not None else {"scale": a.scale}
    target = torch._C._nn.scaled_dot_product_attention
    if a.softcap is not None:
        target, kwargs["softcap"] = sdpa_soft_capped, a.softcap
    with graph.inserting_before(a.out):
        sdpa = graph.call_function(target, (a.q, a.k, a.v), kwargs)
    sdpa.meta = {**a.out.meta}
    a.out.replace_all_uses_with(sdpa)
    for n in reversed(a.nodes):
        graph.erase_node(n)
    capped = f", scores soft-capped at {a.softcap:g}" if a.softcap is not None else ""
    ctx.report.lifted.append(
        f"{sdpa.name} at {source_line(sdpa)}: attention written out (matmul, softmax, matmul) "
        f"taken as SDPA{capped}"
    )

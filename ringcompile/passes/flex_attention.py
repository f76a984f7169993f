"""Pass 0: a ``flex_attention`` call becomes SDPA with the mask its ``mask_mod`` describes.

Expects: a Dynamo FX graph. Dynamo records ``flex_attention(q, k, v, score_mod, block_mask)`` as
the higher-order op ``torch.ops.higher_order.flex_attention``, with the ``mask_mod`` and
``score_mod`` as subgraphs (``get_attr``) that take ``(b, h, q_idx, kv_idx, *buffers)`` and
``(score, b, h, q_idx, kv_idx, *buffers)``, the tensors they read as buffers.
Guarantees: a call over one sequence (queries and keys of one length, the block mask's too),
whose output alone is read (its log-sum-exp, if asked for, feeds nothing that is read), whose
``score_mod`` returns the score, or its soft cap ``c * tanh(score / c)`` (Gemma 2's), plus a bias
or nothing, becomes
``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=...)``, with a
soft cap ``sdpa_soft_capped(..., softcap=c)`` (``ringcompile.soft_cap``). The mask is the
``mask_mod`` evaluated once over broadcast indices (``b = arange(B)[:, None, None, None]``,
``h``, ``q_idx``, ``kv_idx`` likewise): its subgraph inlined into
the graph on aranges, a boolean mask, or with a bias the bias where the mask allows and -inf
elsewhere. From there it is any model's mask built from indices: ``lift_masks`` lifts what it can
read (causal, windows, documents, padding) to per-token facts; where it cannot,
``swap_attention`` gives the ring the ``mask_mod`` and its buffers (the SDPA node's ``MASK_MOD``
meta; with a bias, ``mask_mod.MaskWithBias`` of both mods, a submodule), which each ring step
evaluates on its own block; where a buffer is not a full tensor the mask stays dense, exact
either way. A row the mask hides everywhere gives zeros, as flex gives. Other calls stay as
they are, listed among the fallbacks: they attend over the gathered sequence on every rank.
The block mask's construction is left to dead-code elimination once nothing reads it.

    out = flex_attention(q, k, v, score_mod_0, (S, S, kv_num_blocks, ..., mask_fn_0), 0.125, ...)[0]
    -> b = arange(B)[:, None, None, None]; ...; mask = <mask_fn_0 on b, h, q_idx, kv_idx, *buffers>
       out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
"""

from __future__ import annotations

import operator
import os

import torch
from torch.fx import GraphModule, Node

from ringcompile.mask_mod import MaskWithBias
from ringcompile.passes.context import RingContext, unread
from ringcompile.passes.dims import example
from ringcompile.passes.fx_utils import MASK_MOD, source_line
from ringcompile.passes.idioms import soft_capped
from ringcompile.soft_cap import sdpa_soft_capped

FLEX = getattr(torch.ops.higher_order, "flex_attention", None)
_FLEX_MODULE = os.path.join("torch", "nn", "attention", "flex_attention.py")


def is_flex(node: Node) -> bool:
    return FLEX is not None and node.op == "call_function" and node.target is FLEX


def run(ctx: RingContext) -> None:
    for node in list(ctx.gm.graph.nodes):
        if is_flex(node):
            node.meta["stack_trace"] = _user_trace(node.meta.get("stack_trace"))
            why = _refusal(ctx.gm, node)
            if why is None:
                _replace(ctx.gm, node)
            else:
                ctx.report.fallbacks.append(
                    f"{node.name} at {source_line(node)}: flex_attention {why}; it attends over "
                    "the gathered sequence on every rank, exactly"
                )


def _free_name(gm: GraphModule, stem: str) -> str:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    return f"{stem}_{i}"


def _user_trace(trace: str | None) -> str | None:
    """The stack trace without its last frames inside flex_attention's own module, so that
    reports name the model's line that called it."""
    if not trace:
        return trace
    frames = trace.rstrip("\n").split("\n  File ")
    while len(frames) > 1 and _FLEX_MODULE in frames[-1]:
        frames.pop()
    return "\n  File ".join(frames) + "\n"


def _args(node: Node):
    """(q, k, v, score_mod, block_mask, scale, score_mod's buffers, mask_mod's buffers)."""
    args = list(node.args)
    for name in ("score_mod_other_buffers", "mask_mod_other_buffers")[len(args) - 7 :]:
        args.append(node.kwargs.get(name, ()))
    q, k, v, score, block_mask, scale, _options, score_buffers, mask_buffers = args
    return q, k, v, score, block_mask, scale, tuple(score_buffers), tuple(mask_buffers)


def _refusal(gm: GraphModule, node: Node) -> str | None:
    """Why ``node`` cannot become SDPA (None: it can)."""
    buffers = {"score_mod_other_buffers", "mask_mod_other_buffers"}
    if not 7 <= len(node.args) <= 9 or node.kwargs.keys() - buffers:
        return "recorded with arguments this pass does not know"
    q, k, _v, score, block_mask, _scale, score_buffers, mask_buffers = _args(node)
    S = example(q).shape[-2]
    if example(k).shape[-2] != S or tuple(block_mask[:2]) != (S, S):
        return f"over {S} queries and {example(k).shape[-2]} keys is not self-attention"
    # (transformers asks for it on the GPU and casts it, for nothing that is read)
    if any(u.target is not operator.getitem or (u.args[1] != 0 and unread(u) is None)
           for u in node.users):  # fmt: skip
        return "whose log-sum-exp is read"
    if _score_mod_kind(_subgraph(gm, score)) is None:
        return ("with a score_mod that is not a bias added to the score, soft-capped (c * "
                "tanh(score / c)) or not")  # fmt: skip
    for name, sub in (("mask_mod", _subgraph(gm, block_mask[-1])), ("score_mod",
                                                                      _subgraph(gm, score))):  # fmt: skip
        if any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes):
            return f"whose {name} reads module state"
    buffers = [b for b in score_buffers + mask_buffers if isinstance(b, Node)]
    if any(getattr(example(b), "requires_grad", False) for b in buffers):
        return "whose mods read a tensor that needs a gradient"
    return None


def _subgraph(gm: GraphModule, node: Node) -> GraphModule:
    return getattr(gm, node.target)


def _score_mod_kind(score: GraphModule) -> tuple[float | None, bool] | None:
    """``(softcap, bias)`` of a score_mod that returns the score (soft-capped or not: ``c *
    tanh(score / c)``, ``softcap`` c or None) plus a term that does not read it (``bias``) or
    nothing; None for anything else."""
    placeholders = [n for n in score.graph.nodes if n.op == "placeholder"]
    (out,) = [n for n in score.graph.nodes if n.op == "output"]
    result = out.args[0]
    result = result[0] if isinstance(result, (tuple, list)) else result
    score_in = placeholders[0]
    if isinstance(result, Node) and result.op == "call_function" and result.target in (
            operator.add, torch.add):  # fmt: skip
        a, b = result.args[:2]
        for s, bias in ((a, b), (b, a)):
            if isinstance(bias, Node) and not _reads(bias, score_in):
                cap = _softcap_of(s, score_in)
                if cap is not False:
                    return cap, True
        return None
    cap = _softcap_of(result, score_in)
    return None if cap is False else (cap, False)


def _softcap_of(node, score: Node) -> float | None | bool:
    """None if ``node`` is ``score``; c if it is ``c * tanh(score / c)``; False otherwise."""
    if node is score:
        return None
    found = soft_capped(node)
    return found.cap if found is not None and found.x is score else False


def _reads(node: Node, source: Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


class _Builder:
    """Adds nodes before ``at`` with their example values (computed under the graph's fake mode),
    so that later passes read their shapes as they read Dynamo's."""

    def __init__(self, gm: GraphModule, at: Node):
        self.graph, self.at = gm.graph, at
        self.fake_mode = example(at.args[0]).fake_mode

    def call(self, op: str, target, args, kwargs=None) -> Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.at):
            node = self.graph.create_node(op, target, tuple(args), kwargs)
        node.meta["stack_trace"] = self.at.meta.get("stack_trace")
        values = torch.fx.node.map_arg((args, kwargs), example)
        with self.fake_mode:
            if op == "call_method":
                node.meta["example_value"] = getattr(values[0][0], target)(*values[0][1:],
                                                                          **values[1])  # fmt: skip
            else:
                node.meta["example_value"] = target(*values[0], **values[1])
        return node

    def inline(self, sub: GraphModule, inputs: list[Node]) -> Node:
        """``sub``'s graph on ``inputs``; returns what it returns (its first output)."""
        env: dict[Node, Node] = {}
        placeholders = iter(inputs)
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "output":
                result = n.args[0]
                result = result[0] if isinstance(result, (tuple, list)) else result
                return env[result] if isinstance(result, Node) else result
            else:
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                env[n] = self.call(n.op, n.target, args, kwargs)
        raise AssertionError("a subgraph without output")

    def arange(self, n: int, dim: int, device) -> Node:
        """``arange(n)`` placed on mask dim ``dim``, as masks built from indices place it."""
        place = [None] * 4
        place[dim] = slice(None)
        idx = self.call("call_function", torch.arange, (n,), {"device": device})
        return self.call("call_function", operator.getitem, (idx, tuple(place)))


def _replace(gm: GraphModule, node: Node) -> None:
    q, k, v, score, block_mask, scale, score_buffers, mask_buffers = _args(node)
    B, H, S, _ = example(q).shape
    build = _Builder(gm, node)
    device = example(q).device
    b, h = build.arange(B, 0, device), build.arange(H, 1, device)
    q_idx, kv_idx = build.arange(S, 2, device), build.arange(S, 3, device)
    mask = build.inline(_subgraph(gm, block_mask[-1]), [b, h, q_idx, kv_idx, *mask_buffers])
    if tuple(example(mask).shape[-2:]) != (S, S):  # a mask_mod of fewer indices (or none)
        shape = torch.broadcast_shapes(example(mask).shape, (1, 1, S, S))
        mask = build.call("call_method", "expand", (mask, *shape))
    score_gm = _subgraph(gm, score)
    softcap, bias = _score_mod_kind(score_gm)
    if bias:
        # the bias alone: the score_mod on a score of zero (a soft cap of zero is zero)
        zero = build.call("call_method", "new_zeros", (q, ()))
        full = build.inline(score_gm, [zero, b, h, q_idx, kv_idx, *score_buffers])
        hidden = build.call("call_function", torch.full, ((), float("-inf")),
                            {"dtype": example(q).dtype, "device": device})  # fmt: skip
        # (a bias read from a buffer of another dtype: SDPA takes a mask of the queries' dtype)
        full = build.call("call_method", "to", (full, example(q).dtype))
        mask = build.call("call_function", torch.where, (mask, full, hidden))
    kwargs = {"attn_mask": mask, "scale": scale}
    if example(k).shape[1] != H:
        kwargs["enable_gqa"] = True
    target = torch._C._nn.scaled_dot_product_attention
    if softcap is not None:
        target, kwargs["softcap"] = sdpa_soft_capped, softcap
    (first, *_) = node.users
    sdpa = build.call("call_function", target, (q, k, v), kwargs)
    if all(isinstance(x, Node) for x in mask_buffers + (score_buffers if bias else ())):
        # where the mask stays dense, the ring evaluates the mask_mod (and the bias) per step
        fn, buffers = block_mask[-1], tuple(mask_buffers)
        if bias:
            name = _free_name(gm, "mask_with_bias")
            # the bias in at least float32, as flex adds it to its float32 scores
            dtype = torch.promote_types(example(q).dtype, torch.float32)
            gm.add_submodule(name, MaskWithBias(_subgraph(gm, block_mask[-1]), score_gm,
                                                len(mask_buffers), dtype))  # fmt: skip
            with gm.graph.inserting_before(sdpa):
                fn = gm.graph.get_attr(name)
            buffers += tuple(score_buffers)
        sdpa.meta[MASK_MOD] = (fn, buffers)
    if "nn_module_stack" in first.meta:
        sdpa.meta["nn_module_stack"] = first.meta["nn_module_stack"]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for user in list(node.users):
        if user.args[1] != 0:  # the log-sum-exp, and what only it reads: nothing is read
            for dead in sorted(unread(user), key=order.get, reverse=True):
                gm.graph.erase_node(dead)
            continue
        user.replace_all_uses_with(sdpa)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)

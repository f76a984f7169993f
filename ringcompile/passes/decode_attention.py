"""Pass 3: attention over a sharded KV cache (a decode step) becomes tree attention.

Expects: a Dynamo FX graph in one spelling (pass 1); a decode step's keys and values are
``ringcompile::sharded_kv`` marks of a ``ShardedKVCache`` layer's buffers (``kv_cache.py``),
possibly expanded by ``repeat_kv``.
Guarantees: each SDPA reading such marks is ``tree_decode(q, keys, values, q_positions,
k_positions, ...)``: the replicated queries attend over every rank's shard, causally by global
position (which also hides empty slots), with one all-gather. The marks are gone (they raise if
run). A mask is read as key padding by global position: one built in the graph (transformers',
over the new tokens alone, reading the 2-D ``attention_mask``), or a bool graph input
(B|1, 1, T, C * W) over every position the cache holds (``generate()``'s for a compileable
``ShardedKVCache``; its rows are checked on the device to be causality and that padding). Refused
with a clear error: any other mask (sliding windows, chunks, documents, arbitrary),
``is_causal=False`` with several queries, dropout, or a cache built for another ring than the
backend's.

    k, v = sharded_kv(keys, pos, qpos, W), sharded_kv(values, pos, qpos, W); sdpa(q, k, v, enable_gqa=True)
    -> tree_decode(q, keys, values, qpos, pos, enable_gqa=True)
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ringcompile.errors import RingCompileError
from ringcompile.kv_cache import APPEND_OPS
from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import example, shape_of
from ringcompile.passes.fx_utils import is_sdpa, sdpa_args, source_line
from ringcompile.passes.idioms import sharded_kv_marks
from ringcompile.passes.mask_reader import NotLiftable, read_mask
from ringcompile.runtime import padding_table_of_mask


def _check_ring(ctx: RingContext) -> None:
    for node in ctx.gm.graph.nodes:
        if node.op == "call_function" and node.target in APPEND_OPS:
            rank, world = node.args[6], node.args[7]
            if (rank, world) != (ctx.rank, ctx.world_size):
                raise RingCompileError(
                    f"a ShardedKVCache made for rank {rank} of {world} is used under a ring where "
                    f"this process is rank {ctx.rank} of {ctx.world_size}: give the cache and the "
                    "backend the same group"
                )


def _mask_facts(mask: Node, T: int) -> tuple[bool, Node | None] | None:
    """(is causal, key padding) if a decode step's mask is causality and key padding at most;
    None otherwise.

    transformers builds the mask over the new tokens alone (``ShardedKVCache`` reports their
    count as the mask size), so its causal part says "a query sees keys at or before it", which
    attention by global position over the shards already is. Its padding reads the first columns
    of the whole 2-D ``attention_mask`` (B, N), whose column p is the token at global position p:
    the shards are masked by that table at their keys' positions instead (``TreeDecode``)."""
    try:
        facts = read_mask(mask, shape_of(mask)[0], T, wide_padding=True)
    except NotLiftable:
        return None
    if (
        facts.rules.window is not None
        or facts.rules.chunk
        or facts.rules.prefix
        or facts.document_ids is not None
        or facts.key_bias is not None
        or facts.empty_rows_mean
    ):
        return None
    return facts.rules.causal, facts.key_padding_mask


def _is_mask_by_position(mask: Node, T: int, N: int) -> bool:
    """Whether ``mask`` is a bool graph input (B|1, 1, T, N), N the positions the cache holds:
    a mask built outside the step, whose column p is global position p (``hf_cache.py``)."""
    value = example(mask)
    return (mask.op == "placeholder" and isinstance(value, torch.Tensor)
            and value.dtype == torch.bool and value.dim() == 4
            and tuple(value.shape[1:]) == (1, T, N))  # fmt: skip


def _refusal(a: dict, mk, mv, T: int, N: int) -> tuple[str | None, Node | None, bool]:
    """Why this decode step cannot be swapped (None if it can), the key padding to apply, and
    whether that padding is a mask by position (rows to read it from) rather than a table."""
    if mk is None or mv is None:
        return "only one of its keys and values comes from the sharded cache", None, False
    if "softcap" in a:
        return "its scores are soft-capped, which tree decoding does not do", None, False
    causal, padding = bool(a.get("is_causal", False)), None
    mask = a.get("attn_mask")
    if mask is not None and _is_mask_by_position(mask, T, N):
        return None, mask, True
    if mask is not None:
        read = _mask_facts(mask, T)
        if read is None:
            return (
                (
                    "its mask is more than causality and key padding (a sliding window, chunks, "
                    "packed documents or an arbitrary mask), which decoding over a sharded cache "
                    "does not support"
                ),
                None,
                False,
            )
        causal, padding = read
    if T > 1 and not causal:
        return (
            f"{T} queries that are not causal among themselves (causal decoding only)",
            None,
            False,
        )
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        return "dropout_p != 0 (decode in eval mode)", None, False
    return None, padding, False


def run(ctx: RingContext) -> None:
    _check_ring(ctx)
    swapped = False
    tables: dict[Node, Node] = {}  # a mask by position: its padding table, read once per graph
    for node in list(ctx.gm.graph.nodes):
        if not is_sdpa(node):
            continue
        a = sdpa_args(node)
        mk, mv, enable_gqa = sharded_kv_marks(a)
        if mk is None and mv is None:
            continue
        where = f"{node.name} at {source_line(node)}"
        T = shape_of(a["query"])[-2]
        N = (shape_of(mk[0])[-2] - 1) * ctx.world_size if mk is not None else None
        problem, padding, by_position = _refusal(a, mk, mv, T, N)
        if problem:
            raise RingCompileError(f"backend='ring' cannot decode {where}: {problem}")
        if by_position:
            if padding not in tables:
                with ctx.gm.graph.inserting_before(node):
                    tables[padding] = ctx.gm.graph.call_function(
                        padding_table_of_mask, (padding, mk[2])
                    )
            padding = tables[padding]
        node.target = ctx.tree_decode()
        node.args = (a["query"], mk[0], mv[0])
        node.kwargs = {
            "q_positions": mk[2],
            "k_positions": mk[1],
            "scale": a.get("scale"),
            "enable_gqa": enable_gqa,
        }
        if padding is not None:
            node.kwargs = {**node.kwargs, "padding_by_position": padding}
        given = ", its mask given over global positions (rows checked on the device)"
        ctx.report.attention.append(
            f"{where}: decode, {T} replicated queries over the sharded KV cache (tree attention)"
            + (given if by_position else "")
        )
        swapped = True
    if swapped:
        ctx.remove_dead_code()  # the marks, and any repeat_kv of them

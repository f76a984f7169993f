"""FX helpers every pass may use, so that passes import this module and not each other.

- ``source_line(node)``: the ``file:line`` of the user code a node came from (for reports);
- ``sdpa_args(node)``: an SDPA call's arguments by name, positional or keyword.
"""

from __future__ import annotations

from torch.fx import Node

__all__ = ["sdpa_args", "source_line"]

_SDPA_SIGNATURE = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def source_line(node: Node) -> str:
    """``file:line`` of the user code a node came from."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    if not frames:
        return node.name
    last = frames[-1].split(",")
    return f"{last[0][6:].strip(chr(34))}:{last[1].strip().removeprefix('line ')}"


def sdpa_args(node: Node) -> dict:
    """``F.scaled_dot_product_attention``'s arguments of ``node`` by name."""
    bound = dict(zip(_SDPA_SIGNATURE, node.args))
    bound.update(node.kwargs)
    return bound

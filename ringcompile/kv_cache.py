"""A KV cache sharded across the ring for decoding, and the two ops the ``ring`` backend sees.

Each rank keeps the tokens whose global position ``p`` has ``p % W == rank`` (striped): rank r's
slot ``1 + p // W`` holds position p. New tokens therefore spread round-robin and the shards never
differ by more than one token, however long generation runs, and a slot's place never depends on
how many tokens another rank holds. Per layer and rank the storage is fixed at allocation:

- ``keys`` (B, Hkv, 1 + C, D) and ``values`` (B, Hkv, 1 + C, Dv), C = ceil(max_length / W);
- ``positions`` (B, 1 + C) int64: the global position in each slot, ``EMPTY`` where none is.

Slot 0 is scratch: every rank writes all new tokens, the ones another rank keeps into slot 0 with
position ``EMPTY``. That keeps the append free of data-dependent shapes and host syncs (one static
graph serves every decode step) and a position past capacity is an index error, never a silent
overwrite. ``EMPTY`` is larger than any position, so "key position <= query position" — the
causality decoding needs anyway — also hides empty slots and the scratch slot.

The ops:
- ``ringcompile::kv_cache_append`` writes this rank's share of new tokens (in place);
- ``ringcompile::sharded_kv`` marks a buffer that an attention call reads in a decode step. It
  carries the buffer's positions and the queries' positions for the backend's
  ``decode_attention`` pass, which replaces that attention with ``tree_attn_decode`` over the
  shards. Run by anything else, it raises: plain SDPA over a shard would be silently wrong.
"""

from __future__ import annotations

import math

import torch

from ringcompile.masks import POSITION_NONE

__all__ = ["EMPTY", "ShardedKV", "APPEND_OPS", "MARK_OPS"]

EMPTY = POSITION_NONE


@torch.library.custom_op("ringcompile::kv_cache_append", mutates_args=("keys", "values", "positions"))
def kv_cache_append(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    new_keys: torch.Tensor, new_values: torch.Tensor, new_positions: torch.Tensor,
                    rank: int, world_size: int) -> None:
    """Write the new tokens (B, Hkv, T, D) at global positions ``new_positions`` (B, T) that this
    rank keeps into their slots; the others go to the scratch slot 0."""
    owned = new_positions % world_size == rank
    slots = torch.where(owned, 1 + new_positions // world_size, 0)  # (B, T)
    B, H, T = new_keys.shape[:3]
    keys.scatter_(2, slots[:, None, :, None].expand(B, H, T, keys.shape[-1]), new_keys)
    values.scatter_(2, slots[:, None, :, None].expand(B, H, T, values.shape[-1]), new_values)
    positions.scatter_(1, slots, torch.where(owned, new_positions, EMPTY))


@kv_cache_append.register_fake
def _(keys, values, positions, new_keys, new_values, new_positions, rank, world_size) -> None:
    return None


@torch.library.custom_op("ringcompile::sharded_kv", mutates_args=())
def sharded_kv(buffer: torch.Tensor, positions: torch.Tensor,
               query_positions: torch.Tensor) -> torch.Tensor:
    raise RuntimeError(
        "a decode step read this rank's shard of a ShardedKVCache outside the ring backend: "
        "attention over one shard is not attention over the sequence. Run the model under "
        "torch.compile(model, backend='ring', dynamic=False) (with the cache's group) on every rank"
    )


@sharded_kv.register_fake
def _(buffer, positions, query_positions):
    return torch.empty_strided(buffer.shape, buffer.stride(), dtype=buffer.dtype,
                               device=buffer.device)


APPEND_OPS = (torch.ops.ringcompile.kv_cache_append, torch.ops.ringcompile.kv_cache_append.default)
MARK_OPS = (torch.ops.ringcompile.sharded_kv, torch.ops.ringcompile.sharded_kv.default)


class ShardedKV:
    """One attention layer's shard of the cache on this rank (see the module docstring).

    ``update(k, v)`` is what a model's attention calls with its new keys and values. The shard
    counts the tokens it has been given (a tensor, so one compiled graph serves every step), so
    the new tokens' global positions need no help from the model. The first call (prefill)
    allocates the slots, stores this rank's share and returns ``(k, v)`` unchanged
    (self-attention over the prompt, which the backend shards as usual); later calls (decode)
    store and return the marked shards, which only the ``ring`` backend can attend over.
    """

    def __init__(self, max_length: int, rank: int, world_size: int):
        self.capacity = math.ceil(max_length / world_size)
        self.rank, self.world_size = rank, world_size
        self.keys = self.values = self.positions = self.length = None

    @property
    def filled(self) -> bool:
        return self.keys is not None

    def update(self, k: torch.Tensor, v: torch.Tensor):
        B, H, T, _ = k.shape
        prefill = not self.filled
        if prefill:
            if T > self.capacity * self.world_size:
                raise ValueError(
                    f"ShardedKVCache holds max_length={self.capacity * self.world_size} tokens; "
                    f"the prompt has {T}: make max_length at least prompt + new tokens"
                )
            slots = 1 + self.capacity
            self.keys = torch.zeros(B, H, slots, k.shape[-1], dtype=k.dtype, device=k.device)
            self.values = torch.zeros(B, H, slots, v.shape[-1], dtype=v.dtype, device=v.device)
            self.positions = torch.full((B, slots), EMPTY, dtype=torch.long, device=k.device)
            self.length = torch.zeros((), dtype=torch.long, device=k.device)
        positions = (self.length + torch.arange(T, device=k.device)).expand(B, T)
        self.length.add_(T)
        torch.ops.ringcompile.kv_cache_append(self.keys, self.values, self.positions, k, v,
                                              positions, self.rank, self.world_size)
        if prefill:
            return k, v
        return (torch.ops.ringcompile.sharded_kv(self.keys, self.positions, positions),
                torch.ops.ringcompile.sharded_kv(self.values, self.positions, positions))

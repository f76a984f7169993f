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
  shards. Run by anything else, it raises: plain SDPA over a shard would be silently wrong. Its
  (fake) result has a row per global position the cache can hold, C * W: it stands for the keys
  of the whole sequence, so a mask over global positions fits it while Dynamo traces the step.
"""

from __future__ import annotations

import math

import torch

from ringcompile.masks import POSITION_NONE

__all__ = ["EMPTY", "ShardedKV", "APPEND_OPS", "MARK_OPS"]

EMPTY = POSITION_NONE


@torch.library.custom_op(
    "ringcompile::kv_cache_append", mutates_args=("keys", "values", "positions")
)
def kv_cache_append(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    new_positions: torch.Tensor,
    rank: int,
    world_size: int,
) -> None:
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
def sharded_kv(
    buffer: torch.Tensor, positions: torch.Tensor, query_positions: torch.Tensor, world_size: int
) -> torch.Tensor:
    raise RuntimeError(
        "a decode step read this rank's shard of a ShardedKVCache outside the ring backend: "
        "attention over one shard is not attention over the sequence. Run the model under "
        "torch.compile(model, backend='ring', dynamic=False) (with the cache's group) on every "
        "rank. Calling generate() again with a cache that still holds the last prompt does this "
        "too (transformers then compiles the model itself): call cache.reset() first"
    )


@sharded_kv.register_fake
def _(buffer, positions, query_positions, world_size):
    B, H, slots, D = buffer.shape
    return buffer.new_empty((B, H, (slots - 1) * world_size, D))


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
        self.filled = False  # whether the prefill has been stored

    def allocate(self, batch: int, kv_heads: int, head_dim: int, value_dim: int,
                 dtype: torch.dtype, device) -> None:  # fmt: skip
        """The slots. Called before any compiled step (``ShardedKVCache`` does, given the batch,
        dtype and device), they are marked as static addresses, so a compiled decode step that
        writes into them can be a CUDA graph (``mode="reduce-overhead"``); else the prefill
        allocates them inside its graph."""
        slots = 1 + self.capacity
        self.keys = torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, kv_heads, slots, value_dim, dtype=dtype, device=device)
        self.positions = torch.full((batch, slots), EMPTY, dtype=torch.long, device=device)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.positions, self.length):
                torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        """Empty, keeping the slots (their addresses too) for the next prompt."""
        if self.keys is not None:
            self.positions.fill_(EMPTY)
            self.length.zero_()
        self.filled = False

    def update(self, k: torch.Tensor, v: torch.Tensor):
        B, H, T, _ = k.shape
        prefill = not self.filled
        if prefill:
            if T > self.capacity * self.world_size:
                raise ValueError(
                    f"ShardedKVCache holds max_length={self.capacity * self.world_size} tokens; "
                    f"the prompt has {T}: make max_length at least prompt + new tokens"
                )
            if self.keys is None:
                self.allocate(B, H, k.shape[-1], v.shape[-1], k.dtype, k.device)
            elif (self.keys.shape[:2], self.keys.shape[-1], self.values.shape[-1],
                  self.keys.dtype) != ((B, H), k.shape[-1], v.shape[-1], k.dtype):  # fmt: skip
                raise ValueError(
                    f"the cache was allocated for K/V {tuple(self.keys.shape)} {self.keys.dtype} "
                    f"(batch, KV heads, slots, head dim) but the model gives {tuple(k.shape)} "
                    f"{k.dtype}"
                )
            self.filled = True
        positions = (self.length + torch.arange(T, device=k.device)).expand(B, T)
        self.length.add_(T)
        torch.ops.ringcompile.kv_cache_append(
            self.keys, self.values, self.positions, k, v, positions, self.rank, self.world_size
        )
        if prefill:
            return k, v
        W = self.world_size
        return (
            torch.ops.ringcompile.sharded_kv(self.keys, self.positions, positions, W),
            torch.ops.ringcompile.sharded_kv(self.values, self.positions, positions, W),
        )

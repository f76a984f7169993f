"""``ShardedKVCache``: a transformers ``Cache`` whose layers are ``ShardedKV`` shards.

    cache = ShardedKVCache(model.config, max_length=prompt_len + new_tokens)   # on every rank
    model.forward = torch.compile(model.forward, backend="ring")
    out = model.generate(ids, attention_mask=am, cache=cache, max_new_tokens=new_tokens)

or a loop of its own (``examples/generate.py``): ``model(prompt, cache=cache)`` then
``model(next_token, cache=cache)`` per token (``past_key_values=cache`` in transformers versions
before the rename). The prefill runs sharded over the ring and each rank keeps its striped share
of every layer's K/V; each decode step appends the new token on one rank (round-robin) and
attends over all shards with ``tree_attn_decode`` (one all-gather per layer).

The cache counts its tokens in a tensor, so one compiled decode step serves every token: inside a
compiled step ``get_seq_length`` returns that 0-d tensor (transformers adds it to an arange for the
default position ids), between steps a Python int. A mask built inside a compiled step is sized
for the new tokens alone (``get_mask_sizes``); the backend reads it as causality plus key padding
by global position (left-padded batches work) and refuses anything else, such as sliding windows,
which the constructor refuses up front.

Once it holds the prompt the cache says it is compileable. ``generate()`` then builds each decode
step's mask before the step, at one size: (batch, 1, new tokens, capacity), column p for global
position p. Without that the 2-D ``attention_mask`` that ``generate()`` grows by a column per token
would be a new input shape, so a new graph (a new CUDA graph), every token; with it one graph
serves every step. Before the prompt it says no, so ``generate()`` does not compile the model
itself over the ring-compiled forward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ringcompile.group import resolve_group
from ringcompile.kv_cache import ShardedKV

__all__ = ["ShardedKVCache"]


class _ShardedLayer(DynamicLayer):
    def __init__(self, shard: ShardedKV):
        super().__init__()
        self.shard = shard

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # the shard allocates its slots on the first update

    def update(self, key_states, value_states, *args, **kwargs):
        return self.shard.update(key_states, value_states)

    def reset(self) -> None:
        self.shard.reset()

    @property
    def is_compileable(self) -> bool:
        return self.shard.filled

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(
            "ShardedKVCache does not reorder for beam search; use greedy or sampling"
        )

    def get_seq_length(self):
        if not self.shard.filled:
            return 0
        if torch.compiler.is_compiling():
            # a 0-d tensor: transformers' default position ids (arange + this) then need no
            # Python int, which a compiled step would guard on and recompile for at every token
            return self.shard.length
        return int(self.shard.length)  # between steps (generate() asks): read from the device


class ShardedKVCache(Cache):
    """A KV cache sharded across the ring (``group``/``mesh_dim`` as the backend's options) that
    holds up to ``max_length`` tokens in all. Give the compiled model the same group.

    Given ``batch_size``, ``dtype`` and ``device``, it allocates its slots now, as static
    addresses, so compiled decode steps can run as CUDA graphs (``torch.compile(model,
    backend="ring", mode="reduce-overhead")``); else the prefill allocates them."""

    def __init__(self, config, max_length: int, group=None, mesh_dim=None, batch_size=None,
                 dtype=None, device=None):  # fmt: skip
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        types = getattr(text, "layer_types", None)
        sliding = (
            any(t != "full_attention" for t in types)
            if types
            else getattr(text, "sliding_window", None) is not None
        )
        if sliding:
            raise NotImplementedError(
                "ShardedKVCache decodes full-attention layers only; this model has sliding-window "
                "layers (decode it with transformers' own cache and backend='ring' for the prefill)"
            )
        pg = resolve_group(group, mesh_dim)
        rank, world = (pg.rank(), pg.size()) if pg is not None else (0, 1)
        super().__init__(
            layers=[
                _ShardedLayer(ShardedKV(max_length, rank, world))
                for _ in range(text.num_hidden_layers)
            ]
        )
        given = [x is not None for x in (batch_size, dtype, device)]
        if any(given) and not all(given):
            raise ValueError("ShardedKVCache allocates now given batch_size, dtype and device "
                             "together; pass all three or none")  # fmt: skip
        if all(given):
            heads = text.num_attention_heads
            kv_heads = getattr(text, "num_key_value_heads", None) or heads
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
            for layer in self.layers:
                layer.shard.allocate(batch_size, kv_heads, head_dim, head_dim, dtype, device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    # transformers sizes its masks with these. Inside a compiled step: the new tokens alone (it
    # then skips the mask when nothing is padded, or builds causality and key padding that the
    # backend's decode pass reads by global position, decode_attention.py). Outside one, after the
    # prompt (generate() building a decode step's mask for a compileable cache): every position
    # the cache can hold, the queries at the tokens held so far, so the mask has one shape for
    # every step and says by global position which keys each query sees.
    def _mask_by_position(self, layer_idx: int) -> bool:
        return self.layers[layer_idx].shard.filled and not torch.compiler.is_compiling()

    def get_query_offset(self, layer_idx: int = 0):
        if self._mask_by_position(layer_idx):
            return self.layers[layer_idx].shard.length  # a tensor: no host sync per step
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if self._mask_by_position(layer_idx):
            shard = self.layers[layer_idx].shard
            return shard.capacity * shard.world_size, 0
        if not isinstance(query_length, int):  # transformers 4.x passes cache_position
            query_length = query_length.shape[0]
        return query_length, 0

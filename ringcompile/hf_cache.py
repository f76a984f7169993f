"""``ShardedKVCache``: a transformers ``Cache`` whose layers are ``ShardedKV`` shards.

    cache = ShardedKVCache(model.config, max_length=prompt_len + new_tokens)   # on every rank
    model = torch.compile(model, backend="ring", dynamic=False)
    model(prompt, position_ids=pos, cache=cache)          # prefill: sharded, as without a cache
    model(next_token, position_ids=pos_next, cache=cache) # decode: tree attention over the shards

(``past_key_values=cache`` in transformers versions before the argument was renamed.)
The prefill runs sharded over the ring and each rank keeps its striped share of every layer's K/V;
each decode step appends the new token on one rank (round-robin) and attends over all shards with
``tree_attn_decode`` (one all-gather per layer). ``examples/generate.py`` is a greedy loop on it.

The cache counts the tokens it stores, but transformers asks for the count as a Python int (to make
default position ids), which a compiled step cannot give without a guard per length: the model must
be given ``position_ids`` (the new tokens' global positions) on every call, and ``get_seq_length``
raises rather than recompile every step. Decoding supports batches without padding and models without sliding windows:
the transformers mask in those cases is built against a cache length no shard has, and the
``ring`` backend refuses it with a clear error.
"""

from __future__ import annotations

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

    def get_seq_length(self) -> int:
        raise RuntimeError(
            "ShardedKVCache does not hand out its length as a Python int: pass "
            "position_ids (the new tokens' global positions) to the model on every call "
            "(transformers' generate() is not supported; see examples/generate.py)"
        )


class ShardedKVCache(Cache):
    """A KV cache sharded across the ring (``group``/``mesh_dim`` as the backend's options) that
    holds up to ``max_length`` tokens in all. Give the compiled model the same group."""

    def __init__(self, config, max_length: int, group=None, mesh_dim=None):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        types = getattr(text, "layer_types", None)
        sliding = (any(t != "full_attention" for t in types) if types
                   else getattr(text, "sliding_window", None) is not None)
        if sliding:
            raise NotImplementedError(
                "ShardedKVCache decodes full-attention layers only; this model has sliding-window "
                "layers (decode it with transformers' own cache and backend='ring' for the prefill)"
            )
        pg = resolve_group(group, mesh_dim)
        rank, world = (pg.rank(), pg.size()) if pg is not None else (0, 1)
        super().__init__(layers=[_ShardedLayer(ShardedKV(max_length, rank, world))
                                 for _ in range(text.num_hidden_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    # transformers sizes its masks with these. The sizes of the new tokens alone let it skip the
    # mask when nothing is padded (decode attends by global position in the backend anyway); any
    # mask it still builds is refused by the backend's decode pass.
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if not isinstance(query_length, int):  # transformers 4.x passes cache_position
            query_length = query_length.shape[0]
        return query_length, 0

"""Values computed from a tensor, kept while that tensor lives unchanged.

A model's layers, and their backward, hand the ring op the same few tensors of facts (document
ids, key validity) on every call: what is computed from one (a varlen block's segments, whether
it hides a key) is computed once. An entry is keyed by the tensor's identity and version counter
and holds the tensor weakly: it is found only while that very tensor lives and is unchanged.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

__all__ = ["MISSING", "TensorKeyedCache"]

MISSING = object()  # what ``get`` gives for no entry (a stored value may be None)


class TensorKeyedCache:
    """Values by (a tensor, other hashable facts), least recently used out first."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    @staticmethod
    def _key(tensor: torch.Tensor, facts: tuple):
        if tensor.is_inference():
            return None  # (an inference tensor keeps no version counter)
        return (id(tensor), tensor._version, *facts)

    def get(self, tensor: torch.Tensor, *facts):
        key = self._key(tensor, facts)
        entry = self.entries.get(key) if key is not None else None
        if entry is None or entry[0]() is not tensor:
            return MISSING
        self.entries.move_to_end(key)
        return entry[1]

    def put(self, tensor: torch.Tensor, *facts, value) -> None:
        key = self._key(tensor, facts)
        if key is None:
            return
        self.entries[key] = (weakref.ref(tensor), value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

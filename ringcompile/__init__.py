"""ringcompile: context parallelism as a torch.compile backend.

The story, top to bottom: ``backend`` (``torch.compile(model, backend="ring")``) runs the FX
``passes`` in order, which swap each SDPA for the ring op (``ring_op``: the ring loop and its
autograd, behind ``attention.ring_attention``), which computes each step with the block
``kernels`` (Triton on CUDA, a PyTorch reference elsewhere).
"""

from ringcompile.attention import ring_attention
from ringcompile.backend import explain, ring_backend, ring_shard
from ringcompile.tree_decode import tree_attn_decode
from ringcompile.layout import ContiguousLayout, Layout, StripedLayout, ZigzagLayout, make_layout

__all__ = [
    "ring_attention",
    "tree_attn_decode",
    "ring_backend",
    "ring_shard",
    "explain",
    "Layout",
    "ContiguousLayout",
    "StripedLayout",
    "ZigzagLayout",
    "make_layout",
]

"""ringcompile: context parallelism as a torch.compile backend.

The story, top to bottom: ``backend`` (``torch.compile(model, backend="ring")``) runs the FX
``passes`` in order, which swap each SDPA for the ring op (``ring``: the ring's plan, schedules
and autograd, behind ``attention.ring_attention``), which computes each step with the block
``kernels`` (each kind of block on the kernel declared for it: cuDNN, Triton, a PyTorch
reference).
"""

from ringcompile.attention import ring_attention
from ringcompile.backend import explain, ring_backend, ring_shard
from ringcompile.errors import RingCompileError, RingInputMismatchError, RingWarning
from ringcompile.layout import ContiguousLayout, Layout, StripedLayout, ZigzagLayout, make_layout
from ringcompile.tree_decode import tree_attn_decode


def _register_backend() -> None:
    # The entry point registers "ring" for installed copies; importing registers it too, so a
    # checkout on PYTHONPATH (no pip install) works the same.
    import torch._dynamo

    if "ring" not in torch._dynamo.list_backends(exclude_tags=()):  # lists entry points too
        torch._dynamo.register_backend(ring_backend, name="ring")


_register_backend()

__all__ = [
    "ring_attention",
    "tree_attn_decode",
    "ring_backend",
    "ring_shard",
    "explain",
    "RingCompileError",
    "RingInputMismatchError",
    "RingWarning",
    "Layout",
    "ContiguousLayout",
    "StripedLayout",
    "ZigzagLayout",
    "make_layout",
]

"""Ring-step flash attention in Triton: the :class:`AttentionKernels` interface on CUDA.

A ring step attends this rank's queries to one block of keys under a
:class:`~ringcompile.masks.BlockMask`. Per step, the host makes (or finds cached) the tile lists
of the mask: for every tile of one side, the tiles of the other side that are full (no mask
arithmetic), partial (the mask evaluated per element) or skipped. The attention kernel then
visits only listed tiles. The modules, one concern each:

- ``host``: :class:`TritonKernels`, which checks the tensors and launches the kernels;
- ``configs``: :class:`FwdConfig`, :class:`BwdConfig`, their tuned defaults and the launch chunks;
- ``tiles``: the tile-list kernel and the cache of the ring's lists;
- ``mask_args``: a mask as kernel arguments, and its evaluation on partial tiles;
- ``forward``: the forward kernel (a normalised (out, lse) state carried across steps);
- ``backward``: the delta, dK/dV (with dq by atomics or bulk reductions) and dq kernels;
- ``jit``: constants and helpers the kernels share.

Precision. Operands of the dots are the input dtype; for bf16/fp16 the dots accumulate in fp32 and
the probabilities are rounded to the input dtype before P·V (as FlashAttention does); for fp32
inputs the dots take the precision torch's float32 matmuls do (``jit.dot_precision``): IEEE
by default, as inductor's flex kernels; TF32 (about 3e-4 relative error, on tensor cores) where the
user allowed it (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or
``torch.set_float32_matmul_precision("high")``).
Softmax, running statistics, lse, delta and all gradient accumulators are fp32.

Limits: head dims up to 256 (padded to a power of two inside the kernel with masked loads);
positions, ``seq_len`` and window sizes are compared in int32 inside tiles, so positions must be
below 2**31; one head's slice of a tensor must have fewer than 2**31 elements.
"""

from ringcompile.kernels.triton.configs import BwdConfig, FwdConfig
from ringcompile.kernels.triton.host import TritonKernels

__all__ = ["TritonKernels", "FwdConfig", "BwdConfig"]

"""The host side: :class:`TritonKernels` checks and lays out its tensors, picks the tiles, makes
the tile lists and launches the kernels, their arguments packed in a few groups (a tensor and its
strides, the tile lists, the mask's values and its constexpr flags)."""

from __future__ import annotations

import torch
import triton

from ringcompile.kernels.grad_sum import accumulators
from ringcompile.kernels.interface import ForwardState, finish_forward
from ringcompile.kernels.triton.backward import _bwd_dq_kernel, _bwd_kernel, _delta_kernel
from ringcompile.kernels.triton.configs import (
    BwdConfig,
    FwdConfig,
    TensorDescriptor,
    _bulk_reduce_ok,
    _bulk_reduce_ok_fresh,
    _heads_per_chunk,
    _kv_heads_per_chunk,
    default_bwd_config,
    default_fwd_config,
)
from ringcompile.kernels.triton.forward import _fwd_kernel
from ringcompile.kernels.triton.jit import _LOG2E, LAUNCH_OPTIONS, _strides, dot_precision
from ringcompile.kernels.triton.mask_args import _mask_args
from ringcompile.kernels.triton.tiles import _tile_lists
from ringcompile.masks import BlockMask

__all__ = ["TritonKernels"]


def _empty(shape, dtype: torch.dtype, device, strides=None) -> torch.Tensor:
    """Every buffer a kernel must fill completely comes from here (tests poison it); contiguous
    unless ``strides`` are given."""
    if strides is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


def _layout_strides(x: torch.Tensor) -> tuple[int, ...] | None:
    """``torch.empty_like(x)``'s strides where they keep the last dim contiguous (as the kernels
    write), else None (contiguous)."""
    strides = torch.empty_like(x, device="meta").stride()
    return strides if strides[-1] == 1 else None


def _head_dim_padded(d: int) -> int:
    if d > 256:
        raise ValueError(f"TritonKernels supports head dims up to 256, got {d}")
    return max(16, triton.next_power_of_2(d))


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_offsets(*tensors: torch.Tensor) -> None:
    # Offsets inside one (batch, head) slice are int32 in the kernels.
    for t in tensors:
        if t.shape[-2] * t.stride(-2) >= 2**31:
            raise ValueError(f"a head slice of a tensor of shape {tuple(t.shape)} is too large")


def _fast_tanh(q: torch.Tensor) -> bool:
    """Whether a soft cap may use the GPU's approximate tanh: half-precision inputs on a GPU (the
    interpreter runs on the CPU and has no PTX)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _cuts_tiles(mask: BlockMask) -> bool:
    """Whether the mask leaves few tiles whole or changes every score
    (``configs.default_fwd_config``)."""
    r = mask.rules
    return (r.window is not None or r.chunk > 0 or mask.q_doc is not None
            or mask.dense is not None or bool(mask.softcap))  # fmt: skip


def _full_allowed(flags) -> bool:
    """Whether a tile may be full (every score as q.k gives it): not under a dense mask, whose
    values every score reads, nor under a soft cap, which every score passes through."""
    return flags.dense_kind == 0 and not flags.softcap


class _on_device:
    """Make ``t``'s device current for the launches (a no-op on CPU, under the interpreter)."""

    def __init__(self, t: torch.Tensor):
        self.guard = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)


class TritonKernels:
    """Triton implementation of :class:`ringcompile.kernels.AttentionKernels`.

    ``fwd_config`` / ``bwd_config`` override the tuned tile shapes (benchmarks and tests use
    them); ``None`` picks them from the head dim and dtype.
    """

    def __init__(self, fwd_config: FwdConfig | None = None, bwd_config: BwdConfig | None = None):
        self.fwd_config = fwd_config
        self.bwd_config = bwd_config

    # -- forward ---------------------------------------------------------------------------
    def forward_init(self, q: torch.Tensor) -> ForwardState:
        B, H, Sq, _ = q.shape
        lse = _empty((B, H, Sq), torch.float32, q.device)
        return ForwardState(q_shape=q.shape, lse=lse)

    def forward_step(self, state: ForwardState, q, k, v, mask: BlockMask, scale: float,
                     last: bool) -> None:  # fmt: skip
        if state.final_out is not None:
            raise RuntimeError("forward_step after the last step")
        B, H, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        out_strides = _layout_strides(q)  # (of the q given, before any copy below)
        q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
        if scale < 0:
            # the kernel needs a positive scale; (-q)·k * |scale| is the same score
            q, scale = -q, -scale
        _check_offsets(q, k, v)
        d_pad = _head_dim_padded(D)
        first = state.steps == 0
        cfg = self.fwd_config or default_fwd_config(d_pad, q.dtype, Sq, Sk, last,
                                                    _cuts_tiles(mask))  # fmt: skip
        if last:
            # the answer in q's layout, which the ring op returns (``ring.forward.in_layout_of``)
            state.final_out = _empty((B, H, Sq, D), q.dtype, q.device, out_strides)
            final_out = state.final_out
        else:
            if state.out is None:
                state.out = _empty((B, H, Sq, D), torch.float32, q.device)
            final_out = state.out  # not written (LAST is off); any tensor fills the argument
        # the previous state is only read when there is one
        state_out = state.out if state.out is not None else final_out
        with _on_device(q):
            margs, mflags = _mask_args(mask, B, H, Sq, Sk, _fast_tanh(q))
            lists = _tile_lists(mask, True, cfg.block_m, cfg.block_n, _full_allowed(mflags))
            n_tiles = triton.cdiv(Sq, cfg.block_m)
            chunk = _heads_per_chunk(cfg, n_tiles, B * H, H // Hkv, q.device)
            _fwd_kernel[(n_tiles * B * H,)](
                q, k, v, state_out, state.lse, final_out,
                _strides(q), _strides(k), _strides(v), _strides(final_out), lists, margs,
                Sq, Sk, H, H // Hkv, scale * _LOG2E, chunk,
                HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK=mflags,
                FIRST=first, LAST=last, DOT=dot_precision(q.dtype), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **LAUNCH_OPTIONS,
            )  # fmt: skip
        state.steps += 1

    def forward_finish(self, state: ForwardState, dtype: torch.dtype):
        return finish_forward(state, dtype)

    # -- backward --------------------------------------------------------------------------
    def backward_prepare(self, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
        B, H, S, D = out.shape
        out, dout = _inner_contiguous(out), _inner_contiguous(dout)
        delta = _empty((B, H, S), torch.float32, out.device)
        block = 64
        with _on_device(out):
            _delta_kernel[(triton.cdiv(S, block), B * H)](
                out, dout, delta, _strides(out), _strides(dout), S, H,
                HEAD_DIM=D, D_PAD=_head_dim_padded(D), BLOCK=block, **LAUNCH_OPTIONS,
            )  # fmt: skip
        return delta

    def backward_step(self, q, k, v, dout, lse, delta, mask: BlockMask, scale: float,
                      dq, dk, dv, dkv_fresh: bool = False) -> None:  # fmt: skip
        B, H, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        q, k, v, dout = (_inner_contiguous(t) for t in (q, k, v, dout))
        d_pad = _head_dim_padded(D)
        r = mask.rules
        banded = r.causal or r.window is not None or r.chunk > 0
        # (chosen before a sum's accumulator is made: whether the dq kernel, which can write over
        # a fresh dq, runs decides whether that accumulator is zeroed)
        planned_ok = (_bulk_reduce_ok(dq) if isinstance(dq, torch.Tensor)
                      else _bulk_reduce_ok_fresh(q.shape, q.device))  # fmt: skip
        cfg = self.bwd_config or default_bwd_config(d_pad, q.dtype, banded, planned_ok)
        dq, dk, dv, dkv_fresh, dq_fresh = accumulators(dq, dk, dv, dkv_fresh,
                                                       dq_may_overwrite=cfg.dq is not None)  # fmt: skip
        # gradients that are overwritten may be the answer itself, in the inputs' dtype (a sum's
        # sole contribution: ``GradSum``'s sole_dtype); the store rounds them once
        dkv_dtypes = (torch.float32, q.dtype) if dkv_fresh else (torch.float32,)
        dq_dtypes = (torch.float32, q.dtype) if dq_fresh else (torch.float32,)
        for acc, dtypes in ((dq, dq_dtypes), (dk, dkv_dtypes), (dv, dkv_dtypes)):
            if acc.stride(-1) != 1 or acc.dtype not in dtypes:
                raise ValueError(
                    "gradient accumulators must be fp32 (those that are overwritten may be in "
                    "the inputs' dtype) with a contiguous last dim"
                )
        _check_offsets(q, k, v, dout, dq, dk, dv)
        lse, delta = lse.contiguous(), delta.contiguous()
        bulk_ok = _bulk_reduce_ok(dq)
        dq_mode, dq_desc = 0, None
        if cfg.dq is None:
            dq_mode = 1
            if cfg.dq_bulk and bulk_ok:
                dq_mode = 2
                dq_desc = TensorDescriptor(dq, list(dq.shape), list(dq.stride()),
                                           [1, 1, cfg.block_m, d_pad])  # fmt: skip
        q_st, k_st, v_st, do_st = _strides(q), _strides(k), _strides(v), _strides(dout)
        dq_st = _strides(dq)
        with _on_device(q):
            margs, mflags = _mask_args(mask, B, H, Sq, Sk, _fast_tanh(q))
            lists = _tile_lists(mask, False, cfg.block_n, cfg.block_m, _full_allowed(mflags))
            n_tiles = triton.cdiv(Sk, cfg.block_n)
            chunk = _kv_heads_per_chunk(cfg, n_tiles, B * Hkv, q.device)
            _bwd_kernel[(n_tiles * B * Hkv,)](
                q, k, v, dout, lse, delta, dq, dq_desc, dk, dv,
                q_st, k_st, v_st, do_st, dq_st, _strides(dk), _strides(dv),
                lists, margs, Sq, Sk, Hkv, H // Hkv, scale * _LOG2E, scale, chunk,
                HEAD_DIM=D, D_PAD=d_pad, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, MASK=mflags,
                DQ_MODE=dq_mode, ACCUMULATE=not dkv_fresh, DOT=dot_precision(q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS,
            )  # fmt: skip
            if dq_mode == 0:
                dq_cfg = cfg.dq
                lists = _tile_lists(mask, True, dq_cfg.block_m, dq_cfg.block_n,
                                    _full_allowed(mflags))  # fmt: skip
                n_tiles = triton.cdiv(Sq, dq_cfg.block_m)
                chunk = _heads_per_chunk(dq_cfg, n_tiles, B * H, H // Hkv, q.device)
                _bwd_dq_kernel[(n_tiles * B * H,)](
                    q, k, v, dout, lse, delta, dq, q_st, k_st, v_st, do_st, dq_st,
                    lists, margs, Sq, Sk, H, H // Hkv, scale * _LOG2E, scale, chunk,
                    HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
                    MASK=mflags, DOT=dot_precision(q.dtype), DQ_FRESH=dq_fresh,
                    num_warps=dq_cfg.num_warps,
                    num_stages=dq_cfg.num_stages, **LAUNCH_OPTIONS,
                )  # fmt: skip

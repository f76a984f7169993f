"""The Triton ring-step kernels against ReferenceKernels, on the CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` itself is imported (Triton's own library
functions are jit functions too), and it must not leak into other test modules (GPU tests in the
same session would run interpreted). So unless this process already runs interpreted, the one test
here runs this file again in a child pytest with the variable set, where the real tests run.

Shapes are small and tiles 16 wide so that every case has several tiles, a ragged last tile, and
full, partial and skipped tiles. fp16 and fp32 only: the interpreter computes bf16 dots wrongly.
Every buffer the kernels must fill is poisoned with NaN, and the gradient accumulators start from
random values, so an element left unwritten or overwritten instead of added fails.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest
import torch

from ringcompile.kernels.reference import ReferenceKernels
from ringcompile.layout import make_layout
from ringcompile.masks import BlockMask, PositionRules
from ringcompile.ring.backward import own_block_key_parts

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:  # imported here only where kernels run interpreted (see the docstring)
    from ringcompile.kernels.triton import configs, host, mask_args, tiles
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fp32_dots_take_torch_matmul_precision():
    """float32 dots are IEEE unless the user allowed TF32, as torch's own matmuls; half types
    keep Triton's default."""
    from ringcompile.kernels.triton.jit import dot_precision

    kept = torch.get_float32_matmul_precision()
    try:
        for setting, precision in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert dot_precision(torch.float32) == precision
            assert dot_precision(torch.bfloat16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(kept)


@pytest.mark.skipif(INTERPRETED, reason="this process already runs the interpreted tests")
def test_interpreted_kernels_in_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.abspath(__file__),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]


# Cases whose launches cover every mask flag's code path on a GPU's compiler (the interpreter runs
# code that compiler refuses, such as returns of two shapes from one function).
COMPILED_CASES = ("key-bias-causal-padding-mqa", "dense-bool-B", "dense-additive-window-d80",
                  "chunk-docs-zigzag-dq-kernel", "softcap-docs-dq-kernel-gqa",
                  "softcap-causal-striped", "prefix-docs-window-dq-kernel")  # fmt: skip


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels; the interpreter compiles nothing")
def test_kernels_compile_for_hopper():
    """Every kernel the masked cases launch compiles for sm_90 with Triton's own compiler, no GPU
    needed: the launches are recorded on CPU tensors instead of run, then compiled as they would
    be on an H100/H200."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction, mangle_type

    import ringcompile.kernels.triton as tf
    from ringcompile.kernels.triton import host, tiles

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    mp = pytest.MonkeyPatch()
    try:
        # on a GPU, half-precision soft caps take the GPU's tanh (inline PTX): compiled here too
        mp.setattr(host, "_fast_tanh", lambda q: q.dtype in (torch.float16, torch.bfloat16))
        for module in (host, tiles):  # where the kernels are launched from
            for name, f in list(vars(module).items()):
                if isinstance(f, JITFunction) and name.endswith("_kernel"):
                    mp.setattr(module, name, Recorder(f))
        for name in COMPILED_CASES:
            case = replace(CASES[name], dtype=torch.bfloat16)
            # (the default configurations; with a separate dq kernel where the case has one)
            bwd = None
            if case.dq_kernel:
                bwd = tf.BwdConfig(64, 64, 4, 2, dq=tf.FwdConfig(64, 64, 4, 2))
            _run(tf.TritonKernels(bwd_config=bwd), case, *_build(case), scale=0.1)
    finally:
        mp.undo()
    # every launch pins FP fusion (Triton's default changes in 3.10)
    assert all(kwargs.get("enable_fp_fusion") is True for _, _, kwargs in launches)
    programs = {}
    for kernel, args, kwargs in launches:
        values = dict(zip([p.name for p in kernel.params], args)) | kwargs
        options = {k: values.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")
                   if k in values}  # fmt: skip
        constexprs = {p.name: values[p.name] for p in kernel.params
                      if p.is_constexpr or values[p.name] is None}  # fmt: skip
        signature = {p.name: "constexpr" if p.name in constexprs else mangle_type(values[p.name])
                     for p in kernel.params}  # fmt: skip
        # tuple arguments (flat): elements that specialise to constants (ints equal to 1)
        for i, p in enumerate(kernel.params):
            if isinstance(signature[p.name], tuple):
                for j, (kind, x) in enumerate(zip(signature[p.name], values[p.name])):
                    if kind == "constexpr":
                        constexprs[(i, j)] = x
        key = (kernel.fn.__name__, repr(sorted(signature.items())),
               repr(sorted(constexprs.items(), key=str)), repr(sorted(options.items())))  # fmt: skip
        programs[key] = (kernel, signature, constexprs, options)
    compiled = set()
    for (name, *_), (kernel, signature, constexprs, options) in programs.items():
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        compiled.add(name)
    assert {"_fwd_kernel", "_bwd_kernel", "_bwd_dq_kernel", "_tile_lists_kernel"} <= compiled, (
        compiled
    )


def _repair_interpreter_scalars() -> None:
    # Triton 3.6's interpreter turns a scalar into a Python int with int(array of shape (1,)),
    # which NumPy >= 2.4 refuses (loops over a runtime bound then fail). Later Triton squeezes.
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        int(np.zeros(1))
        return
    except TypeError:
        if original is None:  # a Triton whose interpreter is organised differently
            return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


@pytest.fixture(scope="module")
def tf():
    """The Triton kernels' package, kernels interpreted, with NaN-poisoned output buffers."""
    _repair_interpreter_scalars()
    import ringcompile.kernels.triton as tf
    from ringcompile.kernels.triton import host

    def poisoned(shape, dtype, device, strides=None):
        if strides is None:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty_strided(shape, strides, dtype=dtype, device=device).fill_(float("nan"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host, "_empty", poisoned)
        torch.set_num_threads(min(2, torch.get_num_threads()))
        yield tf


# ---------------------------------------------------------------------------------------------
# Cases: a ring of W ranks over a global sequence; rank `rank`'s queries meet the key blocks of
# the first `steps` ranks of its ring order, each step with its own BlockMask.
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    layout: str = "contiguous"  # contiguous | striped | zigzag | shuffled
    seq_len: int = 150
    world: int = 4
    rank: int = 2
    steps: int = 2
    first_source: int = 0  # the first key block is rank (rank - first_source)'s
    B: int = 2
    H: int = 4
    Hkv: int = 2
    D: int = 32
    dtype: torch.dtype = torch.float32
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    chunk: int = 0  # chunked attention: chunks of this many positions
    prefix: int = 0  # prefix-LM: keys before this position seen by every query
    docs: bool = False
    doc_rate: float = 0.08  # chance that a token starts a document (low: tiles of one document)
    k_valid: bool = False
    left_padding: bool = False  # invalid keys are each batch row's first ones (else random)
    # None | "bool" | "additive" | "additive_min" (finfo.min fills) | "key_bias" (one per key)
    dense: str | None = None
    dense_shape: str = "BH"  # which of B, H the dense mask has (others broadcast)
    blocks: tuple[int, int, int, int] = (16, 16, 16, 16)  # fwd m, n; bwd n, m
    dq_kernel: bool = False  # dq from its own kernel instead of atomics in the dk/dv kernel
    dq_bulk: bool = False  # ask for bulk (TMA) reductions of dq: unavailable here, atomics add it
    heads_per_chunk: int | None = None  # launch order; None: the kernels' own choice
    strided_inputs: bool = False  # q/k/v as transposed views of (B, S, H, D) tensors
    flag_last: bool = True  # whether the final step is called with last=True
    scale: float | None = None  # None: D ** -0.5
    dkv_fresh: bool = False  # dK/dV start as NaN and the backward overwrites them
    key_halves: bool = False  # the backward runs each block as two calls on halves of its keys
    softcap: float = 0.0  # scores capped at this (scores here are O(1): a cap of 1.5 bends them)


def _positions(case: Case, gen: torch.Generator):
    if case.layout == "shuffled":
        # arbitrary order inside blocks: tile bounds must not assume sorted positions
        total = case.seq_len + (-case.seq_len) % case.world
        perm = torch.randperm(total, generator=gen)
        local = total // case.world
        pos = [perm[r * local : (r + 1) * local] for r in range(case.world)]
    else:
        layout = make_layout(case.layout, case.seq_len, case.world)
        pos = [layout.positions(r) for r in range(case.world)]
    q_pos = pos[case.rank]
    k_pos = [pos[(case.rank - case.first_source - s) % case.world] for s in range(case.steps)]
    return q_pos, k_pos


def _build(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = _positions(case, gen)
    total = int(max(q_pos.max(), max(p.max() for p in k_pos))) + 1
    B, H, Hkv, D = case.B, case.H, case.Hkv, case.D

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(case.dtype)

    def heads_major(x):
        # (B, S, heads, D) memory viewed as (B, heads, S, D): strides that are not contiguous
        return x.transpose(1, 2).contiguous().transpose(1, 2) if case.strided_inputs else x

    q = heads_major(rand(B, H, len(q_pos), D))
    ks = [heads_major(rand(B, Hkv, len(p), D)) for p in k_pos]
    vs = [heads_major(rand(B, Hkv, len(p), D)) for p in k_pos]
    dout = rand(B, H, len(q_pos), D)

    doc_of = valid_of = dense_of = None
    if case.docs:
        # random document boundaries per batch element
        starts = torch.rand(B, total, generator=gen) < case.doc_rate
        doc_of = torch.cumsum(starts.long(), dim=1)
    if case.k_valid and case.left_padding:
        # whole tiles of padding, whole tiles of keys and one tile of both: each list kind
        valid_of = torch.arange(total)[None, :] >= torch.tensor([40, 9])[:B, None]
    elif case.k_valid:
        valid_of = torch.rand(B, total, generator=gen) < 0.8
        valid_of[0] = False  # batch 0 sees no key at all: out 0, lse -inf, zero grads
    if case.dense is not None:
        shape = (B if "B" in case.dense_shape else 1, H if "H" in case.dense_shape else 1,
                 1 if case.dense == "key_bias" else total, total)  # fmt: skip
        if case.dense == "key_bias":  # ALiBi's way: a bias per key and head, any query
            dense_of = torch.randn(*shape, generator=gen) * 2
        elif case.dense == "bool":
            dense_of = torch.rand(*shape, generator=gen) < 0.7
        elif case.dense == "bool_band":  # a mask_mod's kind: most tiles hidden, dropped
            idx = torch.arange(total)
            near = (idx[:, None] - idx[None, :]).abs() < 5
            dense_of = near & (torch.rand(*shape, generator=gen) < 0.8)
        else:
            dense_of = torch.randn(*shape, generator=gen) * 2
            fill = float("-inf") if case.dense == "additive" else torch.finfo(torch.float32).min
            dense_of[torch.rand(*shape, generator=gen) < 0.2] = fill
            if case.dense == "additive_min":
                dense_of[:, :, 1::7] = fill  # rows the mask fills everywhere (SDPA: V's mean)

    offset = None
    if case.dense == "additive_min":
        # as the ring gives it: each row's largest mask value over the keys its positions allow
        every_k = torch.cat(k_pos)
        seen = BlockMask(
            q_pos=q_pos,
            k_pos=every_k,
            seq_len=case.seq_len,
            rules=PositionRules.of(case.causal, case.window, case.chunk, case.prefix),
        ).allowed()
        rows = dense_of[:, :, q_pos.clamp(max=total - 1)][..., every_k.clamp(max=total - 1)]
        top = rows.masked_fill(~seen[:, None], float("-inf")).amax(-1)
        offset = torch.where(torch.isfinite(top), top, torch.zeros_like(top))

    masks = []
    for kp in k_pos:
        masks.append(
            BlockMask(
                q_pos=q_pos, k_pos=kp, seq_len=case.seq_len,
                rules=PositionRules.of(case.causal, case.window, case.chunk, case.prefix),
                q_doc=None if doc_of is None else doc_of[:, q_pos.clamp(max=total - 1)],
                k_doc=None if doc_of is None else doc_of[:, kp.clamp(max=total - 1)],
                k_valid=None if valid_of is None else valid_of[:, kp.clamp(max=total - 1)],
                dense=None if dense_of is None else (
                    dense_of[..., kp] if case.dense == "key_bias" else dense_of[:, :, q_pos][..., kp]),
                dense_offset=offset, softcap=case.softcap,
            )
        )  # fmt: skip
    return q, ks, vs, dout, masks


def _accumulator(shape, fresh: bool, gen: torch.Generator) -> torch.Tensor:
    # an overwritten accumulator starts as NaN (a missed element stays NaN); an added one random
    return torch.full(shape, float("nan")) if fresh else torch.randn(shape, generator=gen)


def _run(kernels, case: Case, q, ks, vs, dout, masks, scale: float, seed: int = 1):
    state = kernels.forward_init(q)
    for i, (k, v, m) in enumerate(zip(ks, vs, masks)):
        kernels.forward_step(state, q, k, v, m, scale, last=case.flag_last and i == len(ks) - 1)
    out, lse = kernels.forward_finish(state, q.dtype)
    delta = kernels.backward_prepare(out, dout)
    gen = torch.Generator().manual_seed(seed)
    dq = torch.randn(q.shape, generator=gen)
    dks = [_accumulator(k.shape, case.dkv_fresh, gen) for k in ks]
    dvs = [_accumulator(v.shape, case.dkv_fresh, gen) for v in vs]
    for k, v, m, dk, dv in zip(ks, vs, masks, dks, dvs):
        # the ring's own block: two calls, later keys first
        spans = own_block_key_parts(k.shape[2]) if case.key_halves else [(0, k.shape[2])]
        for lo, hi in spans:
            kernels.backward_step(
                q,
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                dout,
                lse,
                delta,
                m.keys(lo, hi) if case.key_halves else m,
                scale,
                dq,
                dk[:, :, lo:hi],
                dv[:, :, lo:hi],
                dkv_fresh=case.dkv_fresh,
            )
    return dict(out=out, lse=lse, delta=delta, dq=dq, dk=torch.cat(dks, 2), dv=torch.cat(dvs, 2))


def _check(case: Case, tf):
    q, ks, vs, dout, masks = _build(case)
    scale = case.D**-0.5 if case.scale is None else case.scale
    fm, fn, bn, bm = case.blocks
    hpc = case.heads_per_chunk
    dq = tf.FwdConfig(fm, fn, 4, 1, heads_per_chunk=hpc) if case.dq_kernel else None
    ours = _run(
        tf.TritonKernels(tf.FwdConfig(fm, fn, 4, 1, heads_per_chunk=hpc),
                         tf.BwdConfig(bn, bm, 4, 1, dq=dq, heads_per_chunk=hpc,
                                      dq_bulk=case.dq_bulk)),
        case, q, ks, vs, dout, masks, scale,
    )  # fmt: skip
    ref = _run(ReferenceKernels(), case, q, ks, vs, dout, masks, scale)
    tol = 2e-5 if case.dtype == torch.float32 else 4e-3
    assert ours["out"].dtype == case.dtype
    # the last step writes the answer in q's layout; forward_finish after steps without the flag
    # converts the state, contiguous
    layout = (
        q.stride()
        if case.flag_last
        else torch.empty_like(q, memory_format=torch.contiguous_format).stride()
    )
    assert ours["out"].stride() == layout, (ours["out"].stride(), layout)
    assert ours["lse"].dtype == torch.float32
    for name, r in ref.items():
        o = ours[name].float()
        r = r.float()
        assert not o.isnan().any(), f"{name}: NaN (unwritten or invalid)"
        if name == "lse":
            unseen = r == float("-inf")
            assert torch.equal(o == float("-inf"), unseen), "lse: rows with no key differ"
            o, r = o[~unseen], r[~unseen]
        err = (o - r).norm() / r.norm().clamp_min(1e-6)
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return ref


CASES = {
    "none-one-step": Case(steps=1, H=2, Hkv=2),
    "none-gqa4-hkv1": Case(H=4, Hkv=1, D=16, steps=3),
    "causal-contiguous": Case(causal=True, steps=3, rank=2),
    "causal-striped-fp16": Case(layout="striped", causal=True, dtype=torch.float16, steps=3),
    "causal-zigzag": Case(layout="zigzag", causal=True, H=8, Hkv=2, steps=4, rank=1),
    "causal-shuffled-d80": Case(layout="shuffled", causal=True, D=80, steps=2, B=1),
    "causal-padding-keys": Case(causal=True, seq_len=141, rank=0, steps=4, layout="striped"),
    "window-both-zigzag": Case(layout="zigzag", window=(9, 5), steps=3),
    "window-left-causal-fp16": Case(causal=True, window=(20, -1), dtype=torch.float16, D=16),
    "window-right-only": Case(window=(-1, 6), layout="striped", H=2, Hkv=1),
    "chunk-causal-striped": Case(causal=True, chunk=20, layout="striped", steps=3),
    "chunk-docs-zigzag-dq-kernel": Case(
        chunk=33, docs=True, layout="zigzag", steps=3, dq_kernel=True
    ),
    "chunk-tile-aligned-fp16": Case(causal=True, chunk=32, dtype=torch.float16, steps=2),
    # prefix-LM: a bidirectional prefix beside causality, across tiles and ring steps
    "prefix-causal-zigzag": Case(causal=True, prefix=37, layout="zigzag", steps=3, rank=1),
    "prefix-docs-window-dq-kernel": Case(
        causal=True, prefix=20, window=(9, -1), docs=True, layout="striped", steps=3, dq_kernel=True
    ),  # fmt: skip
    "docs": Case(docs=True, steps=3),
    "docs-causal-striped": Case(docs=True, causal=True, layout="striped", H=4, Hkv=1),
    "key-validity": Case(k_valid=True, steps=2),
    # facts that make tiles full or skip them (the tile lists read them)
    "long-docs-causal-dq-kernel": Case(
        docs=True, doc_rate=0.02, causal=True, steps=3, dq_kernel=True
    ),
    "left-padding-zigzag-gqa": Case(
        k_valid=True, left_padding=True, causal=True, layout="zigzag", H=4, Hkv=2, steps=3
    ),
    "long-docs-left-padding-fp16": Case(
        docs=True,
        doc_rate=0.02,
        k_valid=True,
        left_padding=True,
        dtype=torch.float16,
        B=1,
        steps=2,
        dkv_fresh=True,
    ),
    "dense-bool-B": Case(dense="bool", dense_shape="B", steps=2),
    "dense-bool-H-causal": Case(dense="bool", dense_shape="H", causal=True, H=4, Hkv=4),
    "dense-bool-band-steps": Case(dense="bool_band", dense_shape="B", steps=3),
    "dense-additive-BH": Case(dense="additive", dense_shape="BH"),
    "dense-additive-window-d80": Case(dense="additive", dense_shape="", window=(12, 12), D=80, B=1),
    "dense-finfo-min-rows-causal": Case(
        dense="additive_min", dense_shape="H", causal=True, H=4, Hkv=2, steps=3, dq_kernel=True
    ),
    "dense-finfo-min-rows-fp16": Case(
        dense="additive_min", dense_shape="B", dtype=torch.float16, steps=2
    ),
    "key-bias-causal-padding-mqa": Case(
        dense="key_bias",
        causal=True,
        k_valid=True,
        H=4,
        Hkv=1,
        layout="striped",
        steps=3,
        dq_kernel=True,
    ),
    "key-bias-fp16-key-halves": Case(
        dense="key_bias",
        dense_shape="H",
        window=(20, 0),
        dtype=torch.float16,
        key_halves=True,
        dkv_fresh=True,
    ),
    "combo-fp16-gqa": Case(
        causal=True,
        docs=True,
        k_valid=True,
        dense="bool",
        dense_shape="H",
        dtype=torch.float16,
        H=4,
        Hkv=1,
        seq_len=145,
        layout="zigzag",
    ),  # fmt: skip
    # 8 query heads in chunks of 3, 3, 2; 4 KV heads in chunks of 3, 1
    # the soft cap: every tile partial; dq by atomics, by its own kernel, under finfo.min rows
    "softcap-causal-striped": Case(causal=True, layout="striped", softcap=1.5, steps=3),
    "softcap-docs-dq-kernel-gqa": Case(docs=True, softcap=1.5, H=4, Hkv=1, dq_kernel=True),
    "softcap-finfo-min-rows-fp16": Case(
        dense="additive_min", dense_shape="B", dtype=torch.float16, softcap=1.5, steps=2
    ),
    "softcap-negative-scale-key-halves": Case(
        causal=True, scale=-0.3, softcap=1.5, key_halves=True, dkv_fresh=True
    ),
    "ragged-head-chunks": Case(causal=True, layout="zigzag", heads_per_chunk=3, dq_kernel=True),
    "unequal-tiles": Case(causal=True, blocks=(32, 16, 32, 16), steps=2),
    "unequal-tiles-rev": Case(window=(15, 0), blocks=(16, 32, 16, 32), layout="striped"),
    "strided-inputs": Case(causal=True, strided_inputs=True),
    "no-last-flag": Case(causal=True, flag_last=False, steps=3, layout="zigzag"),
    "negative-scale": Case(causal=True, scale=-0.2, steps=2),
    "dq-bulk-falls-back": Case(causal=True, layout="zigzag", dq_bulk=True, D=80, B=1),
    "dq-kernel-causal-striped": Case(
        causal=True, layout="striped", dq_kernel=True, steps=3, blocks=(32, 16, 16, 16)
    ),  # fmt: skip
    "dkv-fresh-window-zigzag": Case(layout="zigzag", window=(9, 5), steps=3, dkv_fresh=True),
    "dkv-fresh-key-halves-combo": Case(
        causal=True,
        docs=True,
        k_valid=True,
        dense="bool",
        layout="zigzag",
        steps=3,
        dkv_fresh=True,
        key_halves=True,
    ),
    "key-halves-accumulate-additive": Case(
        causal=True,
        dense="additive",
        dense_shape="H",
        layout="striped",
        key_halves=True,
        H=4,
        Hkv=4,
    ),
    "dq-kernel-combo-d80": Case(
        window=(30, 2),
        docs=True,
        k_valid=True,
        dense="additive",
        D=80,
        dq_kernel=True,
        B=1,
        H=4,
        Hkv=1,
    ),  # fmt: skip
}


interpreted_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreted child")


@interpreted_only
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(tf, name):
    _check(CASES[name], tf)


@interpreted_only
def test_rows_without_keys(tf):
    """A first step that sees nothing (the block is in the queries' future) is carried through;
    batch 0 has no valid key at all: out 0, lse -inf, zero grads."""
    case = Case(causal=True, rank=1, first_source=-1, steps=2, k_valid=True)
    ref = _check(case, tf)
    assert (ref["lse"][0] == float("-inf")).all() and (ref["lse"][1] > float("-inf")).any()
    # overwritten accumulators of keys no query sees get zeros, not what they held
    _check(replace(case, dkv_fresh=True), tf)


@interpreted_only
def test_overwritten_dkv_in_the_inputs_dtype(tf):
    """dK/dV overwritten straight into fp16 (a ring of one's answer, ``GradSum``'s sole_dtype)
    equal the fp32 ones rounded after, bit for bit; keys no query sees get zeros."""
    case = Case(causal=True, window=(20, -1), dtype=torch.float16, D=16, steps=1, k_valid=True,
                first_source=0)  # fmt: skip
    q, ks, vs, dout, masks = _build(case)
    k, v, m = ks[0], vs[0], masks[0]
    kernels = tf.TritonKernels(tf.FwdConfig(16, 16, 4, 1), tf.BwdConfig(16, 16, 4, 1))
    state = kernels.forward_init(q)
    kernels.forward_step(state, q, k, v, m, case.D**-0.5, last=True)
    out, lse = kernels.forward_finish(state, q.dtype)
    delta = kernels.backward_prepare(out, dout)
    grads = {}
    for dtype in (torch.float32, torch.float16):
        dq = torch.zeros(q.shape)
        dk, dv = (torch.full(t.shape, float("nan"), dtype=dtype) for t in (k, v))
        kernels.backward_step(q, k, v, dout, lse, delta, m, case.D**-0.5, dq, dk, dv,
                              dkv_fresh=True)  # fmt: skip
        grads[dtype] = (dk, dv)
    for wide, narrow in zip(grads[torch.float32], grads[torch.float16]):
        assert not narrow.isnan().any()
        assert torch.equal(narrow, wide.half())
    with pytest.raises(ValueError, match="must be fp32"):  # added into: never in fp16
        kernels.backward_step(q, k, v, dout, lse, delta, m, case.D**-0.5, torch.zeros(q.shape),
                              *grads[torch.float16], dkv_fresh=False)  # fmt: skip


@interpreted_only
@pytest.mark.parametrize("future", [False, True])
def test_dq_kernel_writes_a_fresh_dq(tf, future, monkeypatch):
    """With its own kernel, an empty sum's dq is written over, not zeroed and added to: in fp32,
    or in fp16 where the sum gets one contribution (bit for bit the fp32 sum rounded). A block
    in the queries' future (``future``) leaves zeros. New float buffers start as NaN."""
    from ringcompile.kernels.grad_sum import GradSum

    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    case = Case(causal=True, window=(20, -1), dtype=torch.float16, D=16, steps=2, rank=1,
                first_source=-1 if future else 0)  # fmt: skip
    q, ks, vs, dout, masks = _build(case)
    k, v, m = ks[0], vs[0], masks[0]
    scale = case.D**-0.5
    kernels = tf.TritonKernels(
        tf.FwdConfig(16, 16, 4, 1), tf.BwdConfig(16, 16, 4, 1, dq=tf.FwdConfig(16, 16, 4, 1))
    )
    ref = ReferenceKernels()
    state = ref.forward_init(q)
    ref.forward_step(state, q, k, v, m, scale, last=True)
    out, lse = ref.forward_finish(state, q.dtype)
    delta = kernels.backward_prepare(out, dout)
    results = {}
    for sole in (None, torch.float16):
        sums = [GradSum(t.shape, torch.float32, q.device, sole) for t in (q, k, v)]
        with monkeypatch.context() as mp:
            mp.setattr(torch, "empty", poisoned)
            kernels.backward_step(q, k, v, dout, lse, delta, m, scale, *sums)
        results[sole] = [s.result(torch.float16) for s in sums]
        assert not any(g.isnan().any() for g in results[sole])
        if sole is not None:  # written by the kernel in fp16, no fp32 buffer
            assert all(s.acc.dtype == torch.float16 for s in sums)
    for wide, narrow in zip(results[None], results[torch.float16]):
        assert torch.equal(narrow, wide)
    if future:
        assert all(not g.any() for g in results[torch.float16])
    else:
        assert results[torch.float16][0].abs().sum() > 0


@interpreted_only
def test_ring_of_one_gradients_in_the_inputs_dtype(tf):
    """Through the ring op at W = 1 on Triton, dK/dV come from the kernel in fp16 (no fp32 pass):
    they match the fp32 call's within fp16, as dq, which goes through fp32, does."""
    from ringcompile import ring_attention
    from ringcompile.kernels import grad_sum

    made = []
    real = grad_sum.GradSum._accumulator

    def spy(self, box, overwrite):
        acc = real(self, box, overwrite)
        made.append(acc.dtype)
        return acc

    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, h, 40, 16, generator=g) for h in (4, 2, 2, 4))
    grads = {}
    for dtype in (torch.float32, torch.float16):
        ins = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grad_sum.GradSum, "_accumulator", spy)
            out = ring_attention(*ins, is_causal=True, window=(9, 0), enable_gqa=True,
                                 kernels="triton")  # fmt: skip
            out.backward(dout.to(dtype))
        grads[dtype] = [t.grad for t in ins]
    # fp32 call: dq, dk, dv fp32; fp16 call: dq's fp32 accumulator, dK/dV in fp16
    assert made == [torch.float32] * 3 + [torch.float32, torch.float16, torch.float16], made
    for wide, narrow in zip(grads[torch.float32], grads[torch.float16]):
        assert narrow.dtype == torch.float16
        assert ((narrow.float() - wide).norm() / wide.norm()) < 4e-3


@interpreted_only
def test_no_step(tf):
    q = torch.randn(1, 2, 5, 16)
    kernels = tf.TritonKernels()
    out, lse = kernels.forward_finish(kernels.forward_init(q), q.dtype)
    assert torch.equal(out, torch.zeros_like(q))
    assert (lse == float("-inf")).all()


@interpreted_only
def test_tile_lists_cached_by_positions_key(tf):
    """Masks with a positions_key (the ring's) reuse their tile lists, and only for the same
    rules and tiling; the results through cached lists equal those computed afresh."""
    case = Case(causal=True, layout="zigzag", steps=3)
    q, ks, vs, dout, masks = _build(case)
    keyed = [replace(m, positions_key=("test", i)) for i, m in enumerate(masks)]
    lists = tiles._tile_lists(keyed[0], True, 16, 16, True)
    assert tiles._tile_lists(keyed[0], True, 16, 16, True) is lists
    assert tiles._tile_lists(keyed[0], False, 16, 16, True) is not lists
    assert tiles._tile_lists(replace(keyed[0], seq_len=keyed[0].seq_len - 7), True, 16, 16,
                             True) is not lists  # fmt: skip
    unkeyed = tiles._tile_lists(masks[0], True, 16, 16, True)
    assert tiles._tile_lists(masks[0], True, 16, 16, True) is not unkeyed
    kernels = tf.TritonKernels(tf.FwdConfig(16, 16, 4, 1), tf.BwdConfig(16, 16, 4, 1))
    scale = case.D**-0.5
    fresh = _run(kernels, case, q, ks, vs, dout, masks, scale)
    for _ in range(2):  # the second run is served from the cache
        cached = _run(kernels, case, q, ks, vs, dout, keyed, scale)
        for name, t in fresh.items():
            assert torch.equal(cached[name], t), name


@interpreted_only
def test_token_facts_make_tiles_full_or_skip_them(tf):
    """Documents and key validity in the tile lists: a tile pair inside one document with valid
    keys in every batch row is full, one no batch row shares a document or a valid key over is
    skipped, and the rest are partial, rows as queries or as keys."""
    pos = torch.arange(64)
    docs = (pos >= 32).long()[None]  # two documents of 32 tokens
    valid = torch.stack([pos >= 16, pos >= 8])  # batch row 1: key tile 0 holds both kinds
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=64, rules=PositionRules(False),
                     q_doc=docs, k_doc=docs, k_valid=valid)  # fmt: skip

    def kinds(lists, n):
        out = []
        for r in range(n):
            full = set(lists.full[r, : lists.full_count[r]].tolist())
            part = set(lists.part[r, : lists.part_count[r]].tolist())
            out.append("".join("F" if c in full else "P" if c in part else "." for c in range(n)))
        return out

    # rows: query tiles; columns: key tiles (16 tokens each)
    assert kinds(tiles._tile_lists(mask, True, 16, 16, True), 4) == ["PF..", "PF..", "..FF", "..FF"]
    # rows: key tiles; columns: query tiles
    assert kinds(tiles._tile_lists(mask, False, 16, 16, True), 4) == [
        "PP..",
        "FF..",
        "..FF",
        "..FF",
    ]
    # one batch row alone: key tile 0 holds no valid key there
    one = replace(mask, k_valid=valid[:1])
    assert kinds(tiles._tile_lists(one, True, 16, 16, True), 4)[0] == ".F.."


@interpreted_only
def test_a_dense_mask_drops_the_tiles_it_hides(tf):
    """A dense mask (a mask_mod's block) leaves its tiles partial, and drops from the
    lists those it hides in every batch row and head, in order, rows as queries or as keys."""
    pos = torch.arange(64)
    band = (pos[:, None] - pos[None, :]).abs() < 4  # near the diagonal only
    dense = torch.stack([band, band & (pos[None, :] < 40)])[:, None]  # (B 2, H 1, 64, 64)
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=64, rules=PositionRules(False), dense=dense)

    def kinds(lists, n):
        return ["".join("F" if c in lists.full[r, : lists.full_count[r]].tolist() else
                        "P" if c in lists.part[r, : lists.part_count[r]].tolist() else "."
                        for c in range(n)) for r in range(n)]  # fmt: skip

    want = ["PP..", "PPP.", ".PPP", "..PP"]  # (no full tile under a dense mask: the host's)
    assert kinds(tiles._tile_lists(mask, True, 16, 16, False), 4) == want
    assert kinds(tiles._tile_lists(mask, False, 16, 16, False), 4) == want  # (symmetric)
    # a mask that hides everything: no tile at all
    none = replace(mask, dense=torch.zeros_like(dense))
    assert tiles._tile_lists(none, True, 16, 16, False).part_count.sum() == 0
    # an additive one: -inf hides; a bias per key (one row for every query) is left out of it
    additive = replace(mask, dense=torch.zeros(2, 1, 64, 64).masked_fill(~dense, float("-inf")))
    assert kinds(tiles._tile_lists(additive, True, 16, 16, False), 4) == want
    key_bias = torch.zeros(1, 1, 1, 64).masked_fill(pos >= 32, float("-inf"))
    by_key = replace(mask, dense=key_bias)
    assert kinds(tiles._tile_lists(by_key, True, 16, 16, False), 4) == ["PPPP"] * 4


@interpreted_only
def test_skipped_tiles_are_skipped(tf):
    """A causal key block wholly in the queries' future gives empty tile lists."""
    q_pos, k_pos = torch.arange(64), torch.arange(64, 128)
    mask = BlockMask(q_pos=q_pos, k_pos=k_pos, seq_len=128, rules=PositionRules(True))
    lists = tiles._tile_lists(mask, True, 16, 16, True)
    assert lists.full_count.sum() == 0 and lists.part_count.sum() == 0
    # and a block wholly in the past is all full tiles, none partial
    mask = BlockMask(q_pos=k_pos, k_pos=q_pos, seq_len=128, rules=PositionRules(True))
    lists = tiles._tile_lists(mask, True, 16, 16, True)
    assert lists.full_count.tolist() == [4] * 4 and lists.part_count.sum() == 0


def _rules_tile(mask: BlockMask, queries_on_rows: bool):
    """``mask_args._token_rules`` over one (Sq, Sk) tile of a one-row mask, from the arguments
    ``_mask_args`` makes of it, as a boolean (Sq, Sk)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(margs, out_ptr, QR: tl.constexpr, MASK: tl.constexpr, BQ: tl.constexpr,
               BK: tl.constexpr):  # fmt: skip
        qi = tl.arange(0, BQ)
        ki = tl.arange(0, BK)
        q_doc = None
        k_doc = None
        k_valid = None
        if MASK.has_docs:
            q_doc = tl.load(margs.q_doc + qi * margs.q_doc_s)
            k_doc = tl.load(margs.k_doc + ki * margs.k_doc_s)
        if MASK.has_kvalid:
            k_valid = tl.load(margs.k_valid + ki * margs.k_valid_s)
        # (the interpreter resolves names in the module's globals, not in this closure)
        keep = mask_args._token_rules(
            tl.load(margs.q_pos + qi).to(tl.int32),
            tl.load(margs.k_pos + ki).to(tl.int32),
            margs,
            q_doc,
            k_doc,
            k_valid,
            QR,
            MASK,
        )
        if QR:
            tl.store(out_ptr + qi[:, None] * BK + ki[None, :], keep.to(tl.int8))
        else:
            tl.store(out_ptr + qi[None, :] * BK + ki[:, None], keep.to(tl.int8))

    Sq, Sk = mask.q_pos.numel(), mask.k_pos.numel()
    margs, flags = mask_args._mask_args(mask, 1, 1, Sq, Sk)
    out = torch.empty(Sq, Sk, dtype=torch.int8)
    kernel[(1,)](margs, out, QR=queries_on_rows, MASK=flags, BQ=Sq, BK=Sk)
    return out.bool()


@interpreted_only
def test_mask_rules_agree_on_random_facts(tf):
    """The rules are written once in Python (``BlockMask.allowed``) and once for the kernels
    (``_token_rules``); the tile lists and ``PositionRules.any_allowed`` decide from bounds. On
    random positions (unordered, some past seq_len), documents, validity and rules: the per-element
    rules equal ``allowed`` in both orientations, every allowed pair lies in a listed tile, every
    pair of a full tile is allowed (documents and validity included), and ``any_allowed`` says
    whether a real query sees a key."""
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        Sq, Sk, seq_len = 32, 64, 80
        q_pos = torch.randperm(96, generator=g)[:Sq]
        k_pos = torch.randperm(96, generator=g)[:Sk]
        if seed % 2:  # as layouts give them: rising, so that whole tiles pass or fail
            q_pos, k_pos = q_pos.sort().values, k_pos.sort().values
        # windows at and next to tile sizes, where a bound is met exactly
        r = [
            (-1, 0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31)[i]
            for i in torch.randint(0, 13, (2,), generator=g).tolist()
        ]
        chunk = (0, 0, 4, 7, 8, 16, 20)[seed % 7]
        prefix = (0, 0, 1, 16, 23)[seed % 5 if seed % 3 else 0]
        rules = PositionRules(
            bool(seed % 4 < 2), r[0] if seed % 3 else -1, r[1] if seed % 5 else -1, chunk, prefix
        )
        docs = torch.randint(0, 3, (1, 96), generator=g)
        facts = seed // 4 % 4
        mask = BlockMask(
            q_pos=q_pos,
            k_pos=k_pos,
            seq_len=seq_len,
            rules=rules,
            q_doc=docs[:, q_pos] if facts & 1 else None,
            k_doc=docs[:, k_pos] if facts & 1 else None,
            k_valid=torch.rand(1, Sk, generator=g) < 0.8 if facts & 2 else None,
        )
        want = mask.allowed()[0]
        for on_rows in (True, False):
            assert torch.equal(_rules_tile(mask, on_rows), want), (seed, on_rows)

        by_position = rules.allows(q_pos[:, None], k_pos[None, :], seq_len)
        for rows_are_queries, (rb, cb) in itertools.product((True, False), ((16, 8), (4, 4))):
            lists = tiles._tile_lists(mask, rows_are_queries, rb, cb, True)
            listed = torch.zeros(Sq, Sk, dtype=torch.bool)
            full = torch.zeros(Sq, Sk, dtype=torch.bool)
            for row in range(lists.full_count.numel()):
                for kind, n in ((lists.full, lists.full_count), (lists.part, lists.part_count)):
                    for col in kind[row, : n[row]].tolist():
                        rows, cols = slice(row * rb, row * rb + rb), slice(col * cb, col * cb + cb)
                        tile = (rows, cols) if rows_are_queries else (cols, rows)
                        listed[tile] = True
                        if kind is lists.full:
                            full[tile] = True
            # (the lists read documents and validity too: pairs they hide may be left out)
            assert not (want & ~listed).any(), (seed, rows_are_queries)
            assert want[full].all(), (seed, rows_are_queries)

        real = q_pos < seq_len
        assert rules.any_allowed(q_pos, k_pos, seq_len) == bool(by_position[real].any()), seed
        for _ in range(20):  # and on sparse blocks, where one pair at a bound decides
            qs, ks = (torch.randint(0, 24, (int(n),), generator=g)
                      for n in torch.randint(1, 4, (2,), generator=g))  # fmt: skip
            some = rules.allows(qs[:, None], ks[None, :], 20)[qs < 20].any()
            assert rules.any_allowed(qs, ks, 20) == bool(some), (seed, qs, ks)


@interpreted_only
def test_launch_chunks(tf, monkeypatch):
    """Heads per launch chunk on a 132-SM GPU: the forward takes enough whole GQA groups for four
    waves; the dk/dv kernel the largest power of two of KV heads within two waves."""
    monkeypatch.setattr(configs, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    fwd, bwd = tf.FwdConfig(128, 128, 8, 3), tf.BwdConfig(128, 64, 8, 2)
    # 8k queries: 64 tiles; 528 programs need 9 heads, rounded up to groups of 4
    assert configs._heads_per_chunk(fwd, 64, 32, 4, gpu) == 12
    # keys 4k / 8k / 16k / 32k / 64k: 32 / 64 / 128 / 256 / 512 tiles of 128
    chunks = [configs._kv_heads_per_chunk(bwd, n, 8, gpu) for n in (32, 64, 128, 256, 512)]
    assert chunks == [8, 4, 2, 1, 1]
    assert configs._kv_heads_per_chunk(bwd, 16, 6, gpu) == 6  # never more heads than there are
    assert configs._kv_heads_per_chunk(replace(bwd, heads_per_chunk=3), 64, 8, gpu) == 3


@interpreted_only
def test_forward_tiles_by_step(tf):
    """At head dim 128 in bf16, ring steps that store the fp32 state take the small two-stage
    tiles up to 16k tokens; a step that writes the output keeps the tiles tuned for it."""

    def tiles(s, last):
        c = configs.default_fwd_config(128, torch.bfloat16, s, s, last)
        return c.block_m, c.block_n, c.num_warps, c.num_stages

    assert [tiles(s, False) for s in (4096, 8192, 16384)] == [(128, 64, 4, 2)] * 3
    assert tiles(32768, False) == tiles(32768, True) == (256, 64, 8, 3)
    assert tiles(8192, True) == (128, 128, 8, 3)
    assert configs.default_fwd_config(64, torch.bfloat16, 8192, 8192, False).block_n == 128
    # a final step whose mask cuts most tiles or changes every score: smaller tiles below 16k
    cut = [configs.default_fwd_config(128, torch.bfloat16, s, s, True, cuts_tiles=True)
           for s in (8192, 16384)]  # fmt: skip
    assert [(c.block_m, c.block_n) for c in cut] == [(64, 64), (256, 64)]
    pos = torch.arange(8)
    kinds = {"padding": dict(k_valid=torch.ones(1, 8, dtype=torch.bool)),
             "window": dict(rules=PositionRules(True, window_left=3)),
             "chunks": dict(rules=PositionRules(True, chunk=4)),
             "documents": dict(q_doc=torch.zeros(1, 8), k_doc=torch.zeros(1, 8)),
             "bias": dict(dense=torch.zeros(1, 1, 1, 8)), "soft cap": dict(softcap=5.0)}  # fmt: skip
    cuts = {name: host._cuts_tiles(BlockMask(q_pos=pos, k_pos=pos, seq_len=8,
                                             **{"rules": PositionRules(True), **kw}))
            for name, kw in kinds.items()}  # fmt: skip
    assert cuts == {name: name != "padding" for name in kinds}, cuts


# ---------------------------------------------------------------------------------------------
# The block engine's pieces: the fused (out, lse) merge, and one state shared by plain pieces and
# the Triton kernels' masked steps.
# ---------------------------------------------------------------------------------------------


@interpreted_only
@pytest.mark.parametrize(
    "old_kind, dst_kind",
    [("state", "state"), ("first", "state"), ("state", "answer"), ("first", "answer")],
)
def test_merge_kernel(tf, old_kind, dst_kind):
    """The fused merge against the torch ops, reading the running output from the fp32 state or
    from a first block's output (half dtype, strided as cuDNN returns it) and writing the state or
    the answer (half dtype)."""
    from ringcompile.kernels.merge import merge_block
    from ringcompile.kernels.triton_merge import merge_block_cuda

    g = torch.Generator().manual_seed(5)
    B, H, Sq, D = 2, 3, 70, 24
    state = torch.randn(B, H, Sq, D, generator=g)
    first = torch.randn(B, Sq, H, D, generator=g).to(torch.float16).transpose(1, 2)
    lse = torch.randn(B, H, Sq, generator=g)
    lse[:, :, :5] = float("-inf")  # rows that have seen nothing yet
    blk = torch.randn(B, Sq, H, D, generator=g).transpose(1, 2)  # strided, as cuDNN returns it
    blk_lse = torch.randn(B, H, Sq, 1, generator=g)[..., 0]
    dst_dtype = torch.float32 if dst_kind == "state" else torch.float16
    for start, n, is_first in ((0, Sq, False), (3, 40, False), (10, 50, True)):
        old = state if old_kind == "state" else first
        results = []
        for merge in (merge_block, merge_block_cuda):  # torch ops (CPU), interpreted Triton
            dst = torch.full((B, H, Sq, D), float("nan"), dtype=dst_dtype)
            lse_i = lse.clone()
            merge(old, dst, lse_i, start, blk[:, :, :n], blk_lse[:, :, :n], is_first)
            results.append((dst, lse_i))
        (want, want_lse), (got, got_lse) = results
        rows = slice(start, start + n)
        tol = 1e-6 if dst_dtype == torch.float32 else 1e-3
        torch.testing.assert_close(got[:, :, rows], want[:, :, rows], rtol=tol, atol=tol)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=1e-6)
        assert got[:, :, :start].isnan().all() and got[:, :, start + n :].isnan().all()
        new = torch.logaddexp(lse[:, :, rows], blk_lse[:, :, :n])
        formula = (
            blk[:, :, :n]
            if is_first
            else (
                old[:, :, rows].float() * torch.exp(lse[:, :, rows] - new)[..., None]
                + blk[:, :, :n] * torch.exp(blk_lse[:, :, :n] - new)[..., None]
            )
        )
        torch.testing.assert_close(want[:, :, rows].float(), formula, rtol=tol, atol=tol)


@interpreted_only
@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_engine_shares_state_with_triton_steps(tf, layout):
    """A ring rank's steps, plain ones on the CPU flash kernel and masked ones on (interpreted)
    Triton, in both alternations, with the own block's backward in key halves into fresh dK/dV:
    the reference's answer."""
    from ringcompile.blocks import layout_block_pieces
    from ringcompile.kernels.engine import BlockEngine
    from ringcompile.kernels.registry import KERNELS, KernelPlan

    W, S, rank, B, H, Hkv, D = 4, 128, 1, 1, 4, 2, 16
    lay = make_layout(layout, S, W)
    g = torch.Generator().manual_seed(6)
    n = S // W
    q, dout = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    ks = [torch.randn(B, Hkv, n, D, generator=g) for _ in range(W)]
    vs = [torch.randn(B, Hkv, n, D, generator=g) for _ in range(W)]
    q_pos = lay.positions(rank)
    srcs = [(rank - s) % W for s in range(W)]

    def run(kernels, plain_steps):
        masks = [BlockMask(q_pos=q_pos, k_pos=lay.positions(src), seq_len=S, rules=PositionRules(True),
                           pieces=layout_block_pieces(lay, rank, src, True)
                           if s in plain_steps else None)
                 for s, src in enumerate(srcs)]  # fmt: skip
        state = kernels.forward_init(q)
        for s, src in enumerate(srcs):
            kernels.forward_step(state, q, ks[src], vs[src], masks[s], D**-0.5, last=s == W - 1)
        out, lse = kernels.forward_finish(state, q.dtype)
        prepared = kernels.backward_prepare(out, dout)
        dq = torch.zeros(q.shape)
        dkv = []
        for s, src in enumerate(srcs):
            dk, dv = (
                torch.full(ks[src].shape, float("nan")),
                torch.full(vs[src].shape, float("nan")),
            )
            spans = own_block_key_parts(n) if s == 0 else [(0, n)]
            for lo, hi in spans:
                kernels.backward_step(
                    q,
                    ks[src][:, :, lo:hi],
                    vs[src][:, :, lo:hi],
                    dout,
                    lse,
                    prepared,
                    masks[s].keys(lo, hi),
                    D**-0.5,
                    dq,
                    dk[:, :, lo:hi],
                    dv[:, :, lo:hi],
                    dkv_fresh=True,
                )
            dkv += [dk, dv]
        return [out, lse, dq, *dkv]

    # plain pieces on the CPU's fused kernel, masked blocks on Triton with small tiles
    specs = {spec.name: spec for spec in KERNELS}
    small = replace(
        specs["triton"],
        make=lambda: tf.TritonKernels(tf.FwdConfig(16, 16, 4, 1), tf.BwdConfig(16, 16, 4, 1)),
    )
    engine = BlockEngine(KernelPlan((specs["flash (CPU)"], small, small)))
    want = run(ReferenceKernels(), set())
    for plain_steps in ({0, 2}, {1, 3}, {0, 1, 2, 3}):
        got = run(engine, plain_steps)
        for i, (a, b) in enumerate(zip(got, want)):
            assert not a.isnan().any(), (plain_steps, i)
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=f"{plain_steps} {i}")


@interpreted_only
@pytest.mark.parametrize("dtype, T, batch_positions, padding", [
    (torch.float32, 1, False, False), (torch.float32, 3, True, True),
    (torch.float16, 2, False, True)])  # fmt: skip
def test_decode_split_kernel(dtype, T, batch_positions, padding):
    """The decode partial split over the shard's keys (several splits, a ragged last tile, GQA
    rows of several queries, empty cache slots, padding) against tree decoding's torch path."""
    from ringcompile.kernels.triton_decode import decode_partial
    from ringcompile.masks import POSITION_NONE
    from ringcompile.tree_decode import _local_partial

    _repair_interpreter_scalars()
    g = torch.Generator().manual_seed(T)
    B, H, Hkv, S, D = 2, 8, 2, 150, 32
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    k_pos = torch.randperm(400, generator=g)[:S].repeat(B, 1)
    k_pos[:, -20:] = POSITION_NONE  # empty slots
    q_pos = torch.randint(100, 400, (B, T) if batch_positions else (T,), generator=g)
    if not batch_positions:
        k_pos = k_pos[0]
    valid = torch.rand(B, S, generator=g) < 0.8 if padding else None
    got = decode_partial(q, k, v, 0.3, q_pos, k_pos, valid)
    want = _local_partial(q.float(), k.float(), v.float(), 0.3, valid, q_pos, k_pos, True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:  # the op's fake impl and schema, as a compiled decode graph sees
        torch.library.opcheck(decode_partial, (q, k, v, 0.3, q_pos, k_pos, valid))

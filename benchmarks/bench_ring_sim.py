"""A ring of W virtual ranks on one GPU: how much of the monolithic kernel's speed a ring keeps.

W = 8 ranks, 8192 tokens each (65,536 in all), B=1, H=32, Hkv=8, D=128, bf16, causal. For every
layout, rank r at ring step s attends its queries to the key block of rank (r - s) mod W, with
that pair's BlockMask (positions from ``make_layout(name, S, W).positions(r)``). Steps whose
blocks no query can see (``PositionRules.any_allowed`` is false) cost nothing, as the ring op skips
them. Each (rank, step) is timed alone (median of triton.testing.do_bench, L2 flushed), forward
(forward_step; the first step starts the state, the rank's last visible step writes the output;
the state before each step is the ring's: the second step finds the first's output unmerged where
the engine leaves it so) and backward (backward_step into the ring's gradient sums: dq folded into
fp32 as in the ring's steady state, dK/dV taken in the dtype the ring sends them in after adding
the accumulators that came; step 0, the own block, pays backward_prepare, runs as the ring's two
parts and adds the sum that comes home, all counted at step 0). No communication. Masks carry
a ``positions_key`` as the ring op's do, so tile lists come from the kernels' cache as in a ring.

critical path = sum over steps of the slowest rank's time at that step;
ideal = a monolithic causal kernel on all 65,536 tokens / W: cuDNN's (SDPA, K/V expanded), and
our Triton kernel's; efficiency = ideal / critical path.

The ring's blocks run on the kernels ``--kernels`` names (default both): "auto" is the op's
default (plain blocks on cuDNN, masks carrying their pieces as the op's do), "triton" every
block in Triton.

    PYTHONPATH=. python benchmarks/bench_ring_sim.py [--out DIR] [--kernels auto,triton]
    python benchmarks/bench_ring_sim.py --replot DIR   # the plot from DIR/bench_ring_sim.json
    PYTHONPATH=. python benchmarks/bench_ring_sim.py --steps [--out DIR]

--steps checks the kernels' default tiles on single ring steps instead: each forward step kind
(first or resuming from the state; writing the state or, as the last step, the output) under
the default tiles and the alternatives, and the dk/dv kernel under other launch chunks. The
candidates run interleaved, a few rounds each, and the median of the middle rounds is kept;
``ring_steps.json`` holds every reading.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import torch
import triton
from saving import replot, save_run  # (benchmarks/saving.py: a script's folder is on its path)

from ringcompile.blocks import layout_block_pieces
from ringcompile.kernels import ForwardState, select_kernels
from ringcompile.kernels.grad_sum import GradSum
from ringcompile.kernels.triton import FwdConfig, TritonKernels
from ringcompile.kernels.triton.configs import default_bwd_config, default_fwd_config
from ringcompile.layout import make_layout
from ringcompile.masks import AttentionMask, BlockMask, PositionRules
from ringcompile.ring import LocalRing, RankCall
from ringcompile.ring.backward import dkv_sums, own_block_key_parts, own_part_backward, own_parts

W, LOCAL, H, HKV, D = 8, 8192, 32, 8, 128
S = W * LOCAL
LAYOUTS = ["contiguous", "striped", "zigzag"]
CAUSAL = AttentionMask(PositionRules(causal=True))


def bench(fn):
    # the critical path takes the slowest of 8 medians per step: enough samples (~75 forward,
    # ~25 backward steps) that it is not one rank's noise
    return triton.testing.do_bench(fn, warmup=50, rep=100, return_mode="median")


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def monolithic(kernels, scale):
    q, k, v, dout = rand(1, H, S, D), rand(1, HKV, S, D), rand(1, HKV, S, D), rand(1, H, S, D)
    pos = torch.arange(S, device="cuda")
    mask = BlockMask(q_pos=pos, k_pos=pos, seq_len=S, rules=PositionRules(True))

    def fwd():
        state = kernels.forward_init(q)
        kernels.forward_step(state, q, k, v, mask, scale, last=True)
        return kernels.forward_finish(state, q.dtype)

    out, lse = fwd()
    dq = torch.zeros(q.shape, device="cuda")
    dk = torch.empty(k.shape, device="cuda")
    dv = torch.empty(v.shape, device="cuda")

    def bwd():
        delta = kernels.backward_prepare(out, dout)
        kernels.backward_step(q, k, v, dout, lse, delta, mask, scale, dq, dk, dv, dkv_fresh=True)

    t_fwd = triton.testing.do_bench(fwd, warmup=50, rep=400, return_mode="median")
    t_bwd = triton.testing.do_bench(bwd, warmup=50, rep=600, return_mode="median")
    return t_fwd, t_bwd


def monolithic_cudnn():
    """cuDNN SDPA on the whole sequence (K/V expanded): fwd and bwd medians (the backward's
    gradients of the expanded K/V are not reduced to the KV heads: a little in cuDNN's favour)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = rand(1, H, S, D).requires_grad_()
    k, v = (rand(1, HKV, S, D).repeat_interleave(H // HKV, 1).requires_grad_() for _ in range(2))
    dout = rand(1, H, S, D)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):

        def fwd():
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        t_fwd = triton.testing.do_bench(fwd, warmup=50, rep=400, return_mode="median")
        t_bwd = triton.testing.do_bench(
            lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=50,
            rep=600, return_mode="median")  # fmt: skip
    return t_fwd, t_bwd


def ring(kernels, layout_name, scale):
    lay = make_layout(layout_name, S, W)
    pos = [lay.positions(r, "cuda") for r in range(W)]
    qs = [rand(1, H, LOCAL, D) for _ in range(W)]
    ks = [rand(1, HKV, LOCAL, D) for _ in range(W)]
    vs = [rand(1, HKV, LOCAL, D) for _ in range(W)]
    douts = [rand(1, H, LOCAL, D) for _ in range(W)]
    fwd_t = [[0.0] * W for _ in range(W)]  # [step][rank]
    bwd_t = [[0.0] * W for _ in range(W)]
    for r in range(W):
        q, dout = qs[r], douts[r]
        visible = []
        for s in range(W):
            src = (r - s) % W
            if PositionRules(causal=True).any_allowed(pos[r].cpu(), pos[src].cpu(), S):
                visible.append(s)
        out = rand(1, H, LOCAL, D)
        lse = torch.randn(1, H, LOCAL, device="cuda")
        dq_acc = torch.zeros(q.shape, device="cuda")
        call = RankCall.on(LocalRing(r, W), q, CAUSAL, lay, "auto")
        left_pending = None  # the first step's output, where the engine leaves it unmerged
        for s in visible:
            src = (r - s) % W
            k, v = ks[src], vs[src]
            # keyed as the ring op keys its masks, so tile lists are cached as there
            mask = BlockMask(q_pos=pos[r], k_pos=pos[src], seq_len=S, rules=PositionRules(True),
                             positions_key=(layout_name, W, r, src),
                             pieces=layout_block_pieces(lay, r, src, True))  # fmt: skip
            first, last = s == visible[0], s == visible[-1]
            state_out = torch.zeros(q.shape, device="cuda")
            state_lse = torch.zeros(q.shape[:3], device="cuda")
            pending = left_pending if len(visible) > 1 and s == visible[1] else None

            def fwd():
                # a state as the ring has it before this step
                state = ForwardState(
                    q.shape,
                    state_lse,
                    None if first or pending is not None else state_out,
                    steps=0 if first else 1,
                    pending=pending,
                )
                kernels.forward_step(state, q, k, v, mask, scale, last=last)
                return state

            if first:
                left_pending = fwd().pending
            # dK/dV as the ring sends them: the first hop's may be in the inputs' dtype; later
            # steps add the accumulators that came (fp32); the own block adds the sum that comes
            # home and gives dK/dV in the inputs' dtype
            hop = torch.float32
            if s == 1:
                hop = call.first_hop_dtype(r, kernels.fused_plain, q.dtype, torch.float32)
            came = [torch.randn(k.shape, device="cuda") for _ in range(2)] if s != 1 else None
            parts = own_parts(kernels, mask, k.shape, W) if s == 0 else []

            def bwd():
                delta = kernels.backward_prepare(out, dout) if first else delta_once
                # dq as in the ring's steady state: each step's contribution folded into fp32
                dq = GradSum.over(dq_acc)
                dkv = dkv_sums(k, v, torch.float32)
                for part in parts:  # the own block, as the ring's two parts
                    own_part_backward(kernels, part, q, k, v, dout, out, lse, delta, mask, scale,
                                      dq, *dkv)  # fmt: skip
                if not parts:
                    kernels.backward_step(q, k, v, dout, lse, delta, mask, scale, dq, *dkv)
                dq.flush()
                for d, c in zip(dkv, came or ()):
                    d.add(c)
                return [d.result(q.dtype if parts else hop) for d in dkv]

            delta_once = kernels.backward_prepare(out, dout)
            fwd_t[s][r] = bench(fwd)
            bwd_t[s][r] = bench(bwd)
    return fwd_t, bwd_t


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    bars_of = [(kern, mode) for kern in results["kernels"] for mode in ("fwd", "fwd+bwd")]
    width = 0.8 / len(bars_of)
    xs = range(len(LAYOUTS))
    for i, (kern, mode) in enumerate(bars_of):
        vals = [100 * results[kern][name][mode]["vs_cudnn"] for name in LAYOUTS]
        bars = ax.bar([x + (i - (len(bars_of) - 1) / 2) * width for x in xs], vals, width,
                      label=f"{kern} blocks, {mode}")  # fmt: skip
        ax.bar_label(bars, fmt="%.1f%%", fontsize=7)
    ax.set_xticks(list(xs), LAYOUTS)
    ax.set_ylabel("cuDNN monolithic / W over critical path (%)")
    ax.set_ylim(0, 110)
    ax.set_title(f"ring of {W} virtual ranks, {LOCAL} tokens each, causal, H=32 Hkv=8 D=128 bf16",
                 fontsize=9)  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def interleaved(fns, rounds):
    """Median-of-the-middle-rounds time of each named function, the functions taking turns."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100,
                                                       return_mode="median"))  # fmt: skip
    mid = {n: sorted(t)[(rounds - 1) // 2 : rounds // 2 + 1] for n, t in times.items()}
    return {n: sum(m) / len(m) for n, m in mid.items()}, times


def tiles(cfg):
    return f"F({cfg.block_m}, {cfg.block_n}, {cfg.num_warps}, {cfg.num_stages})"


def step_block(layout_name, local, rank, src):
    """Rank ``rank``'s queries against rank ``src``'s keys in a ring of W, ``local`` tokens each."""
    lay = make_layout(layout_name, W * local, W)
    return BlockMask(q_pos=lay.positions(rank, "cuda"), k_pos=lay.positions(src, "cuda"),
                     seq_len=W * local, rules=PositionRules(True),
                     positions_key=(layout_name, W, local, rank, src))  # fmt: skip


def step_tiles(out_dir):
    scale = D**-0.5
    report = {"fwd": [], "bwd": []}
    blocks = [("striped", LOCAL, 3, 2), ("zigzag", LOCAL, 3, 1), ("zigzag", LOCAL, 1, 3),
              ("striped", LOCAL // 2, 3, 2), ("striped", 2 * LOCAL, 3, 2)]  # fmt: skip
    alternatives = [FwdConfig(128, 128, 8, 3), FwdConfig(128, 64, 4, 2), FwdConfig(256, 64, 8, 3)]
    print("forward, ms: default tiles and alternatives per step kind", flush=True)
    for block in blocks:
        mask, local = step_block(*block), block[1]
        q, k, v = rand(1, H, local, D), rand(1, HKV, local, D), rand(1, HKV, local, D)
        state_out = torch.zeros(q.shape, device="cuda")
        state_lse = torch.zeros(q.shape[:3], device="cuda")
        for first in (True, False):
            for last in (False, True):
                default = default_fwd_config(D, q.dtype, local, local, last)
                cfgs = {f"default {tiles(default)}": default}
                cfgs.update({tiles(c): c for c in alternatives if c != default})

                def fwd(cfg, first=first, last=last):
                    kernels = TritonKernels(fwd_config=cfg)

                    def run():
                        state = ForwardState(q.shape, state_lse,
                                                   None if first else state_out,
                                                   steps=0 if first else 1)  # fmt: skip
                        kernels.forward_step(state, q, k, v, mask, scale, last=last)

                    return run

                ms, times = interleaved({n: fwd(c) for n, c in cfgs.items()}, rounds=2)
                kind = ("first" if first else "resume") + (" + last" if last else "")
                report["fwd"].append(dict(block=block, kind=kind, ms=ms, times=times))
                cells = " | ".join(f"{n}: {t:.3f}" for n, t in ms.items())
                print(f"{block} {kind}: {cells}", flush=True)
    print("dk/dv kernel, ms: KV heads per launch chunk", flush=True)
    own = step_block("striped", LOCAL, 3, 3)
    half = own_block_key_parts(LOCAL)[0]
    for name, mask, keys in [("striped 3<-2", step_block("striped", LOCAL, 3, 2), (0, LOCAL)),
                             ("zigzag 3<-1", step_block("zigzag", LOCAL, 3, 1), (0, LOCAL)),
                             ("own block, later keys", own.keys(*half), half)]:  # fmt: skip
        lo, hi = keys
        q, dout, out = rand(1, H, LOCAL, D), rand(1, H, LOCAL, D), rand(1, H, LOCAL, D)
        k, v = rand(1, HKV, hi - lo, D), rand(1, HKV, hi - lo, D)
        lse = torch.randn(1, H, LOCAL, device="cuda")
        dq = torch.zeros(q.shape, device="cuda")
        dk, dv = torch.empty(k.shape, device="cuda"), torch.empty(v.shape, device="cuda")
        delta = TritonKernels().backward_prepare(out, dout)
        base = default_bwd_config(D, q.dtype, True, True)

        def bwd(chunk):
            kernels = TritonKernels(bwd_config=replace(base, heads_per_chunk=chunk))
            return lambda: kernels.backward_step(q, k, v, dout, lse, delta, mask, scale, dq, dk,
                                                 dv, dkv_fresh=True)  # fmt: skip

        ms, times = interleaved({str(c or "default"): bwd(c) for c in (None, 2, 4, 8)}, rounds=4)
        report["bwd"].append(dict(block=name, ms=ms, times=times))
        print(f"{name}: " + " | ".join(f"{n}: {t:.3f}" for n, t in ms.items()), flush=True)
    with open(os.path.join(out_dir, "ring_steps.json"), "w") as f:
        json.dump(report, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--replot", metavar="DIR")
    ap.add_argument("--steps", action="store_true", help="check the default tiles on ring steps")
    ap.add_argument("--kernels", default="auto,triton", help="block kernel choices to ring")
    args = ap.parse_args()
    if args.replot:
        replot(args.replot, "bench_ring_sim", plot)
        return
    if args.steps:
        step_tiles(args.out)
        return
    scale = D**-0.5
    print(f"torch {torch.__version__} triton {triton.__version__} cudnn "
          f"{torch.backends.cudnn.version()} device {torch.cuda.get_device_name()}", flush=True)  # fmt: skip
    flops_fwd = 4 * H * S * S * D / 2
    ideals = {}
    for name, (t_fwd, t_bwd) in (("cudnn", monolithic_cudnn()),
                                 ("triton", monolithic(TritonKernels(), scale))):  # fmt: skip
        torch.cuda.empty_cache()
        ideals[name] = {"fwd": t_fwd / W, "fwd+bwd": (t_fwd + t_bwd) / W}
        print(f"monolithic {name} S={S}: fwd {t_fwd:.2f} ms ({flops_fwd / t_fwd * 1e-9:.0f} TFLOP/s),"
              f" fwd+bwd {t_fwd + t_bwd:.2f} ms "
              f"({3.5 * flops_fwd / (t_fwd + t_bwd) * 1e-9:.0f} TFLOP/s)", flush=True)  # fmt: skip
    results = {"ideal_ms": ideals, "kernels": args.kernels.split(",")}
    probe = rand(1, H, LOCAL, D)
    for kern in results["kernels"]:
        kernels = select_kernels(probe, kern)
        results[kern] = {}
        for name in LAYOUTS:
            fwd_t, bwd_t = ring(kernels, name, scale)
            torch.cuda.empty_cache()
            crit_fwd = sum(max(row) for row in fwd_t)
            # the backward is a second pass around the ring: its critical path adds to the forward's
            crit_all = crit_fwd + sum(max(row) for row in bwd_t)
            res = {"fwd_ms": fwd_t, "bwd_ms": bwd_t}
            for mode, crit in (("fwd", crit_fwd), ("fwd+bwd", crit_all)):
                res[mode] = {"critical_ms": crit, "vs_cudnn": ideals["cudnn"][mode] / crit,
                             "vs_triton": ideals["triton"][mode] / crit}  # fmt: skip
            results[kern][name] = res
            print(f"{kern} blocks, {name}: fwd critical {crit_fwd:.2f} ms, fwd+bwd {crit_all:.2f} ms"
                  f" ({100 * res['fwd+bwd']['vs_cudnn']:.1f}% of cuDNN's ideal, "
                  f"{100 * res['fwd+bwd']['vs_triton']:.1f}% of Triton's)", flush=True)  # fmt: skip
    save_run(
        args.out,
        "bench_ring_sim",
        results,
        lambda: plot(results, os.path.join(args.out, "bench_ring_sim.png")),
    )

    print("\n| blocks | mode | cuDNN ideal | Triton ideal | " + " | ".join(LAYOUTS) + " |")
    print("|---|---|---|---|" + "---|" * len(LAYOUTS))
    for kern in results["kernels"]:
        for mode in ("fwd", "fwd+bwd"):
            cells = [
                f"{results[kern][n][mode]['critical_ms']:.1f} ms "
                f"({100 * results[kern][n][mode]['vs_cudnn']:.1f}% / "
                f"{100 * results[kern][n][mode]['vs_triton']:.1f}%)"
                for n in LAYOUTS
            ]
            print(
                f"| {kern} | {mode} | {ideals['cudnn'][mode]:.1f} ms | "
                f"{ideals['triton'][mode]:.1f} ms | " + " | ".join(cells) + " |"
            )


if __name__ == "__main__":
    main()

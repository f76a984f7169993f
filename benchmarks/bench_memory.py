"""Per-rank peak GPU memory of a compiled transformers Llama at W = 1, 2, 4, 8 on a long sequence.

One rank of a ring of W is run alone on one GPU with torch.distributed's ``fake`` process group:
collectives and P2P move nothing (the numbers computed are garbage), but every buffer a real rank
allocates, its shards, the K/V blocks in flight, gathered outputs, is allocated with its real size,
so ``torch.cuda.max_memory_allocated`` is that rank's peak. Each W runs in its own process.

Model: ``LlamaForCausalLM`` from a random config (``--layers``, hidden 1024, 16 heads, 4 KV heads,
``--vocab`` tokens), bf16, batch 1, ``--seq`` tokens, compiled with ``backend="ring"`` (inner
compiler ``aot_eager``; ``--no-gather``: ``gather_outputs=False``), forward with the model's own
``labels`` loss (kept sharded by the ring) + backward. ``eager`` is the uncompiled model on one
GPU. The table's bound is the target for everything that scales with the sequence:
1.1 x (W = 1 peak - params) / W + params.

    PYTHONPATH=. python benchmarks/bench_memory.py [--seq 32768] [--vocab 32000] [--no-gather]
        [--worlds 1 2 4 8] [--out DIR]
    python benchmarks/bench_memory.py --replot A/bench_memory.json B/bench_memory.json ...
        [--out DIR]   # DIR/bench_memory.png: peak per rank against W, one line per run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import torch


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--no-gather", action="store_true", help="gather_outputs=False")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "eager" or W: one run
    p.add_argument("--replot", nargs="+", metavar="JSON", help="draw these runs' JSON files")
    return p.parse_args()


def build(layers, vocab, device, dtype):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1 << 20,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def one_run(args) -> dict:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.layers, args.vocab, device, dtype)
    ids = torch.randint(0, args.vocab, (1, args.seq), device=device)
    if args.one != "eager":
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        import ringcompile  # noqa: F401  (registers backend="ring" in a checkout not pip-installed)

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=int(args.one))
        model = torch.compile(
            model,
            backend="ring",
            options={"compiler": "aot_eager", "gather_outputs": not args.no_gather},
        )
    params = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    for _ in range(2):  # the second step is measured: compilation is done by then
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        del out
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return {"peak_gib": peak / 2**30, "params_gib": params / 2**30}


def plot(paths: list[str], out: str) -> None:
    """Peak memory per rank against the ring size, log-log, one line per run; runs that went out
    of memory at some W leave those points out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        rows = {int(w): r for w, r in run["rows"].items() if w != "eager" and "peak_gib" in r}
        worlds = sorted(rows)
        tokens = re.search(r"(\d+) tokens", run["setup"]).group(1)
        vocab = re.search(r"vocab (\d+)", run["setup"]).group(1)
        label = f"{int(tokens):,} tokens, vocabulary {int(vocab):,}"
        (line,) = ax.plot(worlds, [rows[w]["peak_gib"] for w in worlds], "o-", label=label)
        for w in worlds:
            ax.annotate(
                f"{rows[w]['peak_gib']:.1f}",
                (w, rows[w]["peak_gib"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
        if 1 in rows:  # everything that scales with the sequence falls as 1/W
            base, params = rows[1]["peak_gib"], rows[1]["params_gib"]
            ax.plot(
                worlds,
                [(base - params) / w + params for w in worlds],
                ":",
                color=line.get_color(),
                linewidth=1,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("ring size W (one rank each; fake process group)")
    ax.set_ylabel("peak GiB per rank")
    ax.set_title(
        "Per-rank peak memory, Llama fwd+bwd with its labels= loss, gather_outputs=False\n"
        "dotted: (W = 1 peak - params) / W + params",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench_memory.png"), dpi=110)


def main():
    args = _parse()
    if args.replot:
        plot(args.replot, args.out)
        return
    if args.one is not None:
        print(json.dumps(one_run(args)))
        return
    rows = {}
    for which in ["eager"] + [str(w) for w in args.worlds]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            which,
            "--seq",
            str(args.seq),
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
        ]
        cmd += ["--no-gather"] if args.no_gather else []
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            rows[which] = {"error": run.stderr.strip().splitlines()[-1][:300]}
        else:
            rows[which] = json.loads(run.stdout.strip().splitlines()[-1])
        print(which, rows[which], flush=True)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    head = (f"LlamaForCausalLM, {args.layers} layers, hidden 1024, 16/4 heads, vocab {args.vocab}, "
            f"bf16, {args.seq} tokens, fwd+bwd with labels, gather_outputs={not args.no_gather}; "
            f"{name}, torch {torch.__version__}")  # fmt: skip
    lines = [head, "", "| run | peak GiB per rank | of which params | peak - params | bound |",
             "|---|---|---|---|---|"]  # fmt: skip
    one = rows.get("1", {})
    for which, r in rows.items():
        label = "eager, one GPU" if which == "eager" else f"ring W={which}"
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | |")
            continue
        bound = ""
        if which != "eager" and "peak_gib" in one:
            b = 1.1 * (one["peak_gib"] - one["params_gib"]) / int(which) + one["params_gib"]
            bound = f"{b:.2f} ({'met' if r['peak_gib'] <= b else 'missed'})"
        lines.append(f"| {label} | {r['peak_gib']:.2f} | {r['params_gib']:.2f} | "
                     f"{r['peak_gib'] - r['params_gib']:.2f} | {bound} |")  # fmt: skip
    print("\n".join(lines))
    with open(os.path.join(args.out, "bench_memory.json"), "w") as f:
        json.dump({"setup": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

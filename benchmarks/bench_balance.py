"""How evenly each layout spreads packed documents over a ring: pairs per rank on random packs.

No GPU and no timing: the work of a ring call is the (query, key) pairs each rank's queries see
in each step (``ringcompile.ring.balance``), counted exactly from the documents. For each ring
size, sequence length and document-length range, ``--draws`` random packs; per layout, the mean
and the worst over the draws of

- max / mean pairs per rank (the busiest rank's whole call against the mean), and
- each step's slowest rank, summed, over the mean rank's call (what the ring's critical path
  costs: every step waits for its slowest rank).

  python benchmarks/bench_balance.py                      # 32k and 128k, ranks 2 to 8
  python benchmarks/bench_balance.py --window 4096        # causal sliding window inside documents
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.saving import save_run  # noqa: E402
from ringcompile.layout import make_layout  # noqa: E402
from ringcompile.masks import PositionRules  # noqa: E402
from ringcompile.ring.balance import Balance, pairs_per_step  # noqa: E402

LAYOUTS = ("contiguous", "striped", "zigzag")


def random_pack(S: int, shortest: int, longest: int, g: torch.Generator) -> torch.Tensor:
    """(1, S) document ids: documents of uniformly drawn lengths, the last one cut at S."""
    lengths = []
    while sum(lengths) < S:
        lengths.append(int(torch.randint(shortest, longest + 1, (), generator=g)))
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:S][None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--docs", nargs="+", default=["1024-4096", "128-1024"],
                   help="document length ranges, shortest-longest")  # fmt: skip
    p.add_argument("--window", type=int, default=0, help="a causal sliding window too (0: none)")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--out", default="benchmarks/runs")
    args = p.parse_args()
    rules = PositionRules.of(True, (args.window - 1, -1) if args.window else None)

    rows = []
    print(f"rules: {rules}; {args.draws} random packs each; mean (worst) over the packs")
    print(f"{'S':>7} {'W':>2} {'documents':>10}  " + "  ".join(
        f"{name + ' rank / step':>26}" for name in LAYOUTS))  # fmt: skip
    for S in args.seqs:
        for W in args.worlds:
            for docs in args.docs:
                shortest, longest = (int(x) for x in docs.split("-"))
                g = torch.Generator().manual_seed(S + W)
                packs = [random_pack(S, shortest, longest, g) for _ in range(args.draws)]
                row = {"seq_len": S, "world": W, "documents": docs}
                cells = []
                for name in LAYOUTS:
                    lay = make_layout(name, S, W)
                    found = []
                    for doc in packs:
                        sharded = torch.cat([lay.shard(doc, 1, r) for r in range(W)], 1)
                        found.append(Balance(name, pairs_per_step(lay, rules, sharded)))
                    rank = torch.tensor([b.imbalance for b in found])
                    step = torch.tensor([b.step_bound for b in found])
                    row[name] = {"rank_mean": float(rank.mean()), "rank_worst": float(rank.max()),
                                 "step_mean": float(step.mean()), "step_worst": float(step.max())}  # fmt: skip
                    cells.append(f"{rank.mean():.3f} ({rank.max():.3f}) / "
                                 f"{step.mean():.3f} ({step.max():.3f})")  # fmt: skip
                rows.append(row)
                print(f"{S:>7} {W:>2} {docs:>10}  " + "  ".join(f"{c:>26}" for c in cells),
                      flush=True)  # fmt: skip
    name = "bench_balance" + (f"_window{args.window}" if args.window else "")
    save_run(args.out, name, {"rules": str(rules), "draws": args.draws, "rows": rows}, lambda: None)


if __name__ == "__main__":
    main()

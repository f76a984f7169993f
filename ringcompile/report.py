"""What the backend did to each graph, as a reader wants to see it (``ringcompile.explain``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx


def readable_code(gm: torch.fx.GraphModule) -> str:
    """The graph's Python code without FX's bookkeeping: no ``x = None`` frees, no comments, no
    ``l_x = L_x`` input aliases, inputs counted in the signature rather than listed."""
    inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    lines = []
    for line in gm.code.splitlines():
        line = line.split(";  ")[0].rstrip()
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("def forward("):
            line = f"def forward(self, *inputs):  # {inputs} inputs"
        elif re.fullmatch(r"(\w+) = L_\w+", stripped):
            continue
        lines.append(line.replace("ringcompile_runtime_", ""))
    return "\n".join(lines)


@dataclass
class GraphReport:
    """One compiled graph: every rewrite and fallback, and the rewritten code."""

    seq_len: int = 0
    world_size: int = 1
    layout: str = ""
    attention: list[str] = field(default_factory=list)  # SDPA calls made ring attention
    lifted: list[str] = field(default_factory=list)  # masks and K/V expansions recognised
    rows: list[str] = field(default_factory=list)  # rows flattened with the batch put back
    positions: list[str] = field(default_factory=list)  # position tensors fixed
    shards: list[str] = field(default_factory=list)  # full tensors sharded where they enter
    # inputs an earlier graph left for this one (sharded, a mask's facts, document ids derived
    # from position ids), and how this graph takes them
    arrived: list[str] = field(default_factory=list)
    input_check: str = "never"  # when every rank's inputs are compared (the check_inputs option)
    checked_inputs: list[str] = field(default_factory=list)  # the inputs compared
    gathers: list[str] = field(default_factory=list)  # sharded values gathered, and why
    reductions: list[str] = field(default_factory=list)  # reductions over the sequence kept local
    fallbacks: list[str] = field(default_factory=list)  # what was left unsharded, and why
    left: list[str] = field(default_factory=list)  # outputs left for a later graph, and how
    gradients: list[str] = field(default_factory=list)
    # (what the lines are, the attention calls, what their queries are, a line per ring step of
    # this rank or for Ulysses' attention)
    steps: list[tuple[str, list[str], str, list[str]]] = field(default_factory=list)
    code: str = ""

    def __str__(self) -> str:
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        if self.seq_len:
            head = (
                f"ring graph: sequence of {self.seq_len} tokens over {ranks}, {self.layout} layout"
            )
        else:
            # (a recurrence over the sequence, as gated DeltaNet's, before any attention layer)
            head = (f"ring graph: no sequence to shard (no attention call, no input an earlier "
                    f"graph left sharded), {ranks}: each computes all of it")  # fmt: skip
        lines = [head]
        for title, items in (
            ("attention replaced", self.attention),
            ("attention inputs recognised", self.lifted),
            ("rows kept as (batch, sequence)", self.rows),
            ("positions fixed", self.positions),
            ("sharded where they enter", self.shards),
            ("arrived from an earlier graph", self.arrived),
            (f"inputs compared across the ring ({self.input_check})", self.checked_inputs),
            ("gathered", self.gathers),
            ("reductions kept sharded", self.reductions),
            ("fallbacks", self.fallbacks),
            ("left for a later graph", self.left),
            ("gradients", self.gradients),
        ):
            if not items and title in self._SHOWN_IF_ANY:
                continue
            lines.append(f"{title}: {len(items) if items else 'none'}")
            lines += [f"  - {item}" for item in items]
            if title == "attention replaced":
                lines += self._step_lines()
        lines += ["rewritten graph:", self.code.rstrip()]
        return "\n".join(lines)

    # sections about values that cross graph breaks, shown where there are some
    _SHOWN_IF_ANY = ("arrived from an earlier graph", "left for a later graph")

    def _step_lines(self) -> list[str]:
        """Each attention kind's ring steps on this rank, or its Ulysses attention: block kind and
        the kernel computing it."""
        lines = []
        for title, names, head, steps in self.steps:
            lines.append(f"{title} ({', '.join(names)}; {head}):")
            lines += [f"  - {s}" for s in steps]
        return lines


@dataclass
class ExplainReport:
    """Every graph one call of the compiled model produced (graph breaks make several)."""

    graphs: list[GraphReport] = field(default_factory=list)
    # values left sharded that Python code between the graphs read, so gathered (and by what)
    python_gathers: list[str] = field(default_factory=list)
    # each ring call's work per rank on this call's data (``ring.balance``): line -> calls
    balance: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.graphs:
            return "no graph was compiled"
        parts = ["\n\n".join(
            f"=== graph {i} of {len(self.graphs)} ===\n{g}" for i, g in enumerate(self.graphs, 1)
        )]  # fmt: skip
        if len(self.graphs) > 1 or self.python_gathers:
            gathers = [f"  - {g}" for g in self.python_gathers]
            parts += ["", "=== between the graphs ===",
                      f"gathered for Python code: {len(gathers) or 'none'}", *gathers]  # fmt: skip
        if self.balance:
            parts += ["", "=== work per rank on this call's data ==="]
            parts += [f"  - {n} ring call{'s' if n > 1 else ''}: {line}"
                      for line, n in self.balance.items()]  # fmt: skip
        return "\n".join(parts)

"""The ring: exact SDPA over a sequence sharded across a process group.

Each rank holds its queries, keys and values for its tokens of the global sequence (which tokens
is the layout's business). K/V blocks travel around the ring (rank r sends to r + 1, receives from
r - 1) while each rank merges attention of its queries over every block it sees, through
log-sum-exp. The whole ring, forward and backward, is one ``torch.library`` op with its own
autograd (``op.py``), so every rank issues the same sends and receives in the same order whatever
the compiler does around it.

The modules, in the order a call meets them:

- ``plan.py``: which steps run and what each step's block is (plain pieces or masked), from the
  layout and the mask's options alone, so all ranks agree on it without talking; ``explain.py``
  says it in words;
- ``call.py``: one rank's part of one call (``RankCall``): the mask's facts as the kernels read
  them, what travels, each step's ``BlockMask``;
- ``forward.py`` and ``backward.py``: the schedules; ``empty_rows.py``: the correction for rows
  that see no key under a mask that gives them the mean of every value;
- ``comm.py``: the ``Ring`` they talk through: a process group's (``GroupRing``), or none
  (``LocalRing``: one rank computed alone, as the benchmarks and the ring simulator use it);
- ``events.py``: what the ops did, counted for whoever listens (``count_ring_events``);
- ``balance.py``: each rank's work on a call's data, step by step, for ``explain``.

The compute of each step is the kernels' business (``ringcompile.kernels``).
"""

from ringcompile.ring.call import RankCall
from ringcompile.ring.comm import GroupRing, LocalRing, Ring
from ringcompile.ring.events import RingCounts, count_ring_events
from ringcompile.ring.explain import describe_steps
from ringcompile.ring.op import ring_attention_backward_op, ring_attention_op
from ringcompile.ring.plan import Step, StepPlan, rank_steps, step_plan

__all__ = [
    "GroupRing",
    "LocalRing",
    "RankCall",
    "Ring",
    "RingCounts",
    "Step",
    "StepPlan",
    "count_ring_events",
    "describe_steps",
    "rank_steps",
    "ring_attention_backward_op",
    "ring_attention_op",
    "step_plan",
]

"""Reductions over the sequence stay sharded (pass ``shard_reductions``): a loss computed inside
the compiled model reads each rank's rows, and the result equals one process's in float64."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from expecttest import assert_expected_inline

from ringcompile import RingInputMismatchError
from ringcompile.backend import _compile
from ringcompile.testing_models import TinyTransformer

TOL = 1e-10
V = 64


class WithLoss(torch.nn.Module):
    """A small transformer whose forward returns a loss over the sequence of its logits."""

    def __init__(self, kind: str):
        super().__init__()
        self.model = TinyTransformer(vocab=V)
        self.kind = kind

    def forward(self, tokens, labels):
        logits = self.model(tokens)
        if self.kind in ("mean", "sum"):
            # transformers' causal-LM loss: labels shifted on the full tensor, rows = the sequence
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
            return F.cross_entropy(
                logits.view(-1, V), shifted.view(-1), ignore_index=-100, reduction=self.kind
            )
        if self.kind == "mean_all":
            return logits.mean()
        return (logits * logits).sum(1).sum()  # the sequence dim, then the rest (a full value)


def compare(rank, world, kind, S, layout, batch=1):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = WithLoss(kind).double()
    tokens = torch.randint(0, V, (batch, S))
    labels = tokens.clone()
    labels[0, :4] = -100

    def step(m):
        model.zero_grad()
        loss = m(tokens, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = step(model)
    reports = []
    loss, grads = step(_compile(model, {"compiler": "aot_eager", "layout": layout}, {}, reports))
    errs = {"loss": float((loss - ref).abs() / ref.abs())}
    errs.update({n: float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items()})
    return errs, reports


CASES = [
    ("mean", 2, 16, "zigzag", 1),
    ("sum", 3, 17, "striped", 1),
    ("mean", 4, 18, "zigzag", 1),
    ("mean", 3, 17, "zigzag", 2),
    ("mean_all", 3, 16, "zigzag", 1),
    ("sum_seq", 2, 15, "striped", 1),
]


@pytest.mark.parametrize("kind, world, S, layout, batch", CASES)
def test_loss_matches_one_process(gloo, kind, world, S, layout, batch):
    results = gloo(world).run(compare, kind, S, layout, batch)
    for rank, (errs, _) in enumerate(results):
        bad = {k: v for k, v in errs.items() if not v < TOL}
        assert not bad, f"rank {rank}: {bad}"
    (graph,) = results[0][1]
    assert graph.gathers == [], graph.gathers  # nothing of size S x vocab moves
    assert len(graph.reductions) == 1, graph.reductions


def test_report_and_graph(gloo):
    (_, (graph,)), _ = gloo(2).run(compare, "mean", 16, "zigzag")
    (line,) = graph.reductions
    assert line.startswith("cross_entropy (cross_entropy (mean)) at ") and line.endswith(
        ": each rank's rows of view_4 (dim 0), summed over the ring"
    ), line
    # the loss reads the local logits and the full shifted labels; nothing is gathered
    code = [x.strip() for x in graph.code.splitlines()]
    tail = code[next(i for i, x in enumerate(code) if x.startswith("logits = ")) :]
    assert_expected_inline(
        "\n".join(tail),
        """\
logits = torch._C._nn.linear(rms_norm_4, sum_grad_over_ring_20, None)
pad = torch._C._nn.pad(l_labels_, (0, 1), 'constant', -100)
getitem_14 = pad[(Ellipsis, slice(1, None, None))]
shifted = getitem_14.contiguous()
view_4 = logits.view(-1, 64)
view_5 = shifted.view(-1)
cross_entropy = ring_cross_entropy(view_4, view_5, ignore_index = -100, reduction = 'mean')
scale_grad = scale_grad(cross_entropy, 0.5)
return (scale_grad,)""",
    )


def labels_differ(rank, world):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = WithLoss("mean").double()
    tokens = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[0, rank] = -100  # each rank ignores another label
    try:
        torch.compile(model, backend="ring", options={"compiler": "eager"})(tokens, labels)
    except RingInputMismatchError as e:
        return str(e)
    return None


def test_labels_must_agree(gloo):
    # each rank reads its own rows of the labels: ranks given different labels all raise
    msgs = gloo(2).run(labels_differ, timeout=120)
    assert msgs[0] == msgs[1] and "input labels differs in its values" in msgs[0], msgs

"""Every mistake a new user makes gets a clear message, on every rank, instead of wrong numbers or
silence: ranks fed different inputs, ``torchrun`` without a process group, a model with nothing
to shard (bad options: ``test_backend.test_bad_options``); a run of the backend prints no
deprecation warnings, and the README's whole program runs."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import ringcompile
from ringcompile import RingInputMismatchError, RingWarning, ring_attention
from ringcompile.testing_models import TinyTransformer


def given_inputs(rank, world, cases, dynamic=False):
    """For each (check_inputs, calls): each call's outcome on this rank, "ok" or the mismatch
    error's message. A call gives every rank the same tokens ("same"), each rank its own
    ("own"), the same but on rank 1 ("odd"), or a longer sequence on rank 1 ("longer")."""
    outcomes = []
    for mode, calls in cases:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyTransformer(layers=1).double()
        compiled = torch.compile(
            model,
            backend="ring",
            dynamic=dynamic,
            options={"compiler": "eager", "check_inputs": mode},
        )
        outcome = []
        for i, kind in enumerate(calls):
            seed = 10 * i + (rank if kind == "own" else int(kind == "odd" and rank == 1))
            S = 16 + 4 * (kind == "longer" and rank == 1)
            tokens = torch.randint(0, 64, (2, S), generator=torch.Generator().manual_seed(seed))
            try:
                compiled(tokens)
                outcome.append("ok")
            except RingInputMismatchError as e:
                outcome.append(str(e))
        outcomes.append(outcome)
    return outcomes


FIX = (
    "every rank of the ring must be given the same full inputs: feed every rank of the ring "
    "the same batch"
)


def test_ranks_given_different_inputs_raise_on_every_rank(gloo):
    """Each rank its own batch (a DistributedSampler over the ring's ranks): every rank raises the
    same error naming the input, which ranks differ and the fix; "never" lets it through."""
    cases = [("first_call", ["own"]), ("first_call", ["longer"]), ("never", ["own"])]
    results = gloo(2).run(given_inputs, cases, timeout=120)
    assert results[0] == results[1]  # the same message on every rank
    (own,), (longer,), unchecked = results[0]
    assert "were given different inputs (checked on the first call)" in own
    assert (
        "\n  - input tokens differs in its values: rank 0 holds one tensor, rank 1 another" in own
    )
    assert FIX in own and "never over the ring's ranks" in own
    assert (
        "the ranks of the ring run different compiled graphs, so they would issue different "
        "collectives: rank 0: tokens (2, 16); rank 1: tokens (2, 20)"
    ) in longer
    assert unchecked == ["ok"]


def test_a_length_that_changes_on_one_rank_later_raises_on_every_rank(gloo):
    """Both ranks run a graph at 16 tokens; then rank 1 alone is given 20, compiles a new graph
    and would run its first check while rank 0 reuses its checked graph and enters the ring (gloo
    aborted, NCCL hangs). Every call starts with the same header, so every rank raises, naming the
    input and each rank's shape; the next call with equal inputs runs again."""
    for dynamic in (False, None):  # a static graph per length, or torch's symbolic recompile
        results = gloo(2).run(given_inputs, [("first_call", ["same", "longer", "same"])], dynamic,
                              timeout=180)  # fmt: skip
        assert results[0] == results[1], results
        ((first, longer, again),) = results[0]
        assert first == again == "ok"
        assert (
            "run different compiled graphs, so they would issue different collectives: "
            "rank 0: tokens (2, 16); rank 1: tokens (2, 20)"
        ) in longer, longer


def test_every_call_checks_every_call(gloo):
    """By default only each compiled graph's first call is checked; every_call checks each."""
    cases = [("every_call", ["same", "odd"]), ("first_call", ["same", "odd"])]
    results = gloo(3).run(given_inputs, cases, timeout=120)
    assert results[0] == results[1] == results[2]
    (every_first, every_second), first_call = results[0]
    assert every_first == "ok"
    assert "(checked on every call)" in every_second
    assert "input tokens differs in its values: ranks 0, 2 hold one tensor, rank 1 another" in (
        every_second
    )
    assert first_call == ["ok", "ok"]


def built_with_seed_of_rank(rank, world, changed: str):
    """A model built after ``torch.manual_seed(rank)`` ("all": every weight differs), or the same
    model with one buffer changed on rank 1 ("buffer"): the error each rank raises, or "ok"."""
    torch._dynamo.reset()
    torch.manual_seed(rank if changed == "all" else 0)
    model = TinyTransformer(layers=1).double()
    if changed == "buffer" and rank == 1:
        model.inv_freq.mul_(1.5)
    compiled = torch.compile(model, backend="ring", options={"compiler": "eager"})
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        compiled(tokens)
        compiled(tokens)  # a second call is not checked again, and runs
    except RingInputMismatchError as e:
        return str(e)
    return "ok"


def test_ranks_holding_different_weights_raise_on_every_rank(gloo):
    """Each rank built its model from its own seed: every rank raises the same error naming the
    parameters that differ and the fix (before, outputs were off by up to 3.25, silently)."""
    for changed in ("all", "buffer"):
        results = gloo(2).run(built_with_seed_of_rank, changed, timeout=120)
        assert results[0] == results[1], results  # the same message on every rank
        message = results[0]
        assert "hold different parameters or buffers (checked on the first call)" in message
        assert "the same torch.manual_seed before building it" in message
        if changed == "all":
            assert (
                "\n  - parameter or buffer embed.weight differs in its values: rank 0 holds "
                "one tensor, rank 1 another"
            ) in message
            assert re.search(r"and \d+ more", message), message
        else:
            assert message.count("differs") == 1, message
            assert "\n  - parameter or buffer inv_freq differs" in message, message


def deprecation_warnings(rank, world):
    """FutureWarnings that one ring_attention call and a compiled forward and backward raise."""
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
        ring_attention(q, q, q)  # the ring's agreement all-gather
        model = TinyTransformer(layers=1).double()
        # eager inside: the graph's ring_gather runs the functional all-gather as written
        compiled = torch.compile(model, backend="ring", options={"compiler": "eager"})
        compiled(torch.randint(0, 64, (2, 8))).sum().backward()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_no_deprecation_warnings(gloo):
    for messages in gloo(2).run(deprecation_warnings, timeout=120):
        assert messages == [], messages


def test_torchrun_without_process_group_warns_once(monkeypatch):
    """WORLD_SIZE > 1 (as torchrun sets) and no process group: each process would run alone."""
    from ringcompile import group

    group._warn_launched_without_group.cache_clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    torch._dynamo.reset()
    model = TinyTransformer(layers=1).double()
    compiled = torch.compile(model, backend="ring", options={"compiler": "eager"})
    with pytest.warns(
        RingWarning,
        match=r"WORLD_SIZE=2 .* not initialised.*"
        r"init_process_group\(\) on every process",
    ):
        compiled(torch.randint(0, 64, (1, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a new graph does not warn again
        compiled(torch.randint(0, 64, (1, 12)))
    group._warn_launched_without_group.cache_clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process launched alone: nothing to say
        torch.compile(model, backend="ring", options={"compiler": "eager"})(
            torch.randint(0, 64, (1, 8))
        )


class _AttentionByHand(torch.nn.Module):
    """Attention written out, which the backend takes as SDPA; with ``weights``, returning its
    attention weights too (``output_attentions``), which it cannot."""

    def __init__(self, weights: bool = False):
        super().__init__()
        self.weights = weights

    def forward(self, x):  # (B, H, S, D)
        w = (x @ x.transpose(-2, -1) / x.shape[-1] ** 0.5).softmax(-1)
        return (w @ x, w) if self.weights else w @ x


class _AttentionWithDropout(torch.nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1, is_causal=True)


NOTHING_TO_SHARD = (
    "ring graph: no sequence to shard (no attention call, no input an earlier graph "
    "left sharded), 2 ranks: each computes all of it"
)


def nothing_sharded(rank, world):
    """Each model's RingWarnings and the first line of its report, under ``explain``."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    cases = {
        "by hand": (_AttentionByHand(), x),
        "weights returned": (_AttentionByHand(weights=True), x),
        "dropout": (_AttentionWithDropout(), x),
        "no attention": (torch.nn.Linear(4, 4).double(), x),
        "sharded": (TinyTransformer(layers=1).double(), torch.randint(0, 64, (1, 8))),
    }
    out = {}
    for name, (model, inp) in cases.items():
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = ringcompile.explain(model, inp, options={"compiler": "eager"})
        out[name] = (
            [str(w.message) for w in caught if issubclass(w.category, RingWarning)],
            str(report).splitlines()[1],
        )
    return out


def test_nothing_to_shard_warns(gloo):
    """Attention by hand whose weights are returned, or SDPA with dropout: the model runs
    unsharded on every rank; a warning (not only the report) says what was found and the fix, and
    the report gives the ring's size. Attention by hand alone is sharded, as SDPA."""
    for out in gloo(2).run(nothing_sharded, timeout=120):
        assert out["by hand"] == (
            [],
            "ring graph: sequence of 8 tokens over 2 ranks, striped layout",
        )
        (by_hand,), head = out["weights returned"]
        assert "shards nothing in this graph, so each of the 2 ranks computes all of it" in by_hand
        assert "a softmax, and no F.scaled_dot_product_attention" in by_hand
        assert 'attn_implementation="sdpa"' in by_hand
        assert head == NOTHING_TO_SHARD
        (dropout,), head = out["dropout"]
        assert "dropout_p=0.1 (the ring op has no dropout)" in dropout
        assert "set the model's attention dropout to 0" in dropout
        assert head == NOTHING_TO_SHARD
        assert out["no attention"] == ([], NOTHING_TO_SHARD)
        assert out["sharded"][0] == []


README = Path(__file__).resolve().parents[1] / "README.md"


def run_program(rank, world, source):
    """Run a whole program as ``torchrun`` would on this rank; its output. The world exists
    already, so the program's init and destroy of the process group do nothing here, and the
    backend compiles with aot_eager inside (fast on a CPU)."""
    import torch.distributed as dist

    saved = dist.init_process_group, dist.destroy_process_group, torch.compile
    dist.init_process_group = dist.destroy_process_group = lambda *args, **kwargs: None
    torch.compile = lambda *args, **kwargs: saved[2](
        *args, **kwargs, options={"compiler": "aot_eager"}
    )
    torch._dynamo.reset()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, "ring_train.py", "exec"), {"__name__": "__main__"})
    finally:
        dist.init_process_group, dist.destroy_process_group, torch.compile = saved
    return out.getvalue()


def test_readme_whole_program_runs(gloo):
    source = re.search(r"```python\n(# ring_train.py\n.*?)```", README.read_text(), re.S).group(1)
    assert "dist.init_process_group(" in source and "torch.manual_seed(" in source
    printed = gloo(2).run(run_program, source, timeout=120)
    assert re.fullmatch(r"(step \d: loss \d\.\d{4}\n){3}", printed[0]), printed[0]
    assert printed[1] == ""


def test_ringcompile_log_set_after_import_prints_reports(monkeypatch, capsys):
    """``RINGCOMPILE_LOG`` is read when a graph compiles (no handler is attached at import):
    set after ``import ringcompile``, every compiled graph's report goes to stderr."""
    import ringcompile.backend as backend

    monkeypatch.setenv("RINGCOMPILE_LOG", "1")
    monkeypatch.setattr(backend, "_stderr_handler", None)
    level = backend.log.level
    try:
        torch._dynamo.reset()
        torch.compile(lambda x: (x * 2).sum(), backend="ring")(torch.ones(4))
        assert "ring graph:" in capsys.readouterr().err
    finally:
        if backend._stderr_handler is not None:
            backend.log.removeHandler(backend._stderr_handler)
        backend.log.setLevel(level)

"""Every mistake a new user makes gets a clear message, on every rank, instead of wrong numbers or
silence: ranks fed different inputs, ``torchrun`` without a process group, a model with nothing
to shard, bad options; and a run of the backend prints no deprecation warnings."""

from __future__ import annotations

import warnings

import torch
import torch._dynamo

from ringcompile import ring_attention
from ringcompile.testing_models import TinyTransformer


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

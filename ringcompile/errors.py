"""The backend's own errors and warnings, so that they read as ours.

Dynamo wraps whatever a backend raises in ``BackendCompilerFailed``, whose text asks the reader to
set ``TORCHDYNAMO_VERBOSE=1`` "especially if you're reporting a bug to PyTorch" — except
subclasses of its ``ShortenTraceback``, which it re-raises as they are (``output_graph.py``,
``_call_user_compiler``). ``RingCompileError`` is one, so a bad option or a program the backend
refuses surfaces as this type with our message alone, at the first call of the compiled model
(``torch.compile`` hands the options to the backend only then; ``ring_shard`` checks them at once).
"""

from __future__ import annotations

import torch._dynamo.exc

__all__ = ["RingCompileError", "RingInputMismatchError", "RingWarning"]

# the class Dynamo re-raises unwrapped; a torch without it wraps ours like any other error
_REraisedByDynamo = getattr(torch._dynamo.exc, "ShortenTraceback", RuntimeError)


class RingCompileError(_REraisedByDynamo, ValueError):
    """``backend='ring'`` refuses an option or a program; the message says why and what to do."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.message = message
        # ShortenTraceback's: where the traceback shown starts (the backend sets it)
        self.first_useful_frame = None

    def __str__(self) -> str:
        # Dynamo appends its debugging hints to ``args``; the message is the whole story
        return self.message


class RingInputMismatchError(ValueError):
    """The ranks of a ring were given different inputs where the ring needs the same ones."""


class RingWarning(UserWarning):
    """Something the backend did that the user most likely did not mean (nothing sharded, a world
    without a process group); ``warnings.filterwarnings("ignore", category=RingWarning)``
    silences them."""

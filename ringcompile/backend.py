"""The ``ring`` torch.compile backend, ``ring_shard`` and ``explain``.

``torch.compile(model, backend="ring", options={...})`` (registered through the
``torch_dynamo_backends`` entry point, so no import is needed) hands each Dynamo graph to
``ring_backend``, which runs the passes of ``ringcompile.passes`` in order and then the inner
compiler. Every rank of the ring must run the same program with the same full inputs; each computes
on its own tokens.

Options:
- ``group``: a ProcessGroup, a DeviceMesh (with ``mesh_dim``), or None for the world;
- ``mesh_dim``: the mesh dimension that is the ring; or two, ``("cp_a2a", "cp_ring")``: an
  all-to-all over heads along the first and a ring along the second (two levels), the layout over
  the ring dim with each ring rank's tokens split over the first dim;
- ``layout``: "striped" (default), "zigzag" or "contiguous";
- ``compiler``: "inductor" (default), "aot_eager" or "eager";
- ``mode``: inductor's mode (``torch.compile(model, backend="ring", mode="reduce-overhead")``
  hands it over too): "reduce-overhead" runs each graph that can be one as a CUDA graph, a decode
  step over a ``ShardedKVCache`` allocated up front among them (a cache the prefill allocated
  warns); graphs with ring attention are not (the ring's sends and its agreement check are host
  work), inductor says so and runs them as they are;
- ``gather_outputs``: "lazy" (default) returns a sequence output as a ``SequenceShard``
  (``ringcompile.sequence_shard``): a full tensor to whatever reads it, gathered only when Python
  code first reads it, and taken as it is by the next compiled graph (a graph break costs no
  gather); True gathers them as the graph returns; False returns this rank's tokens as plain
  tensors (layout order; gradients of such outputs are this rank's own);
- ``kernels``: which kernels compute the ring's blocks: "auto" (plain blocks on cuDNN, masked
  blocks on Triton), "triton" or "reference"; default: ``RINGCOMPILE_KERNELS``, else "auto";
- ``check_inputs``: when to check that every rank of the ring was given the same inputs where the
  ring shards them (``ringcompile.input_check``): "first_call" (default: each compiled graph's
  first call), "every_call" or "never";
- ``strategy``: how attention runs over the sharded sequence (``ringcompile.strategy``): "auto"
  (default: per site, Ulysses for documents, windows, chunks and per-key biases where the heads
  split over the ranks, the ring otherwise; over two mesh dims, two levels wherever the heads split
  over the first), "ring", "ulysses" or "two-level" (a site whose heads do not split runs as a
  ring, listed among the fallbacks).

A bad option, or a program the backend refuses, raises ``RingCompileError`` with our message alone
(``ringcompile.errors`` says how it passes through Dynamo): at the first call of the compiled
model, when ``torch.compile`` hands the backend its options, and at once from ``ring_shard``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import warnings
import zlib
from dataclasses import dataclass, fields

import torch
import torch.utils._pytree as pytree

from ringcompile.derived_documents import (
    ChecksDocuments,
    MarksDocuments,
    derived_pairs,
    documents_leaving,
)
from ringcompile.errors import RingCompileError, RingWarning
from ringcompile.group import resolve_group, resolve_two_level, warn_if_launched_without_group
from ringcompile.input_check import CheckedInputs
from ringcompile.kernels import resolve_kernel_choice
from ringcompile.kv_cache import APPEND_OPS
from ringcompile.layout import LAYOUTS
from ringcompile.masks import AttentionMask
from ringcompile.passes import RingContext, run_passes
from ringcompile.passes.fx_utils import input_source, is_module_state, is_sdpa
from ringcompile.passes.idioms import reads_sharded_cache
from ringcompile.passes.mask_reader import under_views
from ringcompile.report import ExplainReport, GraphReport, readable_code
from ringcompile.ring.balance import recording_balance
from ringcompile.sequence_shard import (
    GraphBoundary,
    MaskAsFacts,
    SequenceShard,
    recording_gathers,
    taken_inputs,
)
from ringcompile.specialize import PerShape
from ringcompile.strategy import STRATEGIES

__all__ = ["ring_backend", "ring_shard", "explain", "RingOptions"]

log = logging.getLogger("ringcompile")
_stderr_handler: logging.Handler | None = None


def _report_log() -> logging.Logger:
    """``log``; with ``RINGCOMPILE_LOG`` set (read at each compilation, so setting it after the
    import works too) it gets one stderr handler at INFO: every compiled graph's report."""
    global _stderr_handler
    if os.environ.get("RINGCOMPILE_LOG") and _stderr_handler is None:
        _stderr_handler = logging.StreamHandler()
        log.addHandler(_stderr_handler)
        log.setLevel(logging.INFO)
    return log


_COMPILERS = ("inductor", "aot_eager", "eager")
_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_INPUT_CHECKS = ("first_call", "every_call", "never")


@dataclass(frozen=True)
class RingOptions:
    group: object = None
    mesh_dim: int | str | tuple[str, str] | None = None
    layout: str = "striped"
    compiler: str = "inductor"
    mode: str | None = None
    gather_outputs: bool | str = "lazy"
    kernels: str | None = None
    check_inputs: str = "first_call"
    strategy: str = "auto"

    @classmethod
    def from_dict(cls, options: dict | None) -> RingOptions:
        """The options, checked: a bad one raises ``RingCompileError`` naming it and the choices."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise RingCompileError(
                f"backend='ring' got unknown option(s) {unknown}; known: {sorted(known)}"
            )
        opts = cls(**options)
        if opts.layout not in LAYOUTS:
            raise RingCompileError(
                f"backend='ring': layout={opts.layout!r} is not one of {sorted(LAYOUTS)}"
            )
        if opts.compiler not in _COMPILERS:
            raise RingCompileError(
                f"backend='ring': compiler={opts.compiler!r} is not one of {list(_COMPILERS)}"
            )
        if opts.mode is not None and opts.mode not in _MODES:
            raise RingCompileError(
                f"backend='ring': mode={opts.mode!r} is not one of {list(_MODES)}"
            )
        if opts.mode not in (None, "default") and opts.compiler != "inductor":
            raise RingCompileError(
                f"backend='ring': mode={opts.mode!r} is inductor's; it needs compiler='inductor', "
                f"not {opts.compiler!r}"
            )
        if opts.gather_outputs not in (True, False, "lazy"):
            raise RingCompileError("backend='ring': gather_outputs must be 'lazy', True or False")
        if opts.check_inputs not in _INPUT_CHECKS:
            raise RingCompileError(
                f"backend='ring': check_inputs={opts.check_inputs!r} is not one of "
                f"{list(_INPUT_CHECKS)}"
            )
        if opts.strategy not in STRATEGIES:
            raise RingCompileError(
                f"backend='ring': strategy={opts.strategy!r} is not one of {list(STRATEGIES)}"
            )
        try:
            if opts.kernels is not None:
                resolve_kernel_choice(opts.kernels)
            resolve_group(opts.group, opts.mesh_dim)  # fails early and clearly on a bad group
            two = resolve_two_level(opts.group, opts.mesh_dim)
        except (TypeError, ValueError) as e:
            raise RingCompileError(f"backend='ring': {e}") from None
        if opts.strategy == "two-level" and two is None:
            raise RingCompileError(
                "backend='ring': strategy='two-level' needs two mesh dims: group=mesh, "
                "mesh_dim=('cp_a2a', 'cp_ring') (an all-to-all over heads along the first, a ring "
                "along the second)"
            )
        return opts


def _inner_compiler(name: str, mode: str | None = None):
    if name == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(mode) if mode not in (None, "default") else {}
        return functools.partial(compile_fx, config_patches=patches)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


def _symbolic(value) -> bool:
    return any(
        isinstance(leaf, torch.SymInt)
        or (isinstance(leaf, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in leaf.shape))
        for leaf in pytree.tree_leaves(value)
    )


def _needs_static_copy(gm: torch.fx.GraphModule) -> bool:
    """Dynamo made some size symbolic (torch.compile's default after a size changes) in a graph
    that attends over its sequence. Any node's size counts, not only the attention's: a length a
    guard pinned to a number during tracing (transformers' ``generate()`` after a forward at
    another length) stays symbolic in the nodes traced before the guard. A decode step's attention
    over the sharded cache needs no static sizes."""
    attends = any(is_sdpa(n) and not reads_sharded_cache(n) for n in gm.graph.nodes)
    return attends and any(_symbolic(n.meta.get("example_value")) for n in gm.graph.nodes)


def ring_backend(
    gm: torch.fx.GraphModule,
    example_inputs,
    options: dict | None = None,
    _reports: list | None = None,
    *,
    mode: str | None = None,
):
    """The torch.compile backend: rewrite the graph for the ring, then compile it. ``mode`` is
    what ``torch.compile(..., mode=)`` hands a backend (it allows no options beside it)."""
    if mode is not None:
        options = {**(options or {}), "mode": mode}
    try:
        return _rewrite_and_compile(gm, example_inputs, options, _reports)
    except RingCompileError as e:
        # the traceback shown starts here, as Dynamo's own BackendCompilerFailed does
        e.first_useful_frame = inspect.currentframe()
        raise


def _rewrite_and_compile(gm, example_inputs, options, reports):
    opts = RingOptions.from_dict(options)
    if _needs_static_copy(gm):
        # the ring needs the length to lay out the tokens: compile per length
        log.info("ring: a graph with symbolic sizes is compiled per length")
        return PerShape(gm, functools.partial(ring_backend, options=options, _reports=reports))
    group = resolve_group(opts.group, opts.mesh_dim)
    if group is None:
        warn_if_launched_without_group()
    if any(isinstance(n.meta.get("example_value"), MaskAsFacts)
           for n in gm.graph.find_nodes(op="placeholder")):  # fmt: skip
        gm = _own_copy(gm)  # its masks' facts become inputs of their own
    one = group is None or group.size() == 1
    ctx = RingContext(
        gm=gm,
        group=group,
        layout_name=opts.layout,
        # one rank's tokens are the full tensor once its padding is cut (a gather of one)
        gather_outputs=True if one and opts.gather_outputs == "lazy" else opts.gather_outputs,
        kernels=opts.kernels,
        strategy=opts.strategy,
        two_level=resolve_two_level(opts.group, opts.mesh_dim),
        arriving=_arriving(gm),
        arriving_masks=_arriving_masks(gm),
        derived_documents=_derived_documents(gm, example_inputs),
    )
    run_passes(ctx)
    lazy = ctx.leaving if ctx.gather_outputs == "lazy" else {}
    documents = documents_leaving(ctx.gm, ctx.own_outputs if ctx.masks_leaving else 0, lazy)
    _report_documents(ctx, documents)
    checked_documents = _checked_documents(ctx)
    _warn_if_nothing_sharded(ctx)
    _warn_if_cache_moves(ctx, opts.mode)
    checked = _inputs_to_check(ctx, opts.check_inputs)
    ctx.report.input_check = opts.check_inputs.replace("_", " ")
    states = _states(gm) if checked else []
    ctx.report.checked_inputs = [f"{name} ({node.name})" for _, node, name in checked] + (
        [f"the model's {len(states)} parameters and buffers (on the first call)"] if states else []
    )
    ctx.report.code = readable_code(gm)
    if reports is not None:
        reports.append(ctx.report)
    if _report_log().isEnabledFor(logging.INFO):
        log.info("%s", ctx.report)
    arrive = _arrive(ctx)
    inner_inputs = taken_inputs(example_inputs, arrive, example=True)
    compiled = _inner_compiler(opts.compiler, opts.mode)(gm, inner_inputs)
    if not (opts.check_inputs == "never" or ctx.world_size == 1 or not ctx.communicates):
        compiled = CheckedInputs(
            compiled,
            group,
            [(i, name) for i, _, name in checked],
            states,
            every_call=opts.check_inputs == "every_call",
            signature=_collectives_signature(ctx, inner_inputs),
        )
    if arrive or lazy or ctx.masks_leaving:
        layout = ctx.layout if ctx.seq_len else None
        compiled = GraphBoundary(compiled, arrive, lazy, ctx.masks_leaving, ctx.own_outputs,
                                 layout, ctx.rank, group)  # fmt: skip
    if documents:
        compiled = MarksDocuments(compiled, documents)
    if checked_documents:
        compiled = ChecksDocuments(compiled, checked_documents)
    return compiled


def _arriving(gm: torch.fx.GraphModule) -> dict:
    """The graph inputs an earlier graph left sharded: their sequence dim and layout. Their
    example values become plain tensors of the full shape, which the passes read."""
    found = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, SequenceShard):
            found[node] = (value.seq_dim, value.seq_layout)
            full = value.local.new_empty(value.shape).requires_grad_(value.requires_grad)
            node.meta["example_value"] = full
    return found


def _own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo's graph to add inputs to: Dynamo reads its own graph's inputs after the
    backend returns, to call the compiled graph with them."""
    graph, copied = torch.fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copied))
    for old, new in copied.items():
        if hasattr(old, "_dynamo_source"):  # what AOT reads of each input
            new._dynamo_source = old._dynamo_source
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy


def _arriving_masks(gm: torch.fx.GraphModule) -> dict:
    """The graph inputs an earlier graph left as a mask's facts: the mask over new placeholders,
    one per fact, after the others (``GraphBoundary`` appends the facts to the inputs). Their
    example values become plain tensors of the mask's shape."""
    found = {}
    for node in list(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value")
        if not isinstance(value, MaskAsFacts):
            continue
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        facts = {}
        for name in value.names:
            with gm.graph.inserting_after(last):
                last = facts[name] = gm.graph.placeholder(f"{node.name}_{name}")
            last.meta["example_value"] = value.facts[name]
            last._dynamo_source = None  # (what AOT reads of each input: none, as for DDP's)
        found[node] = AttentionMask(value.rules, empty_rows_mean=value.empty_rows_mean, **facts)
        node.meta["example_value"] = value.anchor.new_empty(value.shape, dtype=value.dtype)
    return found


def _derived_documents(gm: torch.fx.GraphModule, example_inputs) -> dict:
    """Inputs that are document ids an earlier graph derived from position ids among the inputs
    (``ringcompile.derived_documents``)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return derived_pairs(placeholders[: len(example_inputs)], example_inputs)


def _checked_documents(ctx: RingContext) -> list[tuple[int, int, str, str]]:
    """The derived document ids the passes relied on (a mask read with them), as
    ``ChecksDocuments`` checks them: input indices and names."""
    index = {n: i for i, n in enumerate(ctx.gm.graph.find_nodes(op="placeholder"))}
    read = [m for s in ctx.sites if (m := s.lifted_mask) is not None]
    used = {under_views(m.document_ids) for m in read if m.document_ids is not None}
    pairs = []
    for doc, positions in ctx.derived_documents.items():
        if doc not in used:
            continue
        positions = sorted(positions, key=index.get)
        pairs += [(index[doc], index[p], _user_name(doc), _user_name(p)) for p in positions]
        ctx.report.arrived.append(
            f"{doc.name}: document ids an earlier graph derived from the position ids "
            f"{', '.join(p.name for p in positions)}; the mask compares positions inside these "
            "documents (checked on each call: the same tensors, unchanged)"
        )
    return pairs


def _report_documents(ctx: RingContext, documents) -> None:
    output = ctx.gm.graph.find_nodes(op="output")[0].args[0]
    for d in documents:
        ctx.report.left.append(
            f"{output[d.documents].name}: document ids derived from position ids, marked so that "
            "a later graph can read a mask that compares those positions inside them"
        )


def _arrive(ctx: RingContext) -> dict[int, str]:
    """How each input that arrives sharded or as a mask's facts enters the compiled graph
    (``GraphBoundary.arrive``)."""
    index = {n: i for i, n in enumerate(ctx.gm.graph.find_nodes(op="placeholder"))}
    arrive = {index[n]: "local" if n in ctx.arrived else "full" for n in ctx.arriving}
    for n in ctx.arriving_masks:
        arrive[index[n]] = "mask dense" if n.users else "mask facts"
    return arrive


def _collectives_signature(ctx: RingContext, example_inputs) -> int:
    """A number that two ranks' graphs share when they issue the same collectives: the inputs'
    shapes and, in graph order, each call that talks to the other ranks with its arguments' shapes
    as traced. (Not the code: a graph Dynamo traced with symbolic sizes, compiled for one length,
    issues what the static graph of that length does in other words.)"""

    def shape(a):
        val = a.meta.get("val", a.meta.get("example_value")) if isinstance(a, torch.fx.Node) else a
        return tuple(val.shape) if isinstance(val, torch.Tensor) else repr(val)

    calls = [(n.target.__name__, [shape(a) for a in pytree.tree_leaves((n.args, n.kwargs))])
             for n in ctx.gm.graph.nodes if ctx.talks(n)]  # fmt: skip
    # (tensors only: a graph traced with symbolic sizes also takes the sizes)
    inputs = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
    return zlib.crc32(repr((inputs, calls)).encode()) & 0x7FFFFFFF


def _user_name(node: torch.fx.Node) -> str:
    """What the user calls a graph input (``tokens``, ``kwargs['input_ids']``), from Dynamo's
    record of where it came from; the graph's name where there is none."""
    name = input_source(node)
    return re.sub(r"^L\['(\w+)'\]", r"\1", name) if name is not None else node.name


_MODULE_PATH = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")


def _states(gm: torch.fx.GraphModule) -> list[tuple[int, str]]:
    """(argument index, dotted name: ``blocks.0.norm1.weight``) of each graph input that is a
    module's parameter or buffer."""
    found = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        name = input_source(node)
        if is_module_state(node):
            found.append((i, ".".join(_MODULE_PATH.findall(name))))
    return found


def _inputs_to_check(ctx: RingContext, mode: str) -> list[tuple[int, torch.fx.Node, str]]:
    """(argument index, placeholder, name) of each graph input the ring shards, where they are
    checked."""
    if mode == "never" or ctx.world_size == 1:
        return []
    index = {n: i for i, n in enumerate(ctx.gm.graph.find_nodes(op="placeholder"))}
    return [(index[n], n, _user_name(n)) for n in ctx.sequence_inputs()]


def _warn_if_nothing_sharded(ctx: RingContext) -> None:
    """A ring of several ranks, attention in the graph (SDPA, or a softmax over (S, S) scores
    written by hand that pass 2 could not take), and
    none of it replaced: every rank would compute everything, and only ``explain`` would say so.
    (A graph with no attention at all, such as a loss after a graph break, is nothing to say.)"""
    if ctx.world_size == 1 or ctx.report.attention or ctx.arrived or not ctx.report.fallbacks:
        return
    found = "\n".join(f"  - {f}" for f in ctx.report.fallbacks)
    warnings.warn(
        f"backend='ring' shards nothing in this graph, so each of the {ctx.world_size} ranks "
        f"computes all of it, unsharded. What it found:\n{found}\nThe ring "
        "replaces F.scaled_dot_product_attention over the graph's sequence (queries and keys of "
        "one length, dropout_p=0); ringcompile.explain(model, *inputs) shows what it did.",
        RingWarning,
        stacklevel=2,
    )


def _warn_if_cache_moves(ctx: RingContext, mode: str | None) -> None:
    """A decode step for CUDA graphs that writes cache slots the prefill allocated inside its
    graph: inductor then does not capture the step (it copies or skips inputs that are written and
    not static), so the mode buys nothing, and only its logs would say so."""
    from torch._inductor import list_mode_options

    if mode in (None, "default") or not list_mode_options(mode).get("triton.cudagraphs"):
        return
    for node in ctx.gm.graph.nodes:
        if node.op == "call_function" and node.target in APPEND_OPS:
            slots = node.args[0]
            static = slots.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
            if slots.op == "placeholder" and static is None:
                warnings.warn(
                    f"backend='ring', mode={mode!r}: this decode step writes a ShardedKVCache "
                    "whose slots the prefill allocated inside its graph, so the step cannot run "
                    "as a CUDA graph. Allocate them up front: ShardedKVCache(config, max_length, "
                    "batch_size=..., dtype=..., device=...).",
                    RingWarning,
                    stacklevel=2,
                )
                return


def _compile(target, options: dict, compile_kwargs: dict, reports: list | None = None):
    RingOptions.from_dict(options)
    backend = functools.partial(ring_backend, options=options, _reports=reports)
    compile_kwargs.setdefault("dynamic", False)
    return torch.compile(target, backend=backend, **compile_kwargs)


def ring_shard(target=None, *, fullgraph: bool = False, **options):
    """Context parallelism for a module class, a module instance or a function.

    Bare (``@ring_shard``) or with options (``@ring_shard(layout="zigzag", group=mesh,
    mesh_dim="cp")``); the options are the backend's (see the module docstring), plus
    ``fullgraph``. On a module class, instances run their ``forward`` compiled.
    """
    if target is None:
        return functools.partial(ring_shard, fullgraph=fullgraph, **options)
    kwargs = {"fullgraph": fullgraph}
    if isinstance(target, type) and issubclass(target, torch.nn.Module):
        target.forward = _compile(target.forward, options, kwargs)
        return target
    if isinstance(target, torch.nn.Module) or callable(target):
        return _compile(target, options, kwargs)
    raise TypeError(f"ring_shard applies to a module class, a module or a function, not {target!r}")


def explain(model, *args, options: dict | None = None, **kwargs) -> ExplainReport:
    """Compile ``model`` with the ring backend, run it once on ``args``/``kwargs`` and report
    every graph: the rewritten code, each SDPA replaced, each position tensor fixed, each shard and
    gather and why, each fallback and why. Run it on every rank of the ring (it communicates)."""
    reports: list[GraphReport] = []
    compiled = _compile(model, dict(options or {}), {}, reports)
    with recording_gathers() as gathers, recording_balance() as balance:
        compiled(*args, **kwargs)
    return ExplainReport(graphs=reports, python_gathers=gathers, balance=balance)

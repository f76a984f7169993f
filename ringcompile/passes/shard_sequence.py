"""Pass 10: the sharded region computes on local tokens; values that leave it are gathered.

Expects: ``ctx.plan`` (pass 9): demand, shard points and their kinds.
Guarantees, walking the graph in order:
- every shard point gets ``ring_shard(x, dim)``: a graph input, a full value, or one that holds
  positions — an ``arange`` over the sequence, an integer input used as positions, anything whose
  sequence dim comes from those alone (rotary cos/sin), a per-position table sliced to the length
  (``cos_cached[:S]``). The full tensor is computed as the model wrote it, in natural order (O(S)
  per rank), so ops that mix along it (``cumsum``, ``diff``) stay right, and this rank's entries
  of it are its tokens' global positions whatever the layout (``explain``: "positions fixed");
- a node in the region reads local versions of its inputs; a full input whose dim lines up with
  the sequence (a (S, D) bias added to a (B, S, D) activation) is sharded at that use; a site's
  lifted mask is not read (even where another site's dense mask made it local);
- sizes baked into ``view``/``reshape``/``expand`` for the sequence dim become the local length
  (found by which output dim is the sequence, never by matching the integer);
- a node downstream of the region that carries the sequence through (the output projection, the
  residual add, the MLP) joins it;
- a prefill's ``kv_cache_append`` (a ``ShardedKVCache``) on the striped layout with no padding
  reads the local K/V and positions: this rank's tokens are exactly its share of the cache;
- any other use of a local value — an op that mixes along the sequence (a shift, a ``cumsum``, a
  reduction over it), an op not understood — reads ``ring_gather(x, dim)``: the full tensor in
  natural order, exact. A graph output is gathered with ``gather_outputs=True``; otherwise it
  stays local, listed in ``ctx.leaving`` (the backend returns it as a ``SequenceShard`` that
  later graphs take as it is);
- an input an earlier graph left sharded (``ctx.arrived``) is local from the start, with no
  shard; a graph with no attention computes on such inputs' tokens where the ops allow;
- an in-place change left by pass 1 (``x.add_(y)``, ``x[i] = v``, ``x += y``, ``out=x`` on a graph
  input, module state or a view) changes the tensor it is given, never a shard or a gather of it:
  on this rank's tokens where that tensor is local, on the full tensor (local operands gathered)
  where it is full; where neither is exact (a local tensor changed by operands that do not line
  up or by an op whose dims the passes do not follow; a view of local values taken through a
  gather, whose change would reach only the copy) it raises ``RingCompileError``;
- every shard and gather reads the memory as its reader sees it: it is taken after the last
  in-place change of that memory (through any view of it) before the reader (``aliases.Writes``),
  so ``b = x.new_empty(s); b[..., :6].copy_(k); sdpa(q, b, v)`` reads ``b`` written.

    x = embedding(tokens, w); h = linear(x.view(2, 4096, 8), w2); return h
    -> t = ring_shard(tokens, 1); x = embedding(t, w); h = linear(x.view(2, 1024, 8), w2)
       return ring_gather(h, 1)
"""

from __future__ import annotations

from torch.fx import Node
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten, tree_unflatten

from ringcompile.errors import RingCompileError
from ringcompile.kv_cache import APPEND_OPS
from ringcompile.layout import StripedLayout
from ringcompile.passes.aliases import Writes, storage_root, written_tensors
from ringcompile.passes.context import RingContext
from ringcompile.passes.dims import dim_map, dtype_only_inputs, shape_of, size_args
from ringcompile.passes.fx_utils import sdpa_args, source_line

POSITION_KINDS = ("positions", "table")  # shard points whose values are positions


def _describe(node: Node) -> str:
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", node.target)
    )
    return f"{node.op} {target}"


def _local_plan(ctx: RingContext, node: Node, want: int | None, writes: Writes):
    """How ``node`` runs on local tokens: (out_dim, {input: local replacement}) or None."""
    S = ctx.seq_len
    site = ctx.site_of.get(node)
    unread: set[Node] = set()
    if site is not None:
        # q, k, v along their sequence (-2); a mask along its rows (its columns stay global);
        # lifted per-token facts along their tokens (their last dim)
        a = sdpa_args(node)
        mask = a.get("attn_mask")
        mapping = [(a[n], {len(shape_of(a[n])) - 2: 2}) for n in ("query", "key", "value")]
        if site.attn_mask is not None and shape_of(mask)[-2] == S:
            mapping.append((mask, {len(shape_of(mask)) - 2: 2}))
        facts = site.lifted_mask.token_facts if site.lifted_mask is not None else {}
        mapping += [(t, {len(shape_of(t)) - 1: 2}) for t in facts.values()]
        if site.lifted_mask is not None and mask is not None:
            unread.add(mask)  # lifted: swap_attention drops it, whatever else made it local
    else:
        mapping = dim_map(node)
    if mapping is None:
        return None
    # the output dim is the one the planned demand says, or where the local inputs lead
    if want is None:
        dims = {m.get(ctx.local[inp][1]) for inp, m in mapping if inp in ctx.local_only}
        if len(dims) != 1 or None in dims:
            return None
        want = dims.pop()
    replace: dict[Node, Node] = {}
    for inp, m in mapping:
        in_dims = [d for d, o in m.items() if o == want and shape_of(inp)[d] == S]
        if inp in ctx.local:
            local, ldim = ctx.local[inp]
            if in_dims == [ldim]:
                replace[inp] = (
                    local
                    if inp in ctx.local_only
                    else ctx.shard_of(inp, ldim, writes.last_before(inp, node))
                )
                continue
            if inp in ctx.local_only:
                return None  # its sequence does not line up with the output's
        if len(in_dims) == 1:
            replace[inp] = ctx.shard_of(inp, in_dims[0], writes.last_before(inp, node))
    for a in dtype_only_inputs(node):  # read for its dtype alone: its shard serves
        unread.add(a)
        if a in ctx.local and a not in replace:
            replace[a] = ctx.local[a][0]
    # inputs the map does not cover (an op's non-tensor or broadcast args) must not be local-only
    if any(
        a in ctx.local_only and a not in replace and a not in unread for a in node.all_input_nodes
    ):
        return None
    return want, replace


def _run_locally(ctx: RingContext, node: Node, plan: tuple[int, dict[Node, Node]]) -> None:
    """``node`` reads the local inputs of ``plan`` (``_local_plan``) and is local itself; a site
    records its lifted facts' local versions (``AttentionSite.local_facts``)."""
    dim, replace = plan
    site = ctx.site_of.get(node)
    if site is not None and site.lifted_mask is not None:
        facts = site.lifted_mask.token_facts.items()
        site.local_facts = {name: replace[t] for name, t in facts if t in replace}
    node.args, node.kwargs = map_arg((node.args, node.kwargs), lambda a: replace.get(a, a))
    ctx.local[node] = (node, dim)
    ctx.local_only.add(node)


def _gather_locals(ctx: RingContext, node: Node, writes: Writes, keep: Node | None = None) -> None:
    """``node`` computes on full tensors: each local-only input (but ``keep``) reads its gather,
    taken after the in-place changes ``node`` sees."""
    node.args, node.kwargs = map_arg(
        (node.args, node.kwargs),
        lambda a: (
            ctx.gather_of(
                a,
                f"read by {node.name} ({_describe(node)}) at {source_line(node)}",
                writes.last_before(a, node),
            )
            if a in ctx.local_only and a is not keep
            else a
        ),
    )


def _shard_write(ctx: RingContext, node: Node, writes: Writes) -> None:
    """``x.op_(...)``, ``x[i] = v``, ``x += y``, ``op(..., out=x)``: on local ``x`` itself (its
    other operands local), or on full ``x`` with its other operands gathered; never on a copy,
    which later readers of ``x`` would not see."""
    targets = written_tensors(node)
    x = targets[0]
    fix = (
        "Write it out of place (x = x.add(y) rather than x.add_(y), torch.cat rather than "
        "writes into slices of one buffer)"
    )
    if len(targets) == 1 and x in ctx.local_only and ctx.local[x][0] is x:
        plan = _local_plan(ctx, node, ctx.local[x][1], writes)
        if plan is None or plan[1].get(x, x) is not x:
            raise RingCompileError(
                f"backend='ring' cannot run {node.name} ({_describe(node)}) at "
                f"{source_line(node)}: it changes {x.name} in place, which holds this rank's "
                "tokens, with operands whose sequence does not line up with it or by an op whose "
                f"dims the passes do not follow. {fix}"
            )
        _run_locally(ctx, node, plan)
        return
    for t in targets:
        root = storage_root(t)  # as rewritten: a view of local values reads their gather
        if root in ctx.gathered:
            held = ctx.gathered[root]
            why = (
                f"a view of {held.name}, which holds this rank's tokens, taken where the "
                f"passes need its whole sequence: the change would reach a gathered copy, "
                f"not {held.name}"
            )
        elif t in ctx.local_only:  # (one of several tensors an out= writes)
            why = "which holds this rank's tokens, beside other tensors the op writes"
        else:
            continue
        raise RingCompileError(
            f"backend='ring' cannot run {node.name} ({_describe(node)}) at "
            f"{source_line(node)}: it changes {t.name} in place, {why}. {fix}"
        )
    _gather_locals(ctx, node, writes, keep=x)


def _local_cache_append(ctx: RingContext, node: Node, writes: Writes) -> bool:
    """Feed a prefill's cache append its local tokens where they are exactly this rank's share of
    the striped cache (the layout is striped and unpadded); otherwise it reads gathered K/V."""
    if not (node.op == "call_function" and node.target in APPEND_OPS):
        return False
    keys, values, positions, k, v, pos, *rest = node.args
    layout = ctx.layout
    if not (
        isinstance(layout, StripedLayout)
        and layout.pad == 0
        and ctx.local.get(k, (None, None))[1] == 2
        and ctx.local.get(v, (None, None))[1] == 2
        and pos not in ctx.local_only
        and shape_of(pos)[1] == ctx.seq_len
    ):
        return False
    node.args = (
        keys,
        values,
        positions,
        ctx.local[k][0],
        ctx.local[v][0],
        ctx.shard_of(pos, 1, writes.last_before(pos, node)),
        *rest,
    )
    ctx.report.shards.append(
        f"{node.name}: this rank's tokens are its share of the KV cache "
        f"(striped), stored without a gather"
    )
    return True


def _localize_sizes(ctx: RingContext, node: Node, dim: int) -> None:
    where = size_args(node)
    if where is None:
        return
    style, positions = where
    S, L = ctx.seq_len, ctx.layout.local_len
    if style == "args":
        args = list(node.args)
        if args[positions[dim]] == S:
            args[positions[dim]] = L
        node.args = tuple(args)
    else:
        sizes = list(node.args[1])
        if sizes[dim] == S:
            sizes[dim] = L
        node.args = (node.args[0], tuple(sizes), *node.args[2:])


def _outputs(ctx: RingContext, node: Node, writes: Writes) -> None:
    """Local outputs: gathered, or left local and listed in ``ctx.leaving`` (pytree order)."""
    if ctx.gather_outputs is True:
        node.args = map_arg(
            node.args,
            lambda a: (
                ctx.gather_of(a, "graph output", writes.last_before(a, node))
                if a in ctx.local_only
                else a
            ),
        )
        return
    leaves, spec = tree_flatten(node.args[0])
    for i, a in enumerate(leaves):
        if isinstance(a, Node) and a in ctx.local_only:
            local, dim = ctx.local[a]
            leaves[i] = local
            ctx.leaving[i] = (dim, f"{a.name} (dim {dim}) from {source_line(a)}")
            ctx.report.left.append(
                f"{a.name} (dim {dim}): "
                + (
                    "this rank's tokens (gather_outputs=False)"
                    if ctx.gather_outputs is False
                    else "a SequenceShard, gathered only where Python code reads it"
                )  # fmt: skip
            )
    node.args = (tree_unflatten(leaves, spec), *node.args[1:])


def run(ctx: RingContext) -> None:
    if not ctx.seq_len:
        return
    graph = ctx.gm.graph
    writes = Writes(graph)
    for node, dim in ctx.arrived.items():  # as an earlier graph left it: no shard
        ctx.local[node] = (node, dim)
        ctx.local_only.add(node)
    for node, dim in ctx.plan.shard_points.items():
        if node in ctx.local:
            continue
        ctx.local[node] = (ctx.shard_of(node, dim), dim)
        kind = ctx.plan.shard_kinds[node]
        if kind in POSITION_KINDS:
            # this rank's entries of the full positions are its tokens' global positions,
            # whatever the layout: no knowledge of rotary embeddings needed
            what = "table sliced to the length" if kind == "table" else "positions"
            ctx.report.positions.append(f"{node.name} (dim {dim}, {what}) at {source_line(node)}")
        else:
            ctx.report.shards.append(f"{node.name} (dim {dim}, {kind}) at {source_line(node)}")
    shard_nodes = {n for n, _ in ctx.local.values()}

    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr") or node in shard_nodes:
            continue
        if node.op == "output":
            _outputs(ctx, node, writes)
            continue
        if _local_cache_append(ctx, node, writes):
            continue
        if written_tensors(node):
            _shard_write(ctx, node, writes)
            continue
        plan = None
        if node not in ctx.plan.shard_points and (
            node in ctx.plan.demand or any(a in ctx.local_only for a in node.all_input_nodes)
        ):
            plan = _local_plan(ctx, node, ctx.plan.demand.get(node), writes)
            if plan is None and node in ctx.plan.demand:
                ctx.report.fallbacks.append(
                    f"{node.name} ({_describe(node)}) at {source_line(node)}: its inputs' "
                    "sequence dims do not line up; computed full from gathered inputs"
                )
        if plan is None:
            _gather_locals(ctx, node, writes)  # full: read the full version of every local input
            continue
        _run_locally(ctx, node, plan)
        _localize_sizes(ctx, node, plan[0])

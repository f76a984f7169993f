"""RingTrainer and RingAccelerator: transformers' Trainer and accelerate on gloo rings match one
process fed the same batches.

A tiny float32 Llama trains with gradient accumulation on the model's own ``labels=`` loss (so
``num_items_in_batch`` divides it): every logged loss and every final parameter agree with a plain
Trainer on one process to 1e-6; a run resumed from its checkpoint continues as the uninterrupted
one; a (dp=2, ring=2) mesh on 4 ranks matches one process that sees both data-parallel ranks'
batches, evaluation included; a plain accelerate loop on a RingAccelerator matches one process. SGD keeps the comparison meaningful at that tolerance: Adam would
turn a rounding-level difference in a gradient near zero into a whole step.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch._dynamo
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from ringcompile.errors import RingCompileError  # noqa: E402
from ringcompile.integrations.accelerate import RingAccelerator  # noqa: E402
from ringcompile.integrations.transformers import RingTrainer  # noqa: E402

TOL = 1e-6
V, S = 96, 16
RING = {"compiler": "aot_eager"}


def _model(seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    """Random sequences whose labels hide a different number of tokens in each, so the count of
    items that divides the loss differs between micro-batches."""

    def __init__(self, n: int, seed: int = 1):
        self.ids = torch.randint(0, V, (n, S), generator=torch.Generator().manual_seed(seed))
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, : i % 5] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _args(out: str, **kw):
    defaults = dict(
        output_dir=out,
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,  # eval_loss averages per batch: the same batches both ways
        gradient_accumulation_steps=2,
        max_steps=4,
        optim="sgd",
        learning_rate=0.5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return transformers.TrainingArguments(**{**defaults, **kw})


@contextlib.contextmanager
def _launched(rank: int, world: int):
    """The environment torchrun gives a process, so that accelerate counts the test's gloo world
    (initialised already); accelerate's process-wide state and the environment are reset after, for
    the next run on these processes."""
    saved = dict(os.environ)
    if world > 1:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            OMP_NUM_THREADS="1",  # else accelerate sets the thread count per process
        )
    torch._dynamo.reset()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        os.environ.clear()
        os.environ.update(saved)


def _counting(trainer_cls):
    """``trainer_cls`` recording the items it counts in each accumulated batch: the divisor of
    the model's loss, which must count each data-parallel rank's batch once."""

    class Counting(trainer_cls):
        def get_batch_samples(self, *args, **kwargs):
            batches, items = super().get_batch_samples(*args, **kwargs)
            self.items.append(float(items))
            return batches, items

    return Counting


def _train(trainer_cls, args, dataset, resume=None, seed=0, **kw):
    """(losses logged at each step, final parameters, the trainer) of a training run; the
    trainer's ``items`` are the counts of each of its accumulated batches."""
    trainer = _counting(trainer_cls)(model=_model(seed), args=args, train_dataset=dataset, **kw)
    trainer.items = []
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return losses, params, trainer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _differences(run, ref) -> dict:
    """Relative differences of two runs' losses (by step) and final parameters (by name)."""
    (losses, params), (ref_losses, ref_params) = run, ref
    assert losses.keys() == ref_losses.keys()
    out = {f"loss {s}": abs(losses[s] - ref_losses[s]) / abs(ref_losses[s]) for s in ref_losses}
    out.update({n: _rel(params[n], p) for n, p in ref_params.items()})
    return out


def ring_runs(rank, world, out):
    """On a ring of every rank: an uninterrupted run that checkpoints at step 2, the run resumed
    from that checkpoint (with a model built from another seed: resuming loads the checkpoint's
    weights), and (rank 0) a plain Trainer on one process with the same batches; what each run
    counted: the items of its accumulated batches and the tokens seen."""
    data = _Tokens(8)
    with _launched(rank, world):
        args = _args(out, save_strategy="steps", save_steps=2, include_num_input_tokens_seen="all")
        *whole, trainer = _train(RingTrainer, args, data, ring_options=RING)
        counts = {"whole": (trainer.items, trainer.state.num_input_tokens_seen)}
    with _launched(rank, world):
        resume = f"{out}/checkpoint-2"
        *resumed, trainer = _train(RingTrainer, _args(out), data, resume, seed=7, ring_options=RING)
        counts["resumed"] = trainer.items
    if rank != 0:
        return None
    with _launched(0, 1):
        args = _args(f"{out}/alone", include_num_input_tokens_seen="all")
        *alone, trainer = _train(transformers.Trainer, args, data)
        counts["alone"] = (trainer.items, trainer.state.num_input_tokens_seen)
    return whole, resumed, alone, counts


@pytest.fixture(scope="module")
def ring_of_two(gloo, tmp_path_factory):
    return gloo(2).run(ring_runs, str(tmp_path_factory.mktemp("ring")), timeout=240)[0]


def test_ring_trainer_matches_one_process(ring_of_two):
    whole, _, alone, counts = ring_of_two
    assert len(alone[0]) == 4  # a loss logged at every step
    # the loss's divisor at each step and the tokens seen, exactly: the ring's batch counted once
    assert counts["whole"] == counts["alone"]
    assert counts["whole"][1] == 8 * S
    diffs = _differences(whole, alone)
    assert max(diffs.values()) < TOL, {k: v for k, v in diffs.items() if v >= TOL}


def test_resumed_run_continues_the_same(ring_of_two):
    whole, resumed, _, counts = ring_of_two
    assert counts["resumed"] == counts["whole"][0][2:]  # it ran steps 3 and 4 only
    # the losses of steps 1 and 2 come with the checkpoint's state; 3 and 4 are its own
    diffs = _differences(resumed, whole)
    assert max(diffs.values()) < TOL, {k: v for k, v in diffs.items() if v >= TOL}


def mesh_run(rank, world, out):
    """A (dp=2, ring=2) mesh, and (rank 0) one process whose batches hold both data-parallel
    ranks' (2 sequences for their 1 each); each trains and evaluates. Also what
    ``gather_for_metrics`` brings back from a loader of 5 items (the last batch on one dp rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    data, held_out = _Tokens(16), _Tokens(4, seed=2)
    with _launched(rank, world):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ring"))
        ring = {**RING, "group": mesh, "mesh_dim": "ring"}
        *run, trainer = _train(RingTrainer, _args(out), data, ring_options=ring)
        items = trainer.items
        eval_loss = trainer.evaluate(held_out)["eval_loss"]
        ddp_ranks = dist.get_process_group_ranks(trainer.model_wrapped.process_group)
        acc = trainer.accelerator
        loader = acc.prepare_data_loader(torch.utils.data.DataLoader(torch.arange(5)))
        gathered = torch.cat([acc.gather_for_metrics(batch) for batch in loader]).tolist()
    if rank != 0:
        return None
    with _launched(0, 1):
        # Trainer divides each evaluation step's loss by the items of the whole step, across
        # data-parallel ranks: one process compares with a batch of both ranks' sequences
        two = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 2}
        *alone, trainer = _train(transformers.Trainer, _args(f"{out}/alone", **two), data)
        alone_eval = trainer.evaluate(held_out)["eval_loss"]
    same_items = items == trainer.items  # summed over the dp ranks, each counted once
    diffs = _differences(run, alone)
    return diffs, abs(eval_loss - alone_eval) / alone_eval, same_items, ddp_ranks, gathered


def test_data_parallel_across_rings_matches_one_process(gloo, tmp_path):
    results = gloo(4).run(mesh_run, str(tmp_path), timeout=240)[0]
    diffs, eval_diff, same_items, ddp_ranks, gathered = results
    assert same_items
    assert ddp_ranks == [0, 2]  # rank 0's DDP spans its dp column, not its ring
    assert max(diffs.values()) < TOL, {k: v for k, v in diffs.items() if v >= TOL}
    assert eval_diff < TOL
    assert gathered == [0, 1, 2, 3, 4]  # each ring's items once, the padding cut


def accelerate_loop(rank, world):
    """A plain accelerate loop on a ring of every rank (RingAccelerator), and (rank 0) the same
    loop on one process: losses and final parameters. Its scheduler decays the learning rate each
    step, so it must step once per optimizer step, not once per process."""
    data = _Tokens(6)

    def run(accelerator):
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
        model, optimizer, loader, scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        losses = {}
        for step, batch in enumerate(loader):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses[step] = loss.item()
        params = accelerator.unwrap_model(model).named_parameters()
        return losses, {n: p.detach().clone() for n, p in params}

    with _launched(rank, world):
        ring = run(RingAccelerator(cpu=True, ring_options=RING))
    if rank != 0:
        return None
    with _launched(0, 1):
        alone = run(accelerate.Accelerator(cpu=True))
    return _differences(ring, alone)


def test_accelerate_loop_matches_one_process(gloo):
    diffs = gloo(2).run(accelerate_loop, timeout=240)[0]
    assert max(diffs.values()) < TOL, {k: v for k, v in diffs.items() if v >= TOL}


def setup_errors(rank, world):
    """What RingAccelerator refuses on a live world: accelerate counting another world than
    torch.distributed, and a ring smaller than the world given as a bare ProcessGroup."""
    errors = []
    with _launched(rank, 1):  # no RANK/WORLD_SIZE: accelerate sees one process of its own
        try:
            RingAccelerator(cpu=True)
        except RingCompileError as e:
            errors.append(str(e))
    alone, _ = dist.new_subgroups(group_size=1)
    with _launched(rank, world):
        try:
            RingAccelerator(cpu=True, ring_options={"group": alone})
        except RingCompileError as e:
            errors.append(str(e))
    return errors


def test_setup_errors_on_a_world(gloo):
    errors = gloo(2).run(setup_errors)[0]
    assert len(errors) == 2
    assert "accelerate counts 1 process(es) but torch.distributed 2" in errors[0]
    assert "a ring of 1 ranks in a world of 2 needs the world as a 2-D DeviceMesh" in errors[1]


@pytest.fixture
def one_process():
    with _launched(0, 1):
        yield


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"torch_compile": True}, "leave torch_compile, torch_compile_backend"),
        ({"torch_compile_backend": "ring"}, "leave torch_compile, torch_compile_backend"),
        ({"train_sampling_strategy": "batch_rebalance"}, "the ranks of a ring would draw"),
    ],
)
def test_trainer_refuses_conflicting_arguments(one_process, tmp_path, kw, says):
    with pytest.raises(RingCompileError, match=says):
        RingTrainer(model=_model(), args=_args(str(tmp_path), **kw), train_dataset=_Tokens(2))


def test_trainer_refuses_pytorch_context_parallelism(one_process, tmp_path):
    config = accelerate.ParallelismConfig(cp_size=2)
    args = _args(str(tmp_path), parallelism_config=config)
    with pytest.raises(RingCompileError, match=r"cp_size=2\) turns on PyTorch's own"):
        RingTrainer(model=_model(), args=args, train_dataset=_Tokens(2))


def test_trainer_refuses_a_launch_without_process_group(one_process, tmp_path, monkeypatch):
    args = _args(str(tmp_path), use_cpu=False)  # use_cpu would have accelerate start the group
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RingCompileError, match="torch.distributed is not initialised"):
        RingTrainer(model=_model(), args=args, train_dataset=_Tokens(2))

"""GradSum: the ring's gradient sums give what adding every contribution into an fp32 accumulator
gave, bit for bit, with fewer passes over memory."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ringcompile.kernels.grad_sum import GradSum, accumulators

SHAPE = (2, 6, 10, 4)


def _slice(n: int, rng: random.Random) -> slice:
    a = rng.randrange(n)
    return slice(a, rng.randrange(a + 1, n + 1))


class _Passes(TorchDispatchMode):
    """The aten ops run inside that write tensor memory (each a pass over it on a GPU)."""

    WRITERS = {"add", "add_", "copy_", "zero_", "fill_", "zeros", "zeros_like", "_to_copy"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.WRITERS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seed", range(40))
def test_sum_equals_fp32_accumulation_bit_for_bit(seed):
    """Random contributions (bf16 and fp32, over random regions and parts, some through an
    accumulator a kernel adds into or overwrites) against the accumulator the ring used to keep:
    zeros in fp32, each contribution added in arrival order, converted at the end."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"))
    old = torch.zeros(SHAPE)
    for _ in range(rng.randrange(1, 7)):
        target, region = s, old
        if rng.random() < 0.3:
            index = (slice(None), _slice(SHAPE[1], rng))
            target, region = s.part(index), old[index]
        index = (slice(None), _slice(region.shape[1], rng), _slice(SHAPE[2], rng))
        roll = rng.random()
        if roll < 0.15:
            acc = target.accumulator()
            x = torch.randn(acc.shape)
            acc += x
            region += x
        elif roll < 0.3 and target.empty:
            acc = target.accumulator(overwrite=True)
            x = torch.randn(acc.shape)
            acc.copy_(x)
            region += x
        else:
            dtype = rng.choice([torch.bfloat16, torch.bfloat16, torch.float32])
            t = torch.randn(region[index].shape, dtype=dtype)
            target.add(t, index)
            region[index] += t
    dtype = rng.choice([torch.bfloat16, torch.float32])
    assert torch.equal(s.result(dtype), old.to(dtype))


@pytest.mark.parametrize("fresh", [False, True])
def test_sum_over_a_callers_tensor(fresh):
    dest = torch.randn(SHAPE)
    want = torch.zeros(SHAPE) if fresh else dest.clone()
    s = GradSum.over(dest, fresh=fresh)
    a, b = torch.randn(SHAPE, dtype=torch.bfloat16), torch.randn(2, 6, 5, 4, dtype=torch.bfloat16)
    s.add(a)
    s.add(b, (slice(None), slice(None), slice(5, 10)))
    want += a
    want[:, :, 5:] += b
    s.flush()
    assert torch.equal(dest, want)


def test_two_contributions_take_one_pass():
    """At W = 2 an element gets two contributions (the own block's and the remote one's): the
    answer is one add, with no zeroing, no fp32 pass and no conversion."""
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"))
    halves = [(slice(None), slice(0, 3)), (slice(None), slice(3, 6))]  # the own block, by heads
    own = [torch.randn(2, 3, 10, 4, dtype=torch.bfloat16) for _ in halves]
    remote = torch.randn(2, 6, 5, 4, dtype=torch.bfloat16)  # the remote block: later rows
    with _Passes() as seen:
        for h, t in zip(halves, own):
            s.part(h).add(t)
        s.add(remote, (slice(None), slice(None), slice(5, 10)))
        s.result(torch.bfloat16)
    # four regions: two with one contribution (a copy), two with both (an add)
    assert sorted(seen.ops) == ["add", "add", "copy_", "copy_"], seen.ops


def test_one_contribution_is_the_result():
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"))
    t = torch.randn(SHAPE, dtype=torch.bfloat16)
    s.add(t)
    assert s.result(torch.bfloat16) is t


def test_a_third_contribution_folds_into_fp32():
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"))
    ts = [torch.randn(SHAPE, dtype=torch.bfloat16) for _ in range(3)]
    for t in ts:
        s.add(t)
    assert s.acc is not None and s.acc.dtype == torch.float32 and len(s.held) == 1
    assert torch.equal(
        s.result(torch.bfloat16), ((ts[0].float() + ts[1].float()) + ts[2].float()).bfloat16()
    )


def test_kernels_that_add_in_place_get_the_accumulator():
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"))
    dq, dk, dv, fresh, dq_fresh = accumulators(
        s,
        GradSum(SHAPE, torch.float32, torch.device("cpu")),
        GradSum(SHAPE, torch.float32, torch.device("cpu")),
        False,
    )
    assert fresh and not dq_fresh
    assert dq.dtype == torch.float32 and torch.equal(dq, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="overwriting a region that holds"):
        s.accumulator(overwrite=True)
    with pytest.raises(ValueError, match="contribution to a region of"):
        s.add(torch.zeros(1, 2, 3, 4))


def test_a_sole_contribution_is_written_in_the_result_dtype():
    """Declared to get one contribution, a sum overwritten whole hands the kernel a tensor in the
    result's dtype and returns it; a second contribution raises."""
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"), sole_dtype=torch.bfloat16)
    acc = s.accumulator(overwrite=True)
    assert acc.dtype == torch.bfloat16
    acc.copy_(torch.randn(SHAPE))
    with _Passes() as seen:
        assert s.result(torch.bfloat16).data_ptr() == acc.data_ptr()
    assert seen.ops == []
    with pytest.raises(RuntimeError, match="second contribution"):
        s.add(torch.zeros(SHAPE))
    # a part overwritten, or an accumulator added into, stays fp32
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"), sole_dtype=torch.bfloat16)
    assert s.part((slice(None), slice(0, 3))).accumulator(overwrite=True).dtype == torch.float32
    s = GradSum(SHAPE, torch.float32, torch.device("cpu"), sole_dtype=torch.bfloat16)
    assert s.accumulator().dtype == torch.float32


def test_a_kernel_that_owns_its_rows_writes_dq_over_an_empty_sum():
    empty, held = (GradSum(SHAPE, torch.float32, torch.device("cpu")) for _ in range(2))
    held.add(torch.ones(SHAPE))
    for s, fresh in ((empty, True), (held, False)):
        dq, *_, dq_fresh = accumulators(s, torch.zeros(SHAPE), torch.zeros(SHAPE), True,
                                        dq_may_overwrite=True)  # fmt: skip
        assert dq_fresh == fresh
    assert torch.equal(dq, torch.ones(SHAPE))  # the held contribution, folded in

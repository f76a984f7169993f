"""Persistent gloo worlds for multi-rank tests on CPU.

Spawning a process group per test would spend most of the suite importing torch, so each world
size keeps one set of worker processes alive and runs test functions on them. A test function is
a module-level ``fn(rank, world_size, *args)``; ``GlooWorld.run`` returns every rank's result.
Any failure or a timeout (a hang) tears the world down so the next test starts clean.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import traceback

import torch.multiprocessing as mp


def _serve(rank: int, world_size: int, init_file: str, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # report everything, including assertion errors, to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class GlooWorld:
    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="ringcompile-gloo-")
        os.close(fd)
        os.unlink(self._init_file)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(r, world_size, self._init_file, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float = 180.0) -> list:
        for t in self._tasks:
            t.put((fn, args))
        out: list = [None] * self.world_size
        errors = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(
                    f"{fn.__name__} did not finish on all {self.world_size} ranks within "
                    f"{timeout}s (a hang?)"
                ) from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                # the other ranks may now wait forever on a collective: don't wait for them
                self.close()
                raise AssertionError("\n".join(errors))
        return out

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def close(self) -> None:
        for t, p in zip(self._tasks, self._procs):
            if p.is_alive():
                try:
                    t.put(None)
                except Exception:
                    pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)

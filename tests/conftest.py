import pytest
import torch
from gloo_world import GlooWorld


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gloo():
    """``gloo(W).run(fn, *args)`` runs ``fn(rank, W, *args)`` on a live gloo world of W ranks."""
    worlds: dict[int, GlooWorld] = {}

    def get(world_size: int) -> GlooWorld:
        w = worlds.get(world_size)
        if w is None or not w.alive:
            w = worlds[world_size] = GlooWorld(world_size)
        return w

    yield get
    for w in worlds.values():
        w.close()

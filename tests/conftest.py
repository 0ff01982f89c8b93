import functools

import pytest
import torch

# Same thread count everywhere in the suite: bit-exact comparisons depend on it.
torch.set_num_threads(2)

ZOO_MODELS = ["alexnet", "vgg16", "resnet18", "resnet50", "googlenet", "mobilenet_v2", "inception_v3",
              "densenet121", "efficientnet_b0", "squeezenet1_1"]


@functools.lru_cache(maxsize=None)
def zoo_graph(name: str, shape: tuple[int, ...] | None = None):
    """Graphs are deterministic (fixed seed), so tests share one per (model, shape)."""
    from partitioner.graph import load_graph

    return load_graph(name, shape)


@pytest.fixture
def graph_of():
    return zoo_graph


def fast_failing_cluster(tmp_path_factory, name: str):
    """A local cloud + 3 edge daemons that drop a silent peer after 1 s and re-run its tiles after 2 s:
    the cluster the fault tests kill nodes in. Use as ``yield from`` in a module-scoped fixture."""
    from tiers.demo import LocalCluster

    local = LocalCluster.create(edge_nodes=3, edge_slowdown=1.0, device_slowdown=1.0,
                                workdir=str(tmp_path_factory.mktemp(name)),
                                extra_edge_args=["--peer-timeout", "1.0", "--tile-timeout", "2"])
    try:
        local.start(timeout_s=90)
        yield local
    finally:
        local.stop()

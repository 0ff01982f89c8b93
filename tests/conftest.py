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

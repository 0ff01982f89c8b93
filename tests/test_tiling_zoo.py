"""Issue 3's acceptance grid: six zoo models, every node count 1..8 with unequal node weights, the whole
model on the (tiled) edge: the stitched output equals the untiled model's."""
import pytest
import torch

from conftest import zoo_graph
from partitioner.segments import build_segments
from partitioner.tiling import plan_segment_tiling, run_edge_tiled
from partitioner.zoo import example_input
from test_tiling import WEIGHTS, assert_matches_untiled

# Small odd sizes keep 48 tiled runs per model fast while still exercising ragged borders.
SHAPES = {
    "vgg16": (1, 3, 67, 67), "resnet18": (1, 3, 99, 99), "resnet50": (1, 3, 99, 99),
    "googlenet": (1, 3, 97, 97), "mobilenet_v2": (1, 3, 97, 97), "inception_v3": (1, 3, 139, 139),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_one_to_eight_weighted_nodes_reproduce_the_model(name):
    graph = zoo_graph(name, SHAPES[name])
    segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
    x = example_input(graph.input_shape)
    with torch.no_grad():
        reference = graph.module(x)
    exact = 0
    for count in range(1, 9):
        plan = plan_segment_tiling(graph, segmented.edge, WEIGHTS[:count])
        with torch.no_grad():
            values = {"x": x}
            values.update(segmented.device.run(values))
            values.update(run_edge_tiled(graph, plan, values))
            out = segmented.assemble_output(values)
        assert_matches_untiled(out, reference, f"{name} N={count}")
        exact += torch.equal(out, reference)
    assert exact >= 1, "N=1 at least must be bit-exact"

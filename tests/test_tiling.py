"""Vertical separation: the edge segment tiled over N nodes gives the untiled segment's output."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import zoo_graph
from deploy.cli import main as d3
from partitioner.graph import build_graph
from partitioner.segments import build_segments
from partitioner.tiling import (EdgeTilingPlan, SerialStage, TiledStage, TileSpec, plan_edge_tiling,
                                plan_segment_tiling, run_edge_tiled, run_tile, slice_inputs, stitch)
from partitioner.zoo import example_input

WEIGHTS = [1.0, 2.5, 1.0, 3.0, 1.5, 1.0, 2.0, 1.25]  # unequal relative speeds; N nodes take the first N


# The tiles reproduce the untiled kernels' rounding on the ISA this was measured on (see partitioner/halo.py);
# elsewhere a conv may pick another blocking for a smaller map, and the float tolerance applies.
BIT_EXACT_ISA = torch.backends.cpu.get_cpu_capability() == "AVX512"


def assert_matches_untiled(out, ref, what=""):
    """torch.equal, or (a conv ran another algorithm on its smaller tile) a max abs diff of at most 1e-5
    with the same top-1."""
    if torch.equal(out, ref):
        return
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-5, f"{what}: max abs diff {diff}"
    if ref.dim() == 2:
        assert torch.equal(out.argmax(1), ref.argmax(1)), f"{what}: top-1 changed"


def edge_values(graph, segmented):
    x = example_input(graph.input_shape)
    with torch.no_grad():
        values = {"x": x}
        values.update(segmented.device.run(values))
        reference = segmented.edge.run(values)
    return values, reference


def assert_tiles_partition_outputs(plan):
    for stage in plan.tiled_stages:
        for name in stage.output_names:
            height, width = stage.output_sizes[name]
            count = torch.zeros(height, width, dtype=torch.int32)
            for tile in stage.tiles:
                if name in tile.output_regions:
                    (h0, h1), (w0, w1) = tile.output_regions[name]
                    count[h0:h1, w0:w1] += 1
            assert bool((count == 1).all()), f"tiles of {name} overlap or leave holes"


class EveryOpNet(nn.Module):
    """Small net with each op kind the tiler handles, with awkward geometry: odd sizes, stride 2, dilation,
    groups, 1x3 kernels, 'same' padding with an even kernel, ceil_mode pools, avg pools with and without
    count_include_pad, a residual add, a channel concat and a squeeze-excite broadcast multiply."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.pool_ceil = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.branch_a = nn.Conv2d(8, 4, 1)
        self.branch_b = nn.Conv2d(8, 4, (1, 3), padding=(0, 1))
        self.avg_ceil = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        self.avg_pad = nn.AvgPool2d(3, 1, padding=1)
        self.same = nn.Conv2d(8, 8, 4, padding="same")
        self.down = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.pool_ceil(x)
        y = self.dilated(x) + self.grouped(x)
        y = torch.cat([self.branch_a(y), self.branch_b(y)], 1)
        y = y * torch.sigmoid(F.adaptive_avg_pool2d(y, 1))
        y = self.avg_ceil(y)
        y = F.max_pool2d(y, 2, 2, ceil_mode=True)
        y = self.down(self.same(self.avg_pad(y)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class PoolNet(nn.Module):
    """Pools only: no conv algorithm to vary, so tiles must be bit-exact."""

    def forward(self, x):
        x = F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True)
        x = F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True, count_include_pad=True)
        x = F.avg_pool2d(x, 3, 1, padding=1, count_include_pad=False)
        x = F.max_pool2d(x, 3, 1, padding=1, dilation=2)
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True, divisor_override=3)
        return x.relu()


def _full_edge(model, shape):
    torch.manual_seed(0)
    graph = build_graph(model.eval(), shape, type(model).__name__)
    segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
    return graph, segmented


@pytest.mark.parametrize("shape,counts", [((1, 3, 45, 37), range(1, 9)), ((2, 3, 33, 64), (3, 6))])
def test_every_op_kind_tiles_exactly_for_any_node_count_and_split(shape, counts):
    torch.manual_seed(0)
    graph, segmented = _full_edge(EveryOpNet(), shape)
    values, reference = edge_values(graph, segmented)
    kinds = {graph.records[n].op_kind for s in plan_segment_tiling(graph, segmented.edge, [1, 1]).tiled_stages
             for n in s.nodes}
    assert {"conv", "bn", "maxpool", "avgpool", "add", "mul", "cat", "activation"} <= kinds
    for count in counts:
        for split in ("auto", ("h", "w", "grid")[count % 3]):
            plan = plan_segment_tiling(graph, segmented.edge, WEIGHTS[:count], split)
            assert_tiles_partition_outputs(plan)
            out = run_edge_tiled(graph, plan, values)
            for name in reference:
                assert_matches_untiled(out[name], reference[name], f"N={count} split={split}")


@pytest.mark.parametrize("shape", [(1, 3, 121, 97), (1, 2, 90, 67)])
def test_pools_with_ceil_mode_and_padding_counts_are_bit_exact(shape):
    graph, segmented = _full_edge(PoolNet(), shape)
    values, reference = edge_values(graph, segmented)
    for count in (2, 3, 5, 8):
        plan = plan_segment_tiling(graph, segmented.edge, WEIGHTS[:count], "auto", max_stage_halo_pct=1000)
        assert len(plan.tiled_stages) == 1 and len(plan.tiled_stages[0].tiles) > 1
        out = run_edge_tiled(graph, plan, values)
        for name in reference:
            assert torch.equal(out[name], reference[name]), f"N={count}"


# (model, input shape, edge segment as fractions of the node order, node count)
ZOO_CASES = [
    ("vgg16", (1, 3, 227, 227), (0.1, 0.6), 3),
    ("resnet18", (1, 3, 227, 227), (0.0, 1.0), 5),
    ("resnet50", (1, 3, 224, 224), (0.05, 0.7), 2),
    ("googlenet", (1, 3, 227, 227), (0.0, 1.0), 4),
    ("mobilenet_v2", (1, 3, 224, 224), (0.0, 1.0), 8),
    ("inception_v3", (1, 3, 299, 299), (0.2, 0.8), 3),
]


@pytest.mark.parametrize("name,shape,cuts,count", ZOO_CASES)
def test_zoo_model_with_tiled_edge_matches_the_untiled_model(name, shape, cuts, count):
    graph = zoo_graph(name, shape)
    first, last = (round(f * len(graph.order)) for f in cuts)
    segmented = build_segments(graph, graph.prefix_assignment(first, last))
    x = example_input(graph.input_shape)
    plan = plan_segment_tiling(graph, segmented.edge, WEIGHTS[:count])
    assert plan.tiled_stages, "the edge segment of a CNN should have tileable stages"
    assert_tiles_partition_outputs(plan)
    with torch.no_grad():
        reference = graph.module(x)
        values = {"x": x}
        values.update(segmented.device.run(values))
        values.update(run_edge_tiled(graph, plan, values))
        values.update(segmented.cloud.run(values))
    assert_matches_untiled(segmented.assemble_output(values), reference, name)


@pytest.mark.parametrize("name", ["resnet50", "inception_v3"])
def test_plans_for_one_to_eight_nodes_balance_weighted_work(name):
    graph = zoo_graph(name)
    segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
    for count in range(1, 9):
        plan = plan_segment_tiling(graph, segmented.edge, WEIGHTS[:count])
        assert_tiles_partition_outputs(plan)
        tiled = sum(s.tiled_flops for s in plan.tiled_stages)
        assert sum(plan.per_node_flops) == pytest.approx(tiled)
        assert plan.serial_flops + tiled == pytest.approx(plan.edge_flops * (1 + plan.halo_overhead_pct / 100))
        if count == 1:
            assert plan.halo_overhead_pct == 0 and plan.predicted_speedup == pytest.approx(1.0)
            continue
        # stages are cut to keep halo under 25%, but one block on a small late map may exceed it
        assert 0 < plan.halo_overhead_pct < 60
        # tiles sized by weight: predicted speedup over node 0 grows with the total weight
        assert plan.predicted_speedup > 0.5 * sum(WEIGHTS[:count]) / WEIGHTS[0]
    plan = plan_segment_tiling(graph, segmented.edge, [1.0, 3.0], "h")
    assert 2.2 < plan.per_node_flops[1] / plan.per_node_flops[0] < 3.8


def test_deeper_runs_are_cut_into_stages_to_bound_halo():
    graph = zoo_graph("resnet18")
    segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
    one_stage = plan_segment_tiling(graph, segmented.edge, [1, 1], "h", max_stage_halo_pct=1e9)
    bounded = plan_segment_tiling(graph, segmented.edge, [1, 1], "h", max_stage_halo_pct=10)
    assert len(one_stage.tiled_stages) == 1 and len(bounded.tiled_stages) > 2
    assert bounded.halo_overhead_pct < one_stage.halo_overhead_pct
    assert isinstance(bounded.stages[-1], SerialStage)  # avgpool / flatten / fc run whole
    assert bounded.stages[-1].nodes[-1] == "fc"


def test_tile_runner_gets_json_specs_and_slices_like_a_remote_node():
    graph = zoo_graph("resnet18", (1, 3, 96, 80))
    segmented = build_segments(graph, graph.prefix_assignment(4, 60))
    values, reference = edge_values(graph, segmented)
    plan = plan_segment_tiling(graph, segmented.edge, [1.0, 2.0, 1.0])
    wire_plan = EdgeTilingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert wire_plan.to_dict() == plan.to_dict()
    calls = []

    def remote(stage_index, tile, slices):
        spec = TileSpec.from_dict(json.loads(json.dumps(tile.to_dict())))  # what the node receives
        assert set(slices) == set(spec.input_regions)
        calls.append((stage_index, spec.node))
        return run_tile(graph, wire_plan.stages[stage_index], spec, slices)

    remote_out = run_edge_tiled(graph, plan, values, tile_runner=remote)
    local_out = run_edge_tiled(graph, plan, values)
    assert len(calls) == sum(len(s.tiles) for s in plan.tiled_stages)
    for name in reference:
        assert torch.equal(remote_out[name], local_out[name])
        assert_matches_untiled(remote_out[name], reference[name])
    # the untouched edge inputs: in-place ops in a tile never write into the caller's tensors
    again, _ = edge_values(graph, segmented)
    for name in segmented.edge.input_names:
        assert torch.equal(values[name], again[name])


def test_slice_and_stitch_round_trip_and_refuse_wrong_pieces():
    graph = zoo_graph("resnet18", (1, 3, 96, 80))
    segmented = build_segments(graph, graph.prefix_assignment(4, 30))
    values, reference = edge_values(graph, segmented)
    plan = plan_segment_tiling(graph, segmented.edge, [1, 1, 1, 1], "grid")
    stage = plan.tiled_stages[0]
    assert isinstance(stage, TiledStage) and stage.split == "grid"
    pieces = [run_tile(graph, stage, tile, slice_inputs(stage, tile, values)) for tile in stage.tiles]
    stitched = stitch(stage, pieces)
    assert set(stitched) == set(stage.output_names)
    with pytest.raises(ValueError, match="tiles"):
        stitch(stage, pieces[:-1])
    tile = stage.tiles[0]
    bad = {k: v[..., 1:, :] for k, v in slice_inputs(stage, tile, values).items()}
    with pytest.raises(ValueError, match="input slice"):
        run_tile(graph, stage, tile, bad)


def test_bad_weights_and_split_are_refused_clearly():
    graph = zoo_graph("resnet18", (1, 3, 64, 64))
    segmented = build_segments(graph, graph.prefix_assignment(0, 20))
    edge = segmented.edge
    with pytest.raises(ValueError, match="positive"):
        plan_edge_tiling(graph, edge.node_names, edge.input_names, edge.output_names, [1, 0])
    with pytest.raises(ValueError, match="at least one"):
        plan_edge_tiling(graph, edge.node_names, edge.input_names, edge.output_names, [])
    with pytest.raises(ValueError, match="split"):
        plan_edge_tiling(graph, edge.node_names, edge.input_names, edge.output_names, [1], split="diagonal")
    with pytest.raises(ValueError, match="neither computed"):
        plan_edge_tiling(graph, edge.node_names, [], edge.output_names, [1, 1])


def test_verify_cli_tiles_the_edge_and_reports_halo(capsys):
    status = d3(["verify", "resnet18", "--input", "1x3x99x99", "--cuts", "3,60", "--edge-nodes", "3",
                 "--weights-per-node", "1,2,1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert status == 0 and result["ok"]
    assert result["edge_nodes"] == 3 and result["tiled_runs"] >= 1
    assert 0 < result["halo_overhead_pct"] < 100
    assert result["max_abs_diff"] <= 1e-5
    assert d3(["verify", "resnet18", "--cuts", "3,60", "--edge-nodes", "3", "--weights-per-node", "1,2"]) == 2
    assert "--weights-per-node gives 2 weights" in capsys.readouterr().err


class BottleneckNet(nn.Module):
    """A resnet bottleneck at a size where oneDNN runs every conv: its 1x1 convs pick their reduction
    blocking by output height (10 / 28 row thresholds), so naive row tiles round differently."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(256, 64, 1)
        self.bn = nn.BatchNorm2d(64)
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.expand = nn.Conv2d(64, 256, 1)
        self.down = nn.Conv2d(256, 128, 1, stride=2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = F.relu(self.bn(self.reduce(x)), inplace=True)
        y = self.expand(F.relu(self.conv(y)))
        return self.down(F.relu(y + x))


# the height classes are those of oneDNN's AVX-512 1x1 kernel; other ISAs have other heuristics
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="tuned to oneDNN's AVX-512 kernels")
@pytest.mark.parametrize("split", ["h", "auto"])
def test_onednn_convs_and_batch_norm_tiles_are_bit_exact(split):
    graph, segmented = _full_edge(BottleneckNet(), (1, 256, 56, 56))
    values, reference = edge_values(graph, segmented)
    for count in (2, 3, 5):
        plan = plan_segment_tiling(graph, segmented.edge, WEIGHTS[:count], split)
        out = run_edge_tiled(graph, plan, values)
        for name in reference:
            assert torch.equal(out[name], reference[name]), f"N={count} split={split}"


@pytest.mark.parametrize("channels,size,threads", [((256, 64), 112, 2), ((128, 128), 13, 2), ((2048, 512), 14, 1)])
def test_pointwise_convs_round_like_the_untiled_map(channels, size, threads):
    """1x1 convs whose kernel blocking follows the map's height, its pixel count (oneDNN) or a minimum
    pixel count (aten's GEMM at one thread): tiles split every way still give the untiled tensor."""
    if not BIT_EXACT_ISA:
        pytest.skip("bit-exactness of the layout is measured on AVX-512 only")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(channels[0], channels[1], 1, bias=False), nn.ReLU()).eval()
        graph = build_graph(net, (1, channels[0], size, size))
        segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
        x = torch.randn(1, channels[0], size, size)
        values = {graph.input_names[0]: x}
        with torch.no_grad():
            reference = net(x)
            for split, count in (("h", 3), ("w", 4), ("grid", 5)):
                plan = plan_segment_tiling(graph, segmented.edge, WEIGHTS[:count], split=split)
                out = segmented.assemble_output({**values, **run_edge_tiled(graph, plan, values)})
                assert torch.equal(out, reference), f"split {split} N={count}: {(out - reference).abs().max()}"
    finally:
        torch.set_num_threads(before)

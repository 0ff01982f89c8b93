"""Edge strategies: every strategy is lossless on real models and heterogeneous clusters, plans travel
as JSON through the item seam, and each strategy's own decision rule does what it claims."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from partitioner.edge_strategies import EDGE_STRATEGIES, EdgePlan, ReduceStage, SubgraphStage, item_meta, \
    plan_all, plan_edge, run_edge_plan, run_item_from_meta
from partitioner.edge_strategies.units import lp_shares, round_shares
from partitioner.graph import build_graph
from partitioner.segments import build_segments
from partitioner.zoo import example_input
from conftest import zoo_graph

# (model, input shape, node speeds): 2 to 6 heterogeneous nodes
CASES = [
    ("vgg16", (1, 3, 112, 112), (1.0, 0.5)),
    ("resnet50", (1, 3, 112, 112), (1.0, 0.5, 0.25)),
    ("googlenet", (1, 3, 112, 112), (1.0, 0.25, 0.5, 1.0)),
    ("inception_v3", (1, 3, 139, 139), (1.0, 0.5, 0.25, 0.25, 0.5, 1.0)),
]


# edge segment as fractions of the node order: inception_v3's middle third (its mixed blocks) keeps it fast
SLICES = {"inception_v3": (1 / 3, 2 / 3)}


@functools.lru_cache(maxsize=None)
def _setup(model: str, shape: tuple[int, ...]):
    """A middle slice of the model as the edge segment (by default device: first fifth, cloud: last
    fifth), the edge segment's input values, and the whole model's output as the reference."""
    graph = zoo_graph(model, shape)
    count = len(graph.order)
    start, stop = SLICES.get(model, (1 / 5, 4 / 5))
    segmented = build_segments(graph, graph.prefix_assignment(int(count * start), int(count * stop)))
    x = example_input(shape)
    with torch.no_grad():
        reference = graph.module(x)
        values = {graph.input_names[0]: x}
        values.update(segmented.device.run(values))
    return graph, segmented, values, reference


def _finish(segmented, values, edge_outputs):
    merged = {**values, **edge_outputs}
    with torch.no_grad():
        merged.update(segmented.cloud.run(merged))
    return segmented.assemble_output(merged)


def _assert_same_model_output(out, reference, what):
    scale = max(1.0, reference.abs().max().item())
    diff = (out - reference).abs().max().item()
    assert diff <= 1e-5 * scale, f"{what}: max abs diff {diff} (output scale {scale})"
    assert torch.equal(out.argmax(dim=1), reference.argmax(dim=1)), f"{what}: top-1 differs"


@pytest.mark.parametrize("model,shape,speeds", CASES, ids=[c[0] for c in CASES])
def test_every_strategy_equals_the_single_node_model(model, shape, speeds):
    graph, segmented, values, reference = _setup(model, shape)
    edge = segmented.edge
    plans = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, speeds)
    assert set(plans) == set(EDGE_STRATEGIES)
    for name, plan in plans.items():
        # every edge node is computed by exactly one stage
        covered = [n for stage in plan.stages for n in stage.nodes]
        assert sorted(covered) == sorted(edge.node_names), name
        out = _finish(segmented, values, run_edge_plan(graph, plan, values))
        _assert_same_model_output(out, reference, f"{model}/{name}")
        assert plan.predicted_ms > 0 and len(plan.per_node_peak_bytes) == len(speeds)


@pytest.mark.parametrize("strategy", ["hetero_lp", "zones", "iop", "auction"])
def test_plans_survive_json_and_run_through_the_item_seam(strategy):
    """What the edge daemon does: the plan as JSON, each item's spec as JSON, items run on 'nodes' in
    parallel threads; the result must equal the in-process run."""
    graph, segmented, values, reference = _setup("googlenet", (1, 3, 112, 112))
    edge = segmented.edge
    plan = plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, 0.5, 1.0),
                     strategy=strategy)
    plan = EdgePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    nodes_used = set()

    def remote(stage_index, item, slices):
        nodes_used.add(item.node)
        meta = json.loads(json.dumps(item_meta(plan, stage_index, item)))
        return run_item_from_meta(graph, meta, {k: v.clone() for k, v in slices.items()})

    out = _finish(segmented, values, run_edge_plan(graph, plan, values, item_runner=remote))
    _assert_same_model_output(out, reference, f"googlenet/{strategy} via item seam")
    assert len(nodes_used) > 1, f"{strategy} used only nodes {nodes_used}"


def test_unknown_strategy_and_bad_speeds_are_clear_errors():
    graph, segmented, _, _ = _setup("googlenet", (1, 3, 112, 112))
    edge = segmented.edge
    with pytest.raises(ValueError, match="unknown edge strategy 'magic'.*hetero_lp"):
        plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, (1.0,), strategy="magic")
    with pytest.raises(ValueError, match="positive"):
        plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, -2.0), strategy="tiles")
    with pytest.raises(ValueError, match="no work nodes"):
        plan_edge(graph, ["nope"], edge.input_names, edge.output_names, (1.0,), strategy="tiles")


def test_auto_picks_the_lowest_predicted_strategy():
    graph, segmented, _, _ = _setup("googlenet", (1, 3, 112, 112))
    edge = segmented.edge
    plan = plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, 0.5, 0.25))
    candidates = plan.notes["candidates_ms"]
    assert set(candidates) == set(EDGE_STRATEGIES)
    assert plan.strategy == min(candidates, key=candidates.get)


def test_auto_at_run_time_tries_the_best_predicted_then_keeps_the_measured_fastest():
    from partitioner.edge_strategies import plan_all
    from partitioner.edge_strategies.online import WHOLE, OnlineSelector

    graph, segmented, _, _ = _setup("googlenet", (1, 3, 112, 112))
    edge = segmented.edge
    plans = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, 0.5, 0.25))
    selector = OnlineSelector.from_plans(plans)
    ranked = sorted(plans, key=lambda name: plans[name].predicted_ms)
    assert selector.candidates[:3] == ranked[:3] and "tiles" in selector.candidates
    assert selector.candidates[-1] == WHOLE  # the unsplit segment is measured too, last
    tried = []
    for _ in selector.candidates:  # one request each, best predicted first
        name = selector.choose_name()
        plan = selector.choose()
        assert (plan is None) == (name == WHOLE) and (plan is None or plan.strategy == name)
        tried.append(name)
        # measured: the third-ranked candidate is by far the fastest (as zones was on throttled nodes)
        selector.record(name, 0.05 if name == ranked[2] else 0.2)
    assert tried == selector.candidates
    assert selector.choose().strategy == ranked[2]
    for _ in range(5):  # it gets slower (a busy node): the next fastest takes over
        selector.record(ranked[2], 0.5)
    assert selector.choose().strategy != ranked[2]
    outsider = next(name for name in plans if name not in selector.candidates)
    selector.record(outsider, 0.001)  # a strategy it never tried cannot win on a record it did not take
    assert selector.choose_name() in selector.candidates
    for name in selector.candidates:  # splitting got slower everywhere: the unsplit segment takes over
        for _ in range(9):
            selector.record(name, 0.3 if name != WHOLE else 0.1)
    assert selector.choose_name() == WHOLE and selector.choose() is None


def test_lp_shares_equalise_finish_times_and_price_the_link():
    speeds = [1.0, 0.5, 0.25]
    shares, finish = lp_shares([1.0 / s for s in speeds], [0.0] * 3, [0.0] * 3)
    np.testing.assert_allclose(shares, np.array(speeds) / sum(speeds), atol=1e-6)
    assert finish == pytest.approx(1.0 / sum(speeds))
    # a remote node that cannot start before the coordinator would be done alone gets nothing
    shares, finish = lp_shares([1.0, 1.0], [0.0, 2.0], [0.0, 0.0])
    assert shares[1] == pytest.approx(0.0, abs=1e-9) and finish == pytest.approx(1.0)
    # transfer time is paid by the remote node: x * (1 + 5) = 1 - x  ->  x = 1/7
    shares, finish = lp_shares([1.0, 1.0], [0.0, 0.0], [0.0, 5.0])
    assert shares[1] == pytest.approx(1 / 7) and finish == pytest.approx(6 / 7)
    assert round_shares([0.5, 0.25, 0.25], 10) in ([(0, 5, 0), (5, 8, 1), (8, 10, 2)],
                                                    [(0, 5, 0), (5, 7, 1), (7, 10, 2)])


def test_hetero_lp_gives_slow_nodes_less_work_and_equal_finish_times():
    graph, segmented, _, _ = _setup("vgg16", (1, 3, 112, 112))
    edge = segmented.edge
    speeds = (1.0, 1.0, 0.1)
    plan = plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, speeds,
                     link_bps=1e12, strategy="hetero_lp")
    busy = plan.per_node_busy_ms
    work = [b * s for b, s in zip(busy, speeds)]  # seconds at speed 1 (transfers are negligible here)
    assert work[2] < 0.2 * work[1], work
    assert max(busy) < 1.35 * min(busy), busy  # the LP equalises finish times


def test_auction_bids_a_crawling_node_out():
    graph, segmented, _, _ = _setup("resnet50", (1, 3, 112, 112))
    edge = segmented.edge
    plan = plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, 1.0, 0.001),
                     strategy="auction")
    assert all(item.node != 2 for stage in plan.stages for item in stage.items)
    assert any(item.node == 1 for stage in plan.stages for item in stage.items)


def test_zones_run_inception_branches_on_different_nodes():
    graph, segmented, _, _ = _setup("inception_v3", (1, 3, 139, 139))
    edge = segmented.edge
    plan = plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, 0.5, 0.25, 0.25, 0.5, 1.0),
                     strategy="zones")
    branch_stages = [s for s in plan.stages if isinstance(s, SubgraphStage) and len({i.node for i in s.items}) > 1]
    assert branch_stages, "no inception block ran its branches in parallel"


def test_dpfl_fuses_more_when_synchronisation_is_expensive():
    graph, segmented, _, _ = _setup("vgg16", (1, 3, 112, 112))
    edge = segmented.edge
    counts = {}
    for link_bps in (1e12, 2e8):
        plan = plan_edge(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, 1.0),
                         link_bps=link_bps, strategy="dpfl")
        counts[link_bps] = len(plan.stages)
    assert counts[2e8] < counts[1e12], counts


def test_iop_pairs_convs_and_cuts_per_node_memory():
    graph, segmented, values, reference = _setup("vgg16", (1, 3, 112, 112))
    edge = segmented.edge
    plans = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, (1.0, 1.0, 1.0, 1.0),
                     strategies=["iop", "tiles"])
    iop = plans["iop"]
    assert any(isinstance(s, ReduceStage) for s in iop.stages)
    # each node holds only its channel slice of the paired convs' weights, tiles hold whole weights
    assert max(iop.per_node_peak_bytes) < max(plans["tiles"].per_node_peak_bytes)


class MixedNet(nn.Module):
    """Biased convs, 'same' padding, depthwise conv, squeeze-excite scaling, residual add, ceil-mode
    pool, conv pairs (IOP), a batch of 2: the cases the channel and reduce splits must get right."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(16)
        self.pair_a = nn.Conv2d(16, 24, 3, padding="same", bias=True)
        self.pair_b = nn.Conv2d(24, 16, 1, bias=True)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.squeeze = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)), inplace=True)
        y = self.pair_b(torch.relu(self.pair_a(x)))
        x = F.max_pool2d(x + y, 3, 2, padding=1, ceil_mode=True)
        z = F.relu6(self.depthwise(x))
        scale = torch.sigmoid(self.squeeze(F.adaptive_avg_pool2d(z, 1)))
        x = z * scale + x
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("speeds", [(1.0, 0.5, 0.25), (0.3, 1.0, 1.0, 0.6, 0.2)])
def test_every_strategy_is_exact_on_mixed_ops(speeds):
    torch.manual_seed(0)
    graph = build_graph(MixedNet().eval(), (2, 3, 29, 23), "mixed")
    segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
    edge = segmented.edge
    x = torch.randn(2, 3, 29, 23, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = graph.module(x)
    values = {graph.input_names[0]: x}
    # a fast LAN and free dispatch so the planners do split the work (the default prices keep a net this
    # small on one node)
    plans = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, speeds, link_bps=1e13,
                     item_overhead_s=0.0)
    kinds = set()
    for name, plan in plans.items():
        out = _finish(segmented, values, run_edge_plan(graph, plan, values))
        _assert_same_model_output(out, reference, f"mixed/{name}")
        kinds |= {type(stage).__name__ for stage in plan.stages}
    assert {"SpatialStage", "ChannelStage", "SubgraphStage"} <= kinds, kinds


def test_interleaved_pair_reduces_partial_sums_exactly():
    """IOP's reduce on MixedNet's conv pair (A 16->24 'same' + relu, B 24->16 with bias), forced over
    3 uneven channel shares; everything else runs whole."""
    from partitioner.edge_strategies.core import make_cost_model, reduce_stage, serial_stage, stage_io

    torch.manual_seed(0)
    graph = build_graph(MixedNet().eval(), (2, 3, 29, 23), "mixed")
    order = graph.order
    a = next(n for n in order if n == "pair_a")
    b = next(n for n in order if n == "pair_b")
    i, j = order.index(a), order.index(b)
    groups = [order[:i], order[i:j + 1], order[j + 1:]]
    io = stage_io(graph, groups, graph.output_names)
    cost = make_cost_model(graph, (1.0, 0.5, 0.25))
    stages = [serial_stage(graph, cost, groups[0], *io[0]),
              reduce_stage(graph, cost, groups[1][:-1], b, io[1][0], [(0, 13, 0), (13, 20, 1), (20, 24, 2)]),
              serial_stage(graph, cost, groups[2], *io[2])]
    plan = EdgePlan("iop", [1.0, 0.5, 0.25], 1e9, list(graph.input_names), list(graph.output_names), stages)
    plan = EdgePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    x = torch.randn(2, 3, 29, 23, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = graph.module(x)
    out = run_edge_plan(graph, plan, {graph.input_names[0]: x})[graph.output_names[0]]
    _assert_same_model_output(out, reference, "mixed/forced reduce")
    assert [len(s.items) for s in plan.stages] == [1, 3, 1]


def test_head_tiles_tiles_only_the_stages_that_pay_and_runs_the_rest_whole(monkeypatch):
    from partitioner.edge_strategies import SpatialStage, tiles as tiles_module

    graph = zoo_graph("resnet18", (1, 3, 224, 224))
    x = example_input((1, 3, 224, 224))
    with torch.no_grad():
        expected = graph.module(x)
    args = (graph, list(graph.order), list(graph.input_names), [graph.order[-1]], (1.0, 1.0, 1.0))
    tiled = plan_edge(*args, strategy="tiles")
    head = plan_edge(*args, strategy="head_tiles")
    kinds = [isinstance(stage, SpatialStage) for stage in head.stages]
    # the large early maps pay for a split, the small late ones do not: a tiled prefix, then one whole stage
    assert kinds[0] and not kinds[-1] and kinds == sorted(kinds, reverse=True), kinds
    assert len(head.stages) < len(tiled.stages) and isinstance(head.stages[-1], SubgraphStage)
    assert len(head.stages[-1].items) == 1 and head.stages[-1].items[0].node == 0
    with torch.no_grad():
        output = run_edge_plan(graph, head, {graph.input_names[0]: x})[graph.order[-1]]
    from test_tiling import BIT_EXACT_ISA

    assert torch.equal(output, expected) if BIT_EXACT_ISA else (output - expected).abs().max().item() <= 1e-5
    # a stage that costs more than any split saves: nothing is tiled, the segment runs whole on node 0
    monkeypatch.setattr(tiles_module, "HEAD_STAGE_OVERHEAD_S", 10.0)
    whole = plan_edge(*args, strategy="head_tiles")
    assert len(whole.stages) == 1 and isinstance(whole.stages[0], SubgraphStage)

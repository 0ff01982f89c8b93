"""Edge strategies: ways to spread the edge segment over N heterogeneous edge nodes, losslessly.

Every strategy returns the same executable :class:`EdgePlan` (stages of independent work items plus a
combine step, see ``core``), so ``run_edge_plan`` and the edge daemon's item seam run any of them.

``plan_edge(graph, segment_node_names, input_names, output_names, node_speeds, link_bps, strategy)``;
``strategy="auto"`` plans every strategy and keeps the one with the lowest predicted latency.
"""
from __future__ import annotations

from typing import Callable, Sequence

from partitioner.graph import ModelGraph

from partitioner.edge_strategies.auction import plan_auction
from partitioner.edge_strategies.core import DEFAULT_LINK_BPS, ChannelItem, ChannelStage, CostModel, EdgePlan, \
    ReduceStage, SpatialStage, SubgraphItem, SubgraphStage, combine, edge_stage_from_dict, evaluate_plan, \
    item_from_dict, item_meta, make_cost_model, run_edge_plan, run_item, run_item_from_meta, slice_item_inputs
from partitioner.edge_strategies.dpfl import plan_dpfl
from partitioner.edge_strategies.hetero_lp import plan_hetero_lp
from partitioner.edge_strategies.iop import plan_iop
from partitioner.edge_strategies.tiles import plan_head_tiles, plan_tiles
from partitioner.edge_strategies.zones import plan_zones

StrategyFn = Callable[[ModelGraph, Sequence[str], list[str], list[str], CostModel], list]

EDGE_STRATEGIES: dict[str, StrategyFn] = {
    "tiles": plan_tiles,
    "head_tiles": plan_head_tiles,
    "hetero_lp": plan_hetero_lp,
    "zones": plan_zones,
    "dpfl": plan_dpfl,
    "auction": plan_auction,
    "iop": plan_iop,
}
STRATEGY_NAMES = ("auto",) + tuple(EDGE_STRATEGIES)

__all__ = ["EDGE_STRATEGIES", "STRATEGY_NAMES", "EdgePlan", "plan_edge", "plan_all", "run_edge_plan", "run_item",
           "slice_item_inputs", "combine", "item_meta", "run_item_from_meta", "edge_stage_from_dict", "item_from_dict", "make_cost_model",
           "SpatialStage", "ChannelStage", "ReduceStage", "SubgraphStage", "ChannelItem", "SubgraphItem"]


def _plan_one(graph: ModelGraph, nodes, input_names, output_names, cost: CostModel, strategy: str) -> EdgePlan:
    from partitioner.edge_strategies.core import check_segment

    ordered = check_segment(graph, nodes, input_names, output_names)
    stages = EDGE_STRATEGIES[strategy](graph, ordered, list(input_names), list(output_names), cost)
    plan = EdgePlan(strategy, list(cost.node_speeds), cost.link_bps, list(input_names), list(output_names), stages)
    return evaluate_plan(graph, cost, plan)


def plan_all(graph: ModelGraph, segment_node_names: Sequence[str], input_names: list[str], output_names: list[str],
             node_speeds: Sequence[float], link_bps: float = DEFAULT_LINK_BPS, strategies: Sequence[str] | None = None,
             latency_model=None, item_overhead_s: float | None = None) -> dict[str, EdgePlan]:
    """One plan per strategy (all of them by default), keyed by name."""
    cost = make_cost_model(graph, node_speeds, link_bps, latency_model, item_overhead_s)
    names = list(strategies) if strategies else list(EDGE_STRATEGIES)
    _check_names(names)
    return {name: _plan_one(graph, segment_node_names, input_names, output_names, cost, name) for name in names}


def _check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in EDGE_STRATEGIES]
    if unknown:
        raise ValueError(f"unknown edge strategy {unknown[0]!r}; choose one of {', '.join(STRATEGY_NAMES)}")


def plan_edge(graph: ModelGraph, segment_node_names: Sequence[str], input_names: list[str], output_names: list[str],
              node_speeds: Sequence[float], link_bps: float = DEFAULT_LINK_BPS, strategy: str = "auto",
              latency_model=None, item_overhead_s: float | None = None) -> EdgePlan:
    """The edge segment (a ``Segment``'s node/input/output names) planned over nodes of relative
    ``node_speeds`` (node 0 coordinates) joined by a ``link_bps`` LAN, by ``strategy`` or, with
    ``"auto"``, by whichever strategy predicts the lowest latency (its name is in ``plan.strategy``,
    every candidate's prediction in ``plan.notes["candidates_ms"]``). ``item_overhead_s`` prices one remote
    work item's round trip besides its bytes (default 0.5 ms)."""
    if strategy != "auto":
        _check_names([strategy])
        return plan_all(graph, segment_node_names, input_names, output_names, node_speeds, link_bps, [strategy],
                        latency_model, item_overhead_s)[strategy]
    plans = plan_all(graph, segment_node_names, input_names, output_names, node_speeds, link_bps, None, latency_model,
                     item_overhead_s)
    best = min(plans.values(), key=lambda p: p.predicted_ms)
    best.notes["candidates_ms"] = {name: round(p.predicted_ms, 4) for name, p in plans.items()}
    best.notes["chosen_by"] = "auto"
    return best

"""``hetero_lp``: heterogeneous workload partition per layer (DeepZoning, CoEdge).

Each layer unit is split over the nodes either by output rows (spatial) or by output channels; an LP
(HiGHS) sizes each node's share so that all finish together, node k's time being
``share * unit_seconds / speed_k`` plus, for remote nodes, the bytes it receives and returns over the
LAN. Both splits are solved, rounded to whole rows/channels, priced with the true halo and the
coordinator's shared link, and the cheaper one kept (keeping the unit whole on the coordinator is the
LP's own corner solution).
"""
from __future__ import annotations

from typing import Sequence

from partitioner.graph import ModelGraph

from partitioner.edge_strategies.core import CostModel, Stage, channel_splittable, channel_stage, \
    node_module, reference_size, row_strip_stage, serial_stage, stage_seconds, value_bytes
from partitioner.edge_strategies.units import Unit, layer_units, lp_shares, round_shares


def spatial_option(graph: ModelGraph, unit: Unit, cost: CostModel) -> Stage:
    base = unit.base_s(cost)
    moved = sum(value_bytes(graph, n) for n in unit.inputs + unit.outputs)
    speeds = cost.node_speeds
    work = [base / s for s in speeds]
    fixed = [0.0] + [cost.per_item_overhead_s] * (len(speeds) - 1)
    per_share = [0.0] + [cost.transfer_s(moved)] * (len(speeds) - 1)
    shares, _ = lp_shares(work, fixed, per_share)
    height, _ = reference_size(graph, unit.outputs)
    return row_strip_stage(graph, cost, unit.nodes, unit.inputs, unit.outputs, round_shares(shares, height))


def channel_option(graph: ModelGraph, unit: Unit, cost: CostModel) -> Stage | None:
    channels = channel_splittable(graph, unit.nodes)
    if channels is None:
        return None
    first = graph.records[unit.nodes[0]]
    dense_input = first.input_names[0] if first.op_kind == "conv" and node_module(graph, unit.nodes[0]).groups == 1 \
        else None
    whole = value_bytes(graph, dense_input) if dense_input else 0.0
    sliced = sum(value_bytes(graph, n) for n in unit.inputs if n != dense_input) + \
        sum(value_bytes(graph, n) for n in unit.outputs)
    speeds = cost.node_speeds
    base = unit.base_s(cost)
    work = [base / s for s in speeds]
    fixed = [0.0] + [cost.per_item_overhead_s + cost.transfer_s(whole)] * (len(speeds) - 1)
    per_share = [0.0] + [cost.transfer_s(sliced)] * (len(speeds) - 1)
    shares, _ = lp_shares(work, fixed, per_share, [cost.transfer_s(whole)] * len(speeds))
    return channel_stage(graph, cost, unit.nodes, unit.inputs, unit.outputs, round_shares(shares, channels))


def plan_unit(graph: ModelGraph, unit: Unit, cost: CostModel) -> tuple[Stage, float]:
    """The cheaper of the spatial and channel LP splits of one unit, with its predicted seconds."""
    if not unit.tileable:
        stage = serial_stage(graph, cost, unit.nodes, unit.inputs, unit.outputs)
        return stage, stage_seconds(cost, stage)[0]
    options = [spatial_option(graph, unit, cost)]
    channel = channel_option(graph, unit, cost)
    if channel is not None:
        options.append(channel)
    priced = [(stage_seconds(cost, stage)[0], i, stage) for i, stage in enumerate(options)]
    seconds, _, stage = min(priced)
    return stage, seconds


def plan_hetero_lp(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
                   cost: CostModel) -> list[Stage]:
    return [plan_unit(graph, unit, cost)[0] for unit in layer_units(graph, nodes, outputs)]

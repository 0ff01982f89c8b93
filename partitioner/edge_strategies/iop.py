"""``iop``: interleaved operator partitioning.

A conv A (with its channel-wise followers: bn, activation) is split by output channels and the next
conv B by the matching input channels, so each node computes A's slice and B's partial sum from it;
only the partial sums travel and are added (a reduce) on the coordinator. Every node holds just its
slice of both weights, which is what shrinks per-node memory. Pairs are chosen greedily by predicted
benefit (seconds saved against planning both units on their own with ``hetero_lp``); units not in a
pair are planned by ``hetero_lp``. Channel shares come from the same LP (equal finish times).
"""
from __future__ import annotations

from typing import Sequence

from partitioner.graph import ModelGraph

from partitioner.edge_strategies.core import CostModel, Stage, reduce_pair_ok, reduce_stage, stage_io, \
    stage_seconds, value_bytes
from partitioner.edge_strategies.hetero_lp import plan_unit
from partitioner.edge_strategies.units import Unit, layer_units, lp_shares, round_shares


def _pair_stages(graph: ModelGraph, a: Unit, b: Unit, outputs, cost: CostModel) -> list[Stage] | None:
    b_conv = b.nodes[0]
    if not (a.tileable and b.tileable) or a.outputs != [a.nodes[-1]]:
        return None
    channels = reduce_pair_ok(graph, a.nodes, b_conv)
    if channels is None:
        return None
    inputs = stage_io(graph, [a.nodes], outputs)[0][0]
    base = a.base_s(cost) + cost.base_s[b_conv]
    moved = sum(value_bytes(graph, i) for i in inputs) + value_bytes(graph, b_conv)
    speeds = cost.node_speeds
    work = [base / s for s in speeds]
    fixed = [0.0] + [cost.per_item_overhead_s + cost.transfer_s(moved)] * (len(speeds) - 1)
    shares, _ = lp_shares(work, fixed, [0.0] * len(speeds), [cost.transfer_s(moved)] * len(speeds))
    stages: list[Stage] = [reduce_stage(graph, cost, a.nodes, b_conv, inputs, round_shares(shares, channels))]
    rest = b.nodes[1:]
    if rest:
        ins, outs = stage_io(graph, [rest], outputs)[0]
        stages.append(plan_unit(graph, Unit(rest, True, ins, outs), cost)[0])
    return stages


def _seconds(cost: CostModel, stages: Sequence[Stage]) -> float:
    return sum(stage_seconds(cost, s)[0] for s in stages)


def plan_iop(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
             cost: CostModel) -> list[Stage]:
    units = layer_units(graph, nodes, outputs)
    alone = [plan_unit(graph, unit, cost) for unit in units]
    candidates = []
    for i in range(len(units) - 1):
        paired = _pair_stages(graph, units[i], units[i + 1], outputs, cost)
        if paired is not None:
            benefit = alone[i][1] + alone[i + 1][1] - _seconds(cost, paired)
            if benefit > 0:
                candidates.append((benefit, i, paired))
    taken: dict[int, list[Stage]] = {}
    for benefit, i, paired in sorted(candidates, key=lambda c: -c[0]):
        if i not in taken and i + 1 not in taken and (i - 1) not in taken:
            taken[i] = paired
    stages: list[Stage] = []
    skip = False
    for i, (stage, _) in enumerate(alone):
        if skip:
            skip = False
            continue
        if i in taken:
            stages.extend(taken[i])
            skip = True
        else:
            stages.append(stage)
    return stages

"""``auction``: partitions assigned to nodes by an auction on predicted completion time (EdgeCI's AWAS).

Stages are the tiling's halo-bounded fused stages (planned as if the nodes were equal). Each tiled
stage is cut into ``PARTITIONS_PER_NODE x N`` equal row strips (each priced at its share of the stage);
strips are auctioned one at a time, and every node bids the time at which it would finish that strip: its load so far
in the stage (``busy_s``, plus any background load it declares) + the strip's seconds at its speed +
the strip's transfer if it is remote. The lowest bid wins, so a slow or busy node bids itself out of
work. Strips are near-equal, so a node's winnings are a strip count: it gets that many neighbouring
strips as one tile (one halo, not one per strip); if halo makes that split slower than the coordinator
alone (a reserve price), the stage stays whole. Serial stages are auctioned whole, the same way.
"""
from __future__ import annotations

from typing import Sequence

from partitioner.graph import ModelGraph
from partitioner.tiling import TiledStage, plan_edge_tiling

from partitioner.edge_strategies.core import CostModel, Stage, reference_size, row_strip_stage, serial_stage, \
    stage_seconds, subgraph_item, value_bytes

PARTITIONS_PER_NODE = 8


def auction(costs: Sequence[tuple[float, float]], cost: CostModel, busy_s: Sequence[float] | None = None
            ) -> list[int]:
    """Winner of each partition ((base seconds, bytes moved if remote)), partitions sold largest first."""
    busy = list(busy_s) if busy_s is not None else [0.0] * len(cost.node_speeds)
    winners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i][0]):
        base, moved = costs[index]
        bids = [busy[k] + cost.item_s(base, moved, k) for k in range(len(busy))]
        winner = min(range(len(bids)), key=bids.__getitem__)
        busy[winner] = bids[winner]
        winners[index] = winner
    return winners


def _auction_tiled(graph: ModelGraph, stage: TiledStage, cost: CostModel) -> Stage:
    height, _ = reference_size(graph, stage.output_names)
    count = min(height, PARTITIONS_PER_NODE * len(cost.node_speeds))
    bounds = [round(height * i / count) for i in range(count + 1)]
    # a strip is priced at its share of the untiled stage: the winner's strips become one tile, so
    # pricing each strip's own halo would overstate it (the merged tile's halo is priced afterwards)
    stage_s = sum(cost.base_s[n] for n in stage.nodes)
    stage_bytes = sum(value_bytes(graph, n) for n in stage.input_names + stage.output_names)
    winners = auction([(stage_s * (b - a) / height, stage_bytes * (b - a) / height)
                       for a, b in zip(bounds, bounds[1:])], cost)
    # strips are near-equal, so what a node won is its strip count; each node gets that many
    # neighbouring strips as one tile (one halo instead of one per strip)
    won = [winners.count(k) for k in range(len(cost.node_speeds))]
    merged, position = [], 0
    for node, strips_won in enumerate(won):
        if strips_won:
            merged.append((bounds[position], bounds[position + strips_won], node))
            position += strips_won
    auctioned = row_strip_stage(graph, cost, stage.nodes, stage.input_names, stage.output_names, merged)
    # reserve price: where halo makes every tile nearly the whole map (deep blocks on tiny maps), the
    # coordinator alone beats any split
    whole = row_strip_stage(graph, cost, stage.nodes, stage.input_names, stage.output_names, [(0, height, 0)])
    return min((auctioned, whole), key=lambda s: stage_seconds(cost, s)[0])


def plan_auction(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
                 cost: CostModel) -> list[Stage]:
    tiling = plan_edge_tiling(graph, list(nodes), inputs, outputs, [1.0] * len(cost.node_speeds))
    stages: list[Stage] = []
    for stage in tiling.stages:
        if isinstance(stage, TiledStage):
            stages.append(_auction_tiled(graph, stage, cost))
            continue
        item = subgraph_item(graph, cost, 0, 0, stage.nodes, stage.input_names, stage.output_names)
        winner = auction([(item.base_s, item.in_bytes + item.out_bytes)], cost)[0]
        stages.append(serial_stage(graph, cost, stage.nodes, stage.input_names, stage.output_names, node=winner))
    return stages

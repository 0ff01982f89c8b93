"""``dpfl``: fused-layer blocks chosen by dynamic programming (EdgeCI's DPFL).

Over each run of tileable layer units, ``best[j] = min_i best[i] + block_s(i, j)``: the cheapest way
to cover units [0, j) where the last fused block is units [i, j), tiled over all nodes as one stage.
A long block pays growing halo (every window op widens the rows each tile recomputes); a short one
pays a gather + re-scatter and one dispatch per node. The DP is iterative (a table filled left to
right, no recursion), with blocks limited to ``MAX_BLOCK_UNITS`` candidate borders for speed. Borders are
block boundaries where one value is live, so a cut moves one tensor.
"""
from __future__ import annotations

from typing import Sequence

from partitioner.graph import ModelGraph
from partitioner.tiling import TiledStage, plan_edge_tiling

from partitioner.edge_strategies.core import CostModel, Stage, serial_stage, spatial_stage, stage_io, stage_seconds
from partitioner.edge_strategies.units import Unit, layer_units
from partitioner.edge_strategies.zones import zone_borders

MAX_BLOCK_UNITS = 10
DP_SPLIT = "auto"  # tile layout the DP prices blocks with


def _runs(units: list[Unit]) -> list[tuple[bool, list[Unit]]]:
    runs: list[tuple[bool, list[Unit]]] = []
    for unit in units:
        if runs and runs[-1][0] == unit.tileable:
            runs[-1][1].append(unit)
        else:
            runs.append((unit.tileable, [unit]))
    return runs


def _block(graph: ModelGraph, nodes: list[str], outputs, cost: CostModel, split: str) -> tuple[Stage, float]:
    inputs, outs = stage_io(graph, [nodes], outputs)[0]
    tiling = plan_edge_tiling(graph, nodes, inputs, outs, cost.node_speeds, split=split, max_stage_halo_pct=1e9)
    stage = tiling.stages[0]
    assert len(tiling.stages) == 1 and isinstance(stage, TiledStage)
    built = spatial_stage(graph, cost, stage)
    return built, stage_seconds(cost, built)[0]


def fuse_run(graph: ModelGraph, nodes: list[str], outputs, cost: CostModel, allowed: set[int]) -> list[Stage]:
    """DP over a tileable run's allowed cut positions (indices into ``nodes``)."""
    cuts = [0] + sorted(c for c in allowed if 0 < c < len(nodes)) + [len(nodes)]
    best = [0.0] + [float("inf")] * (len(cuts) - 1)
    back = [0] * len(cuts)
    blocks: dict[tuple[int, int], Stage] = {}
    for j in range(1, len(cuts)):
        for i in range(max(0, j - MAX_BLOCK_UNITS), j):
            stage, seconds = _block(graph, nodes[cuts[i]:cuts[j]], outputs, cost, DP_SPLIT)
            blocks[i, j] = stage
            if best[i] + seconds < best[j]:
                best[j], back[j] = best[i] + seconds, i
    chosen, j = [], len(cuts) - 1
    while j > 0:
        chosen.append((back[j], j))
        j = back[j]
    # the chosen blocks re-planned with every tile layout (the DP priced row strips for speed)
    return [_block(graph, nodes[cuts[i]:cuts[j]], outputs, cost, "auto")[0] for i, j in reversed(chosen)]


def plan_dpfl(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
              cost: CostModel) -> list[Stage]:
    borders = set(zone_borders(graph, nodes, inputs, outputs))
    index = {name: i for i, name in enumerate(nodes)}
    stages: list[Stage] = []
    for tileable, units in _runs(layer_units(graph, nodes, outputs)):
        run_nodes = [n for u in units for n in u.nodes]
        if not tileable:
            ins, outs = stage_io(graph, [run_nodes], outputs)[0]
            stages.append(serial_stage(graph, cost, run_nodes, ins, outs))
            continue
        start = index[run_nodes[0]]
        unit_starts, position = set(), 0
        for unit in units:
            unit_starts.add(position)
            position += len(unit.nodes)
        allowed = {c - start for c in borders if 0 < c - start < len(run_nodes)} & unit_starts
        stages.extend(fuse_run(graph, run_nodes, outputs, cost, allowed))
    return stages

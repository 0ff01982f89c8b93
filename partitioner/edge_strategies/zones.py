"""``zones``: the DAG cut into sequential zones synchronised only at their borders (DeepZoning's model
partition; the adaptive DAG partition of Miao et al.).

Zone borders are the program positions where exactly one value is live (block boundaries: between
inception/residual/dense blocks, or between layers of a chain). Each zone gets the cheapest of:
- ``whole``: run on the coordinator, no synchronisation (consecutive whole zones fuse into one item);
- ``branches``: its parallel branches (weakly connected parts before the first node that merges two of
  them) load-balanced over the nodes, longest first onto the node that would finish it first
  (transfers priced); the merge and what follows run on the coordinator;
- ``tiled``: the zone as one spatial stage over all nodes (weighted tiles, halo included).
Granularity: neighbouring tiled zones are fused into one tiled stage while that is predicted cheaper
than synchronising between them, so synchronisation stays only at the borders where it pays.
"""
from __future__ import annotations

from typing import Sequence

import networkx as nx

from partitioner.graph import ModelGraph
from partitioner.halo import TileOp
from partitioner.tiling import TiledStage, plan_edge_tiling, tile_ops

from partitioner.edge_strategies.core import CostModel, Stage, SubgraphStage, serial_stage, spatial_stage, \
    stage_io, stage_seconds, subgraph_item

_MAX_FUSED_ZONES = 8


def zone_borders(graph: ModelGraph, nodes: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> list[int]:
    """Positions j (cut before nodes[j]) where one value is live."""
    index = {name: i for i, name in enumerate(nodes)}
    end = len(nodes)
    keep = set(outputs)
    last_read = {}
    for name in list(inputs) + list(nodes):
        reads = [index[c] for c in graph.dag.successors(name) if c in index]
        last_read[name] = end if name in keep else max(reads, default=-1)
    produced = {name: -1 for name in inputs}
    produced.update(index)
    borders = []
    for j in range(1, end):
        live = sum(1 for name, p in produced.items() if p < j <= last_read[name])
        if live == 1:
            borders.append(j)
    return borders


def split_zones(graph: ModelGraph, nodes: Sequence[str], inputs, outputs) -> list[list[str]]:
    cuts = [0] + zone_borders(graph, nodes, inputs, outputs) + [len(nodes)]
    return [list(nodes[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]


def branches(graph: ModelGraph, zone: list[str]) -> tuple[list[list[str]], list[str]]:
    """(parallel branches, tail): components of the zone before the first node joining two of them."""
    members = set(zone)
    sets = nx.utils.UnionFind()
    seen: list[str] = []
    for position, name in enumerate(zone):
        preds = [p for p in graph.records[name].input_names if p in members]
        roots = {sets[p] for p in preds}
        if len(roots) > 1:
            tail = zone[position:]
            break
        sets[name]
        if preds:
            sets.union(name, *preds)
        seen.append(name)
    else:
        tail = []
    groups: dict[str, list[str]] = {}
    for name in seen:
        groups.setdefault(sets[name], []).append(name)
    return list(groups.values()), tail


def _all_tileable(graph: ModelGraph, nodes: Sequence[str]) -> bool:
    ops = tile_ops(graph)
    return all(isinstance(ops[n], TileOp) for n in nodes)


def _tiled_option(graph: ModelGraph, nodes: list[str], outputs, cost: CostModel) -> Stage | None:
    if not _all_tileable(graph, nodes):
        return None
    inputs, outs = stage_io(graph, [nodes], outputs)[0]
    tiling = plan_edge_tiling(graph, nodes, inputs, outs, cost.node_speeds, max_stage_halo_pct=1e9)
    if len(tiling.stages) != 1 or not isinstance(tiling.stages[0], TiledStage):
        return None
    return spatial_stage(graph, cost, tiling.stages[0])


def _branch_option(graph: ModelGraph, zone: list[str], outputs, cost: CostModel) -> list[Stage] | None:
    parts, tail = branches(graph, zone)
    if len(parts) < 2 or len(cost.node_speeds) < 2:
        return None
    finish = [0.0] * len(cost.node_speeds)
    owner: dict[int, list[str]] = {}
    for part in sorted(parts, key=lambda p: -sum(cost.base_s[n] for n in p)):
        inputs, outs = stage_io(graph, [part], outputs)[0]
        item = subgraph_item(graph, cost, 0, 0, part, inputs, outs)
        times = [finish[k] + cost.item_s(item.base_s, item.in_bytes + item.out_bytes, k)
                 for k in range(len(finish))]
        node = min(range(len(finish)), key=times.__getitem__)
        finish[node] = times[node]
        owner.setdefault(node, []).extend(part)
    position = {name: i for i, name in enumerate(zone)}
    groups = [sorted(owner[k], key=position.__getitem__) for k in sorted(owner)]
    items = []
    for index, (node, group) in enumerate(zip(sorted(owner), groups)):
        inputs, outs = stage_io(graph, [group], outputs)[0]
        items.append(subgraph_item(graph, cost, index, node, group, inputs, outs))
    branch_nodes = [n for g in groups for n in g]
    branch_inputs, branch_outputs = stage_io(graph, [branch_nodes], outputs)[0]
    stages: list[Stage] = [SubgraphStage(branch_nodes, branch_inputs, branch_outputs, items)]
    if tail:
        tail_inputs, tail_outputs = stage_io(graph, [tail], outputs)[0]
        stages.append(serial_stage(graph, cost, tail, tail_inputs, tail_outputs))
    return stages


def _seconds(cost: CostModel, stages: Sequence[Stage]) -> float:
    return sum(stage_seconds(cost, s)[0] for s in stages)


def plan_zones(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
               cost: CostModel) -> list[Stage]:
    choices: list[tuple[str, list[str], list[Stage], float]] = []  # (kind, zone nodes, stages, seconds)
    for zone in split_zones(graph, nodes, inputs, outputs):
        whole_inputs, whole_outputs = stage_io(graph, [zone], outputs)[0]
        options = [("whole", [serial_stage(graph, cost, zone, whole_inputs, whole_outputs)])]
        branch = _branch_option(graph, zone, outputs, cost)
        if branch:
            options.append(("branches", branch))
        tiled = _tiled_option(graph, zone, outputs, cost)
        if tiled:
            options.append(("tiled", [tiled]))
        kind, stages = min(options, key=lambda o: _seconds(cost, o[1]))
        choices.append((kind, zone, stages, _seconds(cost, stages)))
    return _fuse(graph, choices, outputs, cost)


def _fuse(graph: ModelGraph, choices, outputs, cost: CostModel) -> list[Stage]:
    """Fuse runs of whole zones into one serial item, and neighbouring zones into one tiled stage while
    that beats synchronising between them."""
    result: list[Stage] = []
    group: tuple[str, list[str], list[Stage], float, int] | None = None

    def flush():
        if group is not None:
            result.extend(group[2])

    for kind, zone, stages, seconds in choices:
        if group is not None and group[0] == "whole" and kind == "whole":
            merged = group[1] + zone
            ins, outs = stage_io(graph, [merged], outputs)[0]
            merged_stage = serial_stage(graph, cost, merged, ins, outs)
            group = ("whole", merged, [merged_stage], _seconds(cost, [merged_stage]), group[4] + 1)
            continue
        if group is not None and group[0] in ("tiled", "whole") and kind in ("tiled", "whole") \
                and group[4] < _MAX_FUSED_ZONES and (group[0] == "tiled" or kind == "tiled"):
            fused = _tiled_option(graph, group[1] + zone, outputs, cost)
            if fused is not None:
                fused_s = _seconds(cost, [fused])
                if fused_s < group[3] + seconds:
                    group = ("tiled", group[1] + zone, [fused], fused_s, group[4] + 1)
                    continue
        flush()
        group = (kind, zone, stages, seconds, 1)
    flush()
    return result

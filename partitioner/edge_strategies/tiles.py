"""``tiles``: the tiling engineer's weighted spatial tiles (``plan_edge_tiling``), wrapped as a plan.

``head_tiles``: the same tiles for the leading stages only, while a stage's tiles save more than a tiled
stage costs besides its compute; the rest of the segment runs unsplit on the coordinating node. Why: per
stage, bit-exact tiles of large maps ran ~2x faster over 3 nodes than the whole stage (resnet18's first
stage: 18.6 ms whole, 9.2 ms per tile), but tiles of 14x14 and 7x7 maps only 1.0-1.6x, because each tile
re-reads the stage's weights and small convs run at a worse rate; on the namespace testbed every stage
also costs a round trip (slicing, two remote items, stitching: ~9 ms at 0.5 CPU). Splitting every stage
was slower than one node for resnet18/50, googlenet and mobilenet_v2 there.
"""
from __future__ import annotations

from typing import Sequence

from partitioner.graph import ModelGraph
from partitioner.tiling import TiledStage, plan_edge_tiling

from partitioner.edge_strategies.core import CostModel, Stage, serial_stage, spatial_item_costs, spatial_stage

# a tiled stage's cost besides its tiles' compute and their transfer, in seconds on a speed-1 node (testbed:
# ~9 ms per stage at 0.5 CPU), and the CPU a tile takes over its FLOP share (weights re-read per tile,
# small-map kernels: 1.3x on resnet18's and resnet50's first stages, more on small maps)
HEAD_STAGE_OVERHEAD_S = 3e-3
TILE_CPU_FACTOR = 1.3


def plan_tiles(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
               cost: CostModel) -> list[Stage]:
    tiling = plan_edge_tiling(graph, list(nodes), inputs, outputs, cost.node_speeds)
    return [spatial_stage(graph, cost, stage) if isinstance(stage, TiledStage)
            else serial_stage(graph, cost, stage.nodes, stage.input_names, stage.output_names)
            for stage in tiling.stages]


def tiling_pays(graph: ModelGraph, cost: CostModel, stage: TiledStage) -> bool:
    """Whether ``stage`` tiled finishes sooner than on the coordinating node alone, overheads included."""
    whole_s = sum(cost.base_s[n] for n in stage.nodes) / cost.node_speeds[0]
    tiles_s = max(TILE_CPU_FACTOR * c["base_s"] / cost.node_speeds[tile.node]
                  + (cost.transfer_s(c["in_bytes"] + c["out_bytes"]) if tile.node else 0.0)
                  for tile, c in zip(stage.tiles, spatial_item_costs(graph, cost, stage)))
    return tiles_s + HEAD_STAGE_OVERHEAD_S / cost.node_speeds[0] < whole_s


def plan_head_tiles(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
                    cost: CostModel) -> list[Stage]:
    tiling = plan_edge_tiling(graph, list(nodes), inputs, outputs, cost.node_speeds)
    head = 0
    while head < len(tiling.stages) and isinstance(tiling.stages[head], TiledStage) and \
            tiling_pays(graph, cost, tiling.stages[head]):
        head += 1
    stages: list[Stage] = [spatial_stage(graph, cost, stage) for stage in tiling.stages[:head]]
    tail = tiling.stages[head:]
    if not tail:
        return stages
    tail_nodes = [name for stage in tail for name in stage.nodes]
    produced = set(tail_nodes)
    tail_inputs = list(dict.fromkeys(name for stage in tail for name in stage.input_names if name not in produced))
    later = set(outputs)
    tail_outputs = [name for name in dict.fromkeys(name for stage in tail for name in stage.output_names)
                    if name in later]
    return stages + [serial_stage(graph, cost, tail_nodes, tail_inputs, tail_outputs)]

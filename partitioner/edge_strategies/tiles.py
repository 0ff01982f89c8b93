"""``tiles``: the tiling engineer's weighted spatial tiles (``plan_edge_tiling``), wrapped as a plan."""
from __future__ import annotations

from typing import Sequence

from partitioner.graph import ModelGraph
from partitioner.tiling import TiledStage, plan_edge_tiling

from partitioner.edge_strategies.core import CostModel, Stage, serial_stage, spatial_stage


def plan_tiles(graph: ModelGraph, nodes: Sequence[str], inputs: list[str], outputs: list[str],
               cost: CostModel) -> list[Stage]:
    tiling = plan_edge_tiling(graph, list(nodes), inputs, outputs, cost.node_speeds)
    return [spatial_stage(graph, cost, stage) if isinstance(stage, TiledStage)
            else serial_stage(graph, cost, stage.nodes, stage.input_names, stage.output_names)
            for stage in tiling.stages]

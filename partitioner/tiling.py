"""Vertical separation: the edge segment as stages, each either tiled over N edge nodes or run whole.

The segment's nodes (program order) fall into maximal runs of spatial ops (conv, pools, bn, activations,
element-wise add/mul, channel concat; see ``partitioner.halo``). Each run is a :class:`TiledStage`: its
outputs are split into rectangles, one per edge node, and each node computes its rectangle from the input
slice the halo back-trace says it needs, so the stitched outputs equal the untiled run's. Anything else
(flatten, linear, global pooling...) is a :class:`SerialStage` that the coordinator runs whole.

Tile sizes follow the nodes' weights (relative speeds): rows/columns start proportional to the weights,
then single rows move between neighbours while that lowers the largest predicted finish time
(tile FLOPs including halo / weight). Per stage the split is along height, width or a 2-D grid (rows of
tiles, each row split into columns), whichever costs the least halo.

Execution is a pure function of (stage, tile spec, input slices): :func:`run_tile`. That is what an edge
node runs; :func:`run_edge_tiled` slices, dispatches (to ``tile_runner`` or in-process) and stitches.
"""
from __future__ import annotations

import math
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from partitioner.graph import ModelGraph
from partitioner.halo import NotTileable, Region, TileOp, build_tile_op, crop, full_region, hull, region_area, \
    region_shape

SPLITS = ("auto", "h", "w", "grid")
_MAX_BALANCE_MOVES = 400
DEFAULT_MAX_STAGE_HALO_PCT = 25.0


def _region_to_json(region: Region) -> list[list[int]]:
    return [list(region[0]), list(region[1])]


def _region_from_json(data: Sequence[Sequence[int]]) -> Region:
    return ((int(data[0][0]), int(data[0][1])), (int(data[1][0]), int(data[1][1])))


@dataclass
class TileSpec:
    """One edge node's share of a tiled stage: the output rectangles it produces and the input
    rectangles (halo included) it receives. Regions are ((row0, row1), (col0, col1)), half-open."""

    stage: int
    index: int
    node: int  # which edge node (index into the plan's weights) computes it
    output_regions: dict[str, Region]
    input_regions: dict[str, Region]
    flops: float = 0.0  # with halo

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "index": self.index, "node": self.node, "flops": self.flops,
                "output_regions": {k: _region_to_json(v) for k, v in self.output_regions.items()},
                "input_regions": {k: _region_to_json(v) for k, v in self.input_regions.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TileSpec":
        return cls(int(data["stage"]), int(data["index"]), int(data["node"]),
                   {k: _region_from_json(v) for k, v in data["output_regions"].items()},
                   {k: _region_from_json(v) for k, v in data["input_regions"].items()},
                   float(data.get("flops", 0.0)))


@dataclass
class TiledStage:
    nodes: list[str]
    input_names: list[str]
    output_names: list[str]
    tiles: list[TileSpec]
    split: str  # "h" | "w" | "grid"
    output_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (H, W) of each untiled output
    flops: float = 0.0  # untiled

    kind = "tiled"

    @property
    def tiled_flops(self) -> float:
        return sum(tile.flops for tile in self.tiles)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "input_names": self.input_names,
                "output_names": self.output_names, "tiles": [t.to_dict() for t in self.tiles],
                "split": self.split, "flops": self.flops,
                "output_sizes": {k: list(v) for k, v in self.output_sizes.items()}}


@dataclass
class SerialStage:
    """Not tileable: runs whole on the coordinating edge node."""

    nodes: list[str]
    input_names: list[str]
    output_names: list[str]
    flops: float = 0.0

    kind = "serial"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "input_names": self.input_names,
                "output_names": self.output_names, "flops": self.flops}


def stage_from_dict(data: Mapping[str, Any]) -> TiledStage | SerialStage:
    common = (list(data["nodes"]), list(data["input_names"]), list(data["output_names"]))
    if data["kind"] == "serial":
        return SerialStage(*common, float(data.get("flops", 0.0)))
    return TiledStage(*common, [TileSpec.from_dict(t) for t in data["tiles"]], data["split"],
                      {k: (int(v[0]), int(v[1])) for k, v in data["output_sizes"].items()},
                      float(data.get("flops", 0.0)))


@dataclass
class EdgeTilingPlan:
    stages: list[TiledStage | SerialStage]  # execution order
    weights: list[float]  # one per edge node: relative speed
    input_names: list[str]
    output_names: list[str]
    halo_overhead_pct: float = 0.0  # extra FLOPs of all tiles over the untiled edge segment, in %
    per_node_flops: list[float] = field(default_factory=list)  # tiled work per edge node (halo included)
    serial_flops: float = 0.0  # run whole on the coordinator (node 0)
    edge_flops: float = 0.0  # the untiled edge segment

    @property
    def tiled_stages(self) -> list[TiledStage]:
        return [s for s in self.stages if isinstance(s, TiledStage)]

    @property
    def makespan_flops(self) -> float:
        """Predicted finish time in FLOPs of a weight-1 node: serial work on node 0, then per tiled stage
        the slowest tile (tiles of one stage run in parallel, stages one after another)."""
        total = self.serial_flops / self.weights[0]
        for stage in self.tiled_stages:
            total += max((t.flops / self.weights[t.node] for t in stage.tiles), default=0.0)
        return total

    @property
    def predicted_speedup(self) -> float:
        """Untiled segment on node 0 / tiled makespan, from FLOPs alone (no transfer or call overhead)."""
        whole = self.edge_flops / self.weights[0]
        return whole / self.makespan_flops if self.makespan_flops else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "weights": list(self.weights),
                "input_names": self.input_names, "output_names": self.output_names,
                "halo_overhead_pct": self.halo_overhead_pct, "per_node_flops": self.per_node_flops,
                "serial_flops": self.serial_flops, "edge_flops": self.edge_flops}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EdgeTilingPlan":
        return cls([stage_from_dict(s) for s in data["stages"]], [float(w) for w in data["weights"]],
                   list(data["input_names"]), list(data["output_names"]), float(data["halo_overhead_pct"]),
                   [float(f) for f in data["per_node_flops"]], float(data["serial_flops"]),
                   float(data["edge_flops"]))


# ---------------------------------------------------------------------------------------------- caches
# Per traced module (weakly held, so a dropped graph frees them): tile ops, serial stage modules and
# region traces. An edge node keeps one graph, so each stage's work is prepared once.
_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _cache(graph: ModelGraph) -> dict:
    return _CACHES.setdefault(graph.module, {"ops": None, "serial": {}, "trace": {}})


def tile_ops(graph: ModelGraph) -> dict[str, TileOp | NotTileable]:
    """Every work node as a :class:`TileOp`, or the :class:`NotTileable` saying why it runs whole."""
    cache = _cache(graph)
    if cache["ops"] is None:
        modules = dict(graph.module.named_modules())
        fx_nodes = {node.name: node for node in graph.module.graph.nodes}
        ops: dict[str, TileOp | NotTileable] = {}
        for name in graph.order:
            try:
                ops[name] = build_tile_op(graph, name, modules, fx_nodes[name])
            except NotTileable as reason:
                ops[name] = reason
        cache["ops"] = ops
    return cache["ops"]


def trace_regions(graph: ModelGraph, nodes: Sequence[str], output_regions: Mapping[str, Region]
                  ) -> dict[str, Region]:
    """Region each node of a tiled run (and each run input) must hold so the run yields
    ``output_regions``: backwards from the outputs, the hull over all consumers' needs."""
    ops = tile_ops(graph)
    need: dict[str, Region] = dict(output_regions)
    for name in reversed(nodes):
        region = need.get(name)
        if region is None:
            continue  # this tile's outputs do not depend on it
        op = ops[name]
        for source, source_region in zip(op.input_names, op.input_regions(region)):
            need[source] = hull(need.get(source), source_region)
    return need


def _traced(graph: ModelGraph, stage: TiledStage, tile: TileSpec) -> dict[str, Region]:
    key = (tuple(stage.nodes), tuple(sorted(tile.output_regions.items())))
    traces = _cache(graph)["trace"]
    if key not in traces:
        traces[key] = trace_regions(graph, stage.nodes, tile.output_regions)
    return traces[key]


# --------------------------------------------------------------------------------------------- stages
def _check_segment(graph: ModelGraph, node_names: Sequence[str], input_names: Sequence[str]) -> None:
    known = set(graph.order)
    unknown = [n for n in node_names if n not in known]
    if unknown:
        raise ValueError(f"{graph.name} has no work nodes named {unknown[:5]}")
    available = set(input_names) | set(node_names)
    for name in node_names:
        missing = [i for i in graph.records[name].input_names if i not in available]
        if missing:
            raise ValueError(f"node {name} reads {missing}, which is neither computed in the segment nor an input")


def _runs(graph: ModelGraph, node_names: Sequence[str]) -> list[tuple[bool, list[str]]]:
    """Maximal runs (program order) of tileable / non-tileable nodes."""
    ops = tile_ops(graph)
    position = {name: i for i, name in enumerate(graph.order)}
    runs: list[tuple[bool, list[str]]] = []
    for name in sorted(node_names, key=position.__getitem__):
        tileable = isinstance(ops[name], TileOp)
        if runs and runs[-1][0] == tileable:
            runs[-1][1].append(name)
        else:
            runs.append((tileable, [name]))
    return runs


def _produced_outside(graph: ModelGraph, nodes: Sequence[str], keep: set[str]) -> list[str]:
    """Nodes of ``nodes`` whose value is read by a node outside them, or is in ``keep``."""
    members = set(nodes)
    return [n for n in nodes if n in keep or any(c not in members for c in graph.dag.successors(n))]


def _stage_io(graph: ModelGraph, groups: list[list[str]], segment_outputs: Sequence[str]
              ) -> list[tuple[list[str], list[str]]]:
    """(inputs, outputs) of each stage: values read from before it, values read after it."""
    position = {name: i for i, name in enumerate(list(graph.input_names) + graph.order)}
    stage_of = {name: index for index, nodes in enumerate(groups) for name in nodes}
    keep = set(segment_outputs)
    result = []
    for index, nodes in enumerate(groups):
        members = set(nodes)
        inputs = {i for n in nodes for i in graph.records[n].input_names if i not in members}
        outputs = [n for n in nodes if n in keep or any(
            stage_of.get(consumer, index) != index for consumer in graph.dag.successors(n))]
        result.append((sorted(inputs, key=position.__getitem__), outputs))
    return result


def _single_value_cuts(graph: ModelGraph, nodes: list[str]) -> list[int]:
    """Positions j (cut before nodes[j]) where one value of nodes[:j] is still read at or after j:
    block boundaries, where a stage boundary costs one stitched tensor."""
    index = {name: i for i, name in enumerate(nodes)}
    last_read = {name: max((index.get(c, len(nodes)) for c in graph.dag.successors(name)), default=len(nodes))
                 for name in nodes}
    cuts = []
    for j in range(1, len(nodes)):
        live = sum(1 for name in nodes[:j] if last_read[name] >= j)
        if live == 1:
            cuts.append(j)
    return cuts


def _stage_halo_pct(graph: ModelGraph, nodes: list[str], keep: set[str], weights: Sequence[float],
                    split: str) -> float:
    geometry = _StageGeometry(graph, nodes, _produced_outside(graph, nodes, keep))
    label, rows = _layout_options(len(weights), split)[0]
    regions = _guillotine(geometry, weights, rows, balance=False)
    untiled = sum(geometry.node_flops.values())
    extra = sum(geometry.flops(r) for r in regions if region_area(r)) - untiled
    return 100.0 * extra / untiled if untiled else 0.0


def _cut_run(graph: ModelGraph, nodes: list[str], keep: set[str], weights: Sequence[float], split: str,
             max_stage_halo_pct: float) -> list[list[str]]:
    """Cut a tileable run at block boundaries so each piece's halo stays under ``max_stage_halo_pct``.
    Halo grows with depth (every 3x3 conv adds a ring), so one deep fused stage would make every tile
    compute most of the map; each cut costs one stitch and re-slice instead."""
    if len(weights) == 1:
        return [nodes]
    pieces, start, accepted, accepted_halo = [], 0, None, 0.0
    for cut in _single_value_cuts(graph, nodes) + [len(nodes)]:
        halo = _stage_halo_pct(graph, nodes[start:cut], keep, weights, split)
        # extend while under the bound, or while the block added no halo (e.g. a trailing activation)
        if accepted is None or halo <= max(max_stage_halo_pct, accepted_halo + 1e-6):
            accepted, accepted_halo = cut, halo
            continue
        pieces.append(nodes[start:accepted])
        start = accepted  # a single block is kept whole whatever its halo
        accepted, accepted_halo = cut, _stage_halo_pct(graph, nodes[start:cut], keep, weights, split)
    if start < len(nodes):
        if accepted < len(nodes):
            pieces.append(nodes[start:accepted])
            start = accepted
        pieces.append(nodes[start:])
    return pieces


class _StageGeometry:
    """Maps a rectangle of the stage's reference grid (its largest output) to each output's rectangle,
    and prices a rectangle in FLOPs (each node's FLOPs scale with the area it computes)."""

    def __init__(self, graph: ModelGraph, nodes: list[str], output_names: list[str]):
        ops = tile_ops(graph)
        self.graph, self.nodes = graph, nodes
        self.sizes = {name: ops[name].output_size for name in output_names}
        self.reference = (max(h for h, _ in self.sizes.values()), max(w for _, w in self.sizes.values()))
        self.node_flops = {n: node_work(graph, n) for n in nodes}
        self.node_area = {n: ops[n].output_size[0] * ops[n].output_size[1] for n in nodes}
        self._costs: dict[Region, float] = {}

    def output_regions(self, reference_region: Region) -> dict[str, Region]:
        result = {}
        for name, size in self.sizes.items():
            region = tuple(tuple(self._scale(x, size[axis], self.reference[axis]) for x in reference_region[axis])
                           for axis in (0, 1))
            if region_area(region):
                result[name] = region
        return result

    @staticmethod
    def _scale(x: int, size: int, reference: int) -> int:
        return (x * size + reference // 2) // reference  # monotone, 0 -> 0, reference -> size

    def trace(self, reference_region: Region) -> tuple[dict[str, Region], dict[str, Region]]:
        outputs = self.output_regions(reference_region)
        return outputs, trace_regions(self.graph, self.nodes, outputs) if outputs else {}

    def flops(self, reference_region: Region) -> float:
        if reference_region not in self._costs:
            _, need = self.trace(reference_region)
            self._costs[reference_region] = sum(
                self.node_flops[n] * region_area(need[n]) / self.node_area[n] for n in self.nodes if n in need)
        return self._costs[reference_region]


def _proportional_cuts(length: int, weights: Sequence[float]) -> list[int]:
    total, running, cuts = sum(weights), 0.0, [0]
    for weight in weights[:-1]:
        running += weight
        cuts.append(max(cuts[-1], min(length, round(length * running / total))))
    return cuts + [length]


def _balanced_cuts(length: int, weights: Sequence[float], cost: Callable[[int, int], float]) -> list[int]:
    """Cut [0, length) into len(weights) pieces with roughly equal cost/weight: start proportional,
    then move single rows from the slowest piece to a neighbour while that lowers the slower of the two."""
    cuts = _proportional_cuts(length, weights)
    finish = lambda i: cost(cuts[i], cuts[i + 1]) / weights[i] if cuts[i + 1] > cuts[i] else 0.0  # noqa: E731
    for _ in range(_MAX_BALANCE_MOVES):
        times = [finish(i) for i in range(len(weights))]
        slowest = max(range(len(weights)), key=times.__getitem__)
        best = None
        for boundary, neighbour, step in ((slowest, slowest - 1, 1), (slowest + 1, slowest + 1, -1)):
            if not 0 <= neighbour < len(weights) or cuts[slowest + 1] - cuts[slowest] == 0:
                continue
            cuts[boundary] += step
            worse = max(finish(slowest), finish(neighbour))
            cuts[boundary] -= step
            if worse < times[slowest] * (1 - 1e-9) and (best is None or worse < best[0]):
                best = (worse, boundary, step)
        if best is None:
            break
        cuts[best[1]] += best[2]
    return cuts


def _guillotine(geometry: _StageGeometry, weights: Sequence[float], rows: int, balance: bool = True
                ) -> list[Region]:
    """Rows of tiles: node indices in order fill ``rows`` bands; each band is then cut into columns.
    rows == N is a height split, rows == 1 a width split. Returns one region per node (maybe empty)."""
    height, width = geometry.reference
    count = len(weights)
    groups, start = [], 0
    for band in range(rows):
        size = count // rows + (1 if band < count % rows else 0)
        groups.append(list(range(start, start + size)))
        start += size
    band_weights = [sum(weights[i] for i in group) for group in groups]
    cut = _balanced_cuts if balance else (lambda length, w, _cost: _proportional_cuts(length, w))
    row_cuts = cut(height, band_weights, lambda a, b: geometry.flops(((a, b), (0, width))))
    regions: list[Region] = []
    for band, group in enumerate(groups):
        rows_range = (row_cuts[band], row_cuts[band + 1])
        col_cuts = cut(width, [weights[i] for i in group],
                                  lambda a, b: geometry.flops((rows_range, (a, b))))
        regions.extend((rows_range, (col_cuts[j], col_cuts[j + 1])) for j in range(len(group)))
    return regions


def _layout_options(count: int, split: str) -> list[tuple[str, int]]:
    if count == 1:
        return [("h", 1)]
    options = {"h": [("h", count)], "w": [("w", 1)],
               "grid": [("grid", r) for r in range(2, count)] or [("h", count)]}
    if split == "auto":
        return options["h"] + options["w"] + (options["grid"] if count > 2 else [])
    return options[split]


def _plan_stage(graph: ModelGraph, stage_index: int, nodes: list[str], inputs: list[str], outputs: list[str],
                weights: Sequence[float], split: str) -> TiledStage:
    geometry = _StageGeometry(graph, nodes, outputs)
    best = None
    for label, rows in _layout_options(len(weights), split):
        regions = _guillotine(geometry, weights, rows)
        costs = [geometry.flops(r) if region_area(r) else 0.0 for r in regions]
        # balanced tiles finish together, so the fastest layout is the one with the least halo; the
        # finish time (not the halo alone) ranks them so that no layout wins by idling nodes
        score = (max(c / w for c, w in zip(costs, weights)), sum(costs))
        if best is None or score < best[0]:
            best = (score, label, regions)
    _, label, regions = best
    tiles = []
    for node, region in enumerate(regions):
        if not region_area(region):
            continue  # more nodes than rows/columns: this node sits this stage out
        output_regions, need = geometry.trace(region)
        tiles.append(TileSpec(stage_index, len(tiles), node, output_regions,
                              {name: need[name] for name in inputs if name in need}, geometry.flops(region)))
    flops = sum(node_work(graph, n) for n in nodes)
    return TiledStage(nodes, inputs, outputs, tiles, label, dict(geometry.sizes), flops)


def node_work(graph: ModelGraph, name: str) -> float:
    """A node's FLOPs as counted by the graph, but at least one per output element: FlopCounterMode
    gives pools, bn and activations 0, and tile sizing must still see their (memory-bound) work."""
    record = graph.records[name]
    return float(max(record.flops, record.output_elements))


def _check_weights(weights: Sequence[float]) -> list[float]:
    values = [float(w) for w in weights]
    if not values:
        raise ValueError("tiling needs at least one edge node weight")
    bad = [w for w in values if not math.isfinite(w) or w <= 0]
    if bad:
        raise ValueError(f"edge node weights must be positive numbers (relative speeds), got {bad}")
    return values


def plan_edge_tiling(graph: ModelGraph, node_names: Sequence[str], input_names: list[str],
                     output_names: list[str], weights: Sequence[float], split: str = "auto",
                     max_stage_halo_pct: float = DEFAULT_MAX_STAGE_HALO_PCT) -> EdgeTilingPlan:
    """Tile the edge segment (its node/input/output names, as in ``Segment``) over ``len(weights)`` nodes.

    ``max_stage_halo_pct`` bounds each tiled stage's halo (extra FLOPs over its untiled run): deeper runs
    are cut at block boundaries into several stages, stitched and re-sliced in between."""
    weights = _check_weights(weights)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not max_stage_halo_pct >= 0:
        raise ValueError(f"max_stage_halo_pct must be >= 0, got {max_stage_halo_pct}")
    _check_segment(graph, node_names, input_names)
    keep = set(output_names)
    groups: list[tuple[bool, list[str]]] = []
    for tileable, nodes in _runs(graph, node_names):
        if tileable:
            groups.extend((True, piece) for piece in _cut_run(graph, nodes, keep, weights, split, max_stage_halo_pct))
        else:
            groups.append((False, nodes))
    stages: list[TiledStage | SerialStage] = []
    for index, ((tileable, nodes), (inputs, outputs)) in enumerate(
            zip(groups, _stage_io(graph, [nodes for _, nodes in groups], output_names))):
        if tileable:
            stages.append(_plan_stage(graph, index, nodes, inputs, outputs, weights, split))
        else:
            stages.append(SerialStage(nodes, inputs, outputs, sum(node_work(graph, n) for n in nodes)))
    per_node = [0.0] * len(weights)
    for stage in stages:
        for tile in getattr(stage, "tiles", []):
            per_node[tile.node] += tile.flops
    edge_flops = sum(node_work(graph, n) for n in node_names)
    serial = sum(s.flops for s in stages if isinstance(s, SerialStage))
    extra = sum(s.tiled_flops - s.flops for s in stages if isinstance(s, TiledStage))
    return EdgeTilingPlan(stages, weights, list(input_names), list(output_names),
                          100.0 * extra / edge_flops if edge_flops else 0.0, per_node, serial, edge_flops)


def plan_segment_tiling(graph: ModelGraph, segment, weights: Sequence[float], split: str = "auto",
                        **options) -> EdgeTilingPlan:
    """:func:`plan_edge_tiling` for a ``partitioner.segments.Segment``."""
    return plan_edge_tiling(graph, segment.node_names, segment.input_names, segment.output_names, weights, split,
                            **options)


# ------------------------------------------------------------------------------------------- execution
def slice_inputs(stage: TiledStage, tile: TileSpec, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The input rectangles one tile needs, as fresh contiguous tensors (what goes on the wire; fresh so
    an in-place op in one tile can never change another tile's input)."""
    slices = {}
    for name, region in tile.input_regions.items():
        if name not in values:
            raise KeyError(f"stage {tile.stage} needs input {name!r}, which is not among the values given")
        value = values[name]
        slices[name] = crop(value, full_region(tuple(value.shape[-2:])), region).clone(
            memory_format=torch.contiguous_format)
    return slices


def run_tile(graph: ModelGraph, stage: TiledStage, tile: TileSpec,
             input_slices: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What one edge node computes for one tile: its output rectangles from its input rectangles."""
    ops = tile_ops(graph)
    need = _traced(graph, stage, tile)
    values: dict[str, tuple[torch.Tensor, Region]] = {}
    for name, region in tile.input_regions.items():
        if name not in input_slices:
            raise KeyError(f"tile {tile.index} of stage {tile.stage} needs input slice {name!r}")
        tensor = input_slices[name]
        if tuple(tensor.shape[-2:]) != region_shape(region):
            raise ValueError(f"input slice {name!r} is {tuple(tensor.shape[-2:])} (HxW), the tile needs "
                             f"{region_shape(region)} for region {region}")
        values[name] = (tensor, region)
    with torch.no_grad():
        for name in stage.nodes:
            if name in need:
                values[name] = (ops[name].run(need[name], values), need[name])
    return {name: crop(*values[name], region) for name, region in tile.output_regions.items()}


def stitch(stage: TiledStage, tiles_outputs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole output maps from the tiles' rectangles (``tiles_outputs`` in the order of ``stage.tiles``)."""
    if len(tiles_outputs) != len(stage.tiles):
        raise ValueError(f"stage has {len(stage.tiles)} tiles but {len(tiles_outputs)} results were given")
    result = {}
    for name in stage.output_names:
        height, width = stage.output_sizes[name]
        pieces = [(tile.output_regions[name], outputs[name])
                  for tile, outputs in zip(stage.tiles, tiles_outputs) if name in tile.output_regions]
        first = pieces[0][1]
        whole = first.new_empty(tuple(first.shape[:-2]) + (height, width))
        covered = 0
        for ((h0, h1), (w0, w1)), piece in pieces:
            if tuple(piece.shape[-2:]) != (h1 - h0, w1 - w0):
                raise ValueError(f"tile result for {name!r} is {tuple(piece.shape[-2:])}, expected {(h1 - h0, w1 - w0)}")
            whole[..., h0:h1, w0:w1] = piece
            covered += (h1 - h0) * (w1 - w0)
        if covered != height * width:
            raise ValueError(f"tiles cover {covered} of the {height * width} pixels of {name!r}")
        result[name] = whole
    return result


TileRunner = Callable[[int, TileSpec, dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def _serial_module(graph: ModelGraph, stage: SerialStage):
    from partitioner.segments import extract_subgraph

    key = (tuple(stage.nodes), tuple(stage.input_names), tuple(stage.output_names))
    modules = _cache(graph)["serial"]
    if key not in modules:
        modules[key] = extract_subgraph(graph.module, stage.nodes, stage.input_names, stage.output_names)
    return modules[key]


def run_serial_stage(graph: ModelGraph, stage: SerialStage, values: Mapping[str, Any]) -> dict[str, Any]:
    with torch.no_grad():
        outputs = _serial_module(graph, stage)(*(values[name] for name in stage.input_names))
    return dict(zip(stage.output_names, outputs))


def caller_threads_pool(workers: int) -> ThreadPoolExecutor:
    """A pool whose threads run torch at the caller's thread count. OpenMP keeps the count per thread: a new
    thread starts at the default (OMP_NUM_THREADS or all cores), not at what ``torch.set_num_threads`` set
    in the caller, and the thread count enters aten's conv choice and oneDNN's blocking. Tiles computed at
    another count than the untiled run were not bit-exact (a test order that left 1 thread, seen in CI)."""
    count = torch.get_num_threads()
    return ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(count,))


def run_edge_tiled(graph: ModelGraph, plan: EdgeTilingPlan, values: Mapping[str, Any],
                   tile_runner: TileRunner | None = None, workers: int | None = None) -> dict[str, Any]:
    """The edge segment, tiled: same contract as ``Segment.run``. ``tile_runner(stage_index, tile,
    input_slices)`` computes one tile (default: :func:`run_tile` in this process). A stage's tiles are
    dispatched on ``workers`` threads (default: one per tile with a ``tile_runner``, so remote nodes work
    in parallel; 1 in-process, where torch already uses the cores)."""
    missing = [name for name in plan.input_names if name not in values]
    if missing:
        raise KeyError(f"edge segment is missing inputs {missing}")
    env: dict[str, Any] = {name: values[name] for name in plan.input_names}
    for index, stage in enumerate(plan.stages):
        if isinstance(stage, SerialStage):
            env.update(run_serial_stage(graph, stage, env))
            continue
        runner = tile_runner or (lambda _i, tile, slices, stage=stage: run_tile(graph, stage, tile, slices))
        jobs = [(tile, slice_inputs(stage, tile, env)) for tile in stage.tiles]
        threads = workers if workers is not None else (len(jobs) if tile_runner else 1)
        if threads > 1 and len(jobs) > 1:
            with caller_threads_pool(min(threads, len(jobs))) as pool:
                results = list(pool.map(lambda job: runner(index, *job), jobs))
        else:
            results = [runner(index, tile, slices) for tile, slices in jobs]
        env.update(stitch(stage, results))
    return {name: env[name] for name in plan.output_names}

"""Vertical separation over time: the edge computes the head of its segment in row tiles while the input is
still arriving.

On a plan whose edge segment reads a large feature map from the device (the input image, when the device
runs nothing), the transfer is most of the latency: at 448x448 the 2.4 MB input took 300-650 ms over the
testbed's Wi-Fi and the whole model 140-300 ms on one edge node, one after the other. Cut into row bands,
the input can be computed on as it comes in: the segment's first tiled stage (``plan_edge_tiling`` with
one row tile per band, so its halo stays within the tiler's bound) runs tile by tile on the coordinating
node, each tile as soon as the rows it needs (halo included) have arrived; the rest of the segment runs
whole once the last tile is stitched. The tiles are the same bit-exact tiles the edge nodes run, so the
result equals the untiled segment's.

The device sends band ``k`` as rows ``[band_ends[k-1], band_ends[k])``: each band ends where a tile's
input ends, so a tile never waits for rows beyond the band that completes it. Both sides derive the bands
from the same plan (this module, deterministic); if they ever disagreed the tiles would only wait longer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from partitioner.graph import ModelGraph
from partitioner.tiling import SerialStage, TiledStage, plan_edge_tiling, run_serial_stage, run_tile, \
    slice_inputs, stitch

# Bands, and how much halo the streamed stage may add. Measured in process at 448x448, one thread (time
# left after the last band, against the untiled model): resnet18 0.71 with 4 bands and the tiler's 25%,
# 0.63 with 8 bands and 50%; mobilenet_v2 0.64 -> 0.58. More halo (100%) made the last tile too big.
DEFAULT_BANDS = 8
DEFAULT_MAX_HALO_PCT = 50.0
MIN_STREAM_BYTES = 256 * 1024  # a smaller input arrives in a few ms: nothing to overlap
MIN_BAND_ROWS = 8


@dataclass
class StreamedHead:
    stream_name: str  # the edge input that arrives in bands
    head: TiledStage  # row tiles, in the order their input rows arrive
    tail: SerialStage | None  # the rest of the segment, run whole on the coordinator
    band_ends: list[int]  # last input row (exclusive) of each band; the last is the map's height
    output_names: list[str]

    def bands(self) -> list[tuple[int, int]]:
        starts = [0] + self.band_ends[:-1]
        return list(zip(starts, self.band_ends))


def plan_streamed_head(graph: ModelGraph, node_names: Sequence[str], input_names: Sequence[str],
                       output_names: Sequence[str], bands: int = DEFAULT_BANDS,
                       max_halo_pct: float = DEFAULT_MAX_HALO_PCT) -> StreamedHead | None:
    """The streamed head of an edge segment, or None where streaming cannot start early: the segment does
    not begin with a tileable stage, or that stage reads more than one map, or the map is small."""
    if bands < 2 or len(input_names) != 1:
        return None
    name = input_names[0]
    shape = _shape_of(graph, name)
    if shape is None or len(shape) != 4 or shape[-2] < bands * MIN_BAND_ROWS:
        return None
    if _nbytes(shape) < MIN_STREAM_BYTES:
        return None
    try:
        tiling = plan_edge_tiling(graph, list(node_names), list(input_names), list(output_names),
                                  [1.0] * bands, split="h", max_stage_halo_pct=max_halo_pct)
    except (ValueError, KeyError):
        return None
    head = tiling.stages[0] if tiling.stages else None
    if not isinstance(head, TiledStage) or head.input_names != [name] or len(head.tiles) < 2:
        return None
    tiles = sorted(head.tiles, key=lambda tile: tile.input_regions[name][0][1])
    if any(tile.input_regions[name][1] != (0, shape[-1]) for tile in tiles):
        return None  # a tile that needs only some columns: not a row band
    head = TiledStage(head.nodes, head.input_names, head.output_names, tiles, head.split, head.output_sizes,
                      head.flops)
    band_ends = sorted({tile.input_regions[name][0][1] for tile in tiles} | {shape[-2]})
    rest = tiling.stages[1:]
    tail = None
    if rest:
        nodes = [n for stage in rest for n in stage.nodes]
        produced = set(nodes)
        inputs = list(dict.fromkeys(i for stage in rest for i in stage.input_names if i not in produced))
        tail = SerialStage(nodes, inputs, list(output_names), sum(s.flops for s in rest))
    return StreamedHead(name, head, tail, band_ends, list(output_names))


@dataclass
class StreamTimes:
    """Where a streamed run's compute went (wall seconds, waits for rows excluded)."""

    tiles_s: list[float]
    tail_s: float

    @property
    def compute_s(self) -> float:
        return sum(self.tiles_s) + self.tail_s

    @property
    def after_last_band_s(self) -> float:
        """The least the run can take once the last band is in: the last tile, then the tail."""
        return (self.tiles_s[-1] if self.tiles_s else 0.0) + self.tail_s


def run_streamed_head(graph: ModelGraph, plan: StreamedHead, values: Mapping[str, Any],
                      wait_rows: Callable[[int], None], tile_runner: Callable | None = None
                      ) -> tuple[dict[str, Any], StreamTimes]:
    """The edge segment's outputs: each head tile once ``wait_rows(row)`` says the rows it needs are in
    ``values[plan.stream_name]`` (a buffer being filled band by band), then the tail whole."""
    name = plan.stream_name
    results, tiles_s = [], []
    for tile in plan.head.tiles:
        wait_rows(tile.input_regions[name][0][1])
        started = time.perf_counter()
        slices = slice_inputs(plan.head, tile, values)
        results.append(tile_runner(tile, slices) if tile_runner else run_tile(graph, plan.head, tile, slices))
        tiles_s.append(time.perf_counter() - started)
    started = time.perf_counter()
    env = {**values, **stitch(plan.head, results)}
    if plan.tail is not None:
        env.update(run_serial_stage(graph, plan.tail, env))
    return {n: env[n] for n in plan.output_names}, StreamTimes(tiles_s, time.perf_counter() - started)


def streamed_seconds(times: StreamTimes, transfer_s: float) -> float:
    """What a streamed run should take after the last band when the bands take ``transfer_s`` to come in
    after the first: the compute the transfer could not hide, and never less than the last tile and the
    tail (a simple overlap model; ``auto`` uses it to compare streaming with its other candidates at the
    current bandwidth, since a run measured on a fast link says little about a slow one)."""
    return max(times.after_last_band_s, times.compute_s - max(transfer_s, 0.0))


def _shape_of(graph: ModelGraph, name: str) -> tuple[int, ...] | None:
    if name in graph.input_names:
        return tuple(graph.input_shape)
    record = graph.records.get(name)
    return tuple(record.output_shape) if record is not None and record.output_shape else None


def _nbytes(shape: Sequence[int], itemsize: int = 4) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * itemsize

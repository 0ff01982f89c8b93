"""Tiled edge segment: halo overhead per model and N, speedup measured for N=2 and predicted for larger N.

The edge segment is the whole model (cuts 0,len). Measured: N worker processes, one torch thread each,
pinned one per core (os.sched_setaffinity), each computing its tiles of every tiled stage while this
process slices, sends (pipes, pickled tensors), stitches and runs the serial stages; against one process
with one thread pinned to one core running the segment whole. Both are medians over --repeats in the
same run. Higher N cannot be measured on 2 cores: the plan's FLOP makespan predicts it.

    .venv/bin/python bench/tiling.py [--models resnet18,resnet50] [--repeats 3] [--max-n 8]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
from tqdm import tqdm

from partitioner.graph import load_graph
from partitioner.segments import build_segments
from partitioner.tiling import TileSpec, plan_segment_tiling, run_edge_tiled, run_tile
from partitioner.zoo import example_input

DEFAULT_MODELS = "resnet18,resnet50,googlenet,mobilenet_v2,inception_v3"


def _pin(core: int) -> None:
    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[core % len(cores)]})


def _worker(core: int, model: str, connection) -> None:
    _pin(core)
    graph = load_graph(model)
    stages: dict = {}
    while True:
        message = connection.recv()
        if message is None:
            return
        stage_index, stage, tile_dict, slices = message
        stages.setdefault(stage_index, stage)
        connection.send(run_tile(graph, stages[stage_index], TileSpec.from_dict(tile_dict), slices))


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up: caches, oneDNN primitives
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: str, count: int, repeats: int) -> tuple[float, float, float]:
    """(whole seconds, tiled seconds, halo %) for ``count`` worker processes."""
    graph = load_graph(model)
    segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
    values = {"x": example_input(graph.input_shape)}
    plan = plan_segment_tiling(graph, segmented.edge, [1.0] * count)
    context = mp.get_context("fork")
    pipes, workers = [], []
    for core in range(count):
        parent, child = context.Pipe()
        worker = context.Process(target=_worker, args=(core, model, child), daemon=True)
        worker.start()
        pipes.append(parent)
        workers.append(worker)
    _pin(0)  # the coordinator shares core 0 with worker 0: it only slices and stitches while they compute

    def remote(stage_index, tile, slices):
        pipes[tile.node].send((stage_index, plan.stages[stage_index], tile.to_dict(), slices))
        return pipes[tile.node].recv()

    try:
        with torch.no_grad():
            whole = _median_seconds(lambda: segmented.edge.run(values), repeats)
            tiled = _median_seconds(lambda: run_edge_tiled(graph, plan, values, tile_runner=remote), repeats)
    finally:
        for pipe in pipes:
            pipe.send(None)
        for worker in workers:
            worker.join(timeout=10)
    return whole, tiled, plan.halo_overhead_pct


def predicted(model: str, counts: list[int]) -> list[tuple[int, float, float, int]]:
    graph = load_graph(model)
    segmented = build_segments(graph, graph.prefix_assignment(0, len(graph.order)))
    rows = []
    for count in counts:
        plan = plan_segment_tiling(graph, segmented.edge, [1.0] * count)
        rows.append((count, plan.halo_overhead_pct, plan.predicted_speedup, len(plan.tiled_stages)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median; default 3)")
    parser.add_argument("--max-n", type=int, default=8, help="largest edge node count to predict (default 8)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    counts = list(range(1, args.max_n + 1))
    print(f"{'model':<14}{'N':>3}{'stages':>8}{'halo %':>9}{'pred x':>8}{'whole ms':>10}{'tiled ms':>10}{'meas x':>8}")
    for model in tqdm(models, desc="models", leave=False):
        measured = measure(model, 2, args.repeats) if os.cpu_count() >= 2 else None
        for count, halo, speedup, stages in predicted(model, counts):
            line = f"{model:<14}{count:>3}{stages:>8}{halo:>9.1f}{speedup:>8.2f}"
            if count == 2 and measured:
                whole, tiled, _ = measured
                line += f"{whole * 1e3:>10.1f}{tiled * 1e3:>10.1f}{whole / tiled:>8.2f}"
            print(line, flush=True)
    print("pred x: FLOP makespan speedup (equal nodes, no transfer cost); meas x: N=2 worker processes on 2 cores "
          "vs one 1-thread process, medians")


if __name__ == "__main__":
    main()

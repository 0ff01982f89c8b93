"""Rescale a predictor fitted on one tier to another: time a few dozen kernels where the tier runs.

The kernels (a prefix of each calibration model, so they run in context on each other's outputs) are
timed over many passes, and the scale is measured / predicted over all of them with the per-call overhead.

At one thread (the tiers' setting) the scale has two factors, each measured the way it is best measured:
- how fast this tier's CPU runs the kernels: each kernel on the thread's CPU clock, its lower quartile over
  the passes, which is the statistic the predictor was fitted on;
- how much of the time the tier runs us at all: wall / CPU time over whole passes. A CFS quota of 25% shows as
  ~4 here, other tenants as more than 1. Means over passes, so a stall in one pass counts at its share.
Scaling wall-clock *means* of each kernel instead (the earlier method) also counted the wall clock's ordinary
noise as slowness: under a 25% quota it said 4.97 where the segments ran 4.6x, and the calibrated predictor
was within 10% on 52% of the segments timed in the cgroup, against 78% for the same segments on a free tier.
With more threads the CPU clock of one thread says nothing, and wall-clock means are used.
"""
from __future__ import annotations

import time

import numpy as np

from partitioner.graph import load_graph
from partitioner.zoo import example_input
from predictor.features import group_kernels
from predictor.fitted import KernelPredictor
from predictor.profiler import ChainJob, ProfileSettings, _typical, run_jobs

DEFAULT_CALIBRATION_MODELS = ("resnet18", "mobilenet_v2")


class _PassTimedChain(ChainJob):
    """A ChainJob whose whole passes are also timed on the wall and the thread's CPU clocks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wall_s = self.cpu_s = 0.0

    def step(self, record: bool = True) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        super().step(record)
        if record:
            self.wall_s += time.perf_counter() - wall
            self.cpu_s += time.thread_time() - cpu


def calibrate(predictor: KernelPredictor, models: tuple[str, ...] = DEFAULT_CALIBRATION_MODELS, kernels: int = 40,
              settings: ProfileSettings | None = None, progress: bool = True) -> tuple[KernelPredictor, dict]:
    """(predictor scaled to this tier, what was measured). ``kernels`` are split across ``models``.
    ``settings.clock``: "wall" (default) counts the time the tier does not run us (quota, tenants); "cpu"
    measures the CPU's speed only."""
    import torch

    if kernels < 1:
        raise ValueError(f"--kernels must be at least 1, got {kernels}")
    if not models:
        raise ValueError("name at least one calibration model")
    settings = settings or ProfileSettings(threads=predictor.threads, rounds=30, fuse=predictor.fuse, clock="wall")
    clock = settings.resolved_clock()
    one_thread = settings.threads == 1
    torch.set_num_threads(settings.threads)
    base = predictor.scaled(1.0 / predictor.scale)  # compare against the unscaled fit
    started = time.perf_counter()
    measured_s = predicted_s = wall_s = cpu_s = 0.0
    timed = 0
    for index, model in enumerate(models):
        share = kernels // len(models) + (1 if index < kernels % len(models) else 0)
        if share == 0:
            continue
        graph = load_graph(model)
        kernel_list = group_kernels(graph, predictor.fuse)[:share]
        job = _PassTimedChain(graph, kernel_list, example_input(graph.input_shape), "cpu" if one_thread else clock)
        run_jobs([(job, settings.rounds)], f"calibrating on {model}", progress)
        if one_thread:
            measured_s += sum(_typical(s, "cpu") for s in job.samples) + _typical(job.overheads, "cpu")
        else:
            measured_s += sum(float(np.mean(s)) for s in job.samples) + float(np.mean(job.overheads))
        wall_s, cpu_s = wall_s + job.wall_s, cpu_s + job.cpu_s
        predicted_s += float(base.kernel_seconds([k.kind for k in kernel_list],
                                                 np.array([k.features for k in kernel_list])).sum())
        predicted_s += base.per_call_overhead_s
        timed += len(kernel_list)
    cpu_scale = measured_s / predicted_s
    stall_factor = wall_s / cpu_s if one_thread and clock == "wall" and cpu_s > 0 else 1.0
    scale = cpu_scale * stall_factor
    info = {"scale": scale, "cpu_scale": cpu_scale, "stall_factor": stall_factor, "kernels": timed,
            "models": list(models), "rounds": settings.rounds, "seconds": time.perf_counter() - started,
            "threads": settings.threads, "clock": clock, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    calibrated = base.scaled(scale)
    calibrated.meta = {**predictor.meta, "calibration": info}
    return calibrated, info

"""Rescale a predictor fitted on one tier to another: time a few dozen kernels where the tier runs.

The kernels (a prefix of each calibration model, so they run in context on each other's outputs) are
timed on the wall clock over many passes; the scale is the ratio of *means*, measured / predicted, over
all of them with the per-call overhead. Means rather than medians because on a CPU-quota tier a short
kernel is either unthrottled or hit by a whole throttled stretch of the period: the median would see an
unthrottled tier, the mean sees the long-run rate the quota allows.
"""
from __future__ import annotations

import time

import numpy as np

from partitioner.graph import load_graph
from partitioner.zoo import example_input
from predictor.features import group_kernels
from predictor.fitted import KernelPredictor
from predictor.profiler import ProfileSettings, measure_chain

DEFAULT_CALIBRATION_MODELS = ("resnet18", "mobilenet_v2")


def calibrate(predictor: KernelPredictor, models: tuple[str, ...] = DEFAULT_CALIBRATION_MODELS, kernels: int = 40,
              settings: ProfileSettings | None = None, progress: bool = True) -> tuple[KernelPredictor, dict]:
    """(predictor scaled to this tier, what was measured). ``kernels`` are split across ``models``."""
    import torch

    if kernels < 1:
        raise ValueError(f"--kernels must be at least 1, got {kernels}")
    if not models:
        raise ValueError("name at least one calibration model")
    settings = settings or ProfileSettings(threads=predictor.threads, rounds=30, fuse=predictor.fuse, clock="wall")
    torch.set_num_threads(settings.threads)
    base = predictor.scaled(1.0 / predictor.scale)  # compare against the unscaled fit
    started = time.perf_counter()
    measured_s = predicted_s = 0.0
    timed = 0
    for index, model in enumerate(models):
        share = kernels // len(models) + (1 if index < kernels % len(models) else 0)
        if share == 0:
            continue
        graph = load_graph(model)
        kernel_list = group_kernels(graph, predictor.fuse)[:share]
        samples, overheads = measure_chain(graph, kernel_list, example_input(graph.input_shape), settings.rounds,
                                           settings.resolved_clock(), f"calibrating on {model}", progress)
        measured_s += sum(float(np.mean(s)) for s in samples) + float(np.mean(overheads))
        predicted_s += float(base.kernel_seconds([k.kind for k in kernel_list],
                                                 np.array([k.features for k in kernel_list])).sum())
        predicted_s += base.per_call_overhead_s
        timed += len(kernel_list)
    scale = measured_s / predicted_s
    info = {"scale": scale, "kernels": timed, "models": list(models), "rounds": settings.rounds,
            "seconds": time.perf_counter() - started, "threads": settings.threads, "clock": settings.resolved_clock(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    calibrated = base.scaled(scale)
    calibrated.meta = {**predictor.meta, "calibration": info}
    return calibrated, info

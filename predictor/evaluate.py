"""How well a predictor matches a profile: kernel MAPE and the share of segments within +-10%."""
from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np

from predictor.fitted import KernelPredictor
from predictor.profiler import Profile

# Kernels below this measured time are mostly timer and dispatch noise; their relative error says nothing.
KERNEL_MAPE_FLOOR_S = 1e-5


@functools.lru_cache(maxsize=16)
def _graph(model: str, shape: tuple[int, ...]):
    from partitioner.graph import load_graph

    return load_graph(model, shape)


def evaluate(predictor: KernelPredictor, profile: Profile, models: tuple[str, ...] | None = None,
             tolerance: float = 0.10) -> dict:
    """``{"kernel_mape", "segment_within_10pct", "segments", "models", ...}`` over ``models`` (default: all)."""
    kernels = [k for k in profile.kernels if models is None or k["model"] in models]
    segments = [s for s in profile.segments if models is None or s["model"] in models]
    result: dict = {"kernel_mape": None, "segment_within_10pct": None, "segments": len(segments),
                    "models": sorted({s["model"] for s in segments} | {k["model"] for k in kernels
                                                                       if not k["model"].startswith("sweep_")})}
    if kernels:
        measured = np.array([k["net_s"] for k in kernels])
        predicted = predictor.kernel_seconds([k["kind"] for k in kernels], np.array([k["features"] for k in kernels]))
        keep = measured >= KERNEL_MAPE_FLOOR_S
        if keep.any():
            result["kernel_mape"] = float(np.mean(np.abs(predicted[keep] - measured[keep]) / measured[keep]))
        result["kernels"] = int(keep.sum())
    if segments:
        errors = segment_errors(predictor, segments)
        per_model = defaultdict(list)
        for record, error in zip(segments, errors):
            per_model[record["model"]].append(error)
        result["segment_within_10pct"] = float(np.mean(np.abs(errors) <= tolerance))
        result["segment_median_abs_error"] = float(np.median(np.abs(errors)))
        result["segment_bias"] = float(np.median(errors))
        result["per_model"] = {m: {"segments": len(e), "within_10pct": float(np.mean(np.abs(np.array(e)) <= tolerance)),
                                   "median_abs_error": float(np.median(np.abs(e)))} for m, e in sorted(per_model.items())}
    return result


def segment_errors(predictor: KernelPredictor, segments: list[dict]) -> np.ndarray:
    """(predicted - measured) / measured for each segment record."""
    cache: dict = {}
    errors = []
    for record in segments:
        key = (record["model"], tuple(record["input_shape"]))
        if key not in cache:
            graph = _graph(*key)
            cache[key] = (graph, predictor.node_seconds(graph))
        graph, node_seconds = cache[key]
        nodes = graph.order[record["start"]:record["end"]]
        predicted = predictor.segment_seconds(graph, nodes, node_seconds)
        errors.append((predicted - record["median_s"]) / record["median_s"])
    return np.array(errors)

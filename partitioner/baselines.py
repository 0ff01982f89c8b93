"""Baselines on the same cost model as the D3 planner, so their predicted latencies compare directly.

* device_only / edge_only (one edge node) / cloud_only: the whole model on one tier.
* neurosurgeon: the best single cut of the topological order between the device and one server tier
  (Neurosurgeon's chain view of the model; the better of edge-as-server and cloud-as-server).
* dads: the DAG min-cut two-tier split (device + one server tier, the better of edge and cloud), as DADS.
* d3_no_tiling: the three-tier D3 split with the edge segment on one node (no vertical separation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from partitioner.cost import Conditions, Links, TierModels, cost_graph, features
from partitioner.graph import ModelGraph
from partitioner.hpa import make_plan, solve
from partitioner.plan import Plan

BASELINE_NAMES = ("device_only", "edge_only", "cloud_only", "neurosurgeon", "dads", "d3_no_tiling")


def _best_prefix_cut(cg, cond: Conditions, server_tier: int) -> tuple[np.ndarray, float]:
    theta = cond.theta()
    best_labels, best_seconds = None, np.inf
    for cut in range(cg.n_inputs, cg.n + 1):  # nodes [0, cut) of the topological order on the device
        labels = np.zeros(cg.n, dtype=np.int64)
        labels[cut:] = server_tier
        seconds = float(features(cg, labels, cond) @ theta)
        if seconds < best_seconds:
            best_labels, best_seconds = labels, seconds
    return best_labels, best_seconds


def baseline_plans(graph: ModelGraph, links: Links, tiers: TierModels,
                   edge_weights: Sequence[float] = (1.0,)) -> dict[str, Plan]:
    cg = cost_graph(graph)
    one_node = Conditions(links, tiers, tuple(edge_weights)[:1] or (1.0,))
    theta = one_node.theta()
    plans = {}
    for name, tier in (("device_only", 0), ("edge_only", 1), ("cloud_only", 2)):
        labels = np.full(cg.n, tier, dtype=np.int64)
        labels[:cg.n_inputs] = 0
        plans[name] = make_plan(graph, one_node, labels, name)
    prefix = [_best_prefix_cut(cg, one_node, server) for server in (1, 2)]
    plans["neurosurgeon"] = make_plan(graph, one_node, min(prefix, key=lambda item: item[1])[0], "neurosurgeon")
    two_tier = [solve(cg, one_node, allowed_tiers=(0, server)) for server in (1, 2)]
    best = min(two_tier, key=lambda s: float(s.features @ theta))
    plans["dads"] = make_plan(graph, one_node, best.labels, "dads")
    plans["d3_no_tiling"] = make_plan(graph, one_node, solve(cg, one_node).labels, "d3_no_tiling")
    return plans

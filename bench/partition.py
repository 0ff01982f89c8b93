"""Horizontal-partition benchmark: per model, D3's predicted speedup over each baseline at the uplinks
DADS reported (CAT1 0.13, 3G 1.1, 4G 5.85, Wi-Fi 18.88 Mbit/s device->edge; device->cloud 0.8x that plus a
longer RTT; a 100 Mbit/s edge->cloud backbone), full-plan solve times, incremental-step times and
closeness on a real Mahimahi trace, and the gap to the exact MILP oracle over a bandwidth grid.

    .venv/bin/python bench/partition.py [--models resnet50,vgg16] [--edge-nodes 4] [--trace FILE]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

# bench/ holds scripts named like the packages (bench/predictor.py): keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch
from tqdm import tqdm

from partitioner.baselines import BASELINE_NAMES, baseline_plans
from partitioner.cost import Conditions, Links, TierModels, cost_graph
from partitioner.graph import load_graph
from partitioner.hpa import plan_d3, solve, solve_d3, solve_throughput
from partitioner.oracle import solve_milp
from partitioner.repartition import Repartitioner

MODELS = ["alexnet", "vgg16", "resnet18", "resnet50", "googlenet", "mobilenet_v2", "inception_v3",
          "densenet121", "efficientnet_b0", "squeezenet1_1"]
UPLINKS = {"CAT1": 0.13, "3G": 1.1, "4G": 5.85, "WiFi": 18.88}
RTTS = dict(device_edge_rtt_s=0.02, edge_cloud_rtt_s=0.02, device_cloud_rtt_s=0.06)
# Mbit/s: device->edge x edge->cloud x device->cloud (the MILP takes seconds on the larger DAGs)
ORACLE_GRID = list(itertools.product([0.5, 20, 1000], [0.5, 1000], [0.5, 1000]))
THROUGHPUT_GRID = [(5.85, 100, 4.68), (300, 20, 5)]  # fast bottleneck planner vs the MILP, 4 edge nodes
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared/traces/mahimahi/TMobile-LTE-short.up"


def uplink(mbps: float) -> Links:
    return Links.mbps(mbps, 100, 0.8 * mbps, **RTTS)


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def trace_mbps(path: Path, steps: int) -> np.ndarray:
    try:
        from traces.formats import load_trace
        trace = load_trace(path, "mahimahi")
        mbps = trace.mbps
    except ImportError:  # private reader: one line per 1500-byte delivery opportunity, ms timestamps
        stamps = np.loadtxt(path, dtype=np.int64)
        mbps = np.bincount(stamps // 1000) * 1500 * 8 / 1e6
    return np.clip(np.asarray(mbps, dtype=float), 0.05, None)[:steps]


def replay(graph, tiers, weights, mbps: np.ndarray) -> tuple[float, float, int, int]:
    base = uplink(float(mbps[0]))
    rep = Repartitioner(graph, tiers, base, weights)
    cg = cost_graph(graph)
    close = []
    for value in mbps:
        links = base.replace(device_edge_bps=value * 1e6, device_cloud_bps=0.8 * value * 1e6)
        plan = rep.update(links)
        best = solve_d3(cg, links, tiers, weights)[0][0].seconds * 1e3
        close.append(plan.predicted_ms <= 1.02 * best)
    return (statistics.median(rep.stats.step_seconds) * 1e3, float(np.mean(close)), rep.stats.full_replans,
            rep.repartitions)


def oracle_gap(graph, tiers, node_counts) -> tuple[float, int]:
    cg = cost_graph(graph)
    worst, cases = 1.0, 0
    for bw in ORACLE_GRID:
        for nodes in node_counts:
            cond = Conditions(Links.mbps(*bw, **RTTS), tiers, (1.0,) * nodes)
            fast, exact = solve(cg, cond), solve_milp(cg, cond)
            worst = max(worst, fast.seconds / exact.seconds)
            cases += 1
    return worst, cases


def throughput_gap(graph, tiers) -> tuple[float, float, float]:
    """(worst fast/MILP bottleneck, median fast ms, median MILP ms) over THROUGHPUT_GRID."""
    cg = cost_graph(graph)
    worst, fast_ms, milp_ms = 1.0, [], []
    for bw in THROUGHPUT_GRID:
        cond = Conditions(Links.mbps(*bw, **RTTS), tiers, (1.0,) * 4)
        started = time.perf_counter()
        fast = solve_throughput(cg, cond)
        fast_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        exact = solve_milp(cg, cond, objective="throughput")
        milp_ms.append((time.perf_counter() - started) * 1e3)
        worst = max(worst, fast.seconds / exact.seconds)
    return worst, statistics.median(fast_ms), statistics.median(milp_ms)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--edge-nodes", type=int, default=4)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--trace-steps", type=int, default=120)
    parser.add_argument("--oracle-nodes", default="1,8", help="edge node counts of the oracle grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tiers = TierModels.default()
    weights = (1.0,) * args.edge_nodes
    mbps = trace_mbps(Path(args.trace), args.trace_steps)
    node_counts = [int(n) for n in args.oracle_nodes.split(",")]
    print(f"edge nodes {args.edge_nodes}; links: device->cloud 0.8x uplink, edge->cloud 100 Mbit/s, RTT ms "
          f"de/ec/dc 20/20/60; trace {Path(args.trace).name} ({len(mbps)} s, mean {mbps.mean():.1f} Mbit/s)")
    rows = []
    for model in tqdm(args.models.split(","), desc="models", file=sys.stderr):
        graph = load_graph(model)
        for label, up in UPLINKS.items():
            links = uplink(up)
            plan = plan_d3(graph, links, tiers, weights)
            baselines = baseline_plans(graph, links, tiers, weights)
            speedups = {k: baselines[k].predicted_ms / plan.predicted_ms for k in BASELINE_NAMES}
            rows.append((model, label, plan.predicted_ms, speedups))
            print(f"{model:<16} {label:<5} D3 {plan.predicted_ms:9.1f} ms  speedup vs " +
                  "  ".join(f"{k} {v:5.2f}x" for k, v in speedups.items()))
        solve_ms = median_ms(lambda: plan_d3(graph, uplink(5.85), tiers, weights))
        step_ms, close, replans, changes = replay(graph, tiers, weights, mbps)
        gap, cases = oracle_gap(graph, tiers, node_counts)
        tp_gap, tp_fast, tp_milp = throughput_gap(graph, tiers)
        print(f"{model:<16} solve {solve_ms:6.2f} ms (median)  incremental step {step_ms:6.3f} ms (median), "
              f"within 2% of a full re-plan on {close * 100:5.1f}% of steps ({replans} full re-plans, {changes} "
              f"plan changes)  worst HPA/oracle {gap:.4f} over {cases} cases  throughput fast/MILP "
              f"{tp_gap:.4f} ({tp_fast:.0f} vs {tp_milp:.0f} ms)")
    geo = {k: float(np.exp(np.mean([np.log(r[3][k]) for r in rows]))) for k in BASELINE_NAMES}
    print("geometric-mean speedup of D3 over: " + "  ".join(f"{k} {v:.2f}x" for k, v in geo.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

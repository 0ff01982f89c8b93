"""`d3 plan`: the D3 three-tier plan of a model for given links, next to the baselines."""
from __future__ import annotations

import argparse
import json
import re
import time

from partitioner.cli import add_model_arguments, load_graph_from_args

LINK_KEYS = {"device-edge": "device_edge", "edge-cloud": "edge_cloud", "device-cloud": "device_cloud",
             "edge-edge": "edge_edge"}
DEFAULT_BW = "device-edge=20Mbit,edge-cloud=200Mbit,device-cloud=8Mbit"
DEFAULT_RTT = "device-edge=10,edge-cloud=20,device-cloud=60"
_UNITS = {"": 1e6, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 1, "kbps": 1e3, "mbps": 1e6,
          "gbps": 1e9}


def parse_bandwidth(text: str) -> float:
    """'20Mbit' / '1.5gbit' / '500kbit' / '20' (Mbit/s) -> bit/s."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z/]*)\s*", text)
    unit = match.group(2).lower().replace("/s", "") if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"bad bandwidth {text!r}: want a positive number with a unit, e.g. 20Mbit, 500kbit, 1Gbit")
    return float(match.group(1)) * _UNITS[unit]


def _pairs(text: str, option: str) -> dict[str, str]:
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in LINK_KEYS:
            raise ValueError(f"{option}: {item!r} should be LINK=VALUE with LINK one of {', '.join(LINK_KEYS)}")
        result[key.strip()] = value.strip()
    return result


def parse_links(bw: str, rtt_ms: str):
    from partitioner.cost import Links

    values = {f"{LINK_KEYS[k]}_bps": parse_bandwidth(v) for k, v in _pairs(DEFAULT_BW, "--bw").items()}
    values.update({f"{LINK_KEYS[k]}_bps": parse_bandwidth(v) for k, v in _pairs(bw, "--bw").items()})
    for key, value in {**_pairs(DEFAULT_RTT, "--rtt-ms"), **_pairs(rtt_ms, "--rtt-ms")}.items():
        if key == "edge-edge":
            raise ValueError("--rtt-ms: the edge-edge link has no RTT setting")
        try:
            values[f"{LINK_KEYS[key]}_rtt_s"] = float(value) / 1e3
        except ValueError:
            raise ValueError(f"--rtt-ms: {key}={value!r} is not a number of milliseconds") from None
    return Links(**values)


def parse_weights(text: str | None, nodes: int) -> tuple[float, ...]:
    if nodes < 1:
        raise ValueError(f"--edge-nodes must be >= 1, got {nodes}")
    if not text:
        return (1.0,) * nodes
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"--edge-weights wants comma-separated numbers, got {text!r}") from None
    if len(weights) != nodes or min(weights) <= 0:
        raise ValueError(f"--edge-weights needs {nodes} positive numbers (one per edge node), got {text!r}")
    return weights


def load_tiers(predictor: str | None):
    from partitioner.cost import TierModels

    if predictor is None:
        return TierModels.default()
    try:
        from predictor.registry import load_predictor
    except ImportError:
        try:
            from predictor import load_predictor
        except ImportError:
            raise ValueError("--predictor needs the fitted predictors (predictor.registry.load_predictor), "
                             "which this installation does not have; omit --predictor for FLOP-rate estimates"
                             ) from None
    loaded = load_predictor(predictor)
    if all(hasattr(loaded, tier) for tier in ("device", "edge", "cloud")):
        return TierModels(loaded.device, loaded.edge, loaded.cloud)
    # One model (an edge node's): the default tier ratios around it.
    return TierModels(device=loaded.scaled(5.0), edge=loaded, cloud=loaded.scaled(0.25))


def add_commands(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="the device/edge/cloud plan of a model, with the baselines")
    add_model_arguments(plan)
    plan.add_argument("--bw", default="", metavar="LINK=RATE,...",
                      help=f"link bandwidths (default {DEFAULT_BW}; edge-edge=1Gbit)")
    plan.add_argument("--rtt-ms", default="", metavar="LINK=MS,...", help=f"round-trip times (default {DEFAULT_RTT})")
    plan.add_argument("--edge-nodes", type=int, default=4, help="edge nodes the edge segment is tiled over (default 4)")
    plan.add_argument("--edge-weights", default=None, metavar="W1,W2,...",
                      help="relative speed of each edge node (default all 1)")
    plan.add_argument("--predictor", default=None, help="fitted predictor ('default' or a file); default FLOP rates")
    plan.add_argument("--objective", default="latency", choices=("latency", "throughput"),
                      help="latency of one request (default) or the slowest pipeline stage of a stream")
    plan.add_argument("--json", action="store_true", help="one JSON object on stdout")
    plan.set_defaults(handler=run_plan)


def tier_ranges(graph, assignment: dict[str, str]) -> dict[str, list[tuple[int, int, str, str]]]:
    """Per tier, runs of consecutive topological positions: (first, last, first name, last name)."""
    runs: dict[str, list] = {"device": [], "edge": [], "cloud": []}
    for position, name in enumerate(graph.order):
        tier = assignment[name]
        if runs[tier] and runs[tier][-1][1] == position - 1:
            first, _, first_name, _ = runs[tier][-1]
            runs[tier][-1] = (first, position, first_name, name)
        else:
            runs[tier].append((position, position, name, name))
    return runs


def run_plan(args: argparse.Namespace) -> int:
    from partitioner.baselines import baseline_plans
    from partitioner.hpa import plan_d3

    links = parse_links(args.bw, args.rtt_ms)
    weights = parse_weights(args.edge_weights, args.edge_nodes)
    tiers = load_tiers(args.predictor)
    graph = load_graph_from_args(args)
    started = time.perf_counter()
    plan = plan_d3(graph, links, tiers, weights, objective=args.objective)
    solve_ms = (time.perf_counter() - started) * 1e3
    baselines = baseline_plans(graph, links, tiers, weights)
    result = {
        "model": graph.name, "assignment": plan.assignment, "predicted_ms": plan.predicted_ms,
        "stages_ms": plan.stages_ms, "link_bytes": plan.link_bytes, "edge_weights": plan.edge_weights,
        "objective": args.objective, "baselines_ms": {k: p.predicted_ms for k, p in baselines.items()},
        "solve_ms": solve_ms,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    edge_used = any(tier == "edge" for tier in plan.assignment.values())
    tiled = "unused" if not edge_used else f"tiled over {len(plan.edge_weights)} nodes" if len(plan.edge_weights) > 1 else "on one node (tiling does not pay here)"
    print(f"{graph.name}: D3 plan ({args.objective}), edge {tiled}, solved in {solve_ms:.1f} ms")
    for tier, runs in tier_ranges(graph, plan.assignment).items():
        count = sum(last - first + 1 for first, last, _, _ in runs)
        shown = ", ".join(f"{a}-{b} ({na}..{nb})" if a != b else f"{a} ({na})" for a, b, na, nb in runs[:4])
        more = f", ... {len(runs) - 4} more runs" if len(runs) > 4 else ""
        print(f"  {tier:<6} {count:>4} nodes  {shown or '-'}{more}")
    print("  bytes: " + ", ".join(f"{k} {v / 1e3:.1f} KB" for k, v in plan.link_bytes.items() if v))
    print("  stages ms: " + ", ".join(f"{k} {v:.2f}" for k, v in plan.stages_ms.items() if v))
    print(f"  predicted latency {plan.predicted_ms:.2f} ms")
    print("  baselines ms: " + ", ".join(f"{k} {p.predicted_ms:.1f} ({p.predicted_ms / plan.predicted_ms:.2f}x)"
                                         for k, p in baselines.items()))
    return 0

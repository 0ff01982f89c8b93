"""`d3 edge-plan`: plan a model's edge segment over heterogeneous edge nodes with any edge strategy,
compare the strategies' predictions, check the plan is lossless, and write it as JSON.

Also runnable without the d3 entry point: ``python -m partitioner.edge_strategies.cli edge-plan ...``.
Other commands that plan the edge (``d3 plan``, ``d3 edge``) can reuse :func:`add_edge_strategy_argument`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_edge_strategy_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    from partitioner.edge_strategies import STRATEGY_NAMES

    parser.add_argument("--edge-strategy", default=default, choices=STRATEGY_NAMES,
                        help=f"how the edge segment is spread over the edge nodes (default: {default}; auto = "
                             "the strategy with the lowest predicted latency)")


def parse_speeds(text: str) -> list[float]:
    try:
        speeds = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"bad --edge-nodes {text!r}: expected relative speeds like 1.0,0.5,0.25") from None
    if not speeds or any(not s > 0 for s in speeds):
        raise ValueError(f"bad --edge-nodes {text!r}: every speed must be a positive number")
    return speeds


def parse_cuts(text: str | None, count: int) -> tuple[int, int]:
    if text is None:
        return 0, count
    try:
        start, stop = (int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"bad --cuts {text!r}: expected A,B (node indices)") from None
    return start, stop


def add_commands(subparsers) -> None:
    from partitioner.cli import add_model_arguments

    command = subparsers.add_parser("edge-plan", help="plan the edge segment with an edge strategy",
                                    description=__doc__.split("\n")[0])
    add_model_arguments(command)
    command.add_argument("--cuts", default=None, metavar="A,B",
                         help="edge segment = work nodes A..B-1 (default: the whole model)")
    command.add_argument("--edge-nodes", default="1.0,0.5,0.25", metavar="S1,S2,...",
                         help="relative speed of each edge node; the first coordinates (default 1.0,0.5,0.25)")
    command.add_argument("--link-mbps", type=float, default=1000.0, help="edge LAN bandwidth (default 1000)")
    add_edge_strategy_argument(command)
    command.add_argument("--verify", action="store_true", help="run the plan here and compare with the unsplit segment")
    command.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the plan as JSON")
    command.add_argument("--json", action="store_true", help="one JSON summary on stdout")
    command.set_defaults(handler=run_edge_plan_command)


def run_edge_plan_command(args: argparse.Namespace) -> int:
    from partitioner.cli import load_graph_from_args
    from partitioner.edge_strategies import plan_all
    from partitioner.segments import build_segments

    speeds = parse_speeds(args.edge_nodes)
    if not args.link_mbps > 0:
        raise ValueError(f"--link-mbps must be positive, got {args.link_mbps}")
    graph = load_graph_from_args(args)
    start, stop = parse_cuts(args.cuts, len(graph.order))
    segmented = build_segments(graph, graph.prefix_assignment(start, stop))
    edge = segmented.edge
    if not edge.node_names:
        raise ValueError(f"the edge segment {start}..{stop} is empty")
    strategies = None if args.edge_strategy == "auto" else [args.edge_strategy]
    plans = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, speeds, args.link_mbps * 1e6,
                     strategies)
    chosen = min(plans.values(), key=lambda p: p.predicted_ms)
    summary = {"model": graph.name, "edge_nodes": speeds, "link_mbps": args.link_mbps,
               "strategy": chosen.strategy, "predicted_ms": round(chosen.predicted_ms, 3),
               "stages": len(chosen.stages), "items": sum(len(s.items) for s in chosen.stages),
               "per_node_busy_ms": [round(b, 3) for b in chosen.per_node_busy_ms],
               "per_node_peak_mb": [round(b / 1e6, 2) for b in chosen.per_node_peak_bytes],
               "candidates_ms": {n: round(p.predicted_ms, 3) for n, p in plans.items()}}
    if args.verify:
        summary["max_abs_diff"] = _verify(graph, segmented, chosen)
    if args.out:
        args.out.write_text(json.dumps(chosen.to_dict()))
        summary["written"] = str(args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0 if summary.get("max_abs_diff", 0.0) <= 1e-5 else 1


def _verify(graph, segmented, plan) -> float:
    import torch

    from partitioner.edge_strategies import run_edge_plan
    from partitioner.zoo import example_input

    values = {graph.input_names[0]: example_input(graph.input_shape)}
    with torch.no_grad():
        values.update(segmented.device.run(values))
        reference = segmented.edge.run(values)
    outputs = run_edge_plan(graph, plan, values)
    diffs = [((outputs[n] - reference[n]).abs().max() / max(1.0, reference[n].abs().max().item())).item()
             for n in reference if isinstance(reference[n], torch.Tensor)]
    return max(diffs, default=0.0)


def _print_summary(summary: dict) -> None:
    print(f"{summary['model']} edge segment over {len(summary['edge_nodes'])} nodes {summary['edge_nodes']}, "
          f"LAN {summary['link_mbps']:g} Mbit/s")
    for name, ms in sorted(summary["candidates_ms"].items(), key=lambda kv: kv[1]):
        mark = "  <- chosen" if name == summary["strategy"] else ""
        print(f"  {name:<10} {ms:>10.2f} ms predicted{mark}")
    print(f"{summary['strategy']}: {summary['stages']} stages, {summary['items']} work items; per node busy ms "
          f"{summary['per_node_busy_ms']}, peak MB {summary['per_node_peak_mb']}")
    if "max_abs_diff" in summary:
        print(f"verified: max abs diff {summary['max_abs_diff']:.2e} (relative to the output scale, <= 1e-5 is lossless)")
    if "written" in summary:
        print(f"plan written to {summary['written']}")


def main(argv=None) -> int:
    from deploy.cli import _expected_errors

    parser = argparse.ArgumentParser(prog="python -m partitioner.edge_strategies.cli")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _expected_errors() as exc:
        print(f"d3 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

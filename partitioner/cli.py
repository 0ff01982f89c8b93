"""`d3 graph` and `d3 verify`: look at a model's DAG and check that a three-way split is exact."""
from __future__ import annotations

import argparse
import json


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --input and --weights: shared by every command that loads a zoo model."""
    parser.add_argument("model", help="torchvision classification model name, e.g. resnet50")
    parser.add_argument("--input", default=None, metavar="SHAPE",
                        help="input shape, e.g. 1x3x224x224 (default: the model's usual size)")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="state dict to load (weights_only=True); default: random weights, fixed seed")


def load_graph_from_args(args: argparse.Namespace):
    from partitioner.graph import load_graph
    from partitioner.zoo import parse_shape

    shape = parse_shape(args.input) if args.input else None
    return load_graph(args.model, shape, args.weights)


def add_commands(subparsers) -> None:
    graph = subparsers.add_parser("graph", help="the model as a DAG: nodes, FLOPs, parameters, cut sizes")
    add_model_arguments(graph)
    graph.add_argument("--json", action="store_true", help="one JSON object on stdout")
    graph.set_defaults(handler=run_graph)

    verify = subparsers.add_parser("verify", help="run a device/edge/cloud split and compare with the model")
    add_model_arguments(verify)
    verify.add_argument("--cuts", required=True, metavar="A,B",
                        help="first A nodes (topological order) on the device, A..B-1 on the edge, rest on the cloud")
    verify.add_argument("--json", action="store_true", help="one JSON object on stdout")
    verify.set_defaults(handler=run_verify)


def _format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count:.2f} GB"


def graph_summary(graph) -> dict:
    from collections import Counter

    interior = graph.cut_point_bytes()[1:-1] or graph.cut_point_bytes()
    largest = max(interior, key=lambda item: item[1])
    smallest = min(interior, key=lambda item: item[1])

    def describe(cut):
        position, nbytes = cut
        return {"position": position, "after_node": graph.order[position - 1] if position else None, "bytes": nbytes}

    return {
        "model": graph.name,
        "input_shape": list(graph.input_shape),
        "nodes": len(graph.order),
        "edges": graph.dag.number_of_edges(),
        "gflops": round(graph.total_flops / 1e9, 4),
        "param_mb": round(graph.param_bytes / 1e6, 3),
        "largest_cut": describe(largest),
        "smallest_cut": describe(smallest),
        "op_kinds": dict(Counter(graph.records[n].op_kind for n in graph.order).most_common()),
    }


def run_graph(args: argparse.Namespace) -> int:
    summary = graph_summary(load_graph_from_args(args))
    if args.json:
        print(json.dumps(summary))
        return 0
    shape = "x".join(map(str, summary["input_shape"]))
    print(f"{summary['model']}  (input {shape})")
    print(f"  nodes {summary['nodes']}   edges {summary['edges']}   "
          f"{summary['gflops']:.3f} GFLOPs   parameters {summary['param_mb']:.1f} MB")
    for label in ("largest", "smallest"):
        cut = summary[f"{label}_cut"]
        print(f"  {label + ' cut':<13} after node {cut['position']:>4} ({cut['after_node']}): "
              f"{_format_bytes(cut['bytes'])} cross")
    print("  op kinds: " + ", ".join(f"{k} {v}" for k, v in summary["op_kinds"].items()))
    return 0


def parse_cuts(text: str, node_count: int) -> tuple[int, int]:
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--cuts wants two integers A,B (e.g. 10,40), got {text!r}") from None
    if not 0 <= first <= second <= node_count:
        raise ValueError(f"--cuts {text}: need 0 <= A <= B <= {node_count} (the model's node count)")
    return first, second


def compare_outputs(reference, candidate) -> tuple[float, bool]:
    import torch

    diff = (reference - candidate).abs().max().item() if reference.numel() else 0.0
    return float(diff), bool(torch.equal(reference, candidate))


def run_verify(args: argparse.Namespace) -> int:
    import torch

    from partitioner.segments import build_segments
    from partitioner.zoo import example_input

    graph = load_graph_from_args(args)
    device_count, edge_end = parse_cuts(args.cuts, len(graph.order))
    segmented = build_segments(graph, graph.prefix_assignment(device_count, edge_end))
    x = example_input(graph.input_shape)
    with torch.no_grad():
        reference = graph.module(x)
        candidate = segmented.run(x)
    max_abs_diff, equal = compare_outputs(reference, candidate)
    result = {"model": graph.name, "max_abs_diff": max_abs_diff, "equal": equal,
              "crossing": {seg.tier: seg.input_names for seg in segmented.segments}}
    if args.json:
        print(json.dumps(result))
    else:
        for seg in segmented.segments:
            print(f"  {seg.tier:<6} {len(seg.node_names):>4} nodes  in: {', '.join(seg.input_names) or '-'}")
        print(f"max_abs_diff {max_abs_diff:.3g}  ({'equal' if equal else 'DIFFERENT'})")
    return 0 if equal else 1

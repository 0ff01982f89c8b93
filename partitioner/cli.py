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
    verify.add_argument("--edge-nodes", type=int, default=None, metavar="N",
                        help="also tile the edge segment over N edge nodes (vertical separation) and compare "
                             "the stitched result with the untiled model")
    verify.add_argument("--weights-per-node", default=None, metavar="W1,W2,...",
                        help="relative speed of each edge node (default: all 1); tiles are sized to finish together")
    verify.add_argument("--split", default="auto", choices=["auto", "h", "w", "grid"],
                        help="tile layout per stage (default: auto, the least halo)")
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


def parse_node_weights(text: str | None, edge_nodes: int | None) -> list[float] | None:
    """--edge-nodes / --weights-per-node -> one weight per edge node (None: no tiling)."""
    if text is None:
        if edge_nodes is None:
            return None
        if edge_nodes < 1:
            raise ValueError(f"--edge-nodes must be >= 1, got {edge_nodes}")
        return [1.0] * edge_nodes
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights-per-node wants numbers like 1,2,1, got {text!r}") from None
    if edge_nodes is not None and len(weights) != edge_nodes:
        raise ValueError(f"--weights-per-node gives {len(weights)} weights but --edge-nodes is {edge_nodes}")
    if any(not w > 0 or w == float("inf") for w in weights):
        raise ValueError(f"--weights-per-node: every weight must be a positive number, got {text!r}")
    return weights


# A tiled conv may run a different oneDNN algorithm on its smaller input: accept float noise of this
# size (relative to the output's largest magnitude, when that exceeds 1) when the predicted class is
# the same; bit-exact is reported separately as "equal".
TILED_TOLERANCE = 1e-5


def _top1_same(reference, candidate) -> bool:
    import torch

    if reference.dim() < 2 or reference.numel() == 0:
        return True
    return bool(torch.equal(reference.flatten(1).argmax(1), candidate.flatten(1).argmax(1)))


def run_verify(args: argparse.Namespace) -> int:
    import torch

    from partitioner.segments import build_segments
    from partitioner.zoo import example_input

    weights = parse_node_weights(args.weights_per_node, args.edge_nodes)
    graph = load_graph_from_args(args)
    device_count, edge_end = parse_cuts(args.cuts, len(graph.order))
    segmented = build_segments(graph, graph.prefix_assignment(device_count, edge_end))
    x = example_input(graph.input_shape)
    with torch.no_grad():
        reference = graph.module(x)
        candidate = segmented.run(x) if weights is None else None
    result = {"model": graph.name}
    if weights is not None:
        candidate, tiling = _run_tiled(graph, segmented, x, weights, args.split)
        result.update(tiling)
    max_abs_diff, equal = compare_outputs(reference, candidate)
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    ok = equal or (weights is not None and max_abs_diff <= TILED_TOLERANCE * scale
                   and _top1_same(reference, candidate))
    result.update({"max_abs_diff": max_abs_diff, "equal": equal, "ok": ok,
                   "crossing": {seg.tier: seg.input_names for seg in segmented.segments}})
    if args.json:
        print(json.dumps(result))
    else:
        for seg in segmented.segments:
            print(f"  {seg.tier:<6} {len(seg.node_names):>4} nodes  in: {', '.join(seg.input_names) or '-'}")
        if weights is not None:
            print(f"  tiled  {result['edge_nodes']} edge nodes (weights {','.join(f'{w:g}' for w in weights)}): "
                  f"{result['tiled_runs']} tiled stages, {result['serial_stages']} serial, "
                  f"halo overhead {result['halo_overhead_pct']:.1f}%, predicted speedup "
                  f"{result['predicted_speedup']:.2f}x")
        verdict = "equal" if equal else f"within {TILED_TOLERANCE:g} of scale, same top-1" if ok else "DIFFERENT"
        print(f"max_abs_diff {max_abs_diff:.3g}  ({verdict})")
    return 0 if ok else 1


def _run_tiled(graph, segmented, x, weights, split):
    """The model with its edge segment tiled over len(weights) nodes; and what the JSON reports about it."""
    import torch

    from partitioner.tiling import plan_segment_tiling, run_edge_tiled

    plan = plan_segment_tiling(graph, segmented.edge, weights, split)
    with torch.no_grad():
        values = {name: x for name in segmented.input_names}
        values.update(segmented.device.run(values))
        values.update(run_edge_tiled(graph, plan, values))
        values.update(segmented.cloud.run(values))
    output = segmented.assemble_output(values)
    return output, {"edge_nodes": len(weights), "weights_per_node": weights, "tiled_runs": len(plan.tiled_stages),
                    "serial_stages": len(plan.stages) - len(plan.tiled_stages),
                    "halo_overhead_pct": round(plan.halo_overhead_pct, 3),
                    "predicted_speedup": round(plan.predicted_speedup, 3),
                    "per_node_gflops": [round(f / 1e9, 4) for f in plan.per_node_flops]}

"""Kernels and their features: the unit the profiler times and the regressors predict.

A *kernel* is what one call costs in the runtime's view: normally one fx node, but a conv (or linear)
followed by its batch norm and activation, or a batch norm followed by its activation (DenseNet's
pre-activation), is one kernel, as inference engines fuse them. A kernel's predicted time goes on its
first node and 0 on the others, so a segment's prediction is still a plain sum over its nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from partitioner.graph import ModelGraph, NodeRecord

# Fixed order: the regressors' column order, stored in every predictor file.
FEATURES = (
    "flops", "in_elements", "out_elements", "param_bytes", "kernel_area", "stride", "groups",
    "in_channels", "out_channels", "out_hw", "n_inputs", "has_bn", "has_act", "depthwise", "channels_per_group",
)

# Kinds that stream their input once (memory bound, no reduction over a window): a kind the profiles never
# saw (densenet121's pre-activation batch norms, held out) is predicted by one regressor pooled over these.
ELEMENTWISE_KINDS = ("activation", "add", "mul", "sub", "div", "bn")
ELEMENTWISE = "*elementwise"  # the pooled regressor's key
_DEPTHWISE = FEATURES.index("depthwise")


def regressor_key(kind: str, features) -> str:
    """Which regressor predicts a kernel: its op kind, except that depthwise convs (memory bound, a few
    FLOPs per byte) get their own: fitted together with dense convs, MobileNetV2's were predicted 47% too
    fast."""
    if kind == "conv" and features[_DEPTHWISE]:
        return "conv_dw"
    return kind


# (tail kind, next kind) pairs that are one kernel when the tail's only consumer is the next node.
_FUSIBLE = {("conv", "bn"), ("conv", "activation"), ("bn", "activation"), ("linear", "activation")}


@dataclass
class Kernel:
    nodes: list[str]  # the fused nodes, in program order; the first carries the time
    kind: str  # op kind of the first node: selects the regressor
    features: list[float]  # in FEATURES order


def _elements(shape) -> int:
    return math.prod(shape) if shape else 0


def _consumers(graph: ModelGraph, name: str) -> list[str]:
    return list(graph.dag.successors(name))


def group_kernels(graph: ModelGraph, fuse: bool = True) -> list[Kernel]:
    """Every work node of ``graph`` in exactly one kernel, kernels in program order."""
    kernels: list[Kernel] = []
    taken: set[str] = set()
    outputs = set(graph.output_names)
    for name in graph.order:
        if name in taken:
            continue
        nodes = [name]
        while fuse:
            tail = nodes[-1]
            successors = _consumers(graph, tail)
            if len(successors) != 1 or tail in outputs:
                break
            nxt = successors[0]
            pair = (graph.records[tail].op_kind, graph.records[nxt].op_kind)
            if pair not in _FUSIBLE or nxt in taken or list(graph.dag.predecessors(nxt)) != [tail]:
                break
            nodes.append(nxt)
        taken.update(nodes)
        kernels.append(Kernel(nodes, graph.records[name].op_kind, kernel_features(graph, nodes)))
    return kernels


def kernel_features(graph: ModelGraph, nodes: list[str]) -> list[float]:
    first: NodeRecord = graph.records[nodes[0]]
    last: NodeRecord = graph.records[nodes[-1]]
    kinds = [graph.records[n].op_kind for n in nodes]
    hyper = first.hyper
    kernel = hyper.get("kernel", (1, 1))
    stride = hyper.get("stride", (1, 1))
    groups = int(hyper.get("groups", 1))
    if first.op_kind == "linear":
        in_channels, out_channels = hyper.get("in_features", 0), hyper.get("out_features", 0)
    else:
        in_shape = first.input_shapes[0] if first.input_shapes else ()
        in_channels = hyper.get("in_channels", in_shape[1] if len(in_shape) > 1 else 0)
        out_channels = hyper.get("out_channels", last.output_shape[1] if last.output_shape and len(last.output_shape) > 1 else 0)
    out_shape = last.output_shape or ()
    values = {
        "flops": sum(graph.records[n].flops for n in nodes),
        "in_elements": sum(_elements(s) for s in first.input_shapes),
        "out_elements": _elements(out_shape),
        "param_bytes": sum(graph.records[n].param_bytes for n in nodes),
        "kernel_area": _elements(kernel) if isinstance(kernel, (tuple, list)) else kernel,
        "stride": stride[0] if isinstance(stride, (tuple, list)) else stride,
        "groups": groups,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "out_hw": _elements(out_shape[2:]) if len(out_shape) > 2 else 1,
        "n_inputs": len(first.input_names),
        "has_bn": float("bn" in kinds[1:]),
        "has_act": float("activation" in kinds[1:]),
        "depthwise": float(groups > 1 and groups == in_channels),
        "channels_per_group": in_channels / groups if groups else in_channels,
    }
    return [float(values[f]) for f in FEATURES]

"""Any ``torch.nn.Module`` as a DAG of the work it does.

torch.fx traces the model; ``ShapeProp`` records each node's output shape and dtype while the same
interpreter pass counts each node's FLOPs with ``FlopCounterMode`` (so FLOPs are counted, not guessed:
2 x MACs for conv and matmul). The result is a :class:`ModelGraph`: the traced ``GraphModule`` (which the
segment builder cuts) and a networkx ``DiGraph`` whose nodes carry a :class:`NodeRecord` and whose edges
carry the bytes of the tensor that flows along them.
"""
from __future__ import annotations

import operator
import traceback
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.utils.flop_counter import FlopCounterMode

INPUT_KIND = "input"
WORK_OPS = ("call_module", "call_function", "call_method")

# Ops after which a feature map is no longer spatial: tiling (vertical separation) stops at them.
GLOBAL_KINDS = frozenset({"flatten", "linear", "adaptive_pool", "mean", "attention", "softmax", "other"})


@dataclass
class NodeRecord:
    """What one fx node does and produces. Plain data: the planner and predictor read only this."""

    name: str
    op_kind: str
    target: str
    output_shape: tuple[int, ...] | None
    dtype: str | None
    output_bytes: int
    flops: int
    param_bytes: int
    input_names: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    hyper: dict[str, Any] = field(default_factory=dict)
    is_tensor: bool = True

    @property
    def output_elements(self) -> int:
        if not self.output_shape:
            return 0
        count = 1
        for dim in self.output_shape:
            count *= dim
        return count


@dataclass
class ModelGraph:
    name: str
    module: fx.GraphModule
    input_shape: tuple[int, ...]
    dag: nx.DiGraph
    order: list[str]  # work nodes in the traced program's (topological) order; --cuts index this
    input_names: list[str]  # placeholders: always held by the device
    output_names: list[str]  # nodes whose values form the model's output
    records: dict[str, NodeRecord]

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.records.values())

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters()) + sum(
            b.numel() * b.element_size() for b in self.module.buffers()
        )

    def prefix_assignment(self, device_count: int, edge_end: int) -> dict[str, int]:
        """The assignment of ``d3 verify --cuts A,B``: first A work nodes on the device, A..B-1 on the edge."""
        if not 0 <= device_count <= edge_end <= len(self.order):
            raise ValueError(
                f"cuts must satisfy 0 <= A <= B <= {len(self.order)} (the node count); got A={device_count}, B={edge_end}"
            )
        assignment = {name: 0 for name in self.input_names}
        for index, name in enumerate(self.order):
            assignment[name] = 0 if index < device_count else 1 if index < edge_end else 2
        return assignment

    def cut_point_bytes(self) -> list[tuple[int, int]]:
        """For each cut position i of ``order`` (nodes [0, i) before it): bytes of the tensors crossing it,
        each tensor counted once however many later nodes read it."""
        position = {name: -1 for name in self.input_names}
        position.update({name: i for i, name in enumerate(self.order)})
        last_use = {name: position[name] for name in position}
        for src, dst in self.dag.edges:
            last_use[src] = max(last_use[src], position[dst])
        for name in self.output_names:
            last_use[name] = len(self.order)
        # live[i]: tensors produced before position i and still needed at or after i
        delta = [0] * (len(self.order) + 2)
        for name, pos in position.items():
            size = self.records[name].output_bytes
            start, end = pos + 1, last_use[name]
            if end >= start:
                delta[start] += size
                delta[end + 1] -= size
        result, running = [], 0
        for i in range(len(self.order) + 1):
            running += delta[i]
            result.append((i, running))
        return result


class ModelTraceError(RuntimeError):
    """torch.fx could not turn the model into a graph. The message names the op and the model source line."""


def _model_source_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    inside_model = [f for f in frames if "/torch/" not in f.filename or "/torchvision/" in f.filename]
    frame = (inside_model or frames)[-1] if frames else None
    if frame is None:
        return ""
    return f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"


def trace(model: nn.Module, name: str = "model") -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, RuntimeError...)
        raise ModelTraceError(
            f"torch.fx cannot trace {name}: {type(exc).__name__}: {exc}{_model_source_frame(exc)}. "
            "Data-dependent Python control flow or iterating over a tensor's shape cannot be traced; "
            "wrap that part in a leaf module or rewrite it with tensor ops."
        ) from exc


_MODULE_KINDS: list[tuple[type, str]] = [
    (nn.modules.conv._ConvTransposeNd, "deconv"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.modules.batchnorm._BatchNorm, "bn"),
    (nn.MaxPool1d, "maxpool"),
    (nn.MaxPool2d, "maxpool"),
    (nn.AvgPool1d, "avgpool"),
    (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool2d, "adaptive_pool"),
    (nn.AdaptiveMaxPool2d, "adaptive_pool"),
    (nn.AdaptiveAvgPool1d, "adaptive_pool"),
    (nn.Dropout, "dropout"),
    (nn.Flatten, "flatten"),
    (nn.Identity, "identity"),
    (nn.LocalResponseNorm, "lrn"),
    (nn.LayerNorm, "layernorm"),
    (nn.MultiheadAttention, "attention"),
    (nn.Softmax, "softmax"),
    (
        (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.GELU, nn.Tanh, nn.LeakyReLU,
         nn.ELU, nn.Mish),
        "activation",
    ),
]

_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, torch.relu, torch.sigmoid,
                         torch.tanh, F.sigmoid, F.leaky_relu, F.elu}
_FUNCTION_KINDS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    torch.cat: "cat", torch.concat: "cat",
    torch.flatten: "flatten",
    F.adaptive_avg_pool2d: "adaptive_pool", F.adaptive_max_pool2d: "adaptive_pool",
    F.max_pool2d: "maxpool", F.avg_pool2d: "avgpool",
    F.dropout: "dropout",
    torch.mean: "mean",
    operator.getitem: "getitem",
    F.linear: "linear",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.scaled_dot_product_attention: "attention",
    F.interpolate: "other",
}
_METHOD_KINDS = {
    "view": "flatten", "reshape": "flatten", "flatten": "flatten", "mean": "mean", "size": "shape",
    "add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "relu": "activation", "relu_": "activation",
    "sigmoid": "activation", "contiguous": "identity", "softmax": "softmax",
}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if value else (1, 1)
    return (int(value), int(value))


def _module_hyper(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return {
            "kernel": tuple(module.kernel_size), "stride": tuple(module.stride),
            "padding": tuple(module.padding) if not isinstance(module.padding, str) else module.padding,
            "dilation": tuple(module.dilation), "groups": module.groups,
            "in_channels": module.in_channels, "out_channels": module.out_channels,
        }
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        hyper = {
            "kernel": _pair(module.kernel_size),
            "stride": _pair(module.stride if module.stride is not None else module.kernel_size),
            "padding": _pair(module.padding), "ceil_mode": bool(module.ceil_mode),
        }
        if isinstance(module, nn.MaxPool2d):
            hyper["dilation"] = _pair(module.dilation)
        else:
            hyper["count_include_pad"] = bool(module.count_include_pad)
            hyper["divisor_override"] = module.divisor_override
        return hyper
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {"channels": module.num_features}
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return {"output_size": module.output_size}
    return {"fn": type(module).__name__.lower()}


def _function_hyper(node: fx.Node, gm: fx.GraphModule, kind: str) -> dict[str, Any]:
    if kind not in ("maxpool", "avgpool"):
        if kind == "activation":
            return {"fn": getattr(node.target, "__name__", str(node.target))}
        return {}
    normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    kwargs = normalized.kwargs if normalized is not None else dict(node.kwargs)
    kernel = kwargs.get("kernel_size")
    stride = kwargs.get("stride") or kernel
    hyper = {"kernel": _pair(kernel), "stride": _pair(stride), "padding": _pair(kwargs.get("padding", 0)),
             "ceil_mode": bool(kwargs.get("ceil_mode", False))}
    if kind == "maxpool":
        hyper["dilation"] = _pair(kwargs.get("dilation", 1))
    else:
        hyper["count_include_pad"] = bool(kwargs.get("count_include_pad", True))
        hyper["divisor_override"] = kwargs.get("divisor_override")
    return hyper


def classify(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str, dict[str, Any], int]:
    """(op kind, target description, hyper-parameters, parameter bytes) of one work node."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = "other"
        for types, name in _MODULE_KINDS:
            if isinstance(module, types):
                kind = name
                break
        param_bytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
        return kind, f"{node.target}:{type(module).__name__}", _module_hyper(module), param_bytes
    if node.op == "call_function":
        if node.target in _ACTIVATION_FUNCTIONS:
            kind = "activation"
        else:
            kind = _FUNCTION_KINDS.get(node.target, "other")
            if kind == "other" and getattr(node.target, "__name__", "") == "stochastic_depth":
                kind = "dropout"  # identity in eval mode
        return kind, getattr(node.target, "__name__", str(node.target)), _function_hyper(node, gm, kind), 0
    kind = _METHOD_KINDS.get(str(node.target), "other")
    return kind, f".{node.target}()", {}, 0


class InputShapeError(ValueError):
    """The example input does not fit the model (wrong rank, channels, or too small)."""


class _ProfilingShapeProp(ShapeProp):
    """ShapeProp's per-node tensor metadata, plus each node's FLOPs (FlopCounterMode around that node
    alone). run_node is replaced rather than wrapped because ShapeProp prints a traceback on failure;
    a bad input shape should be one clear error naming the node."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                result = fx.Interpreter.run_node(self, n)
        except Exception as exc:
            shapes = [tuple(a.meta["tensor_meta"].shape) for a in n.all_input_nodes if "tensor_meta" in a.meta
                      and hasattr(a.meta["tensor_meta"], "shape")]
            raise InputShapeError(
                f"node {n.name} ({n.op} {n.target}) fails on inputs of shape {shapes}: {str(exc).splitlines()[0]}"
            ) from None
        if n.op in WORK_OPS:
            self.flops[n.name] = int(counter.get_total_flops())
        meta = fx.node.map_aggregate(
            result, lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v)
        if isinstance(result, torch.Tensor) or meta is not result:
            n.meta["tensor_meta"] = meta
        return result


def _tensor_meta(node: fx.Node) -> tuple[tuple[int, ...] | None, str | None, int, bool]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        # Non-tensor values (sizes, tuples of tensors) are small: price them as a few bytes.
        return None, None, 8, False
    shape = tuple(int(d) for d in meta.shape)
    element_size = torch.empty((), dtype=meta.dtype).element_size()
    elements = 1
    for dim in shape:
        elements *= dim
    return shape, str(meta.dtype).removeprefix("torch."), elements * element_size, True


def build_graph(model: nn.Module, input_shape: tuple[int, ...], name: str = "model",
                example: torch.Tensor | None = None) -> ModelGraph:
    """Trace ``model`` and annotate every work node with shape, dtype, bytes, FLOPs and hyper-parameters."""
    model = model.eval()
    gm = trace(model, name)
    if example is None:
        example = torch.zeros(input_shape)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ModelTraceError(f"{name}: expected one input tensor, the traced graph has {len(placeholders)}")
    interpreter = _ProfilingShapeProp(gm)
    try:
        with torch.no_grad():
            interpreter.propagate(example)
    except InputShapeError as exc:  # fx's Interpreter appends its own multi-line context: drop it
        raise InputShapeError(f"{name}: {str(exc).splitlines()[0]}") from None

    dag = nx.DiGraph(model=name)
    records: dict[str, NodeRecord] = {}
    order: list[str] = []
    input_names = [n.name for n in placeholders]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape, dtype, nbytes, is_tensor = _tensor_meta(node)
            records[node.name] = NodeRecord(node.name, INPUT_KIND, "input", shape, dtype, nbytes, 0, 0,
                                            is_tensor=is_tensor)
            dag.add_node(node.name, record=records[node.name])
        elif node.op in WORK_OPS:
            kind, target, hyper, param_bytes = classify(node, gm)
            shape, dtype, nbytes, is_tensor = _tensor_meta(node)
            inputs = [a.name for a in node.all_input_nodes if a.op != "get_attr"]
            input_shapes = [records[i].output_shape or () for i in inputs]
            param_bytes += sum(_attr_bytes(gm, a) for a in node.all_input_nodes if a.op == "get_attr")
            records[node.name] = NodeRecord(
                node.name, kind, target, shape, dtype, nbytes, interpreter.flops.get(node.name, 0), param_bytes,
                inputs, input_shapes, hyper, is_tensor,
            )
            dag.add_node(node.name, record=records[node.name])
            for source in inputs:
                dag.add_edge(source, node.name, bytes=records[source].output_bytes)
            order.append(node.name)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    output_names = [n.name for n in output_node.all_input_nodes]
    return ModelGraph(name, gm, tuple(input_shape), dag, order, input_names, output_names, records)


def _attr_bytes(gm: fx.GraphModule, node: fx.Node) -> int:
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def load_graph(name: str, input_shape: tuple[int, ...] | None = None, weights_path=None) -> ModelGraph:
    """Zoo model by name -> ModelGraph (the common entry point of the CLI, tests and benchmarks)."""
    from partitioner.zoo import default_input_shape, load_model

    shape = tuple(input_shape) if input_shape else default_input_shape(name)
    return build_graph(load_model(name, weights_path), shape, name)

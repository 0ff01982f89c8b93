"""What every edge strategy plans into and how any such plan runs: stages of independent work items.

A plan is a sequence of stages; a stage is a set of work items (a JSON-able spec, the input slices it
names, the outputs it returns) plus one combine step. That is the seam the edge daemon already uses for
tiles (``tile_runner``): any strategy's items can be scattered to nodes the same way.

Stage kinds (``combine`` in brackets):
- ``spatial``: a ``partitioner.tiling.TiledStage``; items are its ``TileSpec``s [stitch along H/W];
- ``channel``: conv/pool/element-wise run split by output channels [concat along channels];
- ``reduce``: interleaved operator pair (IOP): conv A (+ its channel-wise followers) split by output
  channels, the next conv B by the matching input channels; items return partial sums [sum + B's bias];
- ``subgraph``: items are whole sub-graphs (a serial run, or the branches of a DAG zone) [merge dicts].

Costs are priced with one :class:`CostModel`: per-node seconds from a ``LatencyModel`` (FLOP rate by
default) divided by each edge node's relative speed, and scatter/gather bytes over the edge LAN.
Node 0 coordinates (holds the segment's inputs, runs combines), so its items move no bytes.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from partitioner.graph import ModelGraph
from partitioner.halo import Region, region_area
from partitioner.tiling import TiledStage, TileSpec, caller_threads_pool, run_tile, slice_inputs, stage_from_dict, \
    stitch, tile_ops, trace_regions

DEFAULT_LINK_BPS = 1e9  # edge LAN: 1 Gbit/s
DEFAULT_ITEM_OVERHEAD_S = 5e-4  # one remote item's round trip besides its bytes (ZeroMQ + wire format)
DEFAULT_STAGE_OVERHEAD_S = 1e-4
WINDOW_KINDS = frozenset({"conv", "maxpool", "avgpool"})
# ops that act on each channel on its own (no parameters mixing channels)
CHANNELWISE_KINDS = frozenset({"bn", "activation", "dropout", "identity", "add", "mul", "maxpool", "avgpool"})


# ------------------------------------------------------------------------------------------ cost model
@dataclass
class CostModel:
    """Prices work items: ``base_s[node]`` is a graph node's seconds on a speed-1 edge node."""

    node_speeds: list[float]
    link_bps: float
    base_s: dict[str, float]
    per_item_overhead_s: float = DEFAULT_ITEM_OVERHEAD_S  # dispatch + (de)serialisation of one remote item
    per_stage_overhead_s: float = DEFAULT_STAGE_OVERHEAD_S  # slicing, combining, one synchronisation

    def compute_s(self, base_s: float, node: int) -> float:
        return base_s / self.node_speeds[node]

    def transfer_s(self, nbytes: float) -> float:
        return 8.0 * nbytes / self.link_bps

    def item_s(self, base_s: float, moved_bytes: float, node: int) -> float:
        if node == 0:
            return self.compute_s(base_s, node)
        return self.compute_s(base_s, node) + self.transfer_s(moved_bytes) + self.per_item_overhead_s


def default_latency_model():
    """Seconds per node on a speed-1 edge node: the predictor shipped for this machine (1 torch thread, as
    the daemons run), else a FLOP rate. The FLOP rate's 20 GFLOP/s is ~4x slower than this machine's
    convs, which made per-item overheads look negligible and ``auto`` favour many small items (it picked
    the measured winner for 1 model of 4)."""
    global _DEFAULT_LATENCY_MODEL
    if _DEFAULT_LATENCY_MODEL is None:
        try:
            from predictor.registry import load_predictor

            _DEFAULT_LATENCY_MODEL = load_predictor("default")
        except (OSError, ValueError):
            from predictor.base import FlopRateModel

            _DEFAULT_LATENCY_MODEL = FlopRateModel()
    return _DEFAULT_LATENCY_MODEL


_DEFAULT_LATENCY_MODEL = None


def make_cost_model(graph: ModelGraph, node_speeds: Sequence[float], link_bps: float = DEFAULT_LINK_BPS,
                    latency_model=None, item_overhead_s: float | None = None) -> CostModel:
    speeds = [float(s) for s in node_speeds]
    if not speeds:
        raise ValueError("node_speeds needs at least one edge node")
    bad = [s for s in speeds if not math.isfinite(s) or s <= 0]
    if bad:
        raise ValueError(f"node speeds must be positive numbers (relative speeds), got {bad}")
    if not (math.isfinite(link_bps) and link_bps > 0):
        raise ValueError(f"link_bps must be a positive number of bits/s, got {link_bps}")
    if latency_model is None:
        latency_model = default_latency_model()
    overhead = DEFAULT_ITEM_OVERHEAD_S if item_overhead_s is None else float(item_overhead_s)
    if not (math.isfinite(overhead) and overhead >= 0):
        raise ValueError(f"item overhead must be >= 0 seconds, got {item_overhead_s}")
    return CostModel(speeds, float(link_bps), dict(latency_model.node_seconds(graph)), overhead)


# ------------------------------------------------------------------------------------------ items
@dataclass
class ChannelItem:
    """Output channels [c0, c1) of a channel stage (or of conv A in a reduce stage) on one node."""

    index: int
    node: int
    c0: int
    c1: int
    base_s: float = 0.0
    in_bytes: float = 0.0
    out_bytes: float = 0.0
    param_bytes: float = 0.0

    kind = "channel"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "node": self.node, "c0": self.c0, "c1": self.c1,
                "base_s": self.base_s, "in_bytes": self.in_bytes, "out_bytes": self.out_bytes,
                "param_bytes": self.param_bytes}


@dataclass
class SubgraphItem:
    """Whole sub-graph (program-ordered node names) run on one node."""

    index: int
    node: int
    nodes: list[str]
    input_names: list[str]
    output_names: list[str]
    base_s: float = 0.0
    in_bytes: float = 0.0
    out_bytes: float = 0.0
    param_bytes: float = 0.0

    kind = "subgraph"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "node": self.node, "nodes": self.nodes,
                "input_names": self.input_names, "output_names": self.output_names, "base_s": self.base_s,
                "in_bytes": self.in_bytes, "out_bytes": self.out_bytes, "param_bytes": self.param_bytes}


def item_from_dict(data: Mapping[str, Any]):
    kind = data.get("kind", "tile")
    extra = {k: float(data.get(k, 0.0)) for k in ("base_s", "in_bytes", "out_bytes", "param_bytes")}
    if kind == "channel":
        return ChannelItem(int(data["index"]), int(data["node"]), int(data["c0"]), int(data["c1"]), **extra)
    if kind == "subgraph":
        return SubgraphItem(int(data["index"]), int(data["node"]), list(data["nodes"]), list(data["input_names"]),
                            list(data["output_names"]), **extra)
    return TileSpec.from_dict(data)


# ------------------------------------------------------------------------------------------ stages
@dataclass
class SpatialStage:
    tiled: TiledStage
    item_costs: list[dict[str, float]] = field(default_factory=list)  # per tile: base_s, in/out/param bytes

    kind = "spatial"

    @property
    def items(self) -> list[TileSpec]:
        return self.tiled.tiles

    @property
    def input_names(self) -> list[str]:
        return self.tiled.input_names

    @property
    def output_names(self) -> list[str]:
        return self.tiled.output_names

    @property
    def nodes(self) -> list[str]:
        return self.tiled.nodes

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tiled": self.tiled.to_dict(), "item_costs": self.item_costs}


@dataclass
class ChannelStage:
    nodes: list[str]
    input_names: list[str]
    output_names: list[str]
    items: list[ChannelItem]
    channels: int

    kind = "channel"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "input_names": self.input_names,
                "output_names": self.output_names, "channels": self.channels,
                "items": [i.to_dict() for i in self.items]}


@dataclass
class ReduceStage:
    """IOP pair: ``nodes`` = conv A and its channel-wise followers, then conv ``reduce_node`` (B)."""

    nodes: list[str]
    input_names: list[str]
    output_names: list[str]  # [reduce_node]
    items: list[ChannelItem]  # channel ranges of A's output = B's input channels
    channels: int
    reduce_node: str

    kind = "reduce"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "input_names": self.input_names,
                "output_names": self.output_names, "channels": self.channels, "reduce_node": self.reduce_node,
                "items": [i.to_dict() for i in self.items]}


@dataclass
class SubgraphStage:
    nodes: list[str]
    input_names: list[str]
    output_names: list[str]
    items: list[SubgraphItem]

    kind = "subgraph"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "input_names": self.input_names,
                "output_names": self.output_names, "items": [i.to_dict() for i in self.items]}


Stage = SpatialStage | ChannelStage | ReduceStage | SubgraphStage


def edge_stage_from_dict(data: Mapping[str, Any]) -> Stage:
    kind = data["kind"]
    if kind == "spatial":
        return SpatialStage(stage_from_dict(data["tiled"]), [dict(c) for c in data.get("item_costs", [])])
    common = (list(data["nodes"]), list(data["input_names"]), list(data["output_names"]))
    items = [item_from_dict(i) for i in data["items"]]
    if kind == "channel":
        return ChannelStage(*common, items, int(data["channels"]))
    if kind == "reduce":
        return ReduceStage(*common, items, int(data["channels"]), data["reduce_node"])
    if kind == "subgraph":
        return SubgraphStage(*common, items)
    raise ValueError(f"unknown edge stage kind {kind!r}")


@dataclass
class EdgePlan:
    strategy: str
    node_speeds: list[float]
    link_bps: float
    input_names: list[str]
    output_names: list[str]
    stages: list[Stage]
    predicted_ms: float = 0.0
    stages_ms: list[float] = field(default_factory=list)
    per_node_busy_ms: list[float] = field(default_factory=list)
    per_node_peak_bytes: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "node_speeds": self.node_speeds, "link_bps": self.link_bps,
                "input_names": self.input_names, "output_names": self.output_names,
                "stages": [s.to_dict() for s in self.stages], "predicted_ms": self.predicted_ms,
                "stages_ms": self.stages_ms, "per_node_busy_ms": self.per_node_busy_ms,
                "per_node_peak_bytes": self.per_node_peak_bytes, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EdgePlan":
        return cls(data["strategy"], [float(s) for s in data["node_speeds"]], float(data["link_bps"]),
                   list(data["input_names"]), list(data["output_names"]),
                   [edge_stage_from_dict(s) for s in data["stages"]], float(data.get("predicted_ms", 0.0)),
                   list(data.get("stages_ms", [])), list(data.get("per_node_busy_ms", [])),
                   list(data.get("per_node_peak_bytes", [])), dict(data.get("notes", {})))


# ------------------------------------------------------------------------------------------ graph helpers
_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _cache(graph: ModelGraph) -> dict:
    module = graph.module
    if module not in _CACHES:
        _CACHES[module] = {"fx": {n.name: n for n in module.graph.nodes}, "modules": dict(module.named_modules()),
                           "subgraphs": {}}
    return _CACHES[module]


def fx_node(graph: ModelGraph, name: str) -> fx.Node:
    return _cache(graph)["fx"][name]


def node_module(graph: ModelGraph, name: str) -> nn.Module | None:
    node = fx_node(graph, name)
    return _cache(graph)["modules"].get(node.target) if node.op == "call_module" else None


def value_bytes(graph: ModelGraph, name: str) -> float:
    return float(graph.records[name].output_bytes)


def node_param_bytes(graph: ModelGraph, name: str) -> float:
    return float(graph.records[name].param_bytes)


def stage_io(graph: ModelGraph, groups: Sequence[Sequence[str]], segment_outputs: Sequence[str]
             ) -> list[tuple[list[str], list[str]]]:
    """(inputs, outputs) of each group of nodes: values read from before it, values read after it."""
    position = {name: i for i, name in enumerate(list(graph.input_names) + graph.order)}
    group_of = {name: index for index, nodes in enumerate(groups) for name in nodes}
    keep = set(segment_outputs)
    result = []
    for index, nodes in enumerate(groups):
        members = set(nodes)
        inputs = {i for n in nodes for i in graph.records[n].input_names if i not in members}
        outputs = [n for n in nodes if n in keep or any(
            group_of.get(consumer, -1) != index for consumer in graph.dag.successors(n))]
        result.append((sorted(inputs, key=position.__getitem__), outputs))
    return result


def check_segment(graph: ModelGraph, node_names: Sequence[str], input_names: Sequence[str],
                  output_names: Sequence[str]) -> list[str]:
    """The segment's nodes in program order, after checking they form a runnable segment."""
    position = {name: i for i, name in enumerate(graph.order)}
    unknown = [n for n in node_names if n not in position]
    if unknown:
        raise ValueError(f"{graph.name} has no work nodes named {unknown[:5]}")
    if not node_names:
        raise ValueError("the edge segment is empty: nothing to plan")
    available = set(input_names) | set(node_names)
    for name in node_names:
        missing = [i for i in graph.records[name].input_names if i not in available]
        if missing:
            raise ValueError(f"node {name} reads {missing}, which is neither computed in the segment nor an input")
    stray = [o for o in output_names if o not in available]
    if stray:
        raise ValueError(f"segment outputs {stray} are neither inputs nor computed in the segment")
    return sorted(node_names, key=position.__getitem__)


# ------------------------------------------------------------------------------------------ item builders
def subgraph_item(graph: ModelGraph, cost: CostModel, index: int, node: int, nodes: list[str],
                  inputs: list[str], outputs: list[str]) -> SubgraphItem:
    return SubgraphItem(index, node, list(nodes), list(inputs), list(outputs),
                        sum(cost.base_s[n] for n in nodes), sum(value_bytes(graph, i) for i in inputs),
                        sum(value_bytes(graph, o) for o in outputs), sum(node_param_bytes(graph, n) for n in nodes))


def serial_stage(graph: ModelGraph, cost: CostModel, nodes: list[str], inputs: list[str], outputs: list[str],
                 node: int = 0) -> SubgraphStage:
    return SubgraphStage(list(nodes), list(inputs), list(outputs),
                         [subgraph_item(graph, cost, 0, node, nodes, inputs, outputs)])


def spatial_item_costs(graph: ModelGraph, cost: CostModel, tiled: TiledStage) -> list[dict[str, float]]:
    ops = tile_ops(graph)
    costs = []
    for tile in tiled.tiles:
        need = trace_regions(graph, tiled.nodes, tile.output_regions)
        base = sum(cost.base_s[n] * region_area(need[n]) / max(1, _area(ops[n].output_size))
                   for n in tiled.nodes if n in need)
        in_bytes = sum(_region_bytes(graph, name, region) for name, region in tile.input_regions.items())
        out_bytes = sum(_region_bytes(graph, name, region) for name, region in tile.output_regions.items())
        params = sum(node_param_bytes(graph, n) for n in tiled.nodes if n in need)
        costs.append({"base_s": base, "in_bytes": in_bytes, "out_bytes": out_bytes, "param_bytes": params})
    return costs


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def _region_bytes(graph: ModelGraph, name: str, region: Region) -> float:
    shape = graph.records[name].output_shape
    return value_bytes(graph, name) * region_area(region) / max(1, shape[-2] * shape[-1])


def spatial_stage(graph: ModelGraph, cost: CostModel, tiled: TiledStage) -> SpatialStage:
    return SpatialStage(tiled, spatial_item_costs(graph, cost, tiled))


def reference_size(graph: ModelGraph, outputs: Sequence[str]) -> tuple[int, int]:
    ops = tile_ops(graph)
    return max(ops[o].output_size[0] for o in outputs), max(ops[o].output_size[1] for o in outputs)


def _scale(x: int, size: int, reference: int) -> int:
    return (x * size + reference // 2) // reference  # monotone, 0 -> 0, reference -> size


def row_strip_stage(graph: ModelGraph, cost: CostModel, nodes: list[str], inputs: list[str], outputs: list[str],
                    strips: Sequence[tuple[int, int, int]]) -> SpatialStage:
    """A spatial stage from row strips (row0, row1, node) of the reference grid (the largest output):
    each output's rows scale with its height, the halo back-trace gives each strip's input rows."""
    ops = tile_ops(graph)
    sizes = {o: ops[o].output_size for o in outputs}
    ref_h, _ = reference_size(graph, outputs)
    tiles = []
    for row0, row1, node in strips:
        regions = {}
        for name, (height, width) in sizes.items():
            region = ((_scale(row0, height, ref_h), _scale(row1, height, ref_h)), (0, width))
            if region_area(region):
                regions[name] = region
        if not regions:
            continue
        need = trace_regions(graph, nodes, regions)
        tiles.append(TileSpec(0, len(tiles), node, regions, {i: need[i] for i in inputs if i in need}))
    flops = float(sum(graph.records[n].flops for n in nodes))
    tiled = TiledStage(list(nodes), list(inputs), list(outputs), tiles, "h", sizes, flops)
    stage = spatial_stage(graph, cost, tiled)
    for tile, item in zip(tiles, stage.item_costs):
        tile.flops = flops * item["base_s"] / max(1e-30, sum(cost.base_s[n] for n in nodes))
    return stage


# ------------------------------------------------------------------------------------------ channel split
def channel_count(graph: ModelGraph, name: str) -> int | None:
    shape = graph.records[name].output_shape
    return shape[1] if shape is not None and len(shape) == 4 else None


def channel_splittable(graph: ModelGraph, nodes: Sequence[str], allow_conv_first: bool = True) -> int | None:
    """Channel count C if ``nodes`` (program order) can run split by output channels: an optional leading
    plain conv (groups 1, or depthwise) then ops acting on each channel alone, all with C channels."""
    if not nodes:
        return None
    channels = channel_count(graph, nodes[-1])
    for position, name in enumerate(nodes):
        record = graph.records[name]
        if channel_count(graph, name) != channels or not record.is_tensor:
            return None
        module = node_module(graph, name)
        if record.op_kind == "conv":
            if position or not allow_conv_first or type(module) is not nn.Conv2d:
                return None
            if module.groups not in (1, module.in_channels) or module.padding_mode != "zeros":
                return None
            if module.groups != 1 and module.in_channels != module.out_channels:
                return None
            source = record.input_names[0]
            if module.groups == 1 and any(source in graph.records[n].input_names for n in nodes[1:]):
                return None  # the conv reads it whole, a later op would need its slice
            continue
        if record.op_kind not in CHANNELWISE_KINDS:
            return None
        if record.op_kind == "bn" and not (type(module) is nn.BatchNorm2d and module.track_running_stats):
            return None
        if record.op_kind != "bn" and module is not None and any(True for _ in module.parameters()):
            return None  # e.g. PReLU: per-channel weights
        for source, shape in zip(record.input_names, record.input_shapes):
            if shape is None or len(shape) != 4 or shape[1] != channels:
                return None
        if any(arg.op == "get_attr" for arg in fx_node(graph, name).all_input_nodes):
            return None
    return channels


def _call_node(node: fx.Node, module: nn.Module | None, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    args = fx.node.map_arg(node.args, lambda n: tensors[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: tensors[n.name])
    if node.op == "call_module":
        return module(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    self_arg, *rest = args
    return getattr(self_arg, node.target)(*rest, **kwargs)


def _conv_out_slice(module: nn.Conv2d, x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    groups = module.groups
    weight = module.weight[c0:c1]
    bias = module.bias[c0:c1] if module.bias is not None else None
    if groups != 1:  # depthwise: the input is already the matching channel slice
        groups = c1 - c0
    padding = module.padding
    if isinstance(padding, str):
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                        for k, d in zip(module.kernel_size, module.dilation))
    return F.conv2d(x, weight, bias, module.stride, padding, module.dilation, groups)


def _run_channel_nodes(graph: ModelGraph, nodes: Sequence[str], values: dict[str, torch.Tensor],
                       c0: int, c1: int) -> None:
    """Channels [c0, c1) of every node in ``nodes``; ``values`` holds inputs already cut to the slice
    (a leading dense conv's input whole) and receives each node's slice."""
    for name in nodes:
        record = graph.records[name]
        module = node_module(graph, name)
        if record.op_kind == "conv":
            values[name] = _conv_out_slice(module, values[record.input_names[0]], c0, c1)
        elif record.op_kind == "bn":
            values[name] = F.batch_norm(values[record.input_names[0]], module.running_mean[c0:c1],
                                        module.running_var[c0:c1],
                                        module.weight[c0:c1] if module.weight is not None else None,
                                        module.bias[c0:c1] if module.bias is not None else None,
                                        False, 0.0, module.eps)
        else:
            values[name] = _call_node(fx_node(graph, name), module, values)


def _channel_inputs(graph: ModelGraph, nodes: Sequence[str], inputs: Sequence[str], c0: int, c1: int,
                    values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Input slices of a channel item: a leading dense conv reads its input whole, all else the slice."""
    first = graph.records[nodes[0]]
    whole = set()
    if first.op_kind == "conv" and node_module(graph, nodes[0]).groups == 1:
        whole.add(first.input_names[0])
    slices = {}
    for name in inputs:
        if name not in values:
            raise KeyError(f"channel stage needs input {name!r}, which is not among the values given")
        value = values[name]
        slices[name] = (value if name in whole else value[:, c0:c1]).clone(memory_format=torch.contiguous_format)
    return slices


def channel_item_costs(graph: ModelGraph, cost: CostModel, nodes: Sequence[str], inputs: Sequence[str],
                       outputs: Sequence[str], channels: int, c0: int, c1: int) -> dict[str, float]:
    share = (c1 - c0) / channels
    first = graph.records[nodes[0]]
    dense = first.op_kind == "conv" and node_module(graph, nodes[0]).groups == 1
    in_bytes = sum(value_bytes(graph, i) * (1.0 if dense and i == first.input_names[0] else share) for i in inputs)
    return {"base_s": share * sum(cost.base_s[n] for n in nodes), "in_bytes": in_bytes,
            "out_bytes": share * sum(value_bytes(graph, o) for o in outputs),
            "param_bytes": share * sum(node_param_bytes(graph, n) for n in nodes)}


def channel_stage(graph: ModelGraph, cost: CostModel, nodes: list[str], inputs: list[str], outputs: list[str],
                  ranges: Sequence[tuple[int, int, int]]) -> ChannelStage:
    channels = channel_splittable(graph, nodes)
    if channels is None:
        raise ValueError(f"nodes {nodes[:3]}... cannot be split by channels")
    items = [ChannelItem(i, node, c0, c1, **channel_item_costs(graph, cost, nodes, inputs, outputs, channels, c0, c1))
             for i, (c0, c1, node) in enumerate(r for r in ranges if r[1] > r[0])]
    return ChannelStage(list(nodes), list(inputs), list(outputs), items, channels)


# ------------------------------------------------------------------------------------------ IOP (reduce)
def reduce_pair_ok(graph: ModelGraph, a_nodes: Sequence[str], b_name: str) -> int | None:
    """Channel count of A's output if (A chain, B) is an interleaved pair: A channel-splittable, its only
    value read outside the chain is its last node, read only by B, a dense plain conv."""
    channels = channel_splittable(graph, a_nodes)
    if channels is None or graph.records[a_nodes[0]].op_kind != "conv":
        return None
    b = graph.records[b_name]
    module = node_module(graph, b_name)
    if b.op_kind != "conv" or type(module) is not nn.Conv2d or module.groups != 1 or module.padding_mode != "zeros":
        return None
    if b.input_names != [a_nodes[-1]]:
        return None
    members = set(a_nodes) | {b_name}
    for name in a_nodes:
        if any(c not in members for c in graph.dag.successors(name)):
            return None
    return channels


def reduce_item_costs(graph: ModelGraph, cost: CostModel, a_nodes: Sequence[str], b_name: str, inputs: Sequence[str],
                      channels: int, c0: int, c1: int) -> dict[str, float]:
    share = (c1 - c0) / channels
    return {"base_s": share * (sum(cost.base_s[n] for n in a_nodes) + cost.base_s[b_name]),
            "in_bytes": sum(value_bytes(graph, i) for i in inputs),
            "out_bytes": value_bytes(graph, b_name),  # a full-size partial sum
            "param_bytes": share * (sum(node_param_bytes(graph, n) for n in a_nodes) + node_param_bytes(graph, b_name))}


def reduce_stage(graph: ModelGraph, cost: CostModel, a_nodes: list[str], b_name: str, inputs: list[str],
                 ranges: Sequence[tuple[int, int, int]]) -> ReduceStage:
    channels = reduce_pair_ok(graph, a_nodes, b_name)
    if channels is None:
        raise ValueError(f"{a_nodes[0]} -> {b_name} is not an interleaved conv pair")
    items = [ChannelItem(i, node, c0, c1, **reduce_item_costs(graph, cost, a_nodes, b_name, inputs, channels, c0, c1))
             for i, (c0, c1, node) in enumerate(r for r in ranges if r[1] > r[0])]
    return ReduceStage(list(a_nodes) + [b_name], list(inputs), [b_name], items, channels, b_name)


def _run_reduce_item(graph: ModelGraph, stage: ReduceStage, item: ChannelItem,
                     slices: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    values = dict(slices)
    a_nodes = stage.nodes[:-1]
    _run_channel_nodes(graph, a_nodes, values, item.c0, item.c1)
    module = node_module(graph, stage.reduce_node)
    padding = module.padding
    if isinstance(padding, str):
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                        for k, d in zip(module.kernel_size, module.dilation))
    partial = F.conv2d(values[a_nodes[-1]], module.weight[:, item.c0:item.c1], None, module.stride, padding,
                       module.dilation, 1)
    return {stage.reduce_node: partial}


def _combine_reduce(graph: ModelGraph, stage: ReduceStage, results: Sequence[Mapping[str, torch.Tensor]]
                    ) -> dict[str, torch.Tensor]:
    # summed in float64 so the partial sums' order adds no rounding of its own
    total = None
    for result in results:
        part = result[stage.reduce_node].to(torch.float64)
        total = part if total is None else total + part
    bias = node_module(graph, stage.reduce_node).bias
    if bias is not None:
        total = total + bias.detach().to(torch.float64).view(1, -1, 1, 1)
    return {stage.reduce_node: total.to(results[0][stage.reduce_node].dtype)}


# ------------------------------------------------------------------------------------------ execution
ItemRunner = Callable[[int, Any, dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def _subgraph_module(graph: ModelGraph, item: SubgraphItem):
    from partitioner.segments import extract_subgraph

    key = (tuple(item.nodes), tuple(item.input_names), tuple(item.output_names))
    modules = _cache(graph)["subgraphs"]
    if key not in modules:
        modules[key] = extract_subgraph(graph.module, item.nodes, item.input_names, item.output_names)
    return modules[key]


def item_inputs(stage: Stage, item, values: Mapping[str, Any]) -> dict[str, Any]:
    """Spatial and sub-graph items' wire inputs (fresh tensors, so in-place ops never touch shared values)."""
    if isinstance(stage, SpatialStage):
        return slice_inputs(stage.tiled, item, values)
    missing = [n for n in item.input_names if n not in values]
    if missing:
        raise KeyError(f"sub-graph item needs inputs {missing}, which are not among the values given")
    return {n: values[n].clone() if isinstance(values[n], torch.Tensor) else values[n] for n in item.input_names}


def run_item(graph: ModelGraph, stage: Stage, item, input_slices: Mapping[str, Any]) -> dict[str, Any]:
    """What one edge node computes for one work item: a pure function of (stage, item, input slices)."""
    with torch.no_grad():
        if isinstance(stage, SpatialStage):
            return run_tile(graph, stage.tiled, item, input_slices)
        if isinstance(stage, SubgraphStage):
            outputs = _subgraph_module(graph, item)(*(input_slices[n] for n in item.input_names))
            return dict(zip(item.output_names, outputs))
        values = dict(input_slices)
        if isinstance(stage, ReduceStage):
            return _run_reduce_item(graph, stage, item, values)
        _run_channel_nodes(graph, stage.nodes, values, item.c0, item.c1)
        return {name: values[name] for name in stage.output_names}


def slice_item_inputs(graph: ModelGraph, stage: Stage, item, values: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(stage, (ChannelStage, ReduceStage)):
        return _channel_inputs(graph, stage.nodes, stage.input_names, item.c0, item.c1, values)
    return item_inputs(stage, item, values)


def combine(graph: ModelGraph, stage: Stage, results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One stage's outputs from its items' results (in the order of ``stage.items``)."""
    if len(results) != len(stage.items):
        raise ValueError(f"stage has {len(stage.items)} items but {len(results)} results were given")
    if isinstance(stage, SpatialStage):
        return stitch(stage.tiled, results)
    if isinstance(stage, ChannelStage):
        covered = sum(i.c1 - i.c0 for i in stage.items)
        if covered != stage.channels:
            raise ValueError(f"channel items cover {covered} of {stage.channels} channels")
        return {name: torch.cat([r[name] for r in results], dim=1) for name in stage.output_names}
    if isinstance(stage, ReduceStage):
        return _combine_reduce(graph, stage, results)
    merged: dict[str, Any] = {}
    for result in results:
        merged.update(result)
    return {name: merged[name] for name in stage.output_names}


def run_edge_plan(graph: ModelGraph, plan: EdgePlan, values: Mapping[str, Any], item_runner: ItemRunner | None = None,
                  workers: int | None = None) -> dict[str, Any]:
    """The edge segment under any strategy's plan: same contract as ``Segment.run``.
    ``item_runner(stage_index, item, input_slices)`` computes one item wherever ``item.node`` says
    (default: :func:`run_item` in this process); a stage's items run on ``workers`` threads (default one
    per item with an ``item_runner``, 1 in-process where torch already uses the cores)."""
    missing = [name for name in plan.input_names if name not in values]
    if missing:
        raise KeyError(f"edge segment is missing inputs {missing}")
    env: dict[str, Any] = {name: values[name] for name in plan.input_names}
    for index, stage in enumerate(plan.stages):
        runner = item_runner or (lambda _i, item, slices, stage=stage: run_item(graph, stage, item, slices))
        jobs = [(item, slice_item_inputs(graph, stage, item, env)) for item in stage.items]
        threads = workers if workers is not None else (len(jobs) if item_runner else 1)
        if threads > 1 and len(jobs) > 1:
            with caller_threads_pool(min(threads, len(jobs))) as pool:
                results = list(pool.map(lambda job: runner(index, *job), jobs))
        else:
            results = [runner(index, item, slices) for item, slices in jobs]
        env.update(combine(graph, stage, results))
    return {name: env[name] for name in plan.output_names}


# ------------------------------------------------------------------------------------------ evaluation
def item_cost(stage: Stage, position: int, item) -> dict[str, float]:
    if isinstance(stage, SpatialStage):
        return stage.item_costs[position]
    return {"base_s": item.base_s, "in_bytes": item.in_bytes, "out_bytes": item.out_bytes,
            "param_bytes": item.param_bytes}


def stage_seconds(cost: CostModel, stage: Stage) -> tuple[float, list[float]]:
    """Predicted seconds of one stage and each node's busy seconds in it. Items of one node run one
    after another; nodes run in parallel; the coordinator's LAN port carries every remote byte."""
    busy = [0.0] * len(cost.node_speeds)
    remote_bytes = 0.0
    for position, item in enumerate(stage.items):
        c = item_cost(stage, position, item)
        moved = c["in_bytes"] + c["out_bytes"]
        busy[item.node] += cost.item_s(c["base_s"], moved, item.node)
        if item.node != 0:
            remote_bytes += moved
    combine_s = 0.0
    if isinstance(stage, ReduceStage):  # the coordinator adds the partial sums
        combine_s = len(stage.items) * float(stage.items[0].out_bytes) / 4e9 if stage.items else 0.0
    return max(max(busy), cost.transfer_s(remote_bytes)) + combine_s + cost.per_stage_overhead_s, busy


def evaluate_plan(graph: ModelGraph, cost: CostModel, plan: EdgePlan) -> EdgePlan:
    """Fill the plan's predicted latency, per-stage times, per-node busy time and peak memory. Peak
    memory of a node = parameter bytes of everything it computes (held for the whole run) + its
    largest item's activation bytes (inputs + outputs)."""
    nodes = len(cost.node_speeds)
    stages_s, busy_total = [], [0.0] * nodes
    params = [0.0] * nodes
    activations = [0.0] * nodes
    for stage in plan.stages:
        seconds, busy = stage_seconds(cost, stage)
        stages_s.append(seconds)
        busy_total = [a + b for a, b in zip(busy_total, busy)]
        # a node running several tiles of one stage holds that stage's weights once; channel slices add up
        held = [0.0] * nodes
        for position, item in enumerate(stage.items):
            c = item_cost(stage, position, item)
            if isinstance(stage, SpatialStage):
                held[item.node] = max(held[item.node], c["param_bytes"])
            else:
                held[item.node] += c["param_bytes"]
            activations[item.node] = max(activations[item.node], c["in_bytes"] + c["out_bytes"])
        params = [p + h for p, h in zip(params, held)]
    plan.stages_ms = [1e3 * s for s in stages_s]
    plan.predicted_ms = 1e3 * sum(stages_s)
    plan.per_node_busy_ms = [1e3 * b for b in busy_total]
    plan.per_node_peak_bytes = [p + a for p, a in zip(params, activations)]
    return plan


# ------------------------------------------------------------------------------------------ daemon seam
def item_meta(plan: EdgePlan, stage_index: int, item) -> dict[str, Any]:
    """The JSON an edge node needs besides the input tensors to compute one item (tile-message meta)."""
    return {"edge_stage": plan.stages[stage_index].to_dict(), "stage_index": stage_index, "item": item.to_dict()}


def run_item_from_meta(graph: ModelGraph, meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A remote node's side of :func:`item_meta`: parse the stage and item and run it."""
    try:
        stage = edge_stage_from_dict(meta["edge_stage"])
        item = item_from_dict(meta["item"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad edge stage or item spec: {exc}") from None
    return run_item(graph, stage, item, tensors)

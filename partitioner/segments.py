"""A monotone device/edge/cloud assignment -> three runnable segments.

Each segment is an ``fx.GraphModule`` whose inputs and outputs are exactly the values crossing its cuts,
named after the fx node that produced them (the names travel on the wire). A value read by several
nodes of a later tier crosses once. A branch may skip the edge (device -> cloud directly).

Why not ``torch.fx.passes.split_module``: it returns a single value instead of a tuple when a partition
has one output, drops empty partitions, and renames crossing values; the runtime needs three segments
always (an empty one is the identity), stable value names for the wire header, and the same sub-graph
extraction for the edge tiles (``extract_subgraph`` below serves both).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx

from partitioner.graph import ModelGraph

TIERS = ("device", "edge", "cloud")
DEVICE, EDGE, CLOUD = 0, 1, 2


class AssignmentError(ValueError):
    pass


@dataclass
class Segment:
    tier: str
    module: fx.GraphModule  # forward(*inputs in input_names order) -> tuple in output_names order
    input_names: list[str]
    output_names: list[str]
    node_names: list[str] = field(default_factory=list)

    def run(self, values: Mapping[str, Any]) -> dict[str, Any]:
        missing = [name for name in self.input_names if name not in values]
        if missing:
            raise KeyError(f"{self.tier} segment is missing inputs {missing}")
        outputs = self.module(*(values[name] for name in self.input_names))
        return dict(zip(self.output_names, outputs))


@dataclass
class SegmentedModel:
    segments: list[Segment]  # device, edge, cloud: always three
    input_names: list[str]
    output_template: Any  # the model's output structure, with _Ref(name) where values go

    @property
    def device(self) -> Segment:
        return self.segments[DEVICE]

    @property
    def edge(self) -> Segment:
        return self.segments[EDGE]

    @property
    def cloud(self) -> Segment:
        return self.segments[CLOUD]

    def assemble_output(self, values: Mapping[str, Any]) -> Any:
        return fx.node.map_aggregate(self.output_template, lambda v: values[v.name] if isinstance(v, _Ref) else v)

    def run(self, *inputs: torch.Tensor) -> Any:
        """All three segments in sequence, in one process: the model's output, bit for bit."""
        values: dict[str, Any] = dict(zip(self.input_names, inputs))
        for segment in self.segments:
            values.update(segment.run(values))
        return self.assemble_output(values)


@dataclass(frozen=True)
class _Ref:
    name: str


def normalise_assignment(graph: ModelGraph, assignment: Mapping[str, int | str]) -> dict[str, int]:
    """Check an assignment (node name -> tier index or name) and return it with tier indices.

    Every work node needs a tier; inputs live on the device; every DAG edge must stay in its tier or go
    forward (device -> edge -> cloud).
    """
    tiers: dict[str, int] = {}
    for name, tier in assignment.items():
        if name not in graph.records:
            raise AssignmentError(f"assignment names {name!r}, which is not a node of {graph.name}")
        index = TIERS.index(tier) if isinstance(tier, str) and tier in TIERS else tier
        if index not in (DEVICE, EDGE, CLOUD):
            raise AssignmentError(f"node {name!r}: tier must be one of {TIERS} or 0..2, got {tier!r}")
        tiers[name] = int(index)
    for name in graph.input_names:
        if tiers.setdefault(name, DEVICE) != DEVICE:
            raise AssignmentError(f"input {name!r} is held by the device; it cannot be assigned to {TIERS[tiers[name]]}")
    missing = [name for name in graph.order if name not in tiers]
    if missing:
        raise AssignmentError(f"{len(missing)} nodes have no tier, e.g. {missing[:5]}")
    for src, dst in graph.dag.edges:
        if tiers[src] > tiers[dst]:
            raise AssignmentError(
                f"not monotone: {src} runs on {TIERS[tiers[src]]} but its consumer {dst} runs on "
                f"{TIERS[tiers[dst]]}; data may only flow device -> edge -> cloud"
            )
    return tiers


def crossing_values(graph: ModelGraph, tiers: Mapping[str, int]) -> tuple[list[list[str]], list[list[str]]]:
    """Per tier: the values it receives and the values it sends (each once, in program order)."""
    program_order = {name: i for i, name in enumerate(graph.input_names + graph.order)}
    inputs: list[set[str]] = [set(), set(), set()]
    outputs: list[set[str]] = [set(), set(), set()]
    for src, dst in graph.dag.edges:
        if tiers[src] < tiers[dst]:
            inputs[tiers[dst]].add(src)
            outputs[tiers[src]].add(src)
    for name in graph.output_names:
        outputs[tiers[name]].add(name)
    inputs[DEVICE] = set(graph.input_names)

    def ordered(names: Iterable[str]) -> list[str]:
        return sorted(names, key=program_order.__getitem__)

    return [ordered(s) for s in inputs], [ordered(s) for s in outputs]


def extract_subgraph(gm: fx.GraphModule, node_names: Iterable[str], input_names: list[str],
                     output_names: list[str]) -> fx.GraphModule:
    """A GraphModule running ``node_names`` of ``gm``: placeholders for ``input_names``, returning the
    tuple of ``output_names``. Submodules and parameters are shared with ``gm``, not copied."""
    wanted = set(node_names)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in input_names:
        env[name] = graph.placeholder(name)
    originals = {node.name: node for node in gm.graph.nodes}

    def lookup(node: fx.Node) -> fx.Node:
        if node.name not in env:
            if node.op != "get_attr":
                raise AssignmentError(f"value {node.name!r} is needed but neither computed here nor received")
            env[node.name] = graph.node_copy(node, lookup)  # constants are copied into every user
        return env[node.name]

    for node in gm.graph.nodes:
        if node.name in wanted and node.name not in env:
            env[node.name] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(originals[name]) if name not in env else env[name] for name in output_names))
    return fx.GraphModule(gm, graph, class_name="Segment")


def build_segments(graph: ModelGraph, assignment: Mapping[str, int | str]) -> SegmentedModel:
    tiers = normalise_assignment(graph, assignment)
    seg_inputs, seg_outputs = crossing_values(graph, tiers)
    segments = []
    for tier_index, tier_name in enumerate(TIERS):
        nodes = [name for name in graph.order if tiers[name] == tier_index]
        module = extract_subgraph(graph.module, nodes, seg_inputs[tier_index], seg_outputs[tier_index])
        segments.append(Segment(tier_name, module, seg_inputs[tier_index], seg_outputs[tier_index], nodes))
    output_node = next(n for n in graph.module.graph.nodes if n.op == "output")
    template = fx.node.map_arg(output_node.args[0], lambda n: _Ref(n.name))
    return SegmentedModel(segments, list(graph.input_names), template)

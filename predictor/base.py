"""What the planner asks of a latency predictor, and the simplest one that answers: a FLOP rate.

The planner only needs, per tier, the seconds each node of a graph takes there (a predictor may fold a
fused kernel's time, e.g. conv+bn+relu, into its first node and give the others 0) and the runtime's
fixed cost of one segment call. Fitted predictors (predictor/) implement the same two members.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from partitioner.graph import ModelGraph


class LatencyModel(Protocol):
    per_call_overhead_s: float

    def node_seconds(self, graph: ModelGraph) -> dict[str, float]:
        """Predicted seconds of every work node of ``graph`` (keys: ``graph.order``) on this tier."""
        ...


@dataclass
class FlopRateModel:
    """Seconds = FLOPs / rate + a per-node cost for memory traffic. Good to a factor of ~2; the fitted
    predictor replaces it where a profile exists."""

    flops_per_s: float = 2.0e10
    bytes_per_s: float = 4.0e9  # memory-bound ops (pool, bn, add, cat) move their output once or twice
    per_node_overhead_s: float = 1.5e-5
    per_call_overhead_s: float = 2.0e-4

    def node_seconds(self, graph: ModelGraph) -> dict[str, float]:
        seconds = {}
        for name in graph.order:
            record = graph.records[name]
            seconds[name] = (record.flops / self.flops_per_s + 2 * record.output_bytes / self.bytes_per_s
                             + self.per_node_overhead_s)
        return seconds

    def scaled(self, slowdown: float) -> "FlopRateModel":
        """The same tier made ``slowdown`` times slower (a CPU quota, another tenant)."""
        return FlopRateModel(self.flops_per_s / slowdown, self.bytes_per_s / slowdown,
                             self.per_node_overhead_s * slowdown, self.per_call_overhead_s * slowdown)

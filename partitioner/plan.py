"""The plan: which node runs on which tier, and how the edge segment is spread over edge nodes.

A plain record shared by the planner (which makes it), the runtime (which executes it: every tier runs
the plan version a request names) and the benchmarks (which print it). It travels as JSON.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from partitioner.segments import TIERS


PREDICTION_FIELDS = ("predicted_ms", "stages_ms", "link_bytes")  # what the planner expects, not what to run


@dataclass
class Plan:
    model: str
    input_shape: tuple[int, ...]
    assignment: dict[str, str]  # work node name -> "device" | "edge" | "cloud"
    edge_weights: list[float] = field(default_factory=lambda: [1.0])  # one per edge node: relative speed
    strategy: str = "d3"  # d3, d3_no_tiling, neurosurgeon, dads, device_only, edge_only, cloud_only, ...
    version: int = 0
    predicted_ms: float = float("nan")
    stages_ms: dict[str, float] = field(default_factory=dict)
    link_bytes: dict[str, int] = field(default_factory=dict)
    # how the edge node that receives a request spreads the edge segment over the live edge nodes:
    # a name of partitioner.edge_strategies.STRATEGY_NAMES ("auto" = lowest prediction); older JSON: tiles
    edge_strategy: str = "tiles"

    @property
    def edge_nodes(self) -> int:
        return len(self.edge_weights)

    def nodes_on(self, tier: str) -> list[str]:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        return [name for name, where in self.assignment.items() if where == tier]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_wire_json(self) -> str:
        """The plan as the tiers receive it: without the planner's predictions, which the re-partitioner
        refreshes on every update. A re-priced plan then keeps its digest, and the tiers keep the segments
        they built for it; with the predictions in, every request named a new plan and each edge node
        re-built its tiles (+30% median latency on the testbed, bench/e2e.py)."""
        data = asdict(self)
        for name in PREDICTION_FIELDS:
            data.pop(name)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        data = json.loads(text)
        data["input_shape"] = tuple(data["input_shape"])
        return cls(**data)

"""``auto`` at run time: the edge daemon plans every strategy, then *measures* the few the cost model
ranks best and keeps the fastest.

Why measure: on real edge daemons the cost model's ranking was right for 1 model of 4 (cgroup quotas
1.0/0.5/0.25, 224x224: it ranked auction or dpfl first where zones measured 1.3-2.2x faster), because
work on throttled nodes and per-item round trips cost more than it prices them. Its top three did
contain the measured winner every time, so the daemon tries each of them (plus ``tiles``, the robust
default for equal nodes) on one request, then runs the one with the lowest median measured time,
still recording it: a strategy that gets slower loses its place to the next best.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from partitioner.edge_strategies.core import EdgePlan

CANDIDATES = 3  # measured candidates, best predicted first
ALWAYS_TRY = ("tiles",)


@dataclass
class OnlineSelector:
    plans: dict[str, EdgePlan]  # every planned strategy, by name
    candidates: list[str] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_plans(cls, plans: dict[str, EdgePlan], count: int = CANDIDATES) -> "OnlineSelector":
        if not plans:
            raise ValueError("no edge plans to choose from")
        ranked = sorted(plans, key=lambda name: plans[name].predicted_ms)
        candidates = ranked[:count] + [name for name in ALWAYS_TRY if name in plans and name not in ranked[:count]]
        return cls(plans, candidates, {name: [] for name in candidates})

    def choose(self) -> EdgePlan:
        """The next plan to run: an untried candidate (best predicted first), else the measured fastest."""
        untried = [name for name in self.candidates if not self.seconds[name]]
        name = untried[0] if untried else min(self.candidates, key=lambda n: statistics.median(self.seconds[n]))
        plan = self.plans[name]
        plan.notes["chosen_by"] = "auto (measured)" if not untried else "auto (trying)"
        return plan

    def record(self, strategy: str, seconds: float) -> None:
        if strategy in self.seconds:
            self.seconds[strategy].append(seconds)
            del self.seconds[strategy][:-9]  # recent samples only: the cluster's load changes

    def summary(self) -> dict[str, float | None]:
        return {name: (statistics.median(s) * 1e3 if s else None) for name, s in self.seconds.items()}

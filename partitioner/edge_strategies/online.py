"""``auto`` at run time: the edge daemon plans every strategy, then *measures* the few the cost model
ranks best and keeps the fastest.

Why measure: on real edge daemons the cost model's ranking was right for 1 model of 4 (cgroup quotas
1.0/0.5/0.25, 224x224: it ranked auction or dpfl first where zones measured 1.3-2.2x faster), because
work on throttled nodes and per-item round trips cost more than it prices them. Its top three did
contain the measured winner every time, so the daemon tries each of them (plus ``tiles``, the robust
default for equal nodes) on one request, then runs the one with the lowest median measured time,
still recording it: a strategy that gets slower loses its place to the next best.

One more candidate is no split at all (``WHOLE``: the coordinating node runs the edge segment alone).
Bit-exact tiles cost 1.6-2x the CPU of the untiled segment (halo, and small maps whose weights every
tile re-reads), and every stage adds a round trip: on the namespace testbed (3 nodes at 0.5 CPU) splitting
was slower than one node for resnet18, resnet50, googlenet and mobilenet_v2, and faster only for vgg16.
With ``WHOLE`` measured beside the splits, ``auto`` is never slower than one node for long.

On a request whose input arrives in row bands (``partitioner/streaming.py``) one more candidate is
``STREAM``: the coordinating node computes the segment's first stage tile by tile while the bands arrive,
then the rest whole. Every candidate is then timed from the last band's arrival, the part of its time
the request waits for. How much of a streamed run the transfer hides depends on the bandwidth, so
``STREAM`` is not ranked by its past times but by its measured compute against the latest transfer time
(``streamed_seconds``): measured once on a fast link it would lose for good, though on Wi-Fi it wins.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from partitioner.edge_strategies.core import EdgePlan
from partitioner.streaming import StreamTimes, streamed_seconds

CANDIDATES = 3  # measured candidates, best predicted first
ALWAYS_TRY = ("tiles", "head_tiles")
WHOLE = "whole"  # no split: the edge segment on the coordinating node alone
STREAM = "stream"  # the first stage in row tiles as the input's bands arrive, then the rest whole


@dataclass
class OnlineSelector:
    plans: dict[str, EdgePlan]  # every planned strategy, by name
    candidates: list[str] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    stream_times: list[StreamTimes] = field(default_factory=list)  # STREAM's recent runs
    transfer_s: float = 0.0  # the latest streamed input's time from first to last band

    @classmethod
    def from_plans(cls, plans: dict[str, EdgePlan], count: int = CANDIDATES) -> "OnlineSelector":
        if not plans:
            raise ValueError("no edge plans to choose from")
        ranked = sorted(plans, key=lambda name: plans[name].predicted_ms)
        candidates = ranked[:count] + [name for name in ALWAYS_TRY if name in plans and name not in ranked[:count]]
        candidates.append(WHOLE)
        return cls(plans, candidates, {name: [] for name in candidates})

    def add_candidate(self, name: str) -> None:
        """One more candidate (``STREAM`` once a streamed request comes), tried next; ``WHOLE`` stays last."""
        if name not in self.candidates:
            self.candidates.insert(max(len(self.candidates) - 1, 0), name)
            self.seconds[name] = []

    def choose_name(self) -> str:
        """The next strategy to run: an untried candidate (best predicted first, ``WHOLE`` last), else the
        measured fastest."""
        untried = [name for name in self.candidates if not self.seconds[name]]
        return untried[0] if untried else min(self.candidates, key=self.expected_s)

    def expected_s(self, name: str) -> float:
        """A candidate's expected time: the median of its recent runs (``STREAM``: at the latest transfer)."""
        if name == STREAM and self.stream_times:
            return statistics.median(streamed_seconds(t, self.transfer_s) for t in self.stream_times)
        return statistics.median(self.seconds[name])

    def choose(self) -> EdgePlan | None:
        """The next plan to run; None means ``WHOLE`` or ``STREAM`` (no split over nodes: ``choose_name``)."""
        untried = any(not samples for samples in self.seconds.values())
        name = self.choose_name()
        if name in (WHOLE, STREAM):
            return None
        plan = self.plans[name]
        plan.notes["chosen_by"] = "auto (trying)" if untried else "auto (measured)"
        return plan

    def record(self, strategy: str, seconds: float) -> None:
        if strategy in self.seconds:
            self.seconds[strategy].append(seconds)
            del self.seconds[strategy][:-9]  # recent samples only: the cluster's load changes

    def record_stream(self, times: StreamTimes, seconds: float) -> None:
        self.record(STREAM, seconds)
        self.stream_times.append(times)
        del self.stream_times[:-9]

    def note_transfer(self, seconds: float) -> None:
        self.transfer_s = seconds

    def summary(self) -> dict[str, float | None]:
        return {name: (statistics.median(s) * 1e3 if s else None) for name, s in self.seconds.items()}

"""Play bandwidth traces onto links as time passes.

Every ``step_s`` of trace time (``step_s / speed`` of wall time) each link gets the trace's mean rate over
the coming step. Where the rate goes is an ``applier``:

- ``TcApplier``: the testbed's htb classes (`tc class change` on every interface carrying the link; needs
  root and a running `d3 testbed`). It measures what the link actually carried from tc's byte counters.
- ``InProcessApplier``: token buckets in this process (no root). This is the same shaper the local demo
  uses; on its own it can only shape traffic that passes through it, so `d3 replay` without root also runs
  a probe sender per link and reports the rate the probe achieved, which shows the shaping works.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from traces.formats import BandwidthTrace
from traces.shaping import TokenBucket


class Applier(Protocol):
    def apply(self, link: str, bps: float) -> None: ...

    def measured_bps(self, link: str) -> float | None: ...

    def close(self) -> None: ...


@dataclass
class StepRecord:
    step: int
    t_s: float             # trace time at the step's start
    wall_s: float          # wall time since the replay started
    set_bps: dict[str, float]
    measured_bps: dict[str, float | None]

    def to_dict(self) -> dict:
        return {"step": self.step, "t_s": round(self.t_s, 6), "wall_s": round(self.wall_s, 6),
                "set_bps": self.set_bps, "measured_bps": self.measured_bps}


def replay(traces: dict[str, BandwidthTrace], applier: Applier, step_s: float = 1.0, speed: float = 1.0,
           duration_s: float | None = None, on_step: Callable[[StepRecord], None] | None = None,
           stop: threading.Event | None = None, clock=time.monotonic) -> list[StepRecord]:
    """Apply each link's trace every step until ``duration_s`` of trace time (default: the longest trace).
    ``measured_bps`` in a record is what the link carried during the previous step."""
    if not traces:
        raise ValueError("no links to replay")
    if not step_s > 0 or not speed > 0:
        raise ValueError(f"step and speed must be > 0 (got step {step_s}, speed {speed})")
    duration_s = duration_s or max(trace.duration_s for trace in traces.values())
    binned = {link: trace.resample(step_s) for link, trace in traces.items()}
    steps = max(1, int(round(duration_s / step_s)))
    stop = stop or threading.Event()
    records = []
    start = clock()
    for step in range(steps):
        t_s = step * step_s
        set_bps = {link: float(trace.bps_at(trace.start_s + t_s)) for link, trace in binned.items()}
        measured = {link: applier.measured_bps(link) for link in binned}
        for link, bps in set_bps.items():
            applier.apply(link, bps)
        record = StepRecord(step, t_s, clock() - start, set_bps, measured)
        records.append(record)
        if on_step:
            on_step(record)
        # absolute deadlines: the replay does not drift however long tc takes
        if stop.wait(max(0.0, start + (step + 1) * step_s / speed - clock())):
            break
    return records


@dataclass
class TcApplier:
    """Changes the running testbed's htb classes (deploy.testbed)."""
    prefix: str
    state: dict = field(default_factory=dict)
    _last: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from deploy.testbed import load_state, state_path_for

        self.state = self.state or load_state(self.prefix) or {}
        if self.state.get("status") != "up":
            raise OSError(f"no running testbed with prefix {self.prefix!r} "
                          f"({state_path_for(self.prefix)}); start one with `d3 testbed up`")

    def apply(self, link: str, bps: float) -> None:
        from deploy.testbed import set_link_rate

        set_link_rate(self.prefix, link, bps, self.state)

    def measured_bps(self, link: str) -> float | None:
        from deploy.testbed import link_sent_bytes

        now, sent = time.monotonic(), link_sent_bytes(self.prefix, link, self.state)
        previous = self._last.get(link)
        self._last[link] = (now, sent)
        if previous is None or now <= previous[0]:
            return None
        return (sent - previous[1]) * 8 / (now - previous[0])

    def close(self) -> None:
        pass


class InProcessApplier:
    """Token buckets per link; with ``probe=True`` a thread per link keeps sending through its bucket so
    the achieved rate can be reported (bytes the probe got through per wall second)."""

    def __init__(self, links: list[str], probe: bool = True, chunk_bytes: int = 16 * 1024):
        self.buckets = {link: TokenBucket(1e6, burst_bytes=chunk_bytes) for link in links}
        self._chunk = chunk_bytes
        self._stop = threading.Event()
        self._last: dict[str, tuple[float, int]] = {}
        self._threads = []
        if probe:
            for bucket in self.buckets.values():
                thread = threading.Thread(target=self._probe, args=(bucket,), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _probe(self, bucket: TokenBucket) -> None:
        while not self._stop.is_set():
            bucket.consume(self._chunk)

    def apply(self, link: str, bps: float) -> None:
        self.buckets[link].set_rate(bps)

    def measured_bps(self, link: str) -> float | None:
        now, sent = time.monotonic(), self.buckets[link].bytes_sent
        previous = self._last.get(link)
        self._last[link] = (now, sent)
        if previous is None or not self._threads:
            return None
        return (sent - previous[1]) * 8 / (now - previous[0])

    def close(self) -> None:
        self._stop.set()
        for bucket in self.buckets.values():
            bucket.set_rate(1e12)  # release a probe blocked on a slow rate
        for thread in self._threads:
            thread.join(timeout=2)

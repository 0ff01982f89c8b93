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

import json
import subprocess
import sys
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
    observed: dict = field(default_factory=dict)  # what the tiers measured (see TierObserver), if asked

    def to_dict(self) -> dict:
        out = {"step": self.step, "t_s": round(self.t_s, 6), "wall_s": round(self.wall_s, 6),
               "set_bps": self.set_bps, "measured_bps": self.measured_bps}
        if self.observed:
            out["observed"] = self.observed
        return out


def replay(traces: dict[str, BandwidthTrace], applier: Applier, step_s: float = 1.0, speed: float = 1.0,
           duration_s: float | None = None, on_step: Callable[[StepRecord], None] | None = None,
           stop: threading.Event | None = None, clock=time.monotonic,
           observe: Callable[[], dict] | None = None) -> list[StepRecord]:
    """Apply each link's trace every step until ``duration_s`` of trace time (default: the longest trace).
    ``measured_bps`` in a record is what the link carried during the previous step; ``observe()`` (e.g. a
    TierObserver) adds what the tiers themselves measured over it."""
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
        observed = observe() if observe is not None else {}
        for link, bps in set_bps.items():
            applier.apply(link, bps)
        record = StepRecord(step, t_s, clock() - start, set_bps, measured, observed)
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


# --- what the tiers measured -------------------------------------------------------------------------
def poll_tiers(cloud_url: str | None, edge_addresses: dict[str, str], timeout_s: float = 1.0) -> dict:
    """Each tier's own counters: the cloud's GET /metrics, each edge node's ZeroMQ ``status``
    (tiers.runtime.Metrics snapshots). A tier that does not answer maps to None."""
    import urllib.request

    from tiers.demo import edge_status

    tiers: dict[str, dict | None] = {}
    if cloud_url:
        try:
            with urllib.request.urlopen(cloud_url.rstrip("/") + "/metrics", timeout=timeout_s) as answer:
                tiers["cloud"] = json.loads(answer.read())
        except (OSError, ValueError):
            tiers["cloud"] = None
    for name, address in edge_addresses.items():
        status = edge_status(address, timeout_s=timeout_s)
        tiers[name] = status.get("metrics") if status else None
    return tiers


def _monitor_main(argv: list[str]) -> None:
    """``python -m traces.replay monitor CLUSTER``: one JSON line of poll_tiers() per line read on stdin.
    The testbed runs this inside its device namespace, the only place that reaches every tier."""
    from deploy.cluster import load_cluster

    cluster = load_cluster(argv[0])
    edges = {spec.name: spec.address for spec in cluster.edges}
    for _ in sys.stdin:
        print(json.dumps(poll_tiers(cluster.cloud_url, edges)), flush=True)


class TierObserver:
    """Called once per replay step: what the tiers measured since the previous step.

    * ``tiers``: per tier, the bytes it received and sent per second (its Metrics counters; that is the
      traffic the links carried to and from it as the tier saw it), requests served and their p50 latency;
    * ``device``: the last link estimates a device client wrote to ``device_log`` (one JSON line per
      request with ``estimate_bps``; bench/e2e.py writes them), i.e. the bandwidth the device measured.

    With ``netns`` the tiers are polled by a helper process inside that namespace (the testbed's
    addresses are only reachable from inside it)."""

    def __init__(self, cluster_path: str | None = None, device_log: str | None = None, netns: str | None = None):
        self.cluster_path, self.device_log, self.netns = cluster_path, device_log, netns
        self._helper = None
        self._last: tuple[float, dict] | None = None
        if cluster_path and netns:
            from deploy.netns import in_ns

            command = in_ns(netns, [sys.executable, "-m", "traces.replay", "monitor", cluster_path])
            self._helper = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True)
        elif cluster_path:
            from deploy.cluster import load_cluster

            cluster = load_cluster(cluster_path)
            self._cloud, self._edges = cluster.cloud_url, {e.name: e.address for e in cluster.edges}

    def _poll(self) -> dict:
        if self._helper is not None:
            self._helper.stdin.write("poll\n")
            self._helper.stdin.flush()
            line = self._helper.stdout.readline()
            return json.loads(line) if line else {}
        if self.cluster_path:
            return poll_tiers(self._cloud, self._edges)
        return {}

    def _device_estimate(self) -> dict | None:
        if not self.device_log:
            return None
        try:
            with open(self.device_log, "rb") as log:
                log.seek(0, 2)
                log.seek(max(0, log.tell() - 4096))
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                return json.loads(line).get("estimate_bps")
            except ValueError:
                continue
        return None

    def __call__(self) -> dict:
        now, snapshot = time.monotonic(), self._poll()
        observed: dict = {}
        if snapshot:
            previous = self._last
            self._last = (now, snapshot)
            tiers = {}
            for tier, metrics in snapshot.items():
                if metrics is None:
                    tiers[tier] = None
                    continue
                entry = {"requests": metrics.get("requests_total", 0),
                         "p50_ms": (metrics.get("latency_ms") or {}).get("p50")}
                before = previous[1].get(tier) if previous else None
                if before:
                    seconds = max(now - previous[0], 1e-9)
                    entry["rx_bps"] = (metrics.get("bytes_in", 0) - before.get("bytes_in", 0)) * 8 / seconds
                    entry["tx_bps"] = (metrics.get("bytes_out", 0) - before.get("bytes_out", 0)) * 8 / seconds
                tiers[tier] = entry
            observed["tiers"] = tiers
        estimate = self._device_estimate()
        if estimate:
            observed["device_estimate_bps"] = estimate
        return observed

    def close(self) -> None:
        if self._helper is not None:
            self._helper.stdin.close()
            try:
                self._helper.wait(5)
            except subprocess.TimeoutExpired:
                self._helper.kill()
                self._helper.wait()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "monitor":
        _monitor_main(sys.argv[2:])

"""Links shaped in the process: each sender waits on a token bucket whose rate follows a bandwidth trace
(``traces.shaping.TraceShaper``) before putting a message on the wire. The local demo uses this on
loopback (no root); on real networks no shaper is set. Every process of a demo passes the same
``start_time`` (CLOCK_MONOTONIC is machine-wide) so all tiers see the trace at the same point.

Propagation delay: a sender also waits half the trace's RTT at that moment after its bytes are paced
(``TraceShaper.transmit_async``), so a request and its reply together pay one RTT per link crossed, as
the planner's cost model prices them. Loopback itself adds ~0."""
from __future__ import annotations

from pathlib import Path

LINK_NAMES = ("device_edge", "edge_cloud", "device_cloud")


def load_named_trace(name_or_path: str):
    from traces.formats import builtin_trace, load_trace

    if Path(name_or_path).is_file():
        return load_trace(name_or_path)
    return builtin_trace(name_or_path)


def make_shapers(link_traces: dict[str, str], start_time: float | None = None) -> dict:
    """link name -> TraceShaper for every link that has a trace."""
    from traces.shaping import TraceShaper

    shapers = {}
    for link, trace_name in link_traces.items():
        if link not in LINK_NAMES:
            raise ValueError(f"unknown link {link!r}; links are {LINK_NAMES}")
        # delay_s=None: half the trace's RTT at the current trace time (0 if the trace has no RTT column)
        shapers[link] = TraceShaper(load_named_trace(trace_name), start_time=start_time, delay_s=None)
    return shapers


def links_from_traces(link_traces: dict[str, str], default_mbps: dict[str, float] | None = None):
    """The planner's starting point: each link at its trace's mean bandwidth and mean RTT (a device
    measures the bandwidth from then on)."""
    from partitioner.cost import Links

    mbps = {"device_edge": 50.0, "edge_cloud": 100.0, "device_cloud": 10.0, **(default_mbps or {})}
    rtts_s = {}
    for link, trace_name in link_traces.items():
        trace = load_named_trace(trace_name)
        mbps[link] = trace.mean_mbps
        if trace.rtt_ms is not None and len(trace.rtt_ms):
            rtts_s[f"{link}_rtt_s"] = float(trace.rtt_ms.mean()) / 1e3
    return Links.mbps(mbps["device_edge"], mbps["edge_cloud"], mbps["device_cloud"], **rtts_s)

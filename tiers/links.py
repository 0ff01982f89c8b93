"""Links shaped in the process: each sender waits on a token bucket whose rate follows a bandwidth trace
(``traces.shaping.TraceShaper``) before putting a message on the wire. The local demo uses this on
loopback (no root); on real networks no shaper is set. Every process of a demo passes the same
``start_time`` (CLOCK_MONOTONIC is machine-wide) so all tiers see the trace at the same point."""
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
        shapers[link] = TraceShaper(load_named_trace(trace_name), start_time=start_time, delay_s=0.0)
    return shapers


def links_from_traces(link_traces: dict[str, str], default_mbps: dict[str, float] | None = None):
    """The planner's starting point: each link at its trace's mean (a device measures from then on)."""
    from partitioner.cost import Links

    mbps = {"device_edge": 50.0, "edge_cloud": 100.0, "device_cloud": 10.0, **(default_mbps or {})}
    for link, trace_name in link_traces.items():
        mbps[link] = load_named_trace(trace_name).mean_mbps
    return Links.mbps(mbps["device_edge"], mbps["edge_cloud"], mbps["device_cloud"])

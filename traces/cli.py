"""`d3 replay` (play traces onto links) and `d3 trace` (look at a trace)."""
from __future__ import annotations

import argparse
import json
import os
import re

LINK_NAMES = ("device-edge", "edge-cloud", "device-cloud", "edge-lan")


def add_commands(subparsers) -> None:
    replay = subparsers.add_parser(
        "replay", help="apply bandwidth traces to links as they play (tc on the testbed, or in-process)")
    replay.add_argument("trace", help="trace file (Mahimahi, 't_s mbps' pairs, CSV), built-in name, or const:MBPS")
    replay.add_argument("--link", action="append", nargs="+", required=True, metavar=("LINK", "TRACE"),
                        help="a link to drive: device-edge, edge-cloud, device-cloud or edge-lan, optionally "
                             "followed by its own trace (default: TRACE); repeat for more links")
    replay.add_argument("--step", default="1s", help="how often the rate changes, e.g. 1s, 500ms (default 1s)")
    replay.add_argument("--speed", type=float, default=1.0, help="play the trace this many times faster")
    replay.add_argument("--duration", type=float, default=None, metavar="S",
                        help="seconds of trace to play (default: the longest trace; traces loop)")
    replay.add_argument("--scale", type=float, default=1.0, help="multiply every bandwidth by this")
    replay.add_argument("--min-mbps", type=float, default=0.05,
                        help="clip the trace below at this rate (an outage of exactly 0 stalls TCP for good)")
    replay.add_argument("--mode", choices=("auto", "tc", "inprocess"), default="auto",
                        help="tc: change the testbed's qdiscs (root + `d3 testbed up`); inprocess: token "
                             "buckets with a probe sender in this process; auto: tc when possible")
    replay.add_argument("--prefix", default=os.environ.get("D3_TESTBED_PREFIX", "d3tb-"), help="testbed prefix")
    replay.add_argument("--log", default=None, metavar="FILE", help="also write one JSON line per step here")
    replay.add_argument("--no-observe", action="store_true",
                        help="do not ask the tiers what they measured (default: ask the testbed's daemons, "
                             "or those of --cluster, every step)")
    replay.add_argument("--cluster", default=None, metavar="FILE",
                        help="cluster file whose cloud /metrics and edge status to log (default on the "
                             "testbed: its own cluster file, polled from inside the device namespace)")
    replay.add_argument("--device-log", default=None, metavar="FILE",
                        help="JSON lines with a device's link estimates ('estimate_bps'), e.g. written by "
                             "bench/e2e.py (default on the testbed: RUN_DIR/device-links.jsonl)")
    replay.add_argument("--quiet", action="store_true", help="no line per step")
    replay.set_defaults(handler=run_replay)

    trace = subparsers.add_parser("trace", help="summary of a bandwidth trace (or list the built-in ones)")
    trace.add_argument("trace", nargs="?", help="file, built-in name or const:MBPS (omit to list built-ins)")
    trace.add_argument("--format", default="auto", choices=("auto", "mahimahi", "time_throughput", "csv"))
    trace.add_argument("--bin", type=float, default=1.0, metavar="S", help="Mahimahi bin size (default 1 s)")
    trace.add_argument("--json", action="store_true", help="one JSON object on stdout")
    trace.set_defaults(handler=run_trace)


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"bad step {text!r}: want a positive duration such as 1s or 500ms")
    return float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)


def link_traces(args: argparse.Namespace) -> dict:
    from traces.formats import resolve_trace

    traces = {}
    for item in args.link:
        if len(item) > 2:
            raise ValueError(f"--link takes LINK [TRACE], got {' '.join(item)}")
        link, spec = item[0], (item[1] if len(item) == 2 else args.trace)
        if link not in LINK_NAMES:
            raise ValueError(f"unknown link {link!r}; links: {', '.join(LINK_NAMES)}")
        if link in traces:
            raise ValueError(f"link {link} given twice")
        traces[link] = resolve_trace(spec).scaled(args.scale).clipped(args.min_mbps, None)
    return traces


def choose_mode(args: argparse.Namespace) -> str:
    if args.mode != "auto":
        return args.mode
    from deploy.testbed import load_state

    try:
        running = os.geteuid() == 0 and (load_state(args.prefix) or {}).get("status") == "up"
    except (ValueError, OSError):
        running = False
    return "tc" if running else "inprocess"


def _format_step(record) -> str:
    parts = []
    for link, bps in record.set_bps.items():
        measured = record.measured_bps.get(link)
        seen = "" if measured is None else f" (carried {measured / 1e6:7.2f})"
        parts.append(f"{link} {bps / 1e6:8.2f} Mbit/s{seen}")
    return f"t={record.t_s:7.1f}s  " + "   ".join(parts) + _format_observed(record.observed)


def _format_observed(observed: dict) -> str:
    """'  | tiers rx: edge1 4.1 cloud 0.0 Mbit/s | device est: device_edge 4.5 ...' (empty if nothing)"""
    parts = []
    tiers = {t: m for t, m in (observed.get("tiers") or {}).items() if m and "rx_bps" in m}
    if tiers:
        parts.append("tiers rx: " + " ".join(f"{t} {m['rx_bps'] / 1e6:.2f}" for t, m in tiers.items()) + " Mbit/s")
    down = [t for t, m in (observed.get("tiers") or {}).items() if m is None]
    if down:
        parts.append("no answer: " + ",".join(down))
    estimate = observed.get("device_estimate_bps")
    if estimate:
        parts.append("device est: " + " ".join(f"{k} {v / 1e6:.2f}" for k, v in estimate.items()) + " Mbit/s")
    return "".join(f"  | {part}" for part in parts)


def make_observer(args: argparse.Namespace, mode: str):
    """What `d3 replay` asks the tiers each step; None if nothing to ask."""
    from traces.replay import TierObserver

    if args.no_observe:
        return None
    if mode == "tc":
        from deploy.testbed import load_state

        state = load_state(args.prefix) or {}
        device_log = args.device_log or os.path.join(state.get("run_dir", "/nonexistent"), "device-links.jsonl")
        daemons = bool(state.get("daemons"))
        return TierObserver(args.cluster or (state.get("cluster_config") if daemons else None), device_log,
                            netns=args.prefix + "device")
    if args.cluster or args.device_log:
        return TierObserver(args.cluster, args.device_log)
    return None


def run_replay(args: argparse.Namespace) -> int:
    from traces.replay import InProcessApplier, TcApplier, replay

    traces = link_traces(args)
    step_s = parse_duration(args.step)
    mode = choose_mode(args)
    applier = TcApplier(args.prefix) if mode == "tc" else InProcessApplier(list(traces))
    duration = args.duration or max(t.duration_s for t in traces.values())
    print(f"replaying {', '.join(f'{link} <- {t.name} (mean {t.mean_mbps:.2f} Mbit/s)' for link, t in traces.items())}"
          f" every {step_s:g} s for {duration:g} s at speed {args.speed:g}, mode {mode}"
          + ("" if mode == "tc" else " (in-process token buckets + probe senders; no root or no testbed)"),
          flush=True)
    log = open(args.log, "w") if args.log else None
    observer = make_observer(args, mode)

    def on_step(record) -> None:
        if not args.quiet:
            print(_format_step(record), flush=True)
        if log:
            log.write(json.dumps({**record.to_dict(), "mode": mode}) + "\n")
            log.flush()

    try:
        records = replay(traces, applier, step_s, args.speed, duration, on_step, observe=observer)
    finally:
        applier.close()
        if observer is not None:
            observer.close()
        if log:
            log.close()
    print(f"done: {len(records)} steps")
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from traces.formats import builtin_trace, builtin_trace_names, load_trace, resolve_trace

    if not args.trace:
        for name in builtin_trace_names():
            trace = builtin_trace(name)
            print(f"{name:<12} {trace.duration_s:6.0f} s  mean {trace.mean_mbps:7.2f} Mbit/s")
        return 0
    trace = (load_trace(args.trace, args.format, args.bin) if os.path.isfile(args.trace)
             else resolve_trace(args.trace))
    summary = {"name": trace.name, "samples": len(trace), "duration_s": round(trace.duration_s, 3),
               "mean_mbps": round(trace.mean_mbps, 4), "min_mbps": round(float(trace.mbps.min()), 4),
               "max_mbps": round(float(trace.mbps.max()), 4),
               "mean_rtt_ms": None if trace.rtt_ms is None else round(float(trace.rtt_ms.mean()), 1)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['name']}: {summary['samples']} samples over {summary['duration_s']:g} s, "
              f"mean {summary['mean_mbps']:.2f} Mbit/s (min {summary['min_mbps']:.2f}, max {summary['max_mbps']:.2f})"
              + ("" if summary["mean_rtt_ms"] is None else f", mean RTT {summary['mean_rtt_ms']} ms"))
    return 0

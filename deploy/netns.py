"""Thin wrappers over iproute2 (`ip`, `tc`) for the testbed: network namespaces, veth pairs, a bridge,
addresses and htb shaping. We call the tools rather than pyroute2: iproute2 is on every Linux host, its
commands are what an operator would type to inspect or fix the testbed by hand, and it adds no dependency.

Shaping uses htb (netem is not available on these kernels): one class per link rate and u32 filters that
send traffic for another peer to another class, so one interface can carry two differently-shaped links.
"""
from __future__ import annotations

import re
import shutil
import subprocess

HTB_QUANTUM = 1514  # one full frame; the default (rate / r2q) is huge at high rates and warns


class CommandError(OSError):
    """An `ip`/`tc` command failed; the message holds the command and its stderr."""


def run(args: list[str], check: bool = True, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise CommandError(f"{args[0]} not found on PATH (install iproute2)")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise CommandError(f"`{' '.join(args)}` failed: {reason[-1] if reason else 'exit ' + str(proc.returncode)}")
    return proc


def in_ns(ns: str, args: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


# --- namespaces -----------------------------------------------------------------------------------
def list_namespaces(prefix: str = "") -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(name for name in names if name.startswith(prefix))


def add_namespace(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete_namespace(name: str) -> None:
    run(["ip", "netns", "delete", name], check=False)


def namespace_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(token) for token in out.split() if token.isdigit()]


def refusal_reason(probe_name: str = "d3tb-probe") -> str | None:
    """None if we may create namespaces here, else the kernel's (or tool's) reason."""
    try:
        add_namespace(probe_name)
    except (CommandError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    delete_namespace(probe_name)
    return None


# --- links ----------------------------------------------------------------------------------------
def add_veth(name: str, ns: str, peer: str, peer_ns: str) -> None:
    """Both ends are created directly inside their namespaces, so a crash never strands a link in the
    root namespace (and both die with their namespace)."""
    run(["ip", "link", "add", name, "netns", ns, "type", "veth", "peer", "name", peer, "netns", peer_ns])


def add_bridge(ns: str, name: str) -> None:
    run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])
    link_up(ns, name)


def attach_to_bridge(ns: str, dev: str, bridge: str) -> None:
    run(["ip", "-n", ns, "link", "set", dev, "master", bridge])


def link_up(ns: str, dev: str) -> None:
    run(["ip", "-n", ns, "link", "set", dev, "up"])


def add_address(ns: str, dev: str, cidr: str) -> None:
    run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])


# --- shaping ----------------------------------------------------------------------------------------
def rate_arg(bps: float) -> str:
    return f"{max(int(round(bps)), 8)}bit"  # tc refuses 0; 8 bit/s is "stalled"


def htb_class_args(bps: float) -> list[str]:
    return ["htb", "rate", rate_arg(bps), "ceil", rate_arg(bps), "quantum", str(HTB_QUANTUM)]


def add_htb_root(ns: str, dev: str, default_minor: int = 10) -> None:
    run(in_ns(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
                   "default", str(default_minor)]))


def add_htb_class(ns: str, dev: str, minor: int, bps: float, queue_packets: int) -> None:
    """A shaped class with a short FIFO (a bounded queue: pfifo_fast's 1000 packets would add seconds
    of queueing delay on a slow link)."""
    run(in_ns(ns, ["tc", "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{minor}",
                   *htb_class_args(bps)]))
    run(in_ns(ns, ["tc", "qdisc", "add", "dev", dev, "parent", f"1:{minor}", "handle", f"{minor}:",
                   "pfifo", "limit", str(queue_packets)]))


def change_htb_rate(ns: str, dev: str, minor: int, bps: float) -> None:
    run(in_ns(ns, ["tc", "class", "change", "dev", dev, "parent", "1:", "classid", f"1:{minor}",
                   *htb_class_args(bps)]))


def add_u32_filter(ns: str, dev: str, direction: str, address: str, minor: int) -> None:
    """Send packets whose ``direction`` ("src"/"dst") is ``address`` to class 1:minor."""
    if direction not in ("src", "dst"):
        raise ValueError(f"filter direction must be src or dst, got {direction!r}")
    run(in_ns(ns, ["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                   "u32", "match", "ip", direction, f"{address}/32", "flowid", f"1:{minor}"]))


_CLASS_LINE = re.compile(r"class htb 1:(\d+) .*?rate (\S+)")
_SENT = re.compile(r"Sent (\d+) bytes")


def htb_class_stats(ns: str, dev: str) -> dict[int, dict[str, object]]:
    """{minor: {"rate": "20Mbit", "sent_bytes": N}} from `tc -s class show`."""
    out = run(in_ns(ns, ["tc", "-s", "class", "show", "dev", dev])).stdout
    stats, current = {}, None
    for line in out.splitlines():
        if match := _CLASS_LINE.search(line):
            current = int(match.group(1))
            stats[current] = {"rate": match.group(2), "sent_bytes": 0}
        elif current is not None and (match := _SENT.search(line)):
            stats[current]["sent_bytes"] = int(match.group(1))
    return stats

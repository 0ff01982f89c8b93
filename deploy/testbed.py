"""A one-machine testbed: a network namespace per tier and edge node, veth links through a bridge, htb
shaping per link, cgroup v1 CPU quotas per tier, and the daemons started inside.

Topology (every name starts with the prefix, default ``d3tb-``; addresses live only inside the
namespaces, 10.77.0.0/24):

    device  10.77.0.3 --eth0==p-device--+
    cloud   10.77.0.2 --eth0==p-cloud---+-- br0 in namespace "lan"
    edgeK   10.77.0.(10+K) --eth0==p-edgeK--+

Links are shaped where packets leave an interface, in both directions:
  device-edge:  device eth0 (default class) and lan p-device (default class)
  device-cloud: device eth0 (dst cloud) and cloud eth0 (dst device); lan ports p-cloud (src device) and
                p-device (src cloud) at the same rate
  edge-cloud:   cloud eth0 (default class) and lan p-cloud (default class)
  edge-lan:     edge eth0 (default class), only if a rate is given (else the LAN is unshaped)

`down` finds everything by prefix (namespaces, cgroups, their processes), so it also cleans up after a
crash with no state file.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy import cgroups, netns

DEFAULT_PREFIX = "d3tb-"
SUBNET = "10.77.0"
LINKS = ("device-edge", "edge-cloud", "device-cloud", "edge-lan")
DEFAULT_BANDWIDTH_BPS = {"device-edge": 20e6, "edge-cloud": 100e6, "device-cloud": 10e6}
DEFAULT_CLASS, PEER_CLASS = 10, 20
CLOUD_PORT, EDGE_PORT = 8080, 5555
DEFAULT_CLOUD_COMMAND = "d3 cloud --cluster {config}"
DEFAULT_EDGE_COMMAND = "d3 edge --cluster {config} --name {node}"
_PREFIX_RE = re.compile(r"^d3tb[a-z0-9-]{0,6}$")


def check_prefix(prefix: str) -> str:
    # `down` deletes everything whose name starts with the prefix: keep it unmistakably ours
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"testbed prefix must start with 'd3tb' and be at most 10 of [a-z0-9-], got {prefix!r}")
    return prefix


def state_path_for(prefix: str) -> Path:
    return Path("/run/d3-testbed.json") if prefix == DEFAULT_PREFIX else Path(f"/run/{prefix}testbed.json")


def run_dir_for(prefix: str) -> Path:
    return Path("/run/d3-testbed") if prefix == DEFAULT_PREFIX else Path(f"/run/{prefix}testbed")


# Units are bits per second; "mbps" means megabits here (as people write it), unlike tc's megabytes.
_UNITS = {"": 1, "bit": 1, "bps": 1, "k": 1e3, "kbit": 1e3, "kbps": 1e3, "m": 1e6, "mbit": 1e6, "mbps": 1e6,
          "g": 1e9, "gbit": 1e9, "gbps": 1e9}


def parse_rate(text: str) -> float:
    """20Mbit, 500kbit, 1Gbit, 20mbps, 1000000 -> bit/s."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z/]*)\s*", text)
    unit = match.group(2).lower().replace("/s", "ps") if match else None
    if unit not in _UNITS:
        raise ValueError(f"bad rate {text!r}: want a number and a unit such as 20Mbit, 500kbit, 1Gbit")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"rate must be > 0, got {text!r}")
    return value


def parse_bandwidths(text: str | None) -> dict[str, float]:
    """``device-edge=20Mbit,edge-cloud=100Mbit`` -> bit/s per link, defaults for the rest."""
    rates = dict(DEFAULT_BANDWIDTH_BPS)
    for item in filter(None, (text or "").split(",")):
        link, sep, rate = item.partition("=")
        if not sep or link.strip() not in LINKS:
            raise ValueError(f"--bw item {item!r}: want LINK=RATE with LINK one of {', '.join(LINKS)}")
        rates[link.strip()] = parse_rate(rate)
    return rates


def parse_cpu_list(text: str | None, count: int, default: float) -> list[float]:
    if not text:
        return [default] * count
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--edge-cpu wants comma-separated CPU fractions (e.g. 0.5,0.5,0.3), got {text!r}") from None
    if len(values) == 1:
        values *= count
    if len(values) != count:
        raise ValueError(f"--edge-cpu has {len(values)} values for {count} edge nodes")
    return values


@dataclass
class TestbedConfig:
    __test__ = False  # not a pytest test class despite the name

    edge_nodes: int = 3
    device_cpu: float | None = 0.2
    edge_cpu: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    cloud_cpu: float | None = 1.0
    bandwidth_bps: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BANDWIDTH_BPS))
    prefix: str = DEFAULT_PREFIX
    start_daemons: bool = True
    cluster_config: str | None = None  # a cluster file to hand the daemons; default: one written here
    cloud_command: str = DEFAULT_CLOUD_COMMAND
    edge_command: str = DEFAULT_EDGE_COMMAND
    queue_s: float = 0.2  # queue length per shaped class, in seconds at its initial rate

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if not 1 <= self.edge_nodes <= 200:
            raise ValueError(f"--edge-nodes must be 1..200, got {self.edge_nodes}")
        if len(self.edge_cpu) != self.edge_nodes:
            raise ValueError(f"{len(self.edge_cpu)} edge CPU quotas for {self.edge_nodes} edge nodes")
        for link in self.bandwidth_bps:
            if link not in LINKS:
                raise ValueError(f"unknown link {link!r}; links: {', '.join(LINKS)}")


def tier_names(edge_nodes: int) -> list[str]:
    return ["device", "cloud"] + [f"edge{k}" for k in range(1, edge_nodes + 1)]


def address_of(tier: str) -> str:
    if tier == "cloud":
        return f"{SUBNET}.2"
    if tier == "device":
        return f"{SUBNET}.3"
    return f"{SUBNET}.{10 + int(tier[4:])}"


def shape_points(prefix: str, edge_nodes: int, bandwidth_bps: dict[str, float]) -> list[dict]:
    """Every (namespace, device, htb class) that carries a link, with its filter (if not the default)."""
    lan = prefix + "lan"
    device, cloud = address_of("device"), address_of("cloud")
    points = [
        dict(link="device-edge", ns=prefix + "device", dev="eth0", minor=DEFAULT_CLASS),
        dict(link="device-cloud", ns=prefix + "device", dev="eth0", minor=PEER_CLASS, match=("dst", cloud)),
        dict(link="device-edge", ns=lan, dev="p-device", minor=DEFAULT_CLASS),
        dict(link="device-cloud", ns=lan, dev="p-device", minor=PEER_CLASS, match=("src", cloud)),
        dict(link="edge-cloud", ns=prefix + "cloud", dev="eth0", minor=DEFAULT_CLASS),
        dict(link="device-cloud", ns=prefix + "cloud", dev="eth0", minor=PEER_CLASS, match=("dst", device)),
        dict(link="edge-cloud", ns=lan, dev="p-cloud", minor=DEFAULT_CLASS),
        dict(link="device-cloud", ns=lan, dev="p-cloud", minor=PEER_CLASS, match=("src", device)),
    ]
    if "edge-lan" in bandwidth_bps:
        points += [dict(link="edge-lan", ns=f"{prefix}edge{k}", dev="eth0", minor=DEFAULT_CLASS)
                   for k in range(1, edge_nodes + 1)]
    return points


def refusal_reason() -> str | None:
    """None if this host can run the testbed, else why not (for skipping tests and clear errors)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, cgroups)"
    reason = netns.refusal_reason("d3tbprobe-ns")
    if reason:
        return f"kernel refused a network namespace: {reason}"
    if not (cgroups.CPU_ROOT / "cgroup.procs").exists():
        return f"no cgroup v1 cpu controller at {cgroups.CPU_ROOT}"
    return None


def _stall_point(step: str) -> None:
    """Test hook: D3_TESTBED_STALL_AT=STEP makes `up` stop there (a test kills it to simulate a crash)."""
    if os.environ.get("D3_TESTBED_STALL_AT") == step:
        print(f"stalled at {step}", flush=True)
        while True:
            time.sleep(1)


def write_cluster_toml(path: Path, edge_nodes: int) -> None:
    """The cluster file the daemons read (deploy/cluster.py's format): where each tier listens inside the
    testbed. No [links] and no slowdowns: here tc shapes the links and cgroups slow the tiers."""
    lines = ["# written by `d3 testbed up`: addresses inside the testbed namespaces", "",
             "[cloud]", f'url = "http://{address_of("cloud")}:{CLOUD_PORT}"', "",
             "[device]", "slowdown = 1.0", ""]
    for k in range(1, edge_nodes + 1):
        lines += ["[[edge]]", f'name = "edge{k}"', f'address = "tcp://{address_of(f"edge{k}")}:{EDGE_PORT}"', ""]
    path.write_text("\n".join(lines))


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def load_state(prefix: str = DEFAULT_PREFIX) -> dict | None:
    path = state_path_for(prefix)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"testbed state file {path} is corrupt ({exc}); `d3 testbed down` still works") from None


def _build_network(config: TestbedConfig, state: dict, progress) -> None:
    prefix, lan = config.prefix, config.prefix + "lan"
    tiers = tier_names(config.edge_nodes)
    for name in [lan] + [prefix + tier for tier in tiers]:
        netns.add_namespace(name)
        state["namespaces"].append(name)
        progress(f"namespace {name}")
    netns.add_bridge(lan, "br0")
    _stall_point("namespaces")
    for tier in tiers:
        ns, port = prefix + tier, f"p-{tier}"
        netns.add_veth("eth0", ns, port, lan)
        netns.attach_to_bridge(lan, port, "br0")
        netns.add_address(ns, "eth0", f"{address_of(tier)}/24")
        netns.link_up(ns, "eth0")
        netns.link_up(lan, port)
        progress(f"veth {ns}:eth0 <-> {lan}:{port} ({address_of(tier)})")
    _stall_point("links")
    points = shape_points(prefix, config.edge_nodes, config.bandwidth_bps)
    for ns, dev in dict.fromkeys((p["ns"], p["dev"]) for p in points):
        netns.add_htb_root(ns, dev, DEFAULT_CLASS)
    for point in points:
        bps = config.bandwidth_bps[point["link"]]
        queue = max(20, int(bps * config.queue_s / 8 / 1500))
        netns.add_htb_class(point["ns"], point["dev"], point["minor"], bps, queue)
        if "match" in point:
            netns.add_u32_filter(point["ns"], point["dev"], *point["match"], point["minor"])
    state["shape_points"] = points
    progress("shaped " + ", ".join(f"{link} {bps / 1e6:g} Mbit/s" for link, bps in config.bandwidth_bps.items()))


def _make_cgroups(config: TestbedConfig, state: dict, progress) -> None:
    quotas = {"device": config.device_cpu, "cloud": config.cloud_cpu}
    quotas.update({f"edge{k}": cpus for k, cpus in enumerate(config.edge_cpu, start=1)})
    for tier, cpus in quotas.items():
        cgroups.create(config.prefix + tier, cpus)
        state["cgroups"][config.prefix + tier] = cpus
    progress("cpu quotas " + ", ".join(f"{t} {c if c else 'unlimited'}" for t, c in quotas.items()))


def start_in_tier(prefix: str, tier: str, command: list[str], log_path: Path) -> subprocess.Popen:
    """Run ``command`` inside the tier's namespace and CPU cgroup, detached (own session), logging to a file."""
    log = open(log_path, "ab")
    env = dict(os.environ, D3_TESTBED_TIER=tier, PYTHONUNBUFFERED="1")
    try:
        return subprocess.Popen(netns.in_ns(prefix + tier, command), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                preexec_fn=cgroups.joiner(prefix + tier))
    finally:
        log.close()


def _daemon_command(template: str, config_path: str, node: str = "") -> list[str]:
    words = shlex.split(template.format(config=config_path, node=node))
    if words and words[0] == "d3":  # the d3 of this installation, not whatever is first on PATH
        words[0] = str(Path(sys.executable).with_name("d3"))
    return words


def _start_daemons(config: TestbedConfig, state: dict, run_dir: Path, progress) -> None:
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.cluster_config or str(run_dir / "cluster.toml")
    jobs = [("cloud", _daemon_command(config.cloud_command, config_path))]
    jobs += [(f"edge{k}", _daemon_command(config.edge_command, config_path, f"edge{k}"))
             for k in range(1, config.edge_nodes + 1)]
    for tier, command in jobs:
        log_path = log_dir / f"{tier}.log"
        proc = start_in_tier(config.prefix, tier, command, log_path)
        state["daemons"].append({"tier": tier, "pid": proc.pid, "command": command, "log": str(log_path)})
    time.sleep(1.0)  # a daemon that cannot start usually dies within a second: say so now
    for daemon in state["daemons"]:
        alive = _alive(daemon["pid"])
        daemon["alive_at_start"] = alive
        progress(f"{daemon['tier']}: {' '.join(daemon['command'])} (pid {daemon['pid']})"
                 + ("" if alive else f"  EXITED at once, see {daemon['log']}"))
    _stall_point("daemons")


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def up(config: TestbedConfig, progress=print) -> dict:
    """Build the testbed; on any failure remove what was made and re-raise."""
    prefix = config.prefix
    if netns.list_namespaces(prefix) or cgroups.list_groups(prefix):
        raise OSError(f"a testbed with prefix {prefix!r} already exists; run `d3 testbed down` first")
    run_dir = run_dir_for(prefix)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"prefix": prefix, "status": "starting", "started_at": time.time(), "config": asdict(config),
             "namespaces": [], "cgroups": {}, "shape_points": [], "daemons": [],
             "addresses": {tier: address_of(tier) for tier in tier_names(config.edge_nodes)},
             "rates_bps": dict(config.bandwidth_bps), "cluster_config": config.cluster_config
             or str(run_dir / "cluster.toml"), "run_dir": str(run_dir)}
    state_path = state_path_for(prefix)
    _save_state(state_path, state)
    try:
        _build_network(config, state, progress)
        _save_state(state_path, state)
        _make_cgroups(config, state, progress)
        if config.cluster_config is None:
            write_cluster_toml(run_dir / "cluster.toml", config.edge_nodes)
        if config.start_daemons:
            _start_daemons(config, state, run_dir, progress)
        state["status"] = "up"
        _save_state(state_path, state)
    except BaseException:
        down(prefix, progress=lambda line: None)
        raise
    return state


def _kill_all(pids: set[int], grace_s: float = 3.0) -> None:
    own = os.getpid()
    pids.discard(own)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pids.discard(pid)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 1.0)
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if _alive(pid)}
            time.sleep(0.05)
        if not pids:
            return


def down(prefix: str = DEFAULT_PREFIX, progress=print) -> dict:
    """Remove every namespace and cgroup named with ``prefix`` and every process inside them. Works from
    the names alone, so it also cleans up after a crash or a lost state file."""
    check_prefix(prefix)
    namespaces = netns.list_namespaces(prefix)
    groups = cgroups.list_groups(prefix)
    pids = {pid for name in namespaces for pid in netns.namespace_pids(name)}
    pids |= {pid for name in groups for pid in cgroups.pids(name)}
    state = None
    try:
        state = load_state(prefix)
    except ValueError:
        pass
    if state:
        pids |= {d["pid"] for d in state.get("daemons", []) if _alive(d["pid"])}
    _kill_all(pids)
    for name in namespaces:
        netns.delete_namespace(name)
    for name in groups:
        cgroups.remove(name)
    state_path_for(prefix).unlink(missing_ok=True)
    shutil.rmtree(run_dir_for(prefix), ignore_errors=True)
    removed = {"namespaces": namespaces, "cgroups": groups, "processes": sorted(pids)}
    progress(f"removed {len(namespaces)} namespaces, {len(groups)} cgroups, {len(pids)} processes")
    return removed


def status(prefix: str = DEFAULT_PREFIX) -> dict:
    """What exists now (from the system, not only the state file), with live link rates and counters."""
    check_prefix(prefix)
    state = load_state(prefix) or {}
    namespaces = netns.list_namespaces(prefix)
    report = {"prefix": prefix, "status": state.get("status", "up" if namespaces else "down"),
              "namespaces": namespaces, "cgroups": {}, "links": {}, "daemons": []}
    for name in cgroups.list_groups(prefix):
        report["cgroups"][name] = cgroups.quota_cpus(name)
    for point in state.get("shape_points", []):
        if point["ns"] not in namespaces:
            continue
        stats = netns.htb_class_stats(point["ns"], point["dev"]).get(point["minor"], {})
        report["links"].setdefault(point["link"], []).append(
            {"at": f"{point['ns']}:{point['dev']}", "rate": stats.get("rate"), "sent_bytes": stats.get("sent_bytes")})
    for daemon in state.get("daemons", []):
        report["daemons"].append({**daemon, "alive": _alive(daemon["pid"])})
    return report


def set_link_rate(prefix: str, link: str, bps: float, state: dict | None = None) -> int:
    """Change a link's rate on every interface that carries it; returns how many classes changed."""
    state = state or load_state(prefix)
    if not state:
        raise OSError(f"no testbed state for prefix {prefix!r} ({state_path_for(prefix)}); run `d3 testbed up`")
    points = [p for p in state["shape_points"] if p["link"] == link]
    if not points:
        raise ValueError(f"link {link!r} is not shaped in this testbed; shaped: "
                         f"{', '.join(sorted({p['link'] for p in state['shape_points']}))}")
    for point in points:
        netns.change_htb_rate(point["ns"], point["dev"], point["minor"], bps)
    return len(points)


def link_sent_bytes(prefix: str, link: str, state: dict) -> int:
    """Bytes sent so far on the link, summed over its shaping points (both directions)."""
    total = 0
    for point in (p for p in state["shape_points"] if p["link"] == link):
        total += int(netns.htb_class_stats(point["ns"], point["dev"]).get(point["minor"], {}).get("sent_bytes", 0))
    return total


# --- an iperf-like probe: one TCP transfer between two tiers ----------------------------------------
PROBE_PORT = 5201


def _receive(port: int) -> None:
    """Accept one connection, read to EOF, answer with the byte count (8 bytes, big endian)."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            total = 0
            while chunk := conn.recv(1 << 16):
                total += len(chunk)
            conn.sendall(total.to_bytes(8, "big"))


def _send(host: str, port: int, nbytes: int) -> None:
    """Send ``nbytes`` and print the seconds from connect to the receiver's acknowledgement."""
    payload = bytes(1 << 16)
    with socket.create_connection((host, port), timeout=120) as conn:
        start = time.monotonic()
        left = nbytes
        while left > 0:
            left -= conn.send(payload[:min(left, len(payload))])
        conn.shutdown(socket.SHUT_WR)
        received = int.from_bytes(conn.recv(8), "big")
        elapsed = time.monotonic() - start
    print(json.dumps({"bytes": received, "seconds": elapsed}), flush=True)


def probe_transfer(prefix: str, source: str, target: str, nbytes: int, timeout_s: float = 120) -> dict:
    """Push ``nbytes`` over TCP from tier ``source`` to tier ``target`` through the shaped links;
    returns bytes, seconds and the goodput in bit/s."""
    here = [sys.executable, "-m", "deploy.testbed"]
    receiver = subprocess.Popen(netns.in_ns(prefix + target, [*here, "recv", str(PROBE_PORT)]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if receiver.stdout.readline().strip() != "listening":
            raise OSError(f"probe receiver in {prefix + target} did not start: {receiver.stderr.read().strip()}")
        sender = subprocess.run(netns.in_ns(prefix + source, [*here, "send", address_of(target), str(PROBE_PORT),
                                                             str(nbytes)]),
                                capture_output=True, text=True, timeout=timeout_s)
        if sender.returncode != 0:
            raise OSError(f"probe sender in {prefix + source} failed: {sender.stderr.strip().splitlines()[-1:]}")
        result = json.loads(sender.stdout)
    finally:
        receiver.kill()
        receiver.wait()
    result["goodput_bps"] = result["bytes"] * 8 / result["seconds"]
    return result


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        _receive(int(sys.argv[2]))
    elif sys.argv[1] == "send":
        _send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

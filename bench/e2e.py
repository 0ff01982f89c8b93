"""End-to-end benchmark on the namespace testbed: D3 against the baselines under real bandwidth traces.

    sudo .venv/bin/python bench/e2e.py [--models resnet18,...] [--requests N] [--quick]

For every model, scenario (an LTE and a 3G Mahimahi uplink trace from ../shared/traces/mahimahi) and
strategy, a device client inside the testbed's device namespace (and, once set up, inside its 0.2-CPU
cgroup) sends a stream of requests across the htb-shaped veth links to the edge daemons (3 nodes, 0.5 CPU
each) and the cloud daemon (1 CPU), while this process plays the scenario's traces onto the links with
`tc class change` (traces.replay.TcApplier), restarted at the same trace time for every strategy.

Topologies (--topology), i.e. which links the scenario's cellular uplink trace drives:
  local-edge (default): the edge cluster sits next to the device on a local wireless link (the shipped
    ``wifi-home`` trace, as in the D3 paper's setting: device and edge nodes on one WLAN, e.g. in a vehicle
    or a building) and the cloud is reached over the cellular uplink: the trace drives edge-cloud and
    device-cloud.
  mec: the edge is behind the radio (mobile edge computing at the base station): the trace drives
    device-edge and device-cloud, edge-cloud follows the shipped ``backbone`` trace. With a 3G uplink of
    ~1 Mbit/s the 4.8 Mbit input costs ~5 s on any offloading path, so every strategy runs on the device.
Strategies: d3 (incremental re-partitioning from the bandwidth the device measures, edge tiled over the
3 nodes), d3_fixed (the D3 plan made at the start and never changed), neurosurgeon, dads, device_only,
cloud_only (from partitioner.baselines on the same cost model). Every output is checked against the
local model.

Prints a table of median and p95 latency per model, scenario and strategy with ratios to D3 and the
re-partition count; writes bench/out/e2e.json and bench/out/e2e.png (latency and link bandwidth over
time per strategy). The device side runs as `python bench/e2e.py worker ...` (a JSON-lines protocol).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/e2e.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

TRACE_DIR = REPO_ROOT.parent / "shared" / "traces" / "mahimahi"
MODELS = ("resnet18", "resnet50", "vgg16", "googlenet", "mobilenet_v2")
STRATEGIES = ("d3", "d3_fixed", "neurosurgeon", "dads", "device_only", "cloud_only")
# scenario -> a cellular uplink trace in ../shared/traces/mahimahi
SCENARIOS = {"lte": "TMobile-LTE-short.up", "3g": "TMobile-UMTS-driving.up"}
# topology -> (links the scenario's trace drives, {other link: shipped trace})
TOPOLOGIES = {"local-edge": (("edge-cloud", "device-cloud"), {"device-edge": "wifi-home"}),
              "mec": (("device-edge", "device-cloud"), {"edge-cloud": "backbone"})}
LINKS = ("device-edge", "edge-cloud", "device-cloud")
PREFIX = "d3tbb-"
# CPU quotas: a device ~10x slower than the cloud (a phone CPU next to a server core), edge nodes 2x slower
DEVICE_CPU, EDGE_CPU, CLOUD_CPU, EDGE_NODES = 0.1, 0.5, 1.0, 3
# how D3's edge node spreads its segment: "auto" measures the best predicted splits and the unsplit segment
D3_EDGE_STRATEGY = "auto"
MIN_MBPS = 0.1  # an outage of exactly 0 stalls TCP for good; Mahimahi traces have such seconds
TAG = "@@"  # protocol lines from the worker start with this; anything else is its log


# ----------------------------------------------------------------------------------------- traces
def scenario_traces(scenario: str, topology: str = "local-edge", trace_dir: Path = TRACE_DIR) -> dict:
    """testbed link name -> BandwidthTrace for a scenario (an uplink trace name or a path) and topology."""
    from traces.formats import resolve_trace

    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
    spec = SCENARIOS.get(scenario, scenario)
    path = Path(spec) if Path(spec).is_file() else trace_dir / spec
    if not path.is_file():
        raise FileNotFoundError(f"scenario {scenario!r}: trace {path} not found (see ../shared/traces/README.md)")
    uplink = resolve_trace(str(path)).clipped(MIN_MBPS, None)
    cellular_links, shipped = TOPOLOGIES[topology]
    return {**{link: uplink for link in cellular_links}, **{link: resolve_trace(name) for link, name in shipped.items()}}


def window_mean_mbps(trace, duration_s: float) -> float:
    """Mean rate over the first ``duration_s`` seconds of trace time (what the run will play)."""
    return trace.bits_between(trace.start_s, trace.start_s + duration_s) / duration_s / 1e6


# ----------------------------------------------------------------------------------------- worker
def _emit(**fields) -> None:
    print(TAG, json.dumps(fields), flush=True)


@dataclass
class WorkerState:
    model: str
    graph: object
    x: object
    reference: object
    tiers: object
    cluster: object
    device_log: Path | None
    cgroup: str | None
    joined: bool = False
    machine: object = None  # this machine's per-node model at one thread (set by _prewarm)
    slowdowns: dict = field(default_factory=dict)  # each tier against it
    clients: dict = field(default_factory=dict)  # strategy -> its open Client, kept across a scenario's rounds


def _worker_setup(args) -> WorkerState:
    import torch

    from deploy.cluster import load_cluster
    from partitioner.graph import load_graph
    from partitioner.zoo import example_input
    from tiers.demo import calibrated_tiers

    torch.set_num_threads(1)
    graph = load_graph(args.model, (1, 3, args.input_size, args.input_size) if args.input_size else None)
    x = example_input(graph.input_shape)
    with torch.no_grad():
        reference = graph.module(x)
    # the planner's tier speeds: a first guess from the CPU quotas, replaced by _prewarm's measurements
    tiers = calibrated_tiers(graph, 1 / args.device_cpu, [1 / args.edge_cpu], 1 / args.cloud_cpu) if args.no_prewarm else None
    return WorkerState(args.model, graph, x, reference, tiers, load_cluster(args.cluster),
                       Path(args.device_log) if args.device_log else None, args.cgroup)


def _make_client(state: WorkerState, strategy: str, links):
    from tiers.cli import strategy_plan
    from tiers.device import Client

    weights = [1.0] * len(state.cluster.edges)
    plan = None if strategy in ("d3", "d3_fixed") else strategy_plan(state.graph, strategy, links, state.tiers, weights)
    return Client(state.model, edge=state.cluster.edges[0].address, cloud=state.cluster.cloud_url,
                  input_shape=state.graph.input_shape, plan=plan, links=links, tiers=state.tiers,
                  edge_weights=weights, repartition=strategy == "d3", timeout_s=900,
                  edge_strategy=D3_EDGE_STRATEGY if strategy in ("d3", "d3_fixed") else None)


def _plan_id(plan) -> str:
    """Which split a plan is (assignment + edge node count), to tell when two strategies ran the same."""
    import hashlib

    key = json.dumps([sorted(plan.assignment.items()), plan.edge_nodes if plan.nodes_on("edge") else 0])
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def _describe(plan) -> dict:
    import hashlib

    assignment = hashlib.sha1(json.dumps(sorted(plan.assignment.items())).encode()).hexdigest()[:8]
    return {"id": _plan_id(plan), "assignment": assignment, "version": plan.version, "strategy": plan.strategy, "edge_nodes": plan.edge_nodes,
            "tiers": {t: len(plan.nodes_on(t)) for t in ("device", "edge", "cloud")},
            "predicted_ms": round(plan.predicted_ms, 1)}


def _one_request(state: WorkerState, client, t0: float) -> dict:
    start = time.monotonic()
    output = client.infer(state.x)
    timing = client.timings[-1]
    record = {"t_s": round(start - t0, 3), "latency_ms": round(timing.total_s * 1e3, 2),
              "max_abs_diff": float((output - state.reference).abs().max()), "plan_version": timing.plan_version,
              "device_ms": round(timing.device_s * 1e3, 1), "edge_ms": round(timing.edge_s * 1e3, 1),
              "cloud_ms": round(timing.cloud_s * 1e3, 1), "edge_nodes": timing.edge_nodes,
              "links_ms": {k: round(v * 1e3, 1) for k, v in timing.links_s.items()},
              "bytes": timing.bytes, "edge_ran": timing.edge_strategy, "estimate_mbps": {k: round(v / 1e6, 3) for k, v in client.links.bps.items()}}
    if state.device_log is not None:  # what the device measured, for `d3 replay --device-log`
        with open(state.device_log, "a") as log:
            log.write(json.dumps({"time": time.monotonic(), "estimate_bps": client.links.bps}) + "\n")
    return record


def _run_strategy(state: WorkerState, command: dict) -> None:
    """One stream (or one round of it: with ``keep`` the client, and all D3 has learned, stays open for the
    strategy's next round, as a deployed client would)."""
    from partitioner.cost import Links

    strategy = command["strategy"]
    client = state.clients.pop(strategy, None)
    if client is None:
        client = _make_client(state, strategy, Links.mbps(*command["links_mbps"]))
        # warm-up: every tier builds this plan's segments (and the edge its tiling) once, unmeasured
        client.infer(state.x)
    try:
        _emit(event="warm", plan=_describe(client.plan))
        go = json.loads(sys.stdin.readline())
        t0, deadline = go["t0"], go["t0"] + command["max_s"]
        repartitions0 = _repartitions(client)
        prober = IdleProber(client) if strategy == "d3" else None
        plans_used = []
        for index in range(command["requests"]):
            if index >= command["min_requests"] and time.monotonic() > deadline:
                break
            if prober is not None:
                prober.maybe_probe()
            plans_used.append(_plan_id(client.plan))
            _emit(event="request", **_one_request(state, client, t0))
        _emit(event="done", repartitions=_repartitions(client) - repartitions0, plan=_describe(client.plan),
              plans_used=sorted(set(plans_used)), probes=prober.probes if prober else 0)
    except BaseException:
        client.close()
        raise
    if command.get("keep"):
        state.clients[strategy] = client
    else:
        client.close()


def _release_clients(state: WorkerState) -> None:
    while state.clients:
        state.clients.popitem()[1].close()


def _join_device_cgroup(state: WorkerState) -> None:
    """`ip netns exec` hides the host's /sys/fs/cgroup: the orchestrator moves us into the device's cgroup;
    from then on the device is as slow as its quota."""
    _emit(event="join", pid=os.getpid(), cgroup=state.cgroup)
    sys.stdin.readline()
    state.joined = True


DEVICE_CALIBRATION_MS = 20.0  # of this machine's unthrottled time: ~200 ms on a 0.1-CPU device


def _calibrate_device(state: WorkerState, device_cpu: float) -> dict:
    """The device's speed measured under its quota, as a deployment calibrates a tier where it runs: a
    prefix of the model (about ``DEVICE_CALIBRATION_MS`` at full speed) runs on the device through the
    runtime, the rest on one edge node. The quota alone said 10x for a 0.1-CPU device; measured it was
    15-20x (a throttled process also finds its caches cold), and a planner told 10x put mobilenet_v2's first
    32 nodes on the device, where they took 600-900 ms instead of ~400. Every strategy plans with this."""
    import statistics as stats

    from partitioner.cost import TierModels
    from partitioner.plan import Plan
    from tiers.device import Client

    machine = state.machine
    node_s = machine.node_seconds(state.graph)
    prefix, prefix_s = [], 0.0
    for name in state.graph.order:
        if prefix_s >= DEVICE_CALIBRATION_MS / 1e3 and len(prefix) < len(state.graph.order) - 1:
            break
        prefix.append(name)
        prefix_s += node_s.get(name, 0.0)
    on_device = set(prefix)
    plan = Plan(state.model, tuple(state.graph.input_shape),
                {n: "device" if n in on_device else "edge" for n in state.graph.order},
                edge_weights=[1.0], strategy="calibrate_device")
    with Client(state.model, edge=state.cluster.edges[0].address, cloud=state.cluster.cloud_url,
                plan=plan, timeout_s=300) as client:
        for _ in range(3):
            client.infer(state.x)
        measured_s = stats.median(t.device_s for t in client.timings[-2:])
    slowdowns = dict(state.slowdowns, device=measured_s / prefix_s)
    state.slowdowns = slowdowns
    state.tiers = TierModels(device=machine.scaled(slowdowns["device"]), edge=machine.scaled(slowdowns["edge"]),
                             cloud=machine.scaled(slowdowns["cloud"]))
    return {"device_prefix_nodes": len(prefix), "device_prefix_ms": round(measured_s * 1e3, 1),
            "slowdowns": {k: round(v, 2) for k, v in slowdowns.items()},
            "device_quota_said": round(1 / device_cpu, 2)}


def _repartitions(client) -> int:
    repartitioner = getattr(client.planner, "repartitioner", None)
    return repartitioner.repartitions if repartitioner is not None else 0


def _prewarm(state: WorkerState, device_cpu: float) -> dict:
    """Every edge node and the cloud load the model once (a deployment preloads its models), and their
    measured compute times calibrate the planner: on a shared machine CPU contention, not the cgroup quota,
    sets the servers' speed, and a planner that believes the quotas picks the wrong tier. The edge's
    per-node speed comes from the whole model on *one* node, as the baselines run it: the tiled run (also
    measured, and reported) includes the split's own costs, and a per-node speed taken from it made the
    baselines believe an edge node 1.5-3x slower than it is."""
    import statistics as stats

    from partitioner.cost import TierModels
    from partitioner.plan import Plan
    from tiers import demo
    from tiers.device import Client

    weights = [1.0] * len(state.cluster.edges)
    measured = {}
    for label, tier, edge_weights in (("edge", "edge", [1.0]), ("edge_split", "edge", weights), ("cloud", "cloud", [1.0])):
        plan = Plan(state.model, tuple(state.graph.input_shape), {n: tier for n in state.graph.order},
                    edge_weights=edge_weights, strategy=f"warmup_{label}", edge_strategy=D3_EDGE_STRATEGY)
        with Client(state.model, edge=state.cluster.edges[0].address, cloud=state.cluster.cloud_url,
                    plan=plan, timeout_s=300) as client:
            for _ in range(3 if label != "edge_split" else 2 + 6):  # auto tries its candidates first
                client.infer(state.x)
            measured[label] = stats.median(getattr(t, f"{tier}_s") for t in client.timings[-2:])
            if label == "edge_split":
                measured["edge_split_ran"] = client.timings[-1].edge_strategy
    # this machine's per-node speed at one thread (the runtime's calibration; renamed once already)
    machine = (getattr(demo, "machine_model", None) or getattr(demo, "machine_flop_model"))(state.graph)
    machine_s = sum(machine.node_seconds(state.graph).values())
    slowdowns = {"device": 1 / device_cpu, "edge": measured["edge"] / machine_s, "cloud": measured["cloud"] / machine_s}
    state.tiers = TierModels(device=machine.scaled(slowdowns["device"]), edge=machine.scaled(slowdowns["edge"]),
                             cloud=machine.scaled(slowdowns["cloud"]))
    state.machine, state.slowdowns = machine, slowdowns
    return {"machine_ms": round(machine_s * 1e3, 1), "edge_one_node_ms": round(measured["edge"] * 1e3, 1),
            f"edge_{len(weights)}_nodes_ms": round(measured["edge_split"] * 1e3, 1),
            "edge_split_ran": measured["edge_split_ran"], "cloud_ms": round(measured["cloud"] * 1e3, 1),
            "slowdowns": {k: round(v, 2) for k, v in slowdowns.items()}}


class IdleProber:
    """While the plan keeps everything on the device, no transfer measures the link, so the re-partitioner
    could never learn that offloading pays again: between two requests, at most every ``period_s``, probe
    the device-edge link (Client.probe feeds the estimate and re-plans). Between requests, not beside them:
    on a 0.1-CPU device a concurrent probe and re-plan visibly slow the request they overlap."""

    def __init__(self, client, period_s: float = 1.0, nbytes: int = 64 * 1024):
        self.client, self.period_s, self.nbytes = client, period_s, nbytes
        self.last = time.monotonic()
        self.probes = 0

    def maybe_probe(self) -> None:
        plan = self.client.plan
        if plan.nodes_on("edge") or plan.nodes_on("cloud") or time.monotonic() - self.last < self.period_s:
            return  # requests measure the links themselves, or probed recently
        self.last = time.monotonic()
        try:
            self.client.probe(self.nbytes)
            self.probes += 1
        except Exception:  # a lost probe only delays adaptation
            pass


def run_worker(args) -> int:
    state = _worker_setup(args)
    calibration = {} if args.no_prewarm else _prewarm(state, args.device_cpu)
    if state.cgroup:
        _join_device_cgroup(state)
        if not args.no_prewarm:
            calibration.update(_calibrate_device(state, args.device_cpu))
    _emit(event="ready", shape=list(state.graph.input_shape), calibration=calibration)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("cmd") == "quit":
            break
        if command.get("cmd") == "release":  # the scenario's rounds are over
            _release_clients(state)
            continue
        try:
            _run_strategy(state, command)
        except Exception as exc:  # report and carry on with the next strategy
            _emit(event="error", error=f"{type(exc).__name__}: {exc}")
    return 0


# ----------------------------------------------------------------------------------------- orchestrator
@dataclass
class RunResult:
    model: str
    scenario: str
    strategy: str
    topology: str = "local-edge"
    requests: list[dict] = field(default_factory=list)
    bandwidth: list[dict] = field(default_factory=list)  # replay steps: wall_s, set_bps
    repartitions: int = 0
    plan: dict = field(default_factory=dict)
    plans_used: list = field(default_factory=list)  # plan ids the requests ran with
    probes: int = 0
    error: str | None = None

    def latencies(self) -> list[float]:
        return [r["latency_ms"] for r in self.requests]

    @property
    def median_ms(self) -> float:
        values = self.latencies()
        return statistics.median(values) if values else float("nan")

    @property
    def p95_ms(self) -> float:
        values = sorted(self.latencies())
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


class Worker:
    """The device process inside the testbed's device namespace, driven over stdin/stdout."""

    def __init__(self, model: str, state: dict, log_path: Path, cpus: tuple[float, float, float], input_size: int = 0):
        command = [sys.executable, str(Path(__file__).resolve()), "worker", "--model", model,
                   "--input-size", str(input_size),
                   "--cluster", state["cluster_config"], "--cgroup", PREFIX + "device",
                   "--device-cpu", str(cpus[0]), "--edge-cpu", str(cpus[1]), "--cloud-cpu", str(cpus[2]),
                   "--device-log", str(Path(state["run_dir"]) / "device-links.jsonl")]
        from deploy import netns

        self.log = open(log_path, "a")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(netns.in_ns(PREFIX + "device", command), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        message = self.read()
        if message.get("event") == "join":  # put the device process into the device's cgroup
            from deploy import cgroups

            cgroups.add_pid(message["cgroup"], message["pid"])
            self.send(joined=True)
            message = self.read()
        if message.get("event") != "ready":
            raise RuntimeError(message.get("error", f"device worker said {message} while 'ready' was expected"))
        self.calibration = message["calibration"]

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"device worker exited (status {self.process.wait()}); see {self.log.name}")
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
            self.log.write(line)

    def expect(self, event: str) -> dict:
        message = self.read()
        if message.get("event") == "error":
            raise RuntimeError(message["error"])
        if message.get("event") != event:
            raise RuntimeError(f"device worker said {message} while {event!r} was expected")
        return message

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send(cmd="quit")
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def round_share(total: int, rounds: int, index: int) -> int:
    """Round ``index``'s part of ``total`` requests: the parts add up to ``total`` (3 over 2 rounds: 2 + 1)."""
    return -(-total * (index + 1) // rounds) - -(-total * index // rounds)


def run_one(worker: Worker, model: str, scenario: str, strategy: str, traces: dict, opts,
            round_index: int = 0) -> RunResult:
    """One strategy's stream, or its round ``round_index`` of ``opts.rounds``: round k plays the k-th slice
    of the trace window, so a strategy's rounds together play the same trace seconds as one long stream."""
    from traces.replay import TcApplier, replay

    result = RunResult(model, scenario, strategy, opts.topology)
    round_s = opts.max_s / opts.rounds
    window_s = round_s * opts.speed  # trace seconds one round plays
    # twice the window: a request still running at the round's end keeps seeing the trace, not a frozen rate
    round_traces = {link: trace.window(round_index * window_s, 2 * window_s) for link, trace in traces.items()}
    # the plans (baselines plan once, D3 starts from it) see the mean over the whole stream, as without rounds
    plan_mbps = [window_mean_mbps(traces[link], opts.max_s * opts.speed) for link in LINKS]
    applier = TcApplier(PREFIX)
    for link in LINKS:
        applier.apply(link, window_mean_mbps(round_traces[link], window_s) * 1e6)  # warm-up at the round's mean
    worker.send(cmd="run", strategy=strategy, links_mbps=plan_mbps,
                requests=round_share(opts.requests, opts.rounds, round_index),
                min_requests=round_share(opts.min_requests, opts.rounds, round_index), max_s=round_s,
                keep=opts.rounds > 1)
    try:
        message = worker.read()
        if message.get("event") != "warm":
            raise RuntimeError(message.get("error", f"unexpected {message}"))
    except RuntimeError as exc:
        result.error = str(exc)
        return result
    stop = threading.Event()
    t0 = time.monotonic()
    player = threading.Thread(target=lambda: result.bandwidth.extend(
        r.to_dict() for r in replay(round_traces, applier, opts.step_s, opts.speed, None, None, stop)), daemon=True)
    player.start()
    worker.send(t0=t0)
    while True:
        message = worker.read()
        if message["event"] == "request":
            result.requests.append(message)
            if not opts.quiet:
                print(f"    {strategy:<13} t={message['t_s']:6.1f}s {message['latency_ms']:8.0f} ms  plan v"
                      f"{message['plan_version']}  est d>e {message['estimate_mbps'].get('device_edge', 0):6.2f} "
                      f"Mbit/s", flush=True)
        elif message["event"] == "done":
            result.repartitions, result.plan = message["repartitions"], message["plan"]
            result.plans_used, result.probes = message.get("plans_used", []), message.get("probes", 0)
            break
        else:
            result.error = message.get("error", str(message))
            break
    stop.set()
    player.join(10)
    return result


def merge_round(total: RunResult, part: RunResult, shift_s: float, round_index: int) -> None:
    """Add one round's requests to the strategy's result, on one time axis (round k starts at k x round)."""
    total.requests.extend(dict(q, t_s=round(q["t_s"] + shift_s, 3), round=round_index) for q in part.requests)
    total.bandwidth.extend(dict(b, wall_s=b["wall_s"] + shift_s) for b in part.bandwidth)
    total.repartitions += part.repartitions
    total.plan = part.plan or total.plan
    total.plans_used = sorted(set(total.plans_used) | set(part.plans_used))
    total.probes += part.probes
    total.error = total.error or part.error


def run_scenario(worker: Worker, model: str, scenario: str, traces: dict, opts, on_part=lambda partial: None) -> list[RunResult]:
    """Every strategy's stream on one scenario, split into ``opts.rounds`` rounds in alternating order
    (d3 first, then d3 last, ...): the host's speed drifts by 5-10% over minutes, and a strategy whose whole
    stream fell into a slow stretch once lost a cell it wins otherwise."""
    merged = {s: RunResult(model, scenario, s, opts.topology) for s in opts.strategies}
    round_s = opts.max_s / opts.rounds
    for index in range(opts.rounds):
        order = opts.strategies if index % 2 == 0 else opts.strategies[::-1]
        for strategy in order:
            started = time.monotonic()
            part = run_one(worker, model, scenario, strategy, traces, opts, index)
            merge_round(merged[strategy], part, index * round_s, index)
            rounds = f" round {index + 1}/{opts.rounds}" if opts.rounds > 1 else ""
            print(f"  {model} {scenario} {strategy}{rounds}: {len(part.requests)} requests, median "
                  f"{part.median_ms:.0f} ms, {time.monotonic() - started:.0f} s"
                  + (f"; error {part.error}" if part.error else ""), flush=True)
            on_part(list(merged.values()))
    if opts.rounds > 1:
        worker.send(cmd="release")
    return list(merged.values())


def check_outputs(results: list[RunResult]) -> float:
    """The largest |output - local model| over every request of every run."""
    diffs = [r["max_abs_diff"] for result in results for r in result.requests]
    return max(diffs) if diffs else 0.0


# ----------------------------------------------------------------------------------------- reporting
def format_table(results: list[RunResult]) -> str:
    lines = [f"{'model':<13} {'scenario':<8} {'strategy':<13} {'n':>3} {'median ms':>10} {'p95 ms':>9} "
             f"{'vs d3':>7} {'reparts':>7}  final plan (device/edge/cloud nodes, edge xN)"]
    by_key = {(r.model, r.scenario, r.strategy): r for r in results}
    for model, scenario in dict.fromkeys((r.model, r.scenario) for r in results):
        d3 = by_key.get((model, scenario, "d3"))
        for strategy in STRATEGIES:
            r = by_key.get((model, scenario, strategy))
            if r is None:
                continue
            ratio = f"{r.median_ms / d3.median_ms:.2f}x" if d3 and d3.requests and r.requests else "-"
            tiers = r.plan.get("tiers", {})
            plan = (f"{tiers.get('device', '?')}/{tiers.get('edge', '?')}/{tiers.get('cloud', '?')} "
                    f"x{r.plan.get('edge_nodes', '?')}" if tiers else "")
            lines.append(f"{model:<13} {scenario:<8} {strategy:<13} {len(r.requests):>3} {r.median_ms:>10.0f} "
                         f"{r.p95_ms:>9.0f} {ratio:>7} {r.repartitions:>7}  {plan}"
                         + (f"  ERROR {r.error}" if r.error else ""))
    return "\n".join(lines)


def verdicts(results: list[RunResult]) -> list[str]:
    """Per (model, scenario): is D3's median below every baseline's? (d3_fixed, D3 with re-partitioning
    off, is an ablation, not a baseline: it is reported in the table, not judged here.)"""
    out = []
    by_key = {(r.model, r.scenario, r.strategy): r for r in results}
    baselines = [s for s in STRATEGIES if s not in ("d3", "d3_fixed")]
    for model, scenario in dict.fromkeys((r.model, r.scenario) for r in results):
        d3 = by_key.get((model, scenario, "d3"))
        others = {s: by_key[(model, scenario, s)].median_ms for s in baselines if (model, scenario, s) in by_key}
        if d3 is None or not others:
            continue
        best = min(others, key=others.get)
        won = d3.median_ms < others[best]
        same = d3.plans_used and by_key[(model, scenario, best)].plans_used == d3.plans_used or \
            _same_work(d3, by_key[(model, scenario, best)])
        why = "  [same work as D3: the difference is noise]" if same and not won else ""
        out.append(f"{model:<13} {scenario:<5} D3 {'beats every baseline' if won else 'does NOT beat ' + best} "
                   f"(d3 {d3.median_ms:.0f} ms, best baseline {best} {others[best]:.0f} ms){why}")
    return out


def _same_work(d3: RunResult, other: RunResult) -> bool:
    """D3's x3 plan with its edge running unsplit ("whole", auto's fallback) on most requests is the same
    work as a baseline's one-edge-node plan with the same assignment."""
    unsplit = [r for r in d3.requests if r.get("edge_ran") in ("whole", "")]
    return bool(d3.requests) and len(unsplit) > len(d3.requests) / 2 and \
        d3.plan.get("assignment") is not None and d3.plan.get("assignment") == other.plan.get("assignment") and \
        len(d3.plans_used) == 1


def plot(results: list[RunResult], path: Path, topology: str = "local-edge") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r.model, r.scenario) for r in results))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    colors = dict(zip(STRATEGIES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (model, scenario) in zip(axes[:, 0], panels):
        bandwidth = None
        for r in (r for r in results if (r.model, r.scenario) == (model, scenario)):
            if r.requests:
                ax.plot([q["t_s"] for q in r.requests], [q["latency_ms"] for q in r.requests], "o-", ms=3,
                        color=colors.get(r.strategy), label=f"{r.strategy} (median {r.median_ms:.0f} ms)")
            if r.bandwidth and (bandwidth is None or len(r.bandwidth) > len(bandwidth)):
                bandwidth = r.bandwidth
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        cellular_links, shipped = TOPOLOGIES[topology]
        ax.set_title(f"{model}, {scenario}: {SCENARIOS.get(scenario, scenario)} on {' and '.join(cellular_links)}; "
                     + ", ".join(f"{link} {name}" for link, name in shipped.items()))
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        if bandwidth:
            twin = ax.twinx()
            wall = [b["wall_s"] for b in bandwidth]
            for link, style in ((cellular_links[0], "-"), (next(iter(shipped)), ":")):
                twin.step(wall, [b["set_bps"][link] / 1e6 for b in bandwidth], where="post", color="gray",
                          linestyle=style, alpha=0.6, label=f"{link} set (Mbit/s)")
            twin.set_ylabel(f"link Mbit/s (solid {cellular_links[0]}, dotted {next(iter(shipped))})", color="gray")
            twin.set_yscale("log")
    axes[-1, 0].set_xlabel("wall time since the run started (s); traces fast-forwarded")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/e2e.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    worker = sub.add_parser("worker", help="(internal) the device side, run inside the device namespace")
    worker.add_argument("--model", required=True)
    worker.add_argument("--cluster", required=True)
    worker.add_argument("--cgroup", default=None)
    worker.add_argument("--device-cpu", type=float, default=DEVICE_CPU)
    worker.add_argument("--edge-cpu", type=float, default=EDGE_CPU)
    worker.add_argument("--cloud-cpu", type=float, default=CLOUD_CPU)
    worker.add_argument("--device-log", default=None)
    worker.add_argument("--input-size", type=int, default=0)
    worker.add_argument("--no-prewarm", action="store_true", help="plan from the CPU quotas, tiers start cold")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--scenarios", default="lte,3g",
                        help="comma-separated: lte, 3g, or a Mahimahi uplink trace file (default lte,3g)")
    parser.add_argument("--topology", default="local-edge", choices=sorted(TOPOLOGIES),
                        help="which links the cellular trace drives (default local-edge: edge-cloud and device-cloud; "
                             "mec: device-edge and device-cloud)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all six)")
    parser.add_argument("--requests", type=int, default=None,
                        help="at most this many requests per strategy stream (default 60, quick 30)")
    parser.add_argument("--max-s", type=float, default=None,
                        help="a strategy's stream lasts S wall seconds (default 24, quick 10)")
    parser.add_argument("--min-requests", type=int, default=3, help="even past --max-s (default 3)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="split each stream into this many rounds, strategies in alternating order, so that "
                             "a slow stretch of the host does not fall on one strategy (default 2; 1 with --quick)")
    parser.add_argument("--speed", type=float, default=None, help="trace fast-forward (default 4)")
    parser.add_argument("--step-s", type=float, default=1.0, help="trace seconds per tc change (default 1)")
    parser.add_argument("--input-size", type=int, default=0,
                        help="square input side in pixels (default: the model's own, 224 for most, 299 for inception)")
    parser.add_argument("--device-cpu", type=float, default=DEVICE_CPU, help=f"device CPU quota (default {DEVICE_CPU})")
    parser.add_argument("--edge-cpu", type=float, default=EDGE_CPU, help=f"per edge node (default {EDGE_CPU})")
    parser.add_argument("--cloud-cpu", type=float, default=CLOUD_CPU, help=f"cloud CPU quota (default {CLOUD_CPU})")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter streams (fits ~15 min for 5 models)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "out"), help="where e2e.json/e2e.png go")
    parser.add_argument("--keep-testbed", action="store_true", help="leave the testbed up afterwards")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    args = parser.parse_args(argv)
    if args.mode is None:
        args.requests = args.requests or (30 if args.quick else 60)
        args.max_s = args.max_s or (10.0 if args.quick else 24.0)
        args.speed = args.speed or 4.0
        args.rounds = args.rounds or (1 if args.quick else 2)
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [s for s in args.strategies if s not in STRATEGIES]
        if unknown:
            parser.error(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
        if args.requests < 1 or args.max_s <= 0 or args.speed <= 0 or args.rounds < 1:
            parser.error("--requests, --max-s, --speed and --rounds must be positive")
        if args.requests < args.rounds:
            parser.error(f"--requests {args.requests} cannot fill {args.rounds} rounds")
        if args.input_size and not 32 <= args.input_size <= 2048:
            parser.error(f"--input-size must be 32..2048 pixels, got {args.input_size}")
    return args


def run_bench(args) -> int:
    from tqdm import tqdm

    from deploy.testbed import TestbedConfig, down, refusal_reason, up
    from traces.replay import TcApplier

    reason = refusal_reason()
    if reason:
        print(f"bench/e2e.py: cannot run the testbed here: {reason}", file=sys.stderr)
        return 2
    # the testbed must come down however the bench ends: a background job inherits an ignored SIGINT,
    # and SIGTERM would skip the `finally` below
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # fail on a missing trace before anything starts
    traces = {s: scenario_traces(s, args.topology) for s in args.scenarios}
    cellular_link, (shipped_link, shipped_trace) = TOPOLOGIES[args.topology][0][0], *TOPOLOGIES[args.topology][1].items()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    down(PREFIX, progress=lambda line: None)
    state = up(TestbedConfig(edge_nodes=EDGE_NODES, device_cpu=args.device_cpu, edge_cpu=[args.edge_cpu] * EDGE_NODES,
                             cloud_cpu=args.cloud_cpu, prefix=PREFIX), progress=lambda line: None)
    print(f"testbed {PREFIX} up: device {args.device_cpu} CPU, {EDGE_NODES} edge nodes x {args.edge_cpu} CPU, cloud "
          f"{args.cloud_cpu} CPU; scenarios " + ", ".join(f"{s}: {SCENARIOS.get(s, s)} (mean "
          f"{t[cellular_link].mean_mbps:.2f} Mbit/s) on {' and '.join(TOPOLOGIES[args.topology][0])}"
          for s, t in traces.items()) + f"; {shipped_link} {shipped_trace}; traces x{args.speed:g}", flush=True)
    results: list[RunResult] = []
    runs = [(m, s, k) for m in args.models for s in args.scenarios for k in args.strategies]
    bar = tqdm(total=len(runs) * args.rounds, desc="e2e runs", unit="run", disable=not sys.stderr.isatty())

    def save(partial: list[RunResult]) -> None:
        bar.update(1)
        (out / "e2e.json").write_text(json.dumps([r.__dict__ for r in results + partial]))

    try:
        for model in args.models:
            fast = TcApplier(PREFIX)
            for link in LINKS:
                fast.apply(link, 1e9)  # the worker's pre-warm is setup, not measured
            worker = Worker(model, state, out / f"e2e-worker-{model}.log",
                            (args.device_cpu, args.edge_cpu, args.cloud_cpu), args.input_size)
            print(f"  {model}: measured calibration {worker.calibration}", flush=True)
            try:
                for scenario in args.scenarios:
                    results.extend(run_scenario(worker, model, scenario, traces[scenario], args, save))
            finally:
                worker.close()
    finally:
        bar.close()
        if not args.keep_testbed:
            down(PREFIX, progress=lambda line: None)
    print()
    print(format_table(results))
    print()
    for line in verdicts(results):
        print(line)
    plot(results, out / "e2e.png", args.topology)
    print(f"outputs: max abs diff to the local model {check_outputs(results):.1e}; wrote {out / 'e2e.json'} and "
          f"{out / 'e2e.png'}; bench took {time.monotonic() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "worker":
        return run_worker(args)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())

"""`d3 demo`: a cloud endpoint and N edge daemons as local processes on loopback, a device in this process,
links shaped by token buckets following traces (plus half the trace RTT per message), and tier speeds
emulated by documented factors.

Speeds: every tier computes for real on this machine at one torch thread, then sleeps until the call has
taken k x its thread CPU time (``tiers.runtime.timed_run``): by default the cloud k=2, each edge node k=6,
the device k=10. CPU time rather than wall time, so a tier's speed does not depend on the load of the
shared machine as long as that load slows it by less than k; sleeping keeps the CPU free, so N emulated
edge nodes on a 2-core machine still compute in parallel. The planner's latency models are calibrated the
same way at start-up: one timed pass of the model (CPU seconds per node) times each tier's k.

Default scenario: a 448x448 frame on a slow device, three moderately slow edge nodes on home Wi-Fi, a fast
cloud that the device reaches only over its own 3G uplink and the edge site over a wired backbone; see the
README for why.

Every strategy (D3 and the baselines) runs against the same running processes; all are warmed first,
then measured in rotating rounds so they sample the same stretch of the traces. The summary table
compares measured medians and checks every output against the local model.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The default scenario (see the module docstring): home Wi-Fi to the edge, the phone's 3G uplink straight
# to the cloud, and a wired backbone from the edge site to the cloud.
DEFAULT_LINKS = {"device_edge": "wifi-home", "edge_cloud": "backbone", "device_cloud": "3g-hsdpa"}
DEFAULT_SLOWDOWNS = {"device": 10.0, "edge": 6.0, "cloud": 2.0}
DEFAULT_RESOLUTION = 448
DEFAULT_STRATEGIES = ("d3", "device_only", "cloud_only", "neurosurgeon", "dads")
KNOWN_STRATEGIES = ("d3", "device_only", "edge_only", "cloud_only", "neurosurgeon", "dads", "d3_no_tiling")
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------- processes
PORT_RETRIES = 3


@dataclass
class LocalCluster:
    """Cloud + edge daemons as child processes on loopback; a context manager that always kills them."""

    cluster: object  # deploy.cluster.Cluster
    path: Path
    trace_start: float
    threads: int = 1
    extra_edge_args: list[str] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, edge_nodes: int = 3, edge_slowdown: float = 3.0, device_slowdown: float = 12.0,
               cloud_slowdown: float = 1.0, link_traces: dict[str, str] | None = None,
               workdir: str | None = None, **kwargs) -> "LocalCluster":
        from deploy.cluster import Cluster, EdgeNodeSpec

        edges = [EdgeNodeSpec(f"edge{i}", f"tcp://127.0.0.1:{free_port()}", edge_slowdown) for i in range(edge_nodes)]
        cluster = Cluster(f"http://127.0.0.1:{free_port()}", edges, cloud_slowdown, device_slowdown,
                          dict(link_traces or {}))
        directory = Path(workdir or tempfile.mkdtemp(prefix="d3-demo-"))
        path = directory / "cluster.toml"
        path.write_text(cluster.to_toml())
        return cls(cluster, path, time.monotonic(), **kwargs)

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "deploy.cli", *args, "--cluster", str(self.path),
                "--trace-start", repr(self.trace_start), "--threads", str(self.threads)]

    def _spawn(self, name: str, command: list[str]) -> None:
        log_path = self.path.parent / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(self.threads)}
        with open(log_path, "w") as log:
            self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                    cwd=REPO_ROOT, start_new_session=True)
        self.logs[name] = log_path

    def spawn_all(self) -> None:
        """Start every process without waiting for it (``wait_ready`` waits)."""
        self._spawn("cloud", self._command("cloud"))
        for spec in self.cluster.edges:
            self._spawn(spec.name, self._command("edge", "--name", spec.name, *self.extra_edge_args))

    def start(self, timeout_s: float = 60.0) -> "LocalCluster":
        """Spawn every process and wait until all are ready. A port that ``free_port`` found free can be
        taken before the daemon binds it (an outgoing connection's ephemeral port, seen in CI): then the
        cluster restarts on fresh ports, up to ``PORT_RETRIES`` times."""
        for attempt in range(PORT_RETRIES):
            self.spawn_all()
            try:
                self.wait_ready(timeout_s)
                return self
            except RuntimeError as exc:
                self.stop()
                if "Address already in use" not in str(exc) or attempt == PORT_RETRIES - 1:
                    raise
                self._move_to_fresh_ports()
        return self

    def _move_to_fresh_ports(self) -> None:
        import dataclasses

        edges = [dataclasses.replace(spec, address=f"tcp://127.0.0.1:{free_port()}") for spec in self.cluster.edges]
        self.cluster = dataclasses.replace(self.cluster, cloud_url=f"http://127.0.0.1:{free_port()}", edges=edges)
        self.path.write_text(self.cluster.to_toml())

    def wait_ready(self, timeout_s: float) -> None:
        """Until the cloud answers /healthz and every edge node sees all its peers."""
        import urllib.request

        deadline = time.monotonic() + timeout_s
        pending = {"cloud", *(e.name for e in self.cluster.edges)}
        while pending:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {process.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sorted(pending)} not ready after {timeout_s:.0f} s")
            if "cloud" in pending:
                try:
                    urllib.request.urlopen(self.cluster.cloud_url + "/healthz", timeout=1).read()
                    pending.discard("cloud")
                except OSError:
                    pass
            for spec in self.cluster.edges:
                if spec.name in pending:
                    status = edge_status(spec.address, timeout_s=1.0)
                    if status and len(status["alive"]) == len(self.cluster.edges):
                        pending.discard(spec.name)
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.logs[name].read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def edge_status(address: str, timeout_s: float = 2.0) -> dict | None:
    """Ask an edge node for its status (alive peers, metrics); None if it does not answer in time."""
    import zmq

    from tiers import wire
    from tiers.wire import Message

    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(address)
        dealer.send_multipart(wire.encode_frames(Message(kind="status", request_id="status")))
        if not dealer.poll(int(timeout_s * 1000)):
            return None
        return wire.decode_frames(dealer.recv_multipart()).meta
    finally:
        dealer.close()


# ------------------------------------------------------------------------------------- calibration
@dataclass
class MeasuredModel:
    """A LatencyModel from a timed pass of the model on this machine: each node's CPU seconds (the
    runtime's slowdown emulation stretches CPU time, so CPU time is what every tier's speed is based on),
    times this tier's slowdown ``k``."""

    seconds: dict[str, float]
    per_call_overhead_s: float = 1e-3
    k: float = 1.0

    def node_seconds(self, graph) -> dict[str, float]:
        return {name: self.seconds.get(name, 0.0) * self.k for name in graph.order}

    def scaled(self, slowdown: float) -> "MeasuredModel":
        return MeasuredModel(self.seconds, self.per_call_overhead_s, self.k * slowdown)


def measure_node_seconds(graph, repeats: int = 3) -> dict[str, float]:
    """CPU seconds of every work node of ``graph`` at this process's torch threads: the median over
    ``repeats`` timed passes (after one warm pass) of an fx Interpreter timing each node."""
    import torch
    import torch.fx

    from partitioner.zoo import example_input

    samples: dict[str, list[float]] = {name: [] for name in graph.order}

    class Timer(torch.fx.Interpreter):
        def run_node(self, node):
            start = time.thread_time()
            result = super().run_node(node)
            if node.name in samples:
                samples[node.name].append(time.thread_time() - start)
            return result

    x = example_input(graph.input_shape)
    with torch.no_grad():
        for _ in range(repeats + 1):
            Timer(graph.module).run(x)
    return {name: statistics.median(values[1:]) for name, values in samples.items() if len(values) > 1}


def machine_model(graph, repeats: int = 2) -> MeasuredModel:
    return MeasuredModel(measure_node_seconds(graph, repeats))


def calibrated_tiers(graph, device_slowdown: float, edge_slowdowns: list[float], cloud_slowdown: float = 1.0):
    """The planner's per-tier models, calibrated to this machine: one timed pass of the model (per node,
    CPU time), times each tier's emulated slowdown (``edge``: one edge node; weights scale the rest)."""
    from partitioner.cost import TierModels

    machine = machine_model(graph)
    return TierModels(device=machine.scaled(device_slowdown), edge=machine.scaled(statistics.mean(edge_slowdowns)),
                      cloud=machine.scaled(cloud_slowdown))


# ------------------------------------------------------------------------------------- printing
def format_timing(timing) -> str:
    links = " ".join(f"{k.replace('_', '>')} {v * 1e3:5.0f}" for k, v in timing.links_s.items())
    edge_strategy = getattr(timing, "edge_strategy", "") or "-"
    return (f"plan v{timing.plan_version:<2} {timing.strategy:<13} device {timing.device_s * 1e3:5.0f}  "
            f"edge {timing.edge_s * 1e3:5.0f} (x{timing.edge_nodes} {edge_strategy})  cloud {timing.cloud_s * 1e3:5.0f}  "
            f"links[{links or '-'}]  total {timing.total_s * 1e3:6.0f} ms")


def describe_plan(plan) -> str:
    counts = {tier: len(plan.nodes_on(tier)) for tier in ("device", "edge", "cloud")}
    return (f"{plan.strategy} v{plan.version}: device {counts['device']} / edge {counts['edge']} "
            f"(x{plan.edge_nodes}) / cloud {counts['cloud']} nodes, predicted {plan.predicted_ms:.0f} ms")


# ------------------------------------------------------------------------------------- the demo
def add_demo_command(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="cloud + N edge daemons + a device on this machine: D3 vs baselines")
    demo.add_argument("--model", default="resnet50", help="torchvision model (default resnet50)")
    demo.add_argument("--input", default=None, metavar="SHAPE",
                      help=f"input shape, e.g. 1x3x224x224 (default: the model's usual channels at "
                           f"{DEFAULT_RESOLUTION}x{DEFAULT_RESOLUTION}, a camera frame)")
    demo.add_argument("--edge-nodes", type=int, default=3, help="edge daemons to start (default 3)")
    demo.add_argument("--trace", default=DEFAULT_LINKS["device_edge"],
                      help=f"trace (builtin name or file) of the device-edge link (default {DEFAULT_LINKS['device_edge']})")
    demo.add_argument("--edge-cloud-trace", default=DEFAULT_LINKS["edge_cloud"],
                      help=f"trace of the edge-cloud WAN (default {DEFAULT_LINKS['edge_cloud']})")
    demo.add_argument("--device-cloud-trace", default=DEFAULT_LINKS["device_cloud"],
                      help=f"trace of the device-cloud link (default {DEFAULT_LINKS['device_cloud']})")
    demo.add_argument("--requests", type=int, default=5, help="measured requests per strategy (default 5)")
    demo.add_argument("--device-slowdown", type=float, default=DEFAULT_SLOWDOWNS["device"],
                      help=f"device k: x slower than this machine (default {DEFAULT_SLOWDOWNS['device']:g})")
    demo.add_argument("--edge-slowdown", type=float, default=DEFAULT_SLOWDOWNS["edge"],
                      help=f"edge node k (default {DEFAULT_SLOWDOWNS['edge']:g})")
    demo.add_argument("--cloud-slowdown", type=float, default=DEFAULT_SLOWDOWNS["cloud"],
                      help=f"cloud k (default {DEFAULT_SLOWDOWNS['cloud']:g})")
    demo.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                      help="comma-separated strategies to compare (default: D3 and the four baselines)")
    demo.add_argument("--quiet", action="store_true", help="only the summary table")
    from partitioner.edge_strategies.cli import add_edge_strategy_argument

    # tiles by default: the horizontal planner's edge costs are calibrated on real tiling plans, while `auto`
    # picks by an uncalibrated FLOP-rate model (measured on the daemons it chose the winner for 1 model of 4)
    add_edge_strategy_argument(demo, default="tiles")
    demo.set_defaults(handler=run_demo)


@dataclass
class StrategyResult:
    """What the summary table shows for one strategy."""

    plan: object  # Plan in force at the end
    latencies_s: list[float] = field(default_factory=list)
    max_abs_diff: float = 0.0
    same_top1: bool = True
    replans: int = 0
    same_as: str | None = None  # measured as this strategy, whose plan is the same

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1e3


def output_check(output, reference) -> tuple[float, bool]:
    """(max abs diff, same top-1 class) of one output against the local model's."""
    diff = float((output - reference).abs().max())
    same = bool((output.argmax(dim=-1) == reference.argmax(dim=-1)).all()) if reference.dim() >= 1 else True
    return diff, same


# The tiles reproduce the untiled kernels' rounding (partitioner/halo.py): a diff is 0 where the tiers run
# at the reference's thread count and ISA; 1e-5 absolute is what the issue allows otherwise.
MAX_ABS_DIFF = 1e-5


def tolerance(reference) -> float:
    """The largest max abs diff an output may have against the local model's (absolute, at any scale)."""
    return MAX_ABS_DIFF


def warm_client(client, x, max_requests: int = 6) -> None:
    """Unmeasured requests until the plan stays the same over two requests in a row (the first request of
    a plan makes every tier build its segments and tiling; D3 also re-plans from the first measured
    bandwidths), so the measured requests see neither a cold tier nor the initial guess of the links."""
    if client.repartition is False:
        # A fixed plan learns nothing from its links: warm its tiers without waiting on the device's
        # shaped links (a 2.4 MB input over the 3G trace alone takes ~10 s).
        shapers, client.shapers = client.shapers, {}
        try:
            client.infer(x)
        finally:
            client.shapers = shapers
        return
    steady = 0
    for _ in range(max_requests):
        version = client.plan.version
        client.infer(x)
        steady = steady + 1 if client.plan.version == version else 0
        if steady >= 2:
            return


def demo_input_shape(model: str) -> tuple[int, ...]:
    """The model's usual input at DEFAULT_RESOLUTION (image models), else its usual input."""
    from partitioner.zoo import default_input_shape

    shape = tuple(default_input_shape(model))
    return (*shape[:2], DEFAULT_RESOLUTION, DEFAULT_RESOLUTION) if len(shape) == 4 else shape


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from partitioner.graph import load_graph
    from partitioner.zoo import example_input, parse_shape
    from tiers.links import links_from_traces

    if args.edge_nodes < 1:
        raise ValueError("--edge-nodes must be at least 1")
    if args.requests < 1:
        raise ValueError("--requests must be at least 1")
    for name in ("device_slowdown", "edge_slowdown", "cloud_slowdown"):
        if not getattr(args, name) >= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (a tier cannot run faster than this machine)")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in KNOWN_STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(KNOWN_STRATEGIES)}")
    torch.set_num_threads(1)
    started = time.monotonic()
    link_traces = {"device_edge": args.trace, "edge_cloud": args.edge_cloud_trace,
                   "device_cloud": args.device_cloud_trace}
    links = links_from_traces(link_traces)  # also checks the trace names before anything starts
    shape = parse_shape(args.input) if args.input else demo_input_shape(args.model)
    graph = load_graph(args.model, shape)
    local = LocalCluster.create(args.edge_nodes, args.edge_slowdown, args.device_slowdown, args.cloud_slowdown,
                                link_traces)
    try:
        local.spawn_all()  # the tiers boot while this process computes the reference output
        x = example_input(graph.input_shape)
        with torch.no_grad():
            reference = graph.module(x)
        local.wait_ready(120.0)
        # calibrate once the tiers are idle: timed while they boot, the pass would measure their start-up
        tiers = calibrated_tiers(graph, args.device_slowdown, [args.edge_slowdown], args.cloud_slowdown)
        return _run_demo_on(args, local, graph, x, reference, links, tiers, link_traces, strategies, started)
    finally:
        local.stop()


def _run_demo_on(args, local, graph, x, reference, links, tiers, link_traces, strategies, started) -> int:
    from tiers.links import make_shapers

    weights = [1.0] * args.edge_nodes
    print(f"d3 demo: {args.model} {'x'.join(map(str, graph.input_shape))}, {args.edge_nodes} edge nodes, "
          f"links device-edge {args.trace} / edge-cloud {args.edge_cloud_trace} / device-cloud "
          f"{args.device_cloud_trace} (mean {links.device_edge_bps / 1e6:.0f} / {links.edge_cloud_bps / 1e6:.0f} / "
          f"{links.device_cloud_bps / 1e6:.0f} Mbit/s, RTT {links.device_edge_rtt_s * 1e3:.0f} / "
          f"{links.edge_cloud_rtt_s * 1e3:.0f} / {links.device_cloud_rtt_s * 1e3:.0f} ms), slowdowns device "
          f"x{args.device_slowdown:g} edge x{args.edge_slowdown:g} cloud x{args.cloud_slowdown:g}; "
          f"edge strategy {getattr(args, 'edge_strategy', None) or 'tiles'}; "
          f"model on this machine {sum(tiers.cloud.seconds.values()) * 1e3:.0f} ms CPU", flush=True)
    print(f"  started cloud + {args.edge_nodes} edge daemons and calibrated in {time.monotonic() - started:.1f} s "
          f"(logs in {local.path.parent})", flush=True)
    shapers = make_shapers(link_traces, local.trace_start)
    results = measure_strategies(args, graph, x, reference, strategies, local, links, tiers, weights, shapers)
    print_summary(results, reference, time.monotonic() - started)
    worst_ok = all(r.max_abs_diff <= tolerance(reference) and r.same_top1 for r in results.values())
    return 0 if worst_ok else 1


def measure_strategies(args, graph, x, reference, strategies, local, links, tiers, weights, shapers) -> dict:
    """Every strategy on the same running cluster: all warmed first, then the measured requests in rounds
    (one request per strategy per round, the order rotating), so all strategies sample the same stretch
    of the bandwidth traces and the same background load."""
    from tiers.cli import strategy_plan
    from tiers.device import Client

    clients, results = {}, {}
    try:
        for strategy in strategies:
            plan = strategy_plan(graph, strategy, links, tiers, weights)
            clients[strategy] = Client(args.model, edge=local.cluster.edges[0].address, cloud=local.cluster.cloud_url,
                                       input_shape=graph.input_shape, plan=plan, links=links, tiers=tiers,
                                       edge_weights=weights, slowdown=args.device_slowdown, shapers=shapers,
                                       edge_strategy=getattr(args, "edge_strategy", None))
        same_as = same_plan_as(clients)
        for strategy, client in clients.items():
            if strategy in same_as:
                continue
            if client.plan.nodes_on("edge") or client.plan.nodes_on("cloud"):
                warm_client(client, x)  # (a device-only plan has no remote tier to warm)
            results[strategy] = StrategyResult(client.plan)
            if not args.quiet:
                print(f"  warmed {describe_plan(client.plan)}", flush=True)
        measured = [s for s in strategies if s not in same_as]
        for round_index in range(args.requests):
            offset = round_index % len(measured)
            for strategy in measured[offset:] + measured[:offset]:
                client, result = clients[strategy], results[strategy]
                version = client.plan.version
                output = client.infer(x)
                diff, same = output_check(output, reference)
                result.max_abs_diff, result.same_top1 = max(result.max_abs_diff, diff), result.same_top1 and same
                timing = client.timings[-1]
                result.latencies_s.append(timing.total_s)
                result.plan = client.plan
                if not args.quiet:
                    print(f"    #{round_index} {format_timing(timing)}  diff {diff:.1e}", flush=True)
                if client.plan.version != version:  # re-planned: warm the new plan before it is measured
                    result.replans += 1
                    client.infer(x)
                    if not args.quiet:
                        print(f"       re-planned to {describe_plan(client.plan)} (warmed)", flush=True)
    finally:
        for client in clients.values():
            client.close()
    for strategy, twin in same_as.items():
        results[strategy] = dataclasses.replace(results[twin], plan=clients[strategy].plan, same_as=twin)
    return {s: results[s] for s in strategies}


def same_plan_as(clients: dict) -> dict[str, str]:
    """Fixed baseline plans identical to an earlier strategy's (same assignment and edge nodes): measured
    once, as the earlier strategy, since they are the same requests on the same system."""
    seen, same = {}, {}
    for strategy, client in clients.items():
        if client.repartition:  # D3 re-plans: always measured on its own
            continue
        key = (tuple(sorted(client.plan.assignment.items())), tuple(client.plan.edge_weights))
        if key in seen:
            same[strategy] = seen[key]
        else:
            seen[key] = strategy
    return same


def print_summary(results: dict, reference, elapsed_s: float) -> None:
    d3 = results["d3"].median_ms if "d3" in results else None
    print()
    print(f"{'strategy':<14} {'median ms':>10} {'vs d3':>7} {'max abs diff':>13} {'top-1':>6}  plan")
    for name, result in results.items():
        ratio = f"{result.median_ms / d3:.2f}x" if d3 else "-"
        print(f"{name:<14} {result.median_ms:>10.1f} {ratio:>7} {result.max_abs_diff:>13.2e} "
              f"{'same' if result.same_top1 else 'DIFF':>6}  "
              f"{describe_plan(result.plan)}{f'  (same plan as {result.same_as})' if result.same_as else ''}")
    others = {k: v.median_ms for k, v in results.items() if k != "d3"}
    if d3 is not None and others:
        best = min(others, key=others.get)
        verdict = "D3 is the fastest" if d3 <= others[best] else f"D3 is NOT the fastest ({best} is)"
    else:
        verdict = "summary"
    worst = max(r.max_abs_diff for r in results.values())
    within = all(r.max_abs_diff <= tolerance(reference) and r.same_top1 for r in results.values())
    print(f"{verdict}; outputs {'within' if within else 'OUTSIDE'} the tolerance (max abs diff {worst:.1e} "
          f"<= {tolerance(reference):.0e}, same top-1; {'bit-exact' if worst == 0 else 'not bit-exact'}); "
          f"output scale max|y| {float(reference.abs().max()):.3g}; demo took {elapsed_s:.0f} s")

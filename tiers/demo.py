"""`d3 demo`: a cloud endpoint and N edge daemons as local processes on loopback, a device in this process,
links shaped by token buckets following traces, and tier speeds emulated by documented factors.

Speeds: every tier computes for real on this machine, then sleeps (k-1) x its compute time, so it runs
k times slower than the machine: the cloud k=1, each edge node k=3, the device k=12 (the planner's usual
ratios: a device a few times slower than an edge node, the cloud several times faster). Sleeping keeps
the CPU free, so N emulated edge nodes on a 2-core machine still compute in parallel. The planner's
latency models are calibrated the same way: this machine's measured FLOP rate, divided by each k.

Each strategy (D3 and the baselines) runs the same requests against the same running processes; the
summary table compares their measured end-to-end latencies and checks every output against the local
model.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LINKS = {"device_edge": "wifi-home", "edge_cloud": "backbone", "device_cloud": "lte-driving"}
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------- processes
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

    def start(self, timeout_s: float = 60.0) -> "LocalCluster":
        self._spawn("cloud", self._command("cloud"))
        for spec in self.cluster.edges:
            self._spawn(spec.name, self._command("edge", "--name", spec.name, *self.extra_edge_args))
        self.wait_ready(timeout_s)
        return self

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
def machine_flop_model(graph, repeats: int = 3):
    """A FlopRateModel fitted to this machine: the model's measured forward time, less the memory and
    per-node terms the model already counts, spread over its FLOPs."""
    import torch

    from partitioner.zoo import example_input
    from predictor.base import FlopRateModel

    x = example_input(graph.input_shape)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            graph.module(x)
            times.append(time.perf_counter() - start)
    measured = statistics.median(times[1:])
    base = FlopRateModel()
    other = sum(2 * graph.records[n].output_bytes / base.bytes_per_s + base.per_node_overhead_s for n in graph.order)
    compute = measured - other if measured - other > 0.3 * measured else measured
    return FlopRateModel(flops_per_s=graph.total_flops / compute, per_call_overhead_s=1e-3)


def calibrated_tiers(graph, device_slowdown: float, edge_slowdowns: list[float], cloud_slowdown: float = 1.0):
    from partitioner.cost import TierModels

    machine = machine_flop_model(graph)
    return TierModels(device=machine.scaled(device_slowdown), edge=machine.scaled(statistics.mean(edge_slowdowns)),
                      cloud=machine.scaled(cloud_slowdown))


# ------------------------------------------------------------------------------------- printing
def format_timing(timing) -> str:
    links = " ".join(f"{k.replace('_', '>')} {v * 1e3:5.0f}" for k, v in timing.links_s.items())
    return (f"plan v{timing.plan_version:<2} {timing.strategy:<13} device {timing.device_s * 1e3:5.0f}  "
            f"edge {timing.edge_s * 1e3:5.0f} (x{timing.edge_nodes})  cloud {timing.cloud_s * 1e3:5.0f}  "
            f"links[{links or '-'}]  total {timing.total_s * 1e3:6.0f} ms")


def describe_plan(plan) -> str:
    counts = {tier: len(plan.nodes_on(tier)) for tier in ("device", "edge", "cloud")}
    return (f"{plan.strategy} v{plan.version}: device {counts['device']} / edge {counts['edge']} "
            f"(x{plan.edge_nodes}) / cloud {counts['cloud']} nodes, predicted {plan.predicted_ms:.0f} ms")


# ------------------------------------------------------------------------------------- the demo
def add_demo_command(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="cloud + N edge daemons + a device on this machine: D3 vs baselines")
    demo.add_argument("--model", default="resnet50", help="torchvision model (default resnet50)")
    demo.add_argument("--input", default=None, metavar="SHAPE", help="input shape (default: the model's usual)")
    demo.add_argument("--edge-nodes", type=int, default=3, help="edge daemons to start (default 3)")
    demo.add_argument("--trace", default=DEFAULT_LINKS["device_edge"],
                      help=f"trace of the device-edge link (default {DEFAULT_LINKS['device_edge']}); "
                           f"edge-cloud follows {DEFAULT_LINKS['edge_cloud']}, device-cloud {DEFAULT_LINKS['device_cloud']}")
    demo.add_argument("--edge-cloud-trace", default=DEFAULT_LINKS["edge_cloud"])
    demo.add_argument("--device-cloud-trace", default=DEFAULT_LINKS["device_cloud"])
    demo.add_argument("--requests", type=int, default=4, help="measured requests per strategy (default 4)")
    demo.add_argument("--device-slowdown", type=float, default=12.0, help="device k (default 12)")
    demo.add_argument("--edge-slowdown", type=float, default=3.0, help="edge node k (default 3)")
    demo.add_argument("--strategies", default="d3,device_only,cloud_only,neurosurgeon,dads",
                      help="comma-separated strategies to compare (default: D3 and the four baselines)")
    demo.add_argument("--quiet", action="store_true", help="only the summary table")
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from partitioner.graph import load_graph
    from partitioner.zoo import example_input, parse_shape
    from tiers.cli import strategy_plan
    from tiers.device import Client
    from tiers.links import links_from_traces, make_shapers

    if args.edge_nodes < 1:
        raise ValueError("--edge-nodes must be at least 1")
    if args.requests < 1:
        raise ValueError("--requests must be at least 1")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    torch.set_num_threads(1)
    started = time.monotonic()
    link_traces = {"device_edge": args.trace, "edge_cloud": args.edge_cloud_trace,
                   "device_cloud": args.device_cloud_trace}
    links = links_from_traces(link_traces)  # also checks the trace names before anything starts
    graph = load_graph(args.model, parse_shape(args.input) if args.input else None)
    x = example_input(graph.input_shape)
    with torch.no_grad():
        reference = graph.module(x)
    tiers = calibrated_tiers(graph, args.device_slowdown, [args.edge_slowdown])
    weights = [1.0] * args.edge_nodes
    print(f"d3 demo: {args.model} {'x'.join(map(str, graph.input_shape))}, {args.edge_nodes} edge nodes, "
          f"links {args.trace} / {args.edge_cloud_trace} / {args.device_cloud_trace} "
          f"(mean {links.device_edge_bps / 1e6:.0f} / {links.edge_cloud_bps / 1e6:.0f} / "
          f"{links.device_cloud_bps / 1e6:.0f} Mbit/s), slowdowns device x{args.device_slowdown:g} "
          f"edge x{args.edge_slowdown:g} cloud x1", flush=True)
    results: dict[str, dict] = {}
    with LocalCluster.create(args.edge_nodes, args.edge_slowdown, args.device_slowdown, 1.0, link_traces) as local:
        print(f"  started cloud + {args.edge_nodes} edge daemons in {time.monotonic() - started:.1f} s "
              f"(logs in {local.path.parent})", flush=True)
        shapers = make_shapers(link_traces, local.trace_start)
        for strategy in strategies:
            plan = strategy_plan(graph, strategy, links, tiers, weights)
            with Client(args.model, edge=local.cluster.edges[0].address, cloud=local.cluster.cloud_url,
                        input_shape=graph.input_shape, plan=plan, links=links, tiers=tiers, edge_weights=weights,
                        slowdown=args.device_slowdown, shapers=shapers) as client:
                # warm-up: every tier builds the plan's segments once; D3 re-plans from the bandwidth it
                # measures until its plan settles (at most a few requests), then the measured requests run
                for _ in range(4):
                    version = client.plan.version
                    client.infer(x)
                    if client.plan.version == version:
                        break
                if not args.quiet:
                    print(f"  {describe_plan(client.plan)}", flush=True)
                latencies, diff = [], 0.0
                for index in range(args.requests):
                    output = client.infer(x)
                    diff = max(diff, float((output - reference).abs().max()))
                    timing = client.timings[-1]
                    latencies.append(timing.total_s)
                    if not args.quiet:
                        print(f"    #{index} {format_timing(timing)}", flush=True)
                results[strategy] = {"median_ms": statistics.median(latencies) * 1e3, "max_abs_diff": diff,
                                     "plan": client.plan, "versions": client.plan.version}
    print_summary(results, time.monotonic() - started)
    worst = max(r["max_abs_diff"] for r in results.values())
    return 0 if worst <= 1e-5 else 1


def print_summary(results: dict[str, dict], elapsed_s: float) -> None:
    d3 = results.get("d3", {}).get("median_ms")
    print()
    print(f"{'strategy':<14} {'median ms':>10} {'vs d3':>7} {'max abs diff':>13}  plan")
    for name, result in results.items():
        ratio = f"{result['median_ms'] / d3:.2f}x" if d3 else "-"
        print(f"{name:<14} {result['median_ms']:>10.1f} {ratio:>7} {result['max_abs_diff']:>13.2e}  "
              f"{describe_plan(result['plan'])}")
    if d3 is not None:
        others = {k: v["median_ms"] for k, v in results.items() if k != "d3"}
        best = min(others, key=others.get) if others else None
        verdict = ("D3 is the fastest" if best is None or d3 <= others[best]
                   else f"D3 is NOT the fastest ({best} is)")
        print(f"{verdict}; all outputs within {max(r['max_abs_diff'] for r in results.values()):.1e} of the local "
              f"model; demo took {elapsed_s:.0f} s")

"""Edge strategies compared: predicted latency and per-node peak memory of every strategy, per model and
node count, naming the best per model; optionally measured with each node a separate process.

    .venv/bin/python bench/edge_strategies.py [--models vgg16,resnet50,googlenet,inception_v3]
        [--nodes 2,3,4,6,8] [--speeds 1.0,0.5,0.25] [--link-mbps 1000] [--segment full|middle]
        [--measure | --measure-only] [--measure-nodes 2] [--measure-shape 1x3x112x112] [--repeats 5] [--json PATH]
        [--daemons] [--daemon-slowdowns 1,2,4 | --daemon-quotas 1.0,0.5,0.25]

Cost model: the edge segment (the whole model by default) planned by every strategy for N edge nodes whose
speeds cycle through --speeds (N=3: 1.0, 0.5, 0.25). The table prints each strategy's predicted ms and
the largest per-node peak memory (MB), the best strategy per (model, N), and what ``auto`` picks.

--measure: the plans executed for real. Node 0 is this process (the coordinator, as in the edge daemon);
node k >= 1 is a worker process; all use 1 torch thread pinned to core k mod the machine's cores, and a
node of speed s < 1 sleeps (1/s - 1) x its compute time (the edge daemon's emulated slowdown). Items go
to their node through the ``item_runner`` seam (pickled tensors, as on the wire but with no network).
Planning uses the FLOP-rate model rescaled so the unsplit segment's prediction equals its measured time,
and the measured round trip of an empty item as the per-item overhead. Reported: median wall ms over
--repeats, and each worker's peak RSS growth.

--daemons: the plans run by real edge daemons (``d3 edge`` processes on loopback, ZeroMQ between them,
as in ``d3 demo``), one per --daemon-slowdowns entry (1,2,4 = speeds 1.0, 0.5, 0.25: each node sleeps so
a call takes k x its CPU time). A device in this process sends each request with an edge-only plan that
names the edge strategy; the coordinating daemon (the fastest) plans the edge segment for the live
nodes' speeds and scatters the items. Reported per model and strategy: the median edge-segment seconds
the coordinator reports, and each daemon's peak RSS growth while that strategy ran (VmHWM after it less
VmRSS before, the peak reset through /proc/PID/clear_refs), plus what ``auto`` ran.

--daemon-quotas: the same, but each daemon runs at full speed inside a cgroup v1 CPU quota (1.0, 0.5, 0.25
of one core: the kernel throttles it, as the testbed's tiers are) and announces its quota as its speed.
Needs root and the cgroup v1 cpu controller; the groups are removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from partitioner.edge_strategies import EDGE_STRATEGIES, EdgePlan, item_meta, plan_all, run_edge_plan  # noqa: E402
from partitioner.graph import load_graph  # noqa: E402
from partitioner.segments import build_segments  # noqa: E402
from partitioner.zoo import default_input_shape, example_input, parse_shape  # noqa: E402

DEFAULT_MODELS = "vgg16,resnet50,googlenet,inception_v3"


def cluster_speeds(pattern: list[float], count: int) -> list[float]:
    return [pattern[i % len(pattern)] for i in range(count)]


def edge_segment(graph, which: str):
    count = len(graph.order)
    start, stop = (0, count) if which == "full" else (count // 5, 4 * count // 5)
    return build_segments(graph, graph.prefix_assignment(start, stop))


# ---------------------------------------------------------------------------------------------- cost model
def cost_table(args) -> list[dict]:
    rows = []
    models = args.models.split(",")
    node_counts = [int(n) for n in args.nodes.split(",")]
    speeds_pattern = [float(s) for s in args.speeds.split(",")]
    overhead = None if args.item_overhead_ms is None else args.item_overhead_ms / 1e3
    for model in tqdm(models, desc="models (cost model)", file=sys.stderr):
        graph = load_graph(model, default_input_shape(model))
        edge = edge_segment(graph, args.segment).edge
        for count in node_counts:
            speeds = cluster_speeds(speeds_pattern, count)
            plans = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, speeds,
                             args.link_mbps * 1e6, item_overhead_s=overhead)
            single = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, [1.0],
                              args.link_mbps * 1e6, ["tiles"])["tiles"].predicted_ms
            rows.append({"model": model, "nodes": count, "speeds": speeds, "single_node_ms": single,
                         "ms": {n: p.predicted_ms for n, p in plans.items()},
                         "peak_mb": {n: max(p.per_node_peak_bytes) / 1e6 for n, p in plans.items()},
                         "stages": {n: len(p.stages) for n, p in plans.items()}})
    return rows


def print_cost_table(rows: list[dict], args) -> None:
    names = list(EDGE_STRATEGIES)
    overhead = 0.5 if args.item_overhead_ms is None else args.item_overhead_ms
    print(f"\nPredicted edge latency, ms (max per-node peak MB) -- cost model, LAN {args.link_mbps:g} Mbit/s, "
          f"{overhead:g} ms per remote item, speeds cycling {args.speeds}, edge segment: {args.segment} model")
    header = f"{'model':<13}{'N':>3} {'1 node':>8} " + " ".join(f"{n:>15}" for n in names) + "  best"
    print(header)
    print("-" * len(header))
    wins: dict[str, int] = {n: 0 for n in names}
    per_model_wins: dict[str, dict[str, int]] = {}
    for row in rows:
        best = min(row["ms"], key=row["ms"].get)
        wins[best] += 1
        per_model_wins.setdefault(row["model"], {}).setdefault(best, 0)
        per_model_wins[row["model"]][best] += 1
        cells = " ".join(f"{row['ms'][n]:>7.1f} ({row['peak_mb'][n]:>5.1f})" for n in names)
        print(f"{row['model']:<13}{row['nodes']:>3} {row['single_node_ms']:>8.1f} {cells}  {best}")
    print("\nBest strategy per model (wins over node counts):")
    for model, counts in per_model_wins.items():
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        print(f"  {model:<13} " + ", ".join(f"{n} x{c}" for n, c in ranked))
    print("Wins overall: " + ", ".join(f"{n} {c}" for n, c in sorted(wins.items(), key=lambda kv: -kv[1])))
    print("strategy='auto' plans every strategy and keeps the lowest prediction, i.e. the 'best' column.")


# ---------------------------------------------------------------------------------------------- measured
_WORKER: dict = {}


def _worker_init(model: str, shape: tuple[int, ...], core: int, speed: float) -> None:
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    _WORKER.update(graph=load_graph(model, shape), speed=speed, base_rss=_rss_kb())


def _rss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _worker_item(meta: dict, tensors: dict) -> dict:
    from partitioner.edge_strategies import run_item_from_meta

    start = time.perf_counter()
    outputs = run_item_from_meta(_WORKER["graph"], meta, tensors)
    elapsed = time.perf_counter() - start
    if _WORKER["speed"] < 1.0:  # emulate a slower node, like the edge daemon's --slowdown
        time.sleep(elapsed * (1.0 / _WORKER["speed"] - 1.0))
    return outputs


def _worker_segment(segment_nodes, inputs, outputs, tensors) -> dict:
    from partitioner.segments import extract_subgraph

    key = ("segment", tuple(segment_nodes))
    if key not in _WORKER:
        _WORKER[key] = extract_subgraph(_WORKER["graph"].module, segment_nodes, inputs, outputs)
    with torch.no_grad():
        return dict(zip(outputs, _WORKER[key](*(tensors[n] for n in inputs))))


def _worker_peak_kb() -> int:
    return _rss_kb() - _WORKER["base_rss"]


def _noop(tensors: dict) -> dict:
    return tensors


def measure(args) -> list[dict]:
    from predictor.base import FlopRateModel
    from partitioner.edge_strategies import run_item
    from partitioner.segments import extract_subgraph

    shape = parse_shape(args.measure_shape)
    count = args.measure_nodes
    speeds = cluster_speeds([float(s) for s in args.speeds.split(",")], count)
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_setaffinity"):  # this process is node 0 (the coordinator), as in the edge daemon
        os.sched_setaffinity(0, {0})
    rows = []
    for model in tqdm(args.models.split(","), desc="models (measured)", file=sys.stderr):
        model_shape = shape if model != "inception_v3" or min(shape[-2:]) >= 75 else (shape[0], shape[1], 139, 139)
        graph = load_graph(model, model_shape)
        segmented = edge_segment(graph, args.segment)
        edge = segmented.edge
        values = {graph.input_names[0]: example_input(model_shape)}
        values.update(segmented.device.run(values))
        edge_values = {n: values[n] for n in edge.input_names}
        whole = extract_subgraph(graph.module, edge.node_names, edge.input_names, edge.output_names)
        with torch.no_grad():
            single = _time(lambda: whole(*(edge_values[n] for n in edge.input_names)), args.repeats)
        pools = [ProcessPoolExecutor(1, initializer=_worker_init, initargs=(model, model_shape, k % cores, speeds[k]))
                 for k in range(1, count)]
        try:
            sample = {n: edge_values[n] for n in edge.input_names}
            overhead_s = 1e-3 * _time(lambda: [p.submit(_noop, sample).result() for p in pools], args.repeats) \
                / max(1, len(pools))
            # the FLOP-rate model rescaled so the unsplit segment's prediction matches its measured time
            base = FlopRateModel()
            predicted_single = sum(base.node_seconds(graph)[n] for n in edge.node_names)
            latency_model = base.scaled(single / 1e3 / predicted_single)
            plans = plan_all(graph, edge.node_names, edge.input_names, edge.output_names, speeds,
                             args.link_mbps * 1e6, latency_model=latency_model, item_overhead_s=overhead_s)
            row = {"model": model, "shape": list(model_shape), "speeds": speeds, "single_node_ms": single,
                   "item_overhead_ms": 1e3 * overhead_s, "ms": {}, "predicted_ms": {}}
            for name, plan in plans.items():
                runner = _runner(graph, plan, pools, run_item)
                row["ms"][name] = _time(lambda: run_edge_plan(graph, plan, edge_values, item_runner=runner),
                                        args.repeats)
                row["predicted_ms"][name] = plan.predicted_ms
            row["auto"] = min(plans, key=lambda n: plans[n].predicted_ms)
            row["worker_peak_rss_mb"] = [p.submit(_worker_peak_kb).result() / 1024 for p in pools]
            rows.append(row)
        finally:
            for pool in pools:
                pool.shutdown(cancel_futures=True)
    return rows


def _runner(graph, plan: EdgePlan, pools, run_item):
    def run(stage_index, item, slices):
        if item.node == 0:  # the coordinator computes its own items in-process
            return run_item(graph, plan.stages[stage_index], item, slices)
        return pools[item.node - 1].submit(_worker_item, item_meta(plan, stage_index, item), slices).result()
    return run


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: workers build their sub-modules once
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return statistics.median(samples)


def print_measured(rows: list[dict], args) -> None:
    names = list(EDGE_STRATEGIES)
    print(f"\nMeasured edge latency, ms (median of {args.repeats}); node 0 = this process, nodes 1.. = worker "
          f"processes, all 1 torch thread pinned over {os.cpu_count()} cores; slowdown emulated by sleeping; "
          f"tensors pickled between processes (no LAN). 'pred' = the cost model rescaled to this machine.")
    header = f"{'model':<13}{'N':>3} {'1 node':>8} " + " ".join(f"{n:>10}" for n in names) + "  best / auto"
    print(header)
    print("-" * len(header))
    for row in rows:
        best = min(row["ms"], key=row["ms"].get)
        cells = " ".join(f"{row['ms'][n]:>10.1f}" for n in names)
        print(f"{row['model']:<13}{len(row['speeds']):>3} {row['single_node_ms']:>8.1f} {cells}  {best} / {row['auto']}")
        print(f"{'':<13}{'':>3} {'pred':>8} " + " ".join(f"{row['predicted_ms'][n]:>10.1f}" for n in names)
              + f"  (item round trip {row['item_overhead_ms']:.2f} ms; worker peak RSS growth MB: "
              + ", ".join(f"{m:.0f}" for m in row["worker_peak_rss_mb"]) + ")")


# ---------------------------------------------------------------------------------------------- daemons
def _rss_kb_of(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def _reset_peak(pid: int) -> bool:
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _daemon_cluster(slowdowns: list[float], workdir: Path, quotas: list[float] | None = None):
    """Edge daemons on loopback, each slowed by a CPU-time factor, or (``quotas``) running at full speed in
    a cgroup v1 CPU quota and announcing the quota as its speed."""
    from deploy.cluster import Cluster, EdgeNodeSpec
    from tiers.demo import LocalCluster, free_port

    if quotas:
        edges = [EdgeNodeSpec(f"edge{i}", f"tcp://127.0.0.1:{free_port()}", 1.0, speed=q) for i, q in enumerate(quotas)]
    else:
        edges = [EdgeNodeSpec(f"edge{i}", f"tcp://127.0.0.1:{free_port()}", k) for i, k in enumerate(slowdowns)]
    spec = Cluster(f"http://127.0.0.1:{free_port()}", edges)
    path = workdir / "cluster.toml"
    path.write_text(spec.to_toml())
    return LocalCluster(spec, path, time.monotonic(), extra_edge_args=["--tile-timeout", "120"])


def measure_daemons(args) -> list[dict]:
    import tempfile

    from deploy import cgroups
    from partitioner.edge_strategies import STRATEGY_NAMES
    from partitioner.plan import Plan
    from tiers.device import Client

    shape = parse_shape(args.measure_shape)
    slowdowns = sorted(float(k) for k in args.daemon_slowdowns.split(","))  # the fastest coordinates
    quotas = sorted((float(q) for q in args.daemon_quotas.split(",")), reverse=True) if args.daemon_quotas else None
    if quotas:
        from predictor.cgroup import cgroup_unavailable_reason

        reason = cgroup_unavailable_reason()
        if reason:
            raise SystemExit(f"--daemon-quotas needs cgroup v1 CPU quotas: {reason}")
        slowdowns = [1.0 / q for q in quotas]
    strategies = [s for s in (args.strategies or ",".join(STRATEGY_NAMES)).split(",") if s]
    rows = []
    for model in tqdm(args.models.split(","), desc="models (edge daemons)", file=sys.stderr):
        model_shape = shape if model != "inception_v3" or min(shape[-2:]) >= 75 else (shape[0], shape[1], 139, 139)
        graph = load_graph(model, model_shape)
        x = example_input(model_shape)
        with torch.no_grad():
            reference = graph.module(x)
        local = _daemon_cluster(slowdowns, Path(tempfile.mkdtemp(prefix="d3-edge-bench-")), quotas)
        row = {"model": model, "shape": list(model_shape), "speeds": [round(1 / k, 3) for k in slowdowns],
               "quotas": quotas, "ms": {}, "total_ms": {}, "peak_rss_mb": {}, "ran": {}, "max_abs_diff": {}}
        groups = []
        try:
            local.start(timeout_s=300)
            pids = [local.processes[e.name].pid for e in local.cluster.edges]
            for index, (pid, quota) in enumerate(zip(pids, quotas or [])):  # its threads move with it
                groups.append(f"d3-edgebench-{os.getpid()}-{index}")
                cgroups.create(groups[-1], quota)
                cgroups.add_pid(groups[-1], pid)
            clients = {}
            for strategy in strategies:
                plan = Plan(model, model_shape, {n: "edge" for n in graph.order}, edge_weights=[1.0] * len(slowdowns),
                            strategy="edge_only", edge_strategy=strategy)
                clients[strategy] = Client(model, edge=local.cluster.edges[0].address, cloud=local.cluster.cloud_url,
                                           input_shape=model_shape, plan=plan, timeout_s=600)
            samples = {s: [] for s in strategies}
            totals = {s: [] for s in strategies}
            peaks = {s: [0.0] * len(pids) for s in strategies}
            for strategy, client in clients.items():  # warm: every node builds the plan's pieces once
                for _ in range(5 if strategy == "auto" else 1):  # auto first tries its (<= 4) candidates
                    client.infer(x)
            for round_index in range(args.repeats):  # rounds, order rotating: all see the same load
                offset = round_index % len(strategies)
                for strategy in strategies[offset:] + strategies[:offset]:
                    before = [_rss_kb_of(pid)["VmRSS"] for pid in pids if _reset_peak(pid)]
                    output = clients[strategy].infer(x)
                    after = [_rss_kb_of(pid)["VmHWM"] for pid in pids]
                    if len(before) == len(pids):
                        peaks[strategy] = [max(p, (a - b) / 1024) for p, a, b in zip(peaks[strategy], after, before)]
                    timing = clients[strategy].timings[-1]
                    samples[strategy].append(1e3 * timing.edge_s)
                    totals[strategy].append(1e3 * timing.total_s)
                    row["ran"][strategy] = timing.edge_strategy
                    row["max_abs_diff"][strategy] = max(row["max_abs_diff"].get(strategy, 0.0),
                                                        float((output - reference).abs().max()))
            for client in clients.values():
                client.close()
            row["ms"] = {s: statistics.median(v) for s, v in samples.items()}
            row["total_ms"] = {s: statistics.median(v) for s, v in totals.items()}
            row["peak_rss_mb"] = peaks
            row["tolerance"] = 1e-5
        finally:
            local.stop()
            for group in groups:
                cgroups.remove(group)
        rows.append(row)
    return rows


def print_daemons(rows: list[dict], args) -> None:
    how = (f"cgroup v1 CPU quotas {args.daemon_quotas} of one core each, no emulation" if args.daemon_quotas
           else f"CPU-time slowdowns {args.daemon_slowdowns}")
    print(f"\nMeasured on edge daemons (d3 edge processes, ZeroMQ on loopback), input {args.measure_shape}, "
          f"whole model on the edge, node speeds {', '.join(str(s) for s in rows[0]['speeds']) if rows else ''} "
          f"({how}); edge-segment ms (median of {args.repeats}) [peak RSS growth per node, MB]")
    for row in rows:
        best = min((s for s in row["ms"] if s != "auto"), key=row["ms"].get)
        auto = row["ran"].get("auto", "-")
        ok = all(d <= row["tolerance"] for d in row["max_abs_diff"].values())
        print(f"{row['model']} {'x'.join(map(str, row['shape']))}: best {best}; auto ran {auto} "
              f"({'= the measured winner' if auto == best else 'not the measured winner'}); outputs "
              f"{'within' if ok else 'OUTSIDE'} tolerance")
        for strategy, ms in sorted(row["ms"].items(), key=lambda kv: kv[1]):
            peaks = ", ".join(f"{m:.1f}" for m in row["peak_rss_mb"][strategy])
            name = f"auto->{auto}" if strategy == "auto" else strategy
            print(f"   {name:<18} {ms:8.1f} ms  (device round trip {row['total_ms'][strategy]:8.1f} ms)  [{peaks}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--nodes", default="2,3,4,6,8", help="node counts for the cost model")
    parser.add_argument("--speeds", default="1.0,0.5,0.25", help="relative node speeds, cycled over the nodes")
    parser.add_argument("--link-mbps", type=float, default=1000.0, help="edge LAN bandwidth")
    parser.add_argument("--item-overhead-ms", type=float, default=None,
                        help="cost model: one remote item's round trip besides its bytes (default 0.5)")
    parser.add_argument("--segment", choices=("full", "middle"), default="full",
                        help="edge segment: the whole model, or its middle three fifths")
    parser.add_argument("--measure", action="store_true", help="also execute the plans with one process per node")
    parser.add_argument("--measure-only", action="store_true", help="skip the cost-model table")
    parser.add_argument("--measure-nodes", type=int, default=2)
    parser.add_argument("--measure-shape", default="1x3x112x112")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--daemons", action="store_true", help="execute the plans on real edge daemons")
    parser.add_argument("--daemon-slowdowns", default="1,2,4", help="one edge daemon per CPU-time slowdown")
    parser.add_argument("--daemon-quotas", default=None, metavar="1.0,0.5,0.25",
                        help="instead: one edge daemon per cgroup v1 CPU quota (root; real throttling, no emulation)")
    parser.add_argument("--strategies", default=None, help="edge strategies for --daemons (default: all + auto)")
    parser.add_argument("--json", type=Path, help="write all rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    if not args.measure_only:
        rows = cost_table(args)
        print_cost_table(rows, args)
    measured = []
    if args.measure or (args.measure_only and not args.daemons):
        measured = measure(args)
        print_measured(measured, args)
    daemons = []
    if args.daemons:
        daemons = measure_daemons(args)
        print_daemons(daemons, args)
    if args.json:
        args.json.write_text(json.dumps({"cost_model": rows, "measured": measured, "daemons": daemons}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

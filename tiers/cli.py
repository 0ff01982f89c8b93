"""`d3 cloud`, `d3 edge`, `d3 infer`, `d3 demo`: run the three tiers by hand from a cluster file, or all
of them on this machine at once."""
from __future__ import annotations

import argparse
import json
import sys

STRATEGIES = ("d3", "device_only", "edge_only", "cloud_only", "neurosurgeon", "dads", "d3_no_tiling")


def _cluster_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--cluster", required=required, metavar="FILE",
                        help="TOML cluster file (see deploy/examples/local.toml)")
    parser.add_argument("--trace-start", type=float, default=None, metavar="T",
                        help="CLOCK_MONOTONIC time at which the link traces start (default: now); the demo "
                             "passes one value to every process")
    parser.add_argument("--no-shaping", action="store_true", help="ignore the cluster file's [links] traces")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")


def add_commands(subparsers) -> None:
    cloud = subparsers.add_parser("cloud", help="run the cloud endpoint (HTTP) of a cluster file")
    _cluster_argument(cloud)
    cloud.add_argument("--host", default=None, help="listen address (default: the cluster file's cloud url)")
    cloud.add_argument("--port", type=int, default=None, help="listen port (default: the cluster file's)")
    cloud.add_argument("--slowdown", type=float, default=None, help="emulated slowdown (default: cluster file)")
    cloud.add_argument("--workers", type=int, default=4, help="requests computed at once (default 4)")
    cloud.add_argument("--max-body-mb", type=float, default=256.0, help="largest request body (default 256)")
    cloud.add_argument("--max-queue", type=int, default=256,
                       help="requests held at once (reading, queued, computing); more get 503 + Retry-After "
                            "(default 256)")
    cloud.set_defaults(handler=run_cloud)

    edge = subparsers.add_parser("edge", help="run one edge node (ZeroMQ) of a cluster file")
    _cluster_argument(edge)
    edge.add_argument("--name", required=True, help="which [[edge]] of the cluster file this node is")
    edge.add_argument("--slowdown", type=float, default=None, help="emulated slowdown (default: cluster file)")
    edge.add_argument("--no-tiling", action="store_true", help="run the edge segment whole on the receiving node")
    edge.add_argument("--peer-timeout", type=float, default=2.0, help="drop a silent peer after S seconds")
    edge.add_argument("--tile-timeout", type=float, default=20.0, help="re-run a tile here after S seconds")
    from partitioner.edge_strategies import STRATEGY_NAMES

    edge.add_argument("--edge-strategy", default=None, choices=STRATEGY_NAMES,
                      help="spread every plan's edge segment this way (default: as each plan says)")
    edge.set_defaults(handler=run_edge)

    infer = subparsers.add_parser("infer", help="run requests from this machine as a device of a cluster")
    from partitioner.cli import add_model_arguments

    add_model_arguments(infer)
    _cluster_argument(infer)
    infer.add_argument("--edge", default=None, help="edge node to send to first (default: the first in the file);"
                       " the others of the file take over if it stops answering")
    infer.add_argument("--timeout", type=float, default=120.0,
                       help="deadline of one request in seconds, retries included (default 120)")
    infer.add_argument("--no-failover", action="store_true",
                       help="one try per request on one edge node: no retry on another plan or edge node")
    infer.add_argument("--requests", type=int, default=5, help="how many requests (default 5)")
    infer.add_argument("--strategy", default="d3", choices=STRATEGIES, help="plan to use (default d3, re-planned)")
    infer.add_argument("--slowdown", type=float, default=None, help="emulated device slowdown (default: file)")
    infer.add_argument("--json", action="store_true", help="one JSON object per request")
    infer.add_argument("--device-name", default="device0",
                       help="this device's name in the key folder ([security]; default device0)")
    infer.set_defaults(handler=run_infer)

    from tiers.demo import add_demo_command

    add_demo_command(subparsers)
    _announce_open_demo(subparsers.choices.get("demo"))


def _announce_open_demo(demo_parser) -> None:
    """The local demo runs without CURVE, tokens or TLS (loopback only): say so before it starts."""
    handler = demo_parser.get_default("handler") if demo_parser is not None else None
    if handler is None:
        return

    def announced(args):
        print("d3 demo: security OFF (loopback-only demo: no CURVE keys, bearer tokens or TLS; "
              "see d3 keys and [security] for a real cluster)", flush=True)
        return handler(args)

    demo_parser.set_defaults(handler=announced)


def node_security(spec, name: str, role: str, edge_name: str | None = None):
    from tiers.security import node_security as load

    return load(spec, name, role, edge_name)


def describe_security(security, role: str) -> str:
    """One phrase for the start-up line: an operator must see at once when a tier runs open."""
    if security is None:
        return "security OFF: no [security] in the cluster file, anyone on the network may connect"
    if role == "cloud":
        parts = ["TLS" if security.ssl_server else "no TLS",
                 "bearer tokens" if security.token_check else "NO token check"]
    else:
        parts = ["CURVE" if security.curve else "NO CURVE", "token" if security.token else "no cloud token",
                 "TLS to cloud" if security.ssl_client else "plain HTTP to cloud"]
    return "security: " + ", ".join(parts)


def _shapers(args, cluster) -> dict:
    from tiers.links import make_shapers

    if args.no_shaping:
        return {}
    return make_shapers(cluster.link_traces, args.trace_start)


def run_cloud(args: argparse.Namespace) -> int:
    import torch
    import uvloop

    from deploy.cluster import load_cluster
    from tiers.cloud import make_cloud_app, serve_cloud

    torch.set_num_threads(args.threads)
    cluster = load_cluster(args.cluster)
    host, port = cluster.cloud_host_port
    host, port = args.host or host, args.port or port
    slowdown = args.slowdown or cluster.cloud_slowdown
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
    security = node_security(cluster.security, "cloud", "cloud")
    app = make_cloud_app(workers=args.workers, slowdown=slowdown, max_message_bytes=int(args.max_body_mb * 1e6),
                         shapers=_shapers(args, cluster), threads=args.threads, security=security,
                         max_queue=args.max_queue)
    scheme = "https" if security is not None and security.ssl_server is not None else "http"
    ready = lambda: print(f"d3 cloud: serving on {scheme}://{host}:{port} (slowdown {slowdown:g}; "  # noqa: E731
                          f"{describe_security(security, 'cloud')})", flush=True)
    uvloop.run(serve_cloud(host, port, app, ready, ssl_context=security.ssl_server if security else None))
    return 0


def run_edge(args: argparse.Namespace) -> int:
    from deploy.cluster import load_cluster
    from tiers.edge import EdgeConfig, run_edge_daemon

    cluster = load_cluster(args.cluster)
    spec = cluster.edge(args.name)
    bind = spec.address.replace("tcp://localhost", "tcp://127.0.0.1")
    config = EdgeConfig(name=spec.name, bind=bind, peers={e.name: e.address for e in cluster.edges},
                        cloud_url=cluster.cloud_url, speed=spec.speed, slowdown=args.slowdown or spec.slowdown,
                        tiling=not args.no_tiling, peer_timeout_s=args.peer_timeout,
                        tile_timeout_s=args.tile_timeout, shapers=_shapers(args, cluster),
                        security=node_security(cluster.security, spec.name, "edge"), edge_strategy=args.edge_strategy)
    ready = lambda: print(f"d3 edge {spec.name}: serving on {bind} with {len(cluster.edges) - 1} peers "  # noqa: E731
                          f"({describe_security(config.security, 'edge')})", flush=True)
    run_edge_daemon(config, ready=ready, threads=args.threads)
    return 0


def strategy_plan(graph, strategy: str, links, tiers, edge_weights):
    """A fixed plan for a baseline strategy, or None for d3 (the client re-plans)."""
    if strategy == "d3":
        return None
    from partitioner.baselines import baseline_plans

    plans = baseline_plans(graph, links, tiers, tuple(edge_weights))
    if strategy not in plans:
        raise ValueError(f"strategy {strategy!r} is not among the baselines {sorted(plans)}")
    return plans[strategy]


def run_infer(args: argparse.Namespace) -> int:
    import torch

    from deploy.cluster import load_cluster
    from partitioner.cli import load_graph_from_args
    from partitioner.zoo import example_input
    from tiers.demo import calibrated_tiers, format_timing
    from tiers.failover import BasicClient, FailoverClient
    from tiers.links import links_from_traces

    torch.set_num_threads(args.threads)
    cluster = load_cluster(args.cluster)
    edge = cluster.edge(args.edge) if args.edge else (cluster.edges[0] if cluster.edges else None)
    graph = load_graph_from_args(args)
    slowdown = args.slowdown or cluster.device_slowdown
    tiers = calibrated_tiers(graph, slowdown, [e.slowdown for e in cluster.edges] or [1.0], cluster.cloud_slowdown)
    links = links_from_traces({} if args.no_shaping else cluster.link_traces)
    weights = [1.0] * max(len(cluster.edges), 1)
    plan = strategy_plan(graph, args.strategy, links, tiers, weights)
    x = example_input(graph.input_shape)
    with torch.no_grad():
        reference = graph.module(x)
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    common = dict(input_shape=graph.input_shape, plan=plan, weights=args.weights, links=links, tiers=tiers,
                  edge_weights=weights, slowdown=slowdown, shapers=_shapers(args, cluster), timeout_s=args.timeout,
                  security=node_security(cluster.security, args.device_name, "device", edge.name if edge else None))
    if args.no_failover:
        client = BasicClient(args.model, edge=edge.address if edge else None, cloud=cluster.cloud_url, **common)
    else:  # the chosen edge node first, then the others of the cluster file in order
        order = [edge] + [e for e in cluster.edges if e is not edge] if edge else []
        client = FailoverClient(args.model, edges=[e.address for e in order], edge_names=[e.name for e in order],
                                cloud=cluster.cloud_url, **common)
    with client:
        for index in range(args.requests):
            output = client.infer(x)
            diff = float((output - reference).abs().max())
            timing = client.timings[-1]
            if args.json:
                print(json.dumps({"request": index, "max_abs_diff": diff, **timing.__dict__}))
            else:
                print(f"#{index:<3} {format_timing(timing)}  diff {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from deploy.cli import main

    sys.exit(main(sys.argv[1:]))

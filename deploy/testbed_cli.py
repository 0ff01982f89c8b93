"""`d3 testbed up|down|status`: the namespace + tc + cgroup testbed on one Linux host (needs root)."""
from __future__ import annotations

import argparse
import json
import os


def add_commands(subparsers) -> None:
    testbed = subparsers.add_parser("testbed", help="network namespaces + shaped veth links + CPU quotas (root)")
    actions = testbed.add_subparsers(dest="action", required=True, metavar="ACTION")
    prefix_help = "name prefix of everything made (default d3tb-, or $D3_TESTBED_PREFIX)"
    default_prefix = os.environ.get("D3_TESTBED_PREFIX", "d3tb-")

    up = actions.add_parser("up", help="create namespaces, links, shaping, CPU quotas; start the daemons")
    up.add_argument("--edge-nodes", type=int, default=3, metavar="N", help="edge nodes (default 3)")
    up.add_argument("--device-cpu", type=float, default=0.2, metavar="CPUS",
                    help="device CPU quota in CPUs (default 0.2; 0 = unlimited)")
    up.add_argument("--edge-cpu", default=None, metavar="C1,C2,...",
                    help="CPU quota per edge node, or one for all (default 0.5 each)")
    up.add_argument("--cloud-cpu", type=float, default=1.0, metavar="CPUS", help="cloud CPU quota (default 1.0)")
    up.add_argument("--bw", default=None, metavar="LINK=RATE,...",
                    help="link rates, e.g. device-edge=20Mbit,edge-cloud=100Mbit,device-cloud=10Mbit "
                         "(those are the defaults; edge-lan=RATE shapes the edge LAN too)")
    up.add_argument("--no-daemons", action="store_true", help="only the network and cgroups")
    up.add_argument("--config", default=None, metavar="FILE",
                    help="cluster file for the daemons (default: one written with the testbed addresses)")
    up.add_argument("--cloud-cmd", default=None, metavar="CMD",
                    help="command run in the cloud namespace (default 'd3 cloud --cluster {config}')")
    up.add_argument("--edge-cmd", default=None, metavar="CMD",
                    help="command run in each edge namespace (default 'd3 edge --cluster {config} --name {node}')")
    up.add_argument("--prefix", default=default_prefix, help=prefix_help)
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    up.set_defaults(handler=run_up)

    down = actions.add_parser("down", help="remove everything with the prefix (works after a crash too)")
    down.add_argument("--prefix", default=default_prefix, help=prefix_help)
    down.set_defaults(handler=run_down)

    status = actions.add_parser("status", help="what exists now: namespaces, link rates, quotas, daemons")
    status.add_argument("--prefix", default=default_prefix, help=prefix_help)
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")
    status.set_defaults(handler=run_status)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("the testbed needs root (network namespaces, tc, cgroups); "
                              "without root use `d3 demo`, which shapes links in user space")


def run_up(args: argparse.Namespace) -> int:
    from deploy.testbed import (DEFAULT_CLOUD_COMMAND, DEFAULT_EDGE_COMMAND, TestbedConfig, parse_bandwidths,
                                parse_cpu_list, up)

    _require_root()
    config = TestbedConfig(
        edge_nodes=args.edge_nodes, device_cpu=args.device_cpu,
        edge_cpu=parse_cpu_list(args.edge_cpu, args.edge_nodes, 0.5), cloud_cpu=args.cloud_cpu,
        bandwidth_bps=parse_bandwidths(args.bw), prefix=args.prefix, start_daemons=not args.no_daemons,
        cluster_config=args.config, cloud_command=args.cloud_cmd or DEFAULT_CLOUD_COMMAND,
        edge_command=args.edge_cmd or DEFAULT_EDGE_COMMAND)
    state = up(config, progress=(lambda line: None) if args.json else (lambda line: print("  " + line, flush=True)))
    if args.json:
        print(json.dumps(state))
    else:
        print(f"testbed {args.prefix} up: {len(state['namespaces'])} namespaces; cluster file "
              f"{state['cluster_config']}; `d3 testbed down --prefix {args.prefix}` removes it")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from deploy.testbed import down

    _require_root()
    down(args.prefix, progress=print)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from deploy.testbed import status

    report = status(args.prefix)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"testbed {report['prefix']}: {report['status']}, {len(report['namespaces'])} namespaces")
    for link, points in report["links"].items():
        where = ", ".join(f"{p['at']} {p['rate']} ({p['sent_bytes']} B sent)" for p in points)
        print(f"  {link:<13} {where}")
    for name, cpus in report["cgroups"].items():
        print(f"  cgroup {name:<16} {'unlimited' if cpus is None else f'{cpus:g} CPU'}")
    for daemon in report["daemons"]:
        print(f"  {daemon['tier']:<8} pid {daemon['pid']:<7} {'running' if daemon['alive'] else 'EXITED'}  "
              f"{' '.join(daemon['command'])}")
    return 0

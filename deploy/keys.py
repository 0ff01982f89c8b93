"""`d3 keys --out DIR`: CURVE key pairs for every edge node and device, a bearer token for each, and a
self-signed TLS certificate for the cloud; prints the ``[security]`` lines for the cluster file."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_keys_command(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="generate CURVE keys, bearer tokens and a TLS certificate")
    keys.add_argument("--out", required=True, metavar="DIR", help="folder to write the keys to")
    keys.add_argument("--cluster", metavar="FILE", help="take the edge node names (and cloud host) from this file")
    keys.add_argument("--edges", nargs="+", default=None, metavar="NAME",
                      help="edge node names (default: the cluster file's, else edge0 edge1 edge2)")
    keys.add_argument("--devices", type=int, default=1, help="how many devices: device0, device1, ... (default 1)")
    keys.add_argument("--device-names", nargs="+", default=None, metavar="NAME", help="device names instead")
    keys.add_argument("--tls-host", nargs="+", default=None, metavar="HOST",
                      help="names/IPs the cloud certificate is for (default: the cluster file's cloud host, "
                           "else 127.0.0.1 localhost)")
    keys.add_argument("--no-tls", action="store_true", help="no certificate (the cloud stays plain HTTP)")
    keys.add_argument("--force", action="store_true", help="overwrite keys that already exist")
    keys.set_defaults(handler=run_keys)


def principal_names(args: argparse.Namespace, cluster) -> tuple[list[str], list[str]]:
    edges = args.edges or ([e.name for e in cluster.edges] if cluster else ["edge0", "edge1", "edge2"])
    if args.devices < 0:
        raise ValueError(f"--devices must be 0 or more, got {args.devices}")
    devices = args.device_names or [f"device{i}" for i in range(args.devices)]
    names = edges + devices
    if len(set(names)) != len(names):
        raise ValueError(f"names must be unique, got {names}")
    return edges, devices


def run_keys(args: argparse.Namespace) -> int:
    from tiers import security

    cluster = None
    if args.cluster:
        from deploy.cluster import load_cluster

        cluster = load_cluster(args.cluster)
    edges, devices = principal_names(args, cluster)
    out = Path(args.out).resolve()
    existing = [n for n in edges + devices if (out / security.PRIVATE_DIR / f"{n}.key_secret").exists()]
    if existing and not args.force:
        raise ValueError(f"{out} already holds keys for {existing}; pass --force to replace them")
    security.generate_curve_keys(out, edges + devices)
    security.write_tokens(out / security.TOKENS_FILE, security.generate_tokens(edges + devices))
    lines = ["[security]", f'keys_dir = "{out}"']
    if not args.no_tls:
        hosts = args.tls_host or ([cluster.cloud_host_port[0]] if cluster else ["127.0.0.1", "localhost"])
        security.make_self_signed_cert(out / security.CERT_FILE, out / security.CERT_KEY_FILE, hosts)
        lines += [f'tls_cert = "{out / security.CERT_FILE}"', f'tls_key = "{out / security.CERT_KEY_FILE}"']
    print(f"# d3 keys: {len(edges)} edge nodes ({', '.join(edges)}), {len(devices)} devices "
          f"({', '.join(devices) or 'none'}): CURVE key pairs and bearer tokens"
          f"{'' if args.no_tls else ', a self-signed cloud certificate for ' + ', '.join(hosts)} in {out}")
    print(f"# give each machine only its own {out}/private/<name>.key_secret; public/, tokens of its own name"
          f" and cloud.crt may go everywhere")
    print("\n".join(lines))
    if not args.no_tls:
        print("# and use an https:// url in [cloud]")
    return 0

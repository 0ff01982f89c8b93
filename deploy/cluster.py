"""The cluster file (TOML): where the cloud and each edge node listen, their emulated speeds, and the
traces that shape each link in-process. ``d3 cloud``, ``d3 edge``, ``d3 infer`` and ``d3 demo`` all read
the same file (the demo writes one with free ports). See deploy/examples/local.toml."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

LINK_NAMES = ("device_edge", "edge_cloud", "device_cloud")


@dataclass
class EdgeNodeSpec:
    name: str
    address: str  # tcp://host:port (ZeroMQ)
    slowdown: float = 1.0
    speed: float | None = None  # relative speed announced to peers; default 1/slowdown


@dataclass
class SecuritySpec:
    """The ``[security]`` table (see tiers/security.py; ``d3 keys`` prints it). Paths are absolute or
    relative to the cluster file."""

    keys_dir: str | None = None  # public/ (CURVE allow-list), private/<name>.key_secret, tokens.json
    curve: bool = True  # CURVE on every ZeroMQ socket (needs keys_dir)
    tokens_required: bool = True  # the cloud refuses requests without a known bearer token
    tls_cert: str | None = None  # the cloud serves HTTPS with this certificate ...
    tls_key: str | None = None  # ... and key
    tls_ca: str | None = None  # what clients verify the cloud against (default: tls_cert, self-signed)


def _parse_security(table, source: str, base_dir: Path | None) -> SecuritySpec | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ValueError(f"{source}: [security] must be a table")
    known = {"keys_dir", "curve", "tokens_required", "tls_cert", "tls_key", "tls_ca"}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"{source}: [security] has unknown keys {sorted(unknown)}; known: {sorted(known)}")

    def path(key: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{source}: [security] {key} must be a path string, got {value!r}")
        return str((base_dir / value) if base_dir is not None and not Path(value).is_absolute() else Path(value))

    spec = SecuritySpec(path("keys_dir"), bool(table.get("curve", True)), bool(table.get("tokens_required", True)),
                        path("tls_cert"), path("tls_key"), path("tls_ca"))
    if (spec.curve or spec.tokens_required) and spec.keys_dir is None:
        raise ValueError(f"{source}: [security] needs keys_dir for CURVE keys and tokens (or curve = false, "
                         f"tokens_required = false)")
    if bool(spec.tls_cert) != bool(spec.tls_key):
        raise ValueError(f"{source}: [security] tls_cert and tls_key go together")
    return spec


@dataclass
class Cluster:
    cloud_url: str
    edges: list[EdgeNodeSpec]
    cloud_slowdown: float = 1.0
    device_slowdown: float = 1.0
    link_traces: dict[str, str] = field(default_factory=dict)  # link -> built-in trace name or file
    security: SecuritySpec | None = None  # None: no CURVE, no tokens, no TLS (say so when starting)

    @property
    def cloud_host_port(self) -> tuple[str, int]:
        parsed = urlparse(self.cloud_url)
        return parsed.hostname or "127.0.0.1", parsed.port or 80

    def edge(self, name: str) -> EdgeNodeSpec:
        for spec in self.edges:
            if spec.name == name:
                return spec
        raise ValueError(f"no edge node named {name!r} in the cluster file; nodes: {[e.name for e in self.edges]}")

    def to_toml(self) -> str:
        lines = ["[cloud]", f'url = "{self.cloud_url}"', f"slowdown = {self.cloud_slowdown}", "",
                 "[device]", f"slowdown = {self.device_slowdown}", ""]
        if self.link_traces:
            lines += ["[links]"] + [f'{link} = "{trace}"' for link, trace in self.link_traces.items()] + [""]
        for spec in self.edges:
            lines += ["[[edge]]", f'name = "{spec.name}"', f'address = "{spec.address}"', f"slowdown = {spec.slowdown}"]
            if spec.speed is not None:
                lines.append(f"speed = {spec.speed}")
            lines.append("")
        if self.security is not None:
            lines += ["[security]"] + [f'{key} = {_toml_value(value)}' for key, value in
                                       self.security.__dict__.items() if value is not None] + [""]
        return "\n".join(lines)


def _toml_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else f'"{value}"'


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def parse_cluster(data: dict, source: str = "cluster file", base_dir: Path | None = None) -> Cluster:
    cloud = data.get("cloud", {})
    if not isinstance(cloud.get("url"), str) or not cloud["url"].startswith(("http://", "https://")):
        raise ValueError(f"{source}: [cloud] url must be an http:// URL, got {cloud.get('url')!r}")
    edges = []
    for index, entry in enumerate(data.get("edge", [])):
        name, address = entry.get("name"), entry.get("address")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}: [[edge]] #{index + 1} needs a name")
        if not isinstance(address, str) or not address.startswith("tcp://"):
            raise ValueError(f"{source}: edge {name!r} address must be tcp://host:port, got {address!r}")
        speed = entry.get("speed")
        edges.append(EdgeNodeSpec(name, address, _positive(entry.get("slowdown", 1.0), f"edge {name!r} slowdown"),
                                  None if speed is None else _positive(speed, f"edge {name!r} speed")))
    if len({e.name for e in edges}) != len(edges):
        raise ValueError(f"{source}: two edge nodes share a name")
    links = data.get("links", {})
    unknown = set(links) - set(LINK_NAMES)
    if unknown:
        raise ValueError(f"{source}: [links] names unknown links {sorted(unknown)}; known: {LINK_NAMES}")
    return Cluster(cloud["url"], edges, _positive(cloud.get("slowdown", 1.0), "[cloud] slowdown"),
                   _positive(data.get("device", {}).get("slowdown", 1.0), "[device] slowdown"), dict(links),
                   _parse_security(data.get("security"), source, base_dir))


def load_cluster(path: str | Path) -> Cluster:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    return parse_cluster(data, str(path), path.parent)

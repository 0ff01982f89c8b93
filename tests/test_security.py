"""Who may talk to whom: CURVE between edge nodes and with devices, bearer tokens and TLS at the cloud,
``d3 keys``. Servers run in threads of this process (each on its own event loop) so the tests can look at
their counters; a refused peer must get nothing back and its bytes must never reach a model."""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth

from deploy.cluster import SecuritySpec, parse_cluster
from partitioner.plan import Plan
from partitioner.zoo import example_input
from tests.conftest import zoo_graph
from tiers import security as sec
from tiers import wire
from tiers.cloud import STORE_KEY, make_cloud_app, serve_cloud
from tiers.demo import free_port
from tiers.device import Client
from tiers.edge import EdgeConfig, EdgeDaemon
from tiers.wire import Message

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")
SHAPE = (1, 3, 64, 64)
TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------- helpers
class LoopThread:
    """Runs one coroutine (a server) on its own event loop in a daemon thread until stopped."""

    def __init__(self, make_coroutine, name: str):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self._task = None

        def main():
            asyncio.set_event_loop(self.loop)
            self._task = self.loop.create_task(make_coroutine(self.ready.set))
            try:
                self.loop.run_until_complete(self._task)
            except (asyncio.CancelledError, Exception):
                pass

        self.thread = threading.Thread(target=main, name=name, daemon=True)
        self.thread.start()
        if not self.ready.wait(30):
            raise TimeoutError(f"{name} did not start")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(10)


def start_cloud(security=None, **kwargs) -> tuple[LoopThread, object, str]:
    app = make_cloud_app(workers=2, security=security, threads=1, **kwargs)
    port = free_port()
    scheme = "https" if security is not None and security.ssl_server else "http"
    server = LoopThread(lambda ready: serve_cloud("127.0.0.1", port, app, ready,
                                                  ssl_context=security.ssl_server if security else None), "cloud")
    return server, app, f"{scheme}://127.0.0.1:{port}"


def start_edges(names: list[str], cloud_url: str | None, securities: dict | None = None,
                **config) -> tuple[list[LoopThread], list[EdgeDaemon], dict[str, str]]:
    addresses = {name: f"tcp://127.0.0.1:{free_port()}" for name in names}
    threads, daemons = [], []
    for name in names:
        daemon = EdgeDaemon(EdgeConfig(name=name, bind=addresses[name], peers=addresses, cloud_url=cloud_url,
                                       security=(securities or {}).get(name), heartbeat_s=0.2, **config))
        daemons.append(daemon)
        threads.append(LoopThread(daemon.run, name))
    deadline = time.monotonic() + 20
    while any(len(d.alive_nodes()) < len(names) for d in daemons):  # every node sees every peer
        assert time.monotonic() < deadline, "edge nodes did not see each other"
        time.sleep(0.1)
    return threads, daemons, addresses


def split_plan(model: str, device_nodes: int, edge_end: int, edge_nodes: int = 2) -> Plan:
    graph = zoo_graph(model, SHAPE)
    tiers = graph.prefix_assignment(device_nodes, edge_end)
    names = ("device", "edge", "cloud")
    return Plan(model, SHAPE, {n: names[t] for n, t in tiers.items() if n in graph.order},
                edge_weights=[1.0] * edge_nodes, strategy="fixed")


def reference(seed: int = 0):
    x = example_input(SHAPE, seed)
    with torch.no_grad():
        return x, zoo_graph("resnet18", SHAPE).module(x)


def zmq_ask(address: str, frames: list, curve: tuple | None = None, wait_ms: int = 1500):
    """One request from a fresh DEALER; the reply Message, or None when nothing came back."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        public, secret, server = curve
        dealer.curve_publickey, dealer.curve_secretkey, dealer.curve_serverkey = public, secret, server
    # A refused handshake tears the pipe down; without a send timeout the DEALER would wait for a peer forever.
    dealer.setsockopt(zmq.SNDTIMEO, wait_ms)
    try:
        dealer.connect(address)
        try:
            dealer.send_multipart(frames)
        except zmq.Again:
            return None
        if not dealer.poll(wait_ms):
            return None
        return wire.decode_frames(dealer.recv_multipart())
    finally:
        dealer.close()


def post(url: str, body: bytes, headers: dict | None = None, context: ssl.SSLContext | None = None):
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    from deploy.cli import main

    out = tmp_path_factory.mktemp("keys")
    assert main(["keys", "--out", str(out), "--edges", "edge0", "edge1", "--devices", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def secure(keys_dir):
    """Cloud (TLS + tokens) and two CURVE edge nodes, all from one [security] table."""
    spec = SecuritySpec(keys_dir=str(keys_dir), tls_cert=str(keys_dir / "cloud.crt"),
                        tls_key=str(keys_dir / "cloud.key"))
    cloud_thread, app, url = start_cloud(sec.node_security(spec, "cloud", "cloud"))
    securities = {name: sec.node_security(spec, name, "edge") for name in ("edge0", "edge1")}
    threads, daemons, addresses = start_edges(["edge0", "edge1"], url, securities, tile_timeout_s=5.0)
    yield {"spec": spec, "app": app, "url": url, "daemons": daemons, "addresses": addresses}
    for thread in threads + [cloud_thread]:
        thread.stop()


# ------------------------------------------------------------------------------------- d3 keys
def test_keys_command_writes_private_keys_tokens_and_cluster_lines(tmp_path, capsys):
    from deploy.cli import main

    assert main(["keys", "--out", str(tmp_path / "k"), "--edges", "a", "b", "--devices", "1"]) == 0
    printed = capsys.readouterr().out
    keys = tmp_path / "k"
    assert sorted(p.name for p in (keys / "public").iterdir()) == ["a.key", "b.key", "device0.key"]
    for path in [*(keys / "private").iterdir(), keys / "tokens.json", keys / "cloud.key"]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    tokens = json.loads((keys / "tokens.json").read_text())
    assert set(tokens) == {"a", "b", "device0"} and len(set(tokens.values())) == 3
    public, secret = zmq.auth.load_certificate(str(keys / "private" / "a.key_secret"))
    assert len(public) == 40 and len(secret) == 40
    # the printed lines are a valid [security] table
    import tomllib

    table = tomllib.loads("\n".join(line for line in printed.splitlines() if not line.startswith("#")))
    cluster = parse_cluster({"cloud": {"url": "https://127.0.0.1:1"}, **table})
    assert cluster.security.keys_dir == str(keys) and cluster.security.tls_cert.endswith("cloud.crt")
    assert main(["keys", "--out", str(keys)]) == 2  # never overwrites keys silently


def test_security_table_errors_are_one_clear_line():
    with pytest.raises(ValueError, match="unknown keys"):
        parse_cluster({"cloud": {"url": "http://a:1"}, "security": {"keydir": "x"}})
    with pytest.raises(ValueError, match="needs keys_dir"):
        parse_cluster({"cloud": {"url": "http://a:1"}, "security": {}})
    with pytest.raises(ValueError, match="go together"):
        parse_cluster({"cloud": {"url": "http://a:1"}, "security": {"keys_dir": "k", "tls_cert": "c"}})


# ------------------------------------------------------------------------------------- end to end
def test_authorized_device_gets_the_local_models_output_over_curve_and_tls(secure):
    x, expected = reference(1)
    device = sec.node_security(secure["spec"], "device0", "device", edge_name="edge0")
    with Client("resnet18", edge=secure["addresses"]["edge0"], cloud=secure["url"], input_shape=SHAPE,
                plan=split_plan("resnet18", 3, 40), timeout_s=60, security=device) as client:
        for _ in range(2):
            assert (client.infer(x) - expected).abs().max().item() <= TOLERANCE
        timing = client.timings[-1]
    assert timing.edge_nodes == 2 and timing.cloud_s > 0  # tiles crossed CURVE, the edge used TLS + token
    # straight to the cloud over TLS with the device's own token
    with Client("resnet18", cloud=secure["url"], input_shape=SHAPE, plan=split_plan("resnet18", 3, 3),
                timeout_s=60, security=device) as client:
        assert (client.infer(x) - expected).abs().max().item() <= TOLERANCE


def test_zmq_peers_without_an_allowed_key_are_refused_and_logged(secure, caplog):
    caplog.set_level(logging.WARNING, logger="d3.security")
    address = secure["addresses"]["edge1"]
    daemon = secure["daemons"][1]
    status = [bytes(f) for f in wire.encode_frames(Message(kind="status", request_id="s"))]
    before_zap, served_before = daemon.auth.refused, daemon.metrics.snapshot()["requests_total"]
    # 1) no CURVE at all: the handshake fails, nothing is delivered, nothing comes back
    assert zmq_ask(address, status) is None
    # 2) CURVE with a key pair that is not in the allow-list
    stranger_public, stranger_secret = zmq.curve_keypair()
    server_key = sec.load_public_key(secure["spec"].keys_dir, "edge1")
    assert zmq_ask(address, status, (stranger_public, stranger_secret, server_key)) is None
    # 3) an allowed device key, but pretending the server is someone else: its own handshake fails
    device = sec.load_curve_keys(secure["spec"].keys_dir, "device1")
    wrong_server = sec.load_public_key(secure["spec"].keys_dir, "edge0")
    assert zmq_ask(address, status, (device.public, device.secret, wrong_server)) is None
    deadline = time.monotonic() + 5
    while daemon.auth.refused == before_zap and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.auth.refused > before_zap
    assert daemon.metrics.snapshot()["requests_total"] == served_before  # no traffic reached a handler
    assert "refused a ZeroMQ peer" in caplog.text
    # the same request from an allowed key is answered
    reply = zmq_ask(address, status, (device.public, device.secret, server_key), wait_ms=5000)
    assert reply is not None and reply.kind == "status" and reply.meta["refused"]["zap"] >= 1


def test_http_requests_without_a_valid_token_are_refused_before_any_model_runs(keys_dir, caplog):
    """A fresh cloud, so that its model store shows whether any refused request reached a model."""
    caplog.set_level(logging.WARNING, logger="d3.cloud")
    spec = SecuritySpec(keys_dir=str(keys_dir), tls_cert=str(keys_dir / "cloud.crt"),
                        tls_key=str(keys_dir / "cloud.key"))
    server, app, url = start_cloud(sec.node_security(spec, "cloud", "cloud"))
    try:
        trusted = sec.client_ssl_context(keys_dir / "cloud.crt")
        plan = split_plan("resnet18", 0, 0)
        body = wire.encode_body_bytes(Message(
            kind="infer", request_id="r", model="resnet18", plan_id=wire.plan_digest(plan.to_json()),
            meta={"plan": plan.to_json()}, tensors={"x": example_input(SHAPE)}))
        token = json.loads((keys_dir / "tokens.json").read_text())["device0"]
        for headers in [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": token},
                        {"Authorization": "Bearer " + token[:-1]}]:
            status, answer, reply_headers = post(url + "/v1/infer", body, headers, trusted)
            assert status == 401, headers
            assert wire.decode_body(answer).meta["code"] == "unauthorized"
            assert "Bearer" in reply_headers.get("WWW-Authenticate", "")
        # plain HTTP to the TLS port gets no HTTP answer at all
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            post(url.replace("https", "http") + "/v1/infer", body, {"Authorization": f"Bearer {token}"})
        # a client that does not trust the certificate refuses the server
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            post(url + "/v1/infer", body, {"Authorization": f"Bearer {token}"}, ssl.create_default_context())
        assert app[STORE_KEY]._graphs == {}  # nothing refused ever reached a model
        assert "missing or unknown bearer token" in caplog.text
        status, answer, _ = post(url + "/v1/infer", body, {"Authorization": f"Bearer {token}"}, trusted)
        assert status == 200 and wire.decode_body(answer).kind == "result"
    finally:
        server.stop()


def test_token_check_is_exact():
    check = sec.TokenCheck({"device0": "abc", "edge0": "xyz"})
    assert check.who("Bearer abc") == "device0" and check.who("Bearer xyz") == "edge0"
    assert check.who("Bearer ab") is None and check.who("abc") is None and check.who(None) is None
    assert check.who("Bearer abcd") is None and check.who("Basic abc") is None

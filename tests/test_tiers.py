"""The three tiers for real, over loopback: a cloud endpoint and 3 edge daemons as processes, devices in
this process. Outputs must equal the local model's; bad frames get errors and the servers keep serving."""
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zmq

from partitioner.plan import Plan
from partitioner.zoo import example_input
from tests.conftest import zoo_graph
from tiers import wire
from tiers.demo import LocalCluster, edge_status
from tiers.device import Client, TierError
from tiers.wire import Message

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The given buffer is not writable")]
SHAPE = (1, 3, 112, 112)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = LocalCluster.create(edge_nodes=3, edge_slowdown=1.0, device_slowdown=1.0,
                                workdir=str(tmp_path_factory.mktemp("cluster")),
                                extra_edge_args=["--peer-timeout", "1.5", "--tile-timeout", "5"])
    try:
        local.start(timeout_s=90)
        yield local
    finally:
        local.stop()


def split_plan(model: str, device_nodes: int, edge_end: int, edge_nodes: int = 3) -> Plan:
    graph = zoo_graph(model, SHAPE)
    tiers = graph.prefix_assignment(device_nodes, edge_end)
    names = ("device", "edge", "cloud")
    return Plan(model, SHAPE, {n: names[t] for n, t in tiers.items() if n in graph.records and n in graph.order},
                edge_weights=[1.0] * edge_nodes, strategy="fixed")


def reference(model: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = example_input(SHAPE, seed)
    with torch.no_grad():
        return x, zoo_graph(model, SHAPE).module(x)


def client_for(cluster, model: str, plan: Plan | None = None, edge: int = 0, **kwargs) -> Client:
    return Client(model, edge=cluster.cluster.edges[edge].address, cloud=cluster.cluster.cloud_url,
                  input_shape=SHAPE, plan=plan, timeout_s=60, **kwargs)


@pytest.mark.parametrize("model, cuts", [("resnet18", (3, 45)), ("googlenet", (4, 120))])
def test_three_tiers_equal_the_local_model(cluster, model, cuts):
    x, expected = reference(model)
    plan = split_plan(model, *cuts)
    with client_for(cluster, model, plan) as client:
        for _ in range(2):  # the first request carries the plan JSON, the second names it by id
            output = client.infer(x)
            assert (output - expected).abs().max().item() <= TOLERANCE
        timing = client.timings[-1]
    assert timing.edge_nodes == 3  # the edge segment was tiled over the three nodes
    assert timing.device_s > 0 and timing.edge_s > 0 and timing.cloud_s > 0
    assert set(timing.links_s) == {"device_edge", "edge_cloud"}


@pytest.mark.parametrize("cuts, path", [((0, 0), "cloud"), ((0, 69), "edge"), ((69, 69), "device")])
def test_every_route_gives_the_same_output(cluster, cuts, path):
    x, expected = reference("resnet18", seed=1)
    with client_for(cluster, "resnet18", split_plan("resnet18", *cuts)) as client:
        output = client.infer(x)
        links = set(client.timings[-1].links_s)
    assert (output - expected).abs().max().item() <= TOLERANCE
    assert links == {"cloud": {"device_cloud"}, "edge": {"device_edge"}, "device": set()}[path]


def test_repartitioning_client_switches_plans_between_requests(cluster):
    from partitioner.cost import Links

    x, expected = reference("resnet18", seed=2)
    # it starts believing the device-cloud link is fast; the shaped... here unshaped links then teach it
    with client_for(cluster, "resnet18", links=Links.mbps(5, 5, 5000), edge_weights=(1.0, 1.0, 1.0)) as client:
        versions = set()
        for _ in range(3):
            output = client.infer(x)
            assert (output - expected).abs().max().item() <= TOLERANCE
            versions.add(client.timings[-1].plan_version)
        assert client.links.samples  # bandwidth was measured from real transfers
    assert versions  # every request ran one plan version, whatever re-planning happened


def test_a_repriced_plan_stays_one_plan_on_the_tiers(cluster):
    """The re-partitioner refreshes the current plan's predictions after every request; the tiers must
    still see one plan per version, or each request makes every tier re-build its segments and tiles."""
    from partitioner.cost import Links

    x, expected = reference("resnet18", seed=3)
    with client_for(cluster, "resnet18", links=Links.mbps(200, 2, 2), edge_weights=(1.0, 1.0, 1.0)) as client:
        predictions = set()
        for _ in range(4):
            assert (client.infer(x) - expected).abs().max().item() <= TOLERANCE
            predictions.add(round(client.plan.predicted_ms, 6))
        versions = {timing.plan_version for timing in client.timings}
        assert len(predictions) > 1, "the test needs a plan whose predictions were refreshed"
        assert len(client.store._plans) == len(versions), (len(client.store._plans), versions)


def test_fifty_concurrent_requests_from_eight_clients(cluster):
    # three plans (three tiers; edge + cloud; device + edge) over 8 clients: each tier builds a plan's
    # segments once, so more distinct plans only add build time, not concurrency
    plans = [split_plan("resnet18", d, e) for d, e in [(2, 30), (0, 20), (3, 69)]]
    clients = [client_for(cluster, "resnet18", plans[i % 3], edge=i % 3) for i in range(8)]
    inputs = [reference("resnet18", seed=10 + i) for i in range(50)]
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            outputs = list(pool.map(lambda i: clients[i % 8].infer(inputs[i][0]), range(50)))
    finally:
        for client in clients:
            client.close()
    for (x, expected), output in zip(inputs, outputs):
        assert (output - expected).abs().max().item() <= TOLERANCE


def _zmq_exchange(address: str, frames: list) -> Message:
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(address)
        dealer.send_multipart(frames)
        assert dealer.poll(20000), "no answer"
        return wire.decode_frames(dealer.recv_multipart())
    finally:
        dealer.close()


def test_bad_frames_get_errors_and_the_edge_keeps_serving(cluster):
    address = cluster.cluster.edges[1].address
    good = wire.encode_frames(Message(kind="infer", request_id="r1", tensors={"x": torch.ones(4)}))
    bad_cases = {
        "garbage": [b"\x00\x01 not json"],
        "truncated": [bytes(good[0])],
        "extra": [bytes(good[0]), bytes(good[1]), b"more"],
        "no plan": [bytes(f) for f in good],
        "unknown kind": [bytes(f) for f in wire.encode_frames(Message(kind="teleport"))],
    }
    for name, frames in bad_cases.items():
        reply = _zmq_exchange(address, frames)
        assert reply.kind == "error", name
        assert reply.meta["error"], name
    assert _zmq_exchange(address, [bytes(f) for f in good]).meta["code"] == "unknown_plan"
    x, expected = reference("resnet18", seed=3)
    with client_for(cluster, "resnet18", split_plan("resnet18", 2, 40), edge=1) as client:
        assert (client.infer(x) - expected).abs().max().item() <= TOLERANCE


def _post(url: str, body: bytes, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_bad_bodies_get_errors_and_the_cloud_keeps_serving(cluster):
    url = cluster.cluster.cloud_url
    plan = split_plan("resnet18", 0, 0)
    plan_json = plan.to_json()
    wrong_shape = Message(kind="infer", model="resnet18", plan_id=wire.plan_digest(plan_json),
                          meta={"plan": plan_json}, tensors={"x": torch.ones(1, 3, 8, 8)})
    cases = [b"", b"GET / HTTP/1.1", wire.encode_body_bytes(Message(kind="infer", tensors={"x": torch.ones(9)}))[:-5],
             wire.encode_body_bytes(wrong_shape)]
    for body in cases:
        status, answer = _post(url + "/v1/infer", body)
        assert status == 400
        assert wire.decode_body(answer).kind == "error"
    # a header announcing 4 GB is refused before anything is allocated or read
    header = json.dumps({"protocol": 1, "kind": "infer", "request_id": "big", "model": "", "plan_version": 0,
                         "plan_id": "", "model_digest": "", "meta": {},
                         "tensors": [["x", "float32", [1 << 30], 1 << 32]]}).encode()
    status, answer = _post(url + "/v1/infer", wire.MAGIC + len(header).to_bytes(4, "little") + header)
    assert status == 400 and "over the" in wire.decode_body(answer).meta["error"]
    with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
        assert json.loads(response.read())["ok"] is True
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        metrics = json.loads(response.read())
    assert metrics["requests"].get("bad_frame", 0) >= 2 and metrics["requests_total"] >= 4
    x, expected = reference("resnet18", seed=4)
    with client_for(cluster, "resnet18", plan) as client:
        assert (client.infer(x) - expected).abs().max().item() <= TOLERANCE


def test_model_mismatch_is_refused_with_a_clear_error(cluster):
    plan = split_plan("resnet18", 0, 0)
    with client_for(cluster, "resnet18", plan) as client:
        client.store.digest("resnet18", SHAPE)
        client.store._digests[("resnet18", SHAPE)] = "0" * 16  # as if this device had other weights
        with pytest.raises(TierError, match="different weights"):
            client.infer(reference("resnet18")[0])


def test_a_dead_edge_node_is_dropped_and_its_tiles_rerun(cluster):
    """Last in the module: it kills a node."""
    x, expected = reference("resnet18", seed=5)
    plan = split_plan("resnet18", 1, 60)
    with client_for(cluster, "resnet18", plan) as client:
        client.infer(x)
        cluster.kill("edge2")
        output = client.infer(x)  # edge2's tiles time out and re-run on edge0, or edge2 is already dropped
        assert (output - expected).abs().max().item() <= TOLERANCE
        status = edge_status(cluster.cluster.edges[0].address, timeout_s=10)
        assert "edge2" not in status["alive"]
        output = client.infer(x)
        assert (output - expected).abs().max().item() <= TOLERANCE
        assert client.timings[-1].edge_nodes == 2


def test_cluster_file_errors_are_one_clear_line(tmp_path):
    from deploy.cluster import load_cluster

    path = tmp_path / "c.toml"
    for text, words in [("[cloud\n", "not valid TOML"), ("[cloud]\nurl = 'ftp://x'\n", "http:// URL"),
                        ("[cloud]\nurl = 'http://a:1'\n[[edge]]\nname = 'e'\naddress = 'e:1'\n", "tcp://"),
                        ("[cloud]\nurl = 'http://a:1'\n[links]\nwan = 'x'\n", "unknown links")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=words):
            load_cluster(path)
    with pytest.raises(FileNotFoundError):
        load_cluster(tmp_path / "missing.toml")
    cluster = load_cluster("deploy/examples/local.toml")
    assert [e.name for e in cluster.edges] == ["edge0", "edge1", "edge2"]
    assert cluster.cloud_host_port == ("127.0.0.1", 8700)


def test_the_planner_learns_a_tier_slower_than_its_model_and_moves_work_off_it():
    """A tiled edge measured 2x its prediction: the correction converges to ~2 (the prediction already holds
    the current factor), and a re-plan with it stops putting the work where it is now too slow."""
    from partitioner.cost import Links, TierModels
    from tiers.device import COMPUTE_TIERS, RequestTiming, _Planner, learned_compute_factors

    factors = {tier: 1.0 for tier in COMPUTE_TIERS}
    for _ in range(12):
        predicted_edge_ms = 100.0 * factors["edge"]
        timing = RequestTiming(0, "d3", edge_s=0.2, cloud_s=0.001)  # edge: truly 200 ms; cloud: too short
        factors = learned_compute_factors(factors, {"edge": predicted_edge_ms, "cloud": 1.0}, timing)
    assert factors["edge"] == pytest.approx(2.0, rel=0.01) and factors["cloud"] == 1.0 and factors["device"] == 1.0
    assert learned_compute_factors({t: 1.0 for t in COMPUTE_TIERS}, {"edge": 10.0},
                                   RequestTiming(0, "d3", edge_s=100.0))["edge"] == 4.0  # bounded
    # the device times its own stage: one request is enough, and a plan measured slow on it is not retried
    device_once = learned_compute_factors({t: 1.0 for t in COMPUTE_TIERS}, {"device": 400.0, "edge": 50.0},
                                          RequestTiming(0, "d3", device_s=0.7, edge_s=0.05))
    assert device_once["device"] == pytest.approx(1.75) and device_once["edge"] == pytest.approx(1.0)

    graph = zoo_graph("resnet18", (1, 3, 224, 224))
    tiers = TierModels.default()
    links = Links.mbps(100, 30, 30)  # a fast LAN to the edge, slower uplinks: the (modelled) edge computes
    planner = _Planner(graph, None, links, tiers, (1.0, 1.0, 1.0))
    on_edge = sum(1 for tier in planner.plan.assignment.values() if tier == "edge")
    assert on_edge > 0, "the test needs a plan that uses the edge"
    slower = {tier: planner.base_slowdowns[tier] * (4.0 if tier == "edge" else 1.0) for tier in COMPUTE_TIERS}
    for _ in range(3):  # the re-partitioner's hysteresis wants a better plan to stay better for a while
        plan = planner.update(links, slower)
    assert sum(1 for tier in plan.assignment.values() if tier == "edge") < on_edge, plan.assignment


def test_a_local_cluster_whose_port_was_taken_starts_on_fresh_ports(tmp_path):
    """free_port() is only a guess: another process can take the port before the daemon binds it."""
    import socket

    local = LocalCluster.create(edge_nodes=2, edge_slowdown=1.0, device_slowdown=1.0, workdir=str(tmp_path))
    taken = int(local.cluster.edges[0].address.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            local.start(timeout_s=60)
            assert local.cluster.edges[0].address != f"tcp://127.0.0.1:{taken}"
            assert str(local.cluster.edges[0].address) in local.path.read_text()
        finally:
            local.stop()

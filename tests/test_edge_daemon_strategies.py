"""The edge daemons run every edge strategy's plan for real: 3 edge daemons of different announced speeds
and a cloud endpoint as processes on loopback, a device in this process. Each strategy's answer must
equal the local model's within the project tolerance with the same top-1 class."""
import json

import pytest
import torch

from partitioner.edge_strategies import STRATEGY_NAMES
from partitioner.plan import Plan
from partitioner.zoo import example_input
from tests.conftest import zoo_graph
from tiers.demo import LocalCluster, free_port
from tiers.device import Client

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The given buffer is not writable")]
SPEEDS = (1.0, 0.5, 0.25)  # announced to the peers (the planner sees them); no sleeping, to keep it fast
SHAPES = {"vgg16": (1, 3, 64, 64), "resnet50": (1, 3, 64, 64), "googlenet": (1, 3, 64, 64),
          "inception_v3": (1, 3, 96, 96)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from deploy.cluster import Cluster, EdgeNodeSpec

    directory = tmp_path_factory.mktemp("edge-strategies")
    edges = [EdgeNodeSpec(f"edge{i}", f"tcp://127.0.0.1:{free_port()}", 1.0, speed)
             for i, speed in enumerate(SPEEDS)]
    spec = Cluster(f"http://127.0.0.1:{free_port()}", edges)
    path = directory / "cluster.toml"
    path.write_text(spec.to_toml())
    import time

    local = LocalCluster(spec, path, time.monotonic(), extra_edge_args=["--tile-timeout", "30"])
    try:
        local.start(timeout_s=120)
        yield local
    finally:
        local.stop()


def three_tier_plan(model: str, edge_strategy: str) -> Plan:
    """A few nodes on the device, most of the model on the edge, the classifier tail in the cloud."""
    graph = zoo_graph(model, SHAPES[model])
    count = len(graph.order)
    tiers = graph.prefix_assignment(2, count - 3)
    names = ("device", "edge", "cloud")
    return Plan(model, SHAPES[model], {n: names[tiers[n]] for n in graph.order}, edge_weights=list(SPEEDS),
                strategy="fixed", edge_strategy=edge_strategy)


def check(output: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (output - expected).abs().max().item()
    assert diff <= 1e-5 * max(1.0, expected.abs().max().item()), diff
    assert torch.equal(output.argmax(-1), expected.argmax(-1))


# every strategy on the two DAG models; a share each on vgg16 and inception_v3, whose weights make every
# new plan slow to build on four processes (tests/test_edge_strategies.py runs all of them in-process)
CASES = {"googlenet": STRATEGY_NAMES, "resnet50": STRATEGY_NAMES, "vgg16": ("iop", "hetero_lp", "auction"),
         "inception_v3": ("zones", "dpfl", "auto")}


@pytest.mark.parametrize("model", list(CASES))
def test_every_edge_strategy_answers_like_the_local_model(cluster, model):
    x = example_input(SHAPES[model], seed=4)
    with torch.no_grad():
        expected = zoo_graph(model, SHAPES[model]).module(x)
    ran = {}
    for strategy in CASES[model]:
        plan = three_tier_plan(model, strategy)
        with Client(model, edge=cluster.cluster.edges[0].address, cloud=cluster.cluster.cloud_url,
                    input_shape=SHAPES[model], plan=plan, timeout_s=90) as client:
            check(client.infer(x), expected)
            timing = client.timings[-1]
        assert timing.edge_nodes == 3 and timing.cloud_s > 0
        ran[strategy] = timing.edge_strategy
    # the coordinator ran the strategy each plan named; auto ran the one it predicted fastest
    assert all(ran[name] == name for name in ran if name != "auto"), ran
    assert ran.get("auto", "tiles") in STRATEGY_NAMES[1:], ran


def test_the_client_stamps_its_edge_strategy_on_a_re_planned_plan(cluster):
    from partitioner.cost import Links

    model, shape = "resnet50", SHAPES["resnet50"]
    x = example_input(shape, seed=5)
    with torch.no_grad():
        expected = zoo_graph(model, shape).module(x)
    with Client(model, edge=cluster.cluster.edges[0].address, cloud=cluster.cluster.cloud_url, input_shape=shape,
                links=Links.mbps(1000, 1, 1), edge_weights=SPEEDS, edge_strategy="iop", timeout_s=90) as client:
        check(client.infer(x), expected)
        timing = client.timings[-1]
    assert timing.edge_strategy in ("iop", "whole", "")  # iop whenever the planner gave the edge any work


def test_older_plan_json_without_an_edge_strategy_runs_tiles():
    plan = Plan("resnet18", (1, 3, 64, 64), {"conv1": "edge"})
    data = json.loads(plan.to_json())
    del data["edge_strategy"]
    assert Plan.from_json(json.dumps(data)).edge_strategy == "tiles"


def test_d3_edge_and_d3_demo_take_an_edge_strategy():
    from deploy.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).edge_strategy == "tiles"
    assert parser.parse_args(["demo", "--edge-strategy", "zones"]).edge_strategy == "zones"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--edge-strategy", "nope"])
    args = parser.parse_args(["edge", "--cluster", "c.toml", "--name", "e0", "--edge-strategy", "dpfl"])
    assert args.edge_strategy == "dpfl"
    assert parser.parse_args(["edge", "--cluster", "c.toml", "--name", "e0"]).edge_strategy is None


def test_device_values_for_the_cloud_go_straight_to_the_cloud(cluster):
    """googlenet's inception3a with its 1x1 branch in the cloud: maxpool2 goes device->cloud directly
    while the edge computes the other three branches; the cloud joins both by request id."""
    model, shape = "googlenet", SHAPES["googlenet"]
    graph = zoo_graph(model, shape)
    first = graph.order.index("inception3a_branch1_conv")
    cat = graph.order.index("cat")
    assignment = {}
    for index, name in enumerate(graph.order):
        if index < first:
            assignment[name] = "device"
        elif index >= cat or name in ("inception3a_branch1_conv", "inception3a_branch1_bn", "relu_3"):
            assignment[name] = "cloud"
        else:
            assignment[name] = "edge"
    plan = Plan(model, shape, assignment, edge_weights=list(SPEEDS), strategy="fixed", edge_strategy="zones")
    x = example_input(shape, seed=6)
    with torch.no_grad():
        expected = zoo_graph(model, shape).module(x)
    with Client(model, edge=cluster.cluster.edges[0].address, cloud=cluster.cluster.cloud_url, input_shape=shape,
                plan=plan, timeout_s=90) as client:
        for _ in range(2):
            check(client.infer(x), expected)
        timing = client.timings[-1]
    maxpool_bytes = graph.records["maxpool2"].output_bytes
    assert timing.bytes["device_cloud"] >= maxpool_bytes  # sent to the cloud itself ...
    assert timing.bytes["device_edge"] < 2 * maxpool_bytes + 4096  # ... and to the edge once, for the edge's branches
    assert timing.bytes["edge_cloud"] > 0 and timing.edge_strategy == "zones"

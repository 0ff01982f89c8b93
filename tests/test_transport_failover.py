"""The device keeps working when its coordinator edge node dies: a FailoverClient given every edge node
of the cluster moves to the next one. Every request of the stream is answered with the local model's
output (or a clear error within its deadline); the counts are asserted."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_security import SHAPE, reference, split_plan
from tiers.device import TierError
from tiers.failover import BasicClient, FailoverClient

from conftest import fast_failing_cluster

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The given buffer is not writable")]
TOLERANCE = 1e-4
DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from fast_failing_cluster(tmp_path_factory, "coordinator")


def test_the_failover_client_is_what_d3_infer_builds_on():
    assert issubclass(FailoverClient, BasicClient)
    with pytest.raises(ValueError, match="edge names"):
        FailoverClient("resnet18", edges=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], edge_names=["edge0"],
                       input_shape=SHAPE)


def test_killing_the_coordinator_mid_stream_moves_the_device_to_another_edge_node(cluster):
    edges = [spec.address for spec in cluster.cluster.edges]
    names = [spec.name for spec in cluster.cluster.edges]
    samples = [reference(seed) for seed in range(20, 24)]
    plan = split_plan("resnet18", 2, 40, edge_nodes=3)  # every request goes through the edge
    outcomes: list[tuple[str, float, float]] = []  # (ok | error text, max abs diff, seconds)

    with FailoverClient("resnet18", edges=edges, edge_names=names, cloud=cluster.cluster.cloud_url,
                        input_shape=SHAPE, plan=plan, timeout_s=DEADLINE_S, attempt_fraction=0.25) as client:
        client.timeout_s = 120.0  # the first request builds the plan on every tier: slow on a busy machine
        client.infer(samples[0][0])
        client.timeout_s = DEADLINE_S
        assert client.edge_address == edges[0]

        def one(index: int) -> None:
            x, expected = samples[index % len(samples)]
            started = time.monotonic()
            try:
                diff = (client.infer(x) - expected).abs().max().item()
                outcomes.append(("ok", diff, time.monotonic() - started))
            except TierError as exc:
                outcomes.append((str(exc), float("nan"), time.monotonic() - started))

        with ThreadPoolExecutor(max_workers=2) as pool:  # two requests in flight when the node dies
            futures = [pool.submit(one, index) for index in range(24)]
            while sum(f.done() for f in futures) < 8:
                time.sleep(0.01)
            cluster.kill("edge0")  # SIGKILL the coordinator
            killed_after = sum(f.done() for f in futures)
            for future in futures:
                future.result(timeout=DEADLINE_S * 3)
        switches, address, faults = client.edge_switches, client.edge_address, dict(client.faults)

    answered = [o for o in outcomes if o[0] == "ok"]
    errors = [o for o in outcomes if o[0] != "ok"]
    assert len(outcomes) == 24 and killed_after < 24
    assert max(o[2] for o in outcomes) <= DEADLINE_S + 2.0  # nobody waited past the deadline
    assert all(o[1] <= TOLERANCE for o in answered)  # no wrong tensor
    assert all("deadline" in o[0] or "edge" in o[0] for o in errors)  # errors say what went wrong
    assert len(answered) == 24, f"{len(errors)} errors: {errors[:2]}"
    assert switches == 1 and address == edges[1]  # moved once, to the next node of the file
    assert set(faults) <= {"edge_unreachable", "try_timeout"} and faults

    # a device that starts while its first edge node is already down moves on at the first refused connect
    x, expected = samples[1]
    with FailoverClient("resnet18", edges=edges, cloud=cluster.cluster.cloud_url, input_shape=SHAPE, plan=plan,
                        timeout_s=DEADLINE_S) as late:
        started = time.monotonic()
        assert (late.infer(x) - expected).abs().max().item() <= TOLERANCE
        assert time.monotonic() - started < DEADLINE_S
        assert late.edge_address == edges[1] and late.faults == {"edge_unreachable": 1}
    print(f"\ncoordinator killed after {killed_after} of 24 requests: {len(answered)} answered, "
          f"max diff {max(o[1] for o in answered):.1e}, slowest {max(o[2] for o in outcomes):.1f} s, "
          f"faults {faults}, now on {address}")

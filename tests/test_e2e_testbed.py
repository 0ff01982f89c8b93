"""End to end on the namespace testbed: `d3 testbed up` with its daemons, a device client inside the
device namespace (`ip netns exec`), real requests across the htb-shaped veth links. The device-edge
transfer time the client measures must match the rate tc was given, and the output must equal the
local model's. Skips with the kernel's reason where namespaces/cgroups are refused (no root)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import cgroups, netns
from deploy.testbed import down, refusal_reason, state_path_for

D3 = str(Path(sys.executable).with_name("d3"))
PREFIX = "d3tbe-"
RATE_BPS = 10e6
REFUSAL = refusal_reason()
needs_root = pytest.mark.skipif(REFUSAL is not None, reason=REFUSAL or "")


def d3(*args: str, timeout_s: float = 180, netns_name: str | None = None) -> subprocess.CompletedProcess:
    command = [D3, *args]
    if netns_name:
        command = netns.in_ns(netns_name, command)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def testbed():
    down(PREFIX, progress=lambda line: None)
    up = d3("testbed", "up", "--prefix", PREFIX, "--edge-nodes", "3", "--edge-cpu", "0.7",
            "--bw", f"device-edge={RATE_BPS / 1e6:g}Mbit,edge-cloud=100Mbit,device-cloud=5Mbit", "--json")
    assert up.returncode == 0, up.stderr
    state = json.loads(up.stdout)
    try:
        yield state
    finally:
        result = d3("testbed", "down", "--prefix", PREFIX)
        assert result.returncode == 0, result.stderr
        assert netns.list_namespaces(PREFIX) + cgroups.list_groups(PREFIX) == []
        assert not state_path_for(PREFIX).exists()


@needs_root
def test_request_crosses_shaped_links_at_the_set_rate_and_matches_the_local_model(testbed, tmp_path):
    assert [d["tier"] for d in testbed["daemons"]] == ["cloud", "edge1", "edge2", "edge3"]
    assert all(d["alive_at_start"] for d in testbed["daemons"]), testbed["daemons"]
    # edge_only: the device sends its whole 448x448 input (2.4 MB, ~1.9 s at 10 Mbit/s) to edge1
    result = d3("infer", "resnet18", "--input", "1x3x448x448", "--cluster", testbed["cluster_config"],
                "--strategy", "edge_only", "--requests", "2", "--json", netns_name=PREFIX + "device")
    assert result.returncode == 0, result.stderr[-2000:]
    requests = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(requests) == 2, result.stdout
    for request in requests:
        assert request["max_abs_diff"] == 0.0  # bit-exact: the untiled edge segment is the local model
        sent = request["bytes"]["device_edge"]
        assert sent > 2_000_000
        expected_s = sent * 8 / RATE_BPS
        # TCP/IP headers take ~5% of the line rate; the issue allows 15%
        assert request["links_s"]["device_edge"] == pytest.approx(expected_s, rel=0.15), request
    # tc saw the bytes on the device-edge classes: the traffic really crossed the shaped veths
    status = json.loads(d3("testbed", "status", "--prefix", PREFIX, "--json").stdout)
    carried = sum(point["sent_bytes"] for point in status["links"]["device-edge"])
    assert carried >= 2 * 2_400_000
    assert all(daemon["alive"] for daemon in status["daemons"])

    # `d3 replay` logs what the tiers measured next to what it set: their own counters (polled from inside
    # the device namespace) and the device's latest link estimate
    Path(testbed["run_dir"], "device-links.jsonl").write_text(json.dumps({"estimate_bps": {"device_edge": 9.6e6}}) + "\n")
    log = tmp_path / "replay.jsonl"
    replayed = d3("replay", "const:8", "--link", "device-edge", "--duration", "2", "--prefix", PREFIX,
                  "--log", str(log))
    assert replayed.returncode == 0, replayed.stderr
    assert "device est: device_edge 9.60" in replayed.stdout
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [step["set_bps"]["device-edge"] for step in steps] == [8e6, 8e6]
    tiers = steps[-1]["observed"]["tiers"]
    assert tiers["edge1"]["requests"] >= 2 and "rx_bps" in tiers["edge1"]
    assert set(tiers) == {"cloud", "edge1", "edge2", "edge3"} and tiers["cloud"] is not None
    assert steps[-1]["observed"]["device_estimate_bps"] == {"device_edge": 9.6e6}


@needs_root
def test_down_leaves_nothing_even_with_a_client_still_running(testbed):
    # a device process left behind in the device namespace (a crashed benchmark) must not block `down`
    sleeper = subprocess.Popen(netns.in_ns(PREFIX + "device", [sys.executable, "-c", "import time; time.sleep(60)"]))
    try:
        time.sleep(0.3)
        assert sleeper.pid and sleeper.poll() is None
        assert netns.namespace_pids(PREFIX + "device")
    finally:
        pass
    result = d3("testbed", "down", "--prefix", PREFIX)
    assert result.returncode == 0, result.stderr
    assert sleeper.wait(10) is not None
    assert netns.list_namespaces(PREFIX) == []


def test_tier_observer_reports_rates_from_counter_deltas_and_the_device_estimate(tmp_path, monkeypatch):
    from traces.replay import TierObserver

    log = tmp_path / "device.jsonl"
    log.write_text(json.dumps({"estimate_bps": {"device_edge": 1e6}}) + "\n" +
                   json.dumps({"estimate_bps": {"device_edge": 2e6}}) + "\n")
    observer = TierObserver(device_log=str(log))
    snapshots = iter([{"edge1": {"bytes_in": 0, "bytes_out": 0, "requests_total": 1}, "cloud": None},
                      {"edge1": {"bytes_in": 1_000_000, "bytes_out": 0, "requests_total": 3}, "cloud": None}])
    monkeypatch.setattr(observer, "_poll", lambda: next(snapshots))
    clock = iter([100.0, 102.0])
    monkeypatch.setattr("traces.replay.time.monotonic", lambda: next(clock))
    first, second = observer(), observer()
    assert "rx_bps" not in first["tiers"]["edge1"]  # no previous step to difference against
    assert second["tiers"]["edge1"]["rx_bps"] == pytest.approx(4e6)  # 1 MB in 2 s
    assert second["tiers"]["edge1"]["requests"] == 3 and second["tiers"]["cloud"] is None
    assert second["device_estimate_bps"] == {"device_edge": 2e6}  # the latest line


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_e2e", Path(__file__).resolve().parents[1] / "bench" / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_table_ratios_percentiles_and_verdicts():
    e2e = _bench_module()
    def run(strategy, latencies, plans):
        return e2e.RunResult("resnet18", "lte", strategy, requests=[{"latency_ms": v} for v in latencies],
                             plans_used=plans, plan={"tiers": {"device": 1, "edge": 0, "cloud": 68}, "edge_nodes": 1})
    results = [run("d3", [100, 110, 120, 400], ["a", "b"]), run("cloud_only", [200, 220, 240], ["b"]),
               run("device_only", [90, 95, 300], ["c"])]
    assert results[0].median_ms == 115 and results[0].p95_ms == 400
    table = e2e.format_table(results)
    rows = {line.split()[2]: line for line in table.splitlines()[1:]}
    assert "1.91x" in rows["cloud_only"] and "0.83x" in rows["device_only"]  # 220 / 115, 95 / 115
    [verdict] = e2e.verdicts(results)
    assert "does NOT beat device_only" in verdict and "same split" not in verdict
    results[2].plans_used = ["a", "b"]  # the baseline ran exactly D3's splits: a tie, and the verdict says so
    assert "same work as D3" in e2e.verdicts(results)[0]
    results[2].requests = [{"latency_ms": 500}]
    assert "beats every baseline" in e2e.verdicts(results)[0]
    results.append(run("d3_fixed", [50], ["a"]))  # an ablation of D3, reported but not a baseline
    assert "beats every baseline" in e2e.verdicts(results)[0]


def test_bench_refuses_unknown_strategies():
    e2e = _bench_module()
    with pytest.raises(SystemExit):
        e2e.parse_args(["--strategies", "d3,magic"])
    args = e2e.parse_args(["--quick", "--models", "resnet18"])
    assert args.models == ["resnet18"] and args.max_s == 10.0 and args.strategies == list(e2e.STRATEGIES)
    assert args.rounds == 1 and e2e.parse_args(["--models", "resnet18"]).rounds == 2
    with pytest.raises(SystemExit):
        e2e.parse_args(["--rounds", "4", "--requests", "3"])


def test_bench_rounds_alternate_the_strategies_and_merge_onto_one_time_axis():
    """A stream split into rounds: d3 first in round 1, last in round 2; each strategy's requests add up
    to the stream's, round 2's times follow round 1's, and the scenario's clients are released after."""
    from types import SimpleNamespace

    e2e = _bench_module()
    assert [e2e.round_share(3, 2, i) for i in range(2)] == [2, 1]
    assert [e2e.round_share(60, 3, i) for i in range(3)] == [20, 20, 20]
    assert sum(e2e.round_share(7, 4, i) for i in range(4)) == 7
    order, sent = [], []

    def fake_run_one(worker, model, scenario, strategy, traces, opts, round_index):
        order.append(strategy)
        return e2e.RunResult(model, scenario, strategy, requests=[{"t_s": 1.0, "latency_ms": 10.0 * (1 + round_index)}],
                             bandwidth=[{"wall_s": 0.5}], repartitions=1, plans_used=[f"p{round_index}"],
                             plan={"round": round_index})

    e2e.run_one = fake_run_one
    worker = SimpleNamespace(send=lambda **command: sent.append(command))
    opts = SimpleNamespace(strategies=["d3", "neurosurgeon", "cloud_only"], rounds=2, max_s=20.0, topology="local-edge")
    results = e2e.run_scenario(worker, "resnet18", "lte", {}, opts)
    assert order == ["d3", "neurosurgeon", "cloud_only", "cloud_only", "neurosurgeon", "d3"]
    assert sent == [{"cmd": "release"}]
    d3 = results[0]
    assert d3.strategy == "d3" and [q["t_s"] for q in d3.requests] == [1.0, 11.0]
    assert [q["round"] for q in d3.requests] == [0, 1] and d3.median_ms == 15.0
    assert [b["wall_s"] for b in d3.bandwidth] == [0.5, 10.5]
    assert d3.repartitions == 2 and d3.plans_used == ["p0", "p1"] and d3.plan == {"round": 1}

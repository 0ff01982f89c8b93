"""The namespace testbed: shaped veth links carry what their rate implies, cgroups hold the daemons, and
`down` removes everything, also after `up` was killed midway. Skips with the kernel's reason without root."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import cgroups, netns
from deploy.testbed import (TestbedConfig, refusal_reason, down, parse_bandwidths, parse_rate, probe_transfer, set_link_rate,
                            state_path_for, status, up)

D3 = str(Path(sys.executable).with_name("d3"))


REFUSAL = refusal_reason()
needs_root = pytest.mark.skipif(REFUSAL is not None, reason=REFUSAL or "")


def leftovers(prefix: str) -> list[str]:
    return netns.list_namespaces(prefix) + cgroups.list_groups(prefix)


@pytest.fixture
def testbed_prefix(request):
    prefix = request.param if hasattr(request, "param") else "d3tbt-"
    down(prefix, progress=lambda line: None)
    yield prefix
    down(prefix, progress=lambda line: None)
    assert leftovers(prefix) == []


def test_cpu_quotas_use_a_short_period_and_stretch_it_below_the_kernels_minimum_quota():
    # a 10 ms period: a throttled tier waits at most a few ms, not up to 90 ms of a 100 ms period
    assert cgroups.period_and_quota_us(0.5) == (10_000, 5_000)
    assert cgroups.period_and_quota_us(0.1) == (10_000, 1_000)
    assert cgroups.period_and_quota_us(0.02) == (50_000, 1_000)  # the kernel refuses quotas under 1 ms
    assert cgroups.period_and_quota_us(2.0) == (10_000, 20_000)
    assert cgroups.period_and_quota_us(None)[1] == -1 and cgroups.period_and_quota_us(0)[1] == -1


def test_rate_and_bandwidth_parsing():
    assert parse_rate("20Mbit") == 20e6 and parse_rate("500kbit") == 5e5 and parse_rate("1.5mbps") == 1.5e6
    assert parse_bandwidths("device-edge=5Mbit")["device-edge"] == 5e6
    with pytest.raises(ValueError, match="unit"):
        parse_rate("20 furlongs")
    with pytest.raises(ValueError, match="LINK=RATE"):
        parse_bandwidths("uplink=5Mbit")
    with pytest.raises(ValueError, match="prefix"):
        down("", progress=print)  # never "remove everything"


@needs_root
def test_shaped_links_carry_the_rate_they_were_set_to(testbed_prefix):
    config = TestbedConfig(edge_nodes=2, edge_cpu=[0.5, 0.3], prefix=testbed_prefix, start_daemons=False,
                           bandwidth_bps={"device-edge": 10e6, "edge-cloud": 100e6, "device-cloud": 5e6})
    up(config, progress=lambda line: None)
    assert set(netns.list_namespaces(testbed_prefix)) == {testbed_prefix + n for n in
                                                          ("lan", "device", "cloud", "edge1", "edge2")}
    assert cgroups.quota_cpus(testbed_prefix + "edge2") == pytest.approx(0.3)
    assert cgroups.quota_cpus(testbed_prefix + "device") == pytest.approx(0.2)
    # ~2 s per transfer; TCP/IP headers cost ~5% of the line rate, the test allows 15%
    for source, target, nbytes, rate_bps in [("device", "edge1", 2_500_000, 10e6),
                                             ("cloud", "device", 1_250_000, 5e6)]:
        result = probe_transfer(testbed_prefix, source, target, nbytes)
        expected_s = nbytes * 8 / rate_bps
        assert result["seconds"] == pytest.approx(expected_s, rel=0.15), (source, target, result)
    set_link_rate(testbed_prefix, "device-edge", 20e6)
    result = probe_transfer(testbed_prefix, "edge2", "device", 2_500_000)
    assert result["seconds"] == pytest.approx(1.0, rel=0.15)
    report = status(testbed_prefix)
    assert {p["rate"] for p in report["links"]["device-edge"]} == {"20Mbit"}


@needs_root
def test_daemons_run_inside_their_namespace_and_cgroup(testbed_prefix):
    sleeper = f"{sys.executable} -c 'import time; time.sleep(120)'"
    config = TestbedConfig(edge_nodes=1, edge_cpu=[0.5], prefix=testbed_prefix, cloud_command=sleeper,
                           edge_command=sleeper + " {node}")
    state = up(config, progress=lambda line: None)
    assert [d["tier"] for d in state["daemons"]] == ["cloud", "edge1"]
    for daemon in state["daemons"]:
        assert daemon["alive_at_start"]
        assert daemon["pid"] in cgroups.pids(testbed_prefix + daemon["tier"])
        assert daemon["pid"] in netns.namespace_pids(testbed_prefix + daemon["tier"])
    removed = down(testbed_prefix, progress=lambda line: None)
    assert {d["pid"] for d in state["daemons"]} <= set(removed["processes"])
    for daemon in state["daemons"]:
        assert not Path(f"/proc/{daemon['pid']}").exists() or \
            Path(f"/proc/{daemon['pid']}/stat").read_text().split()[2] == "Z"


@needs_root
@pytest.mark.parametrize("testbed_prefix", ["d3tbcr-"], indirect=True)
def test_down_cleans_up_after_up_was_killed_midway(testbed_prefix):
    env = dict(os.environ, D3_TESTBED_STALL_AT="daemons")
    sleeper = f"{sys.executable} -c 'import time; time.sleep(120)'"
    proc = subprocess.Popen([D3, "testbed", "up", "--prefix", testbed_prefix, "--edge-nodes", "2",
                             "--cloud-cmd", sleeper, "--edge-cmd", sleeper],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "stalled at daemons" in line or not line:
                break
        assert "stalled at daemons" in lines[-1], "".join(lines)
        daemon_pids = {pid for tier in ("cloud", "edge1", "edge2") for pid in cgroups.pids(testbed_prefix + tier)}
        assert len(daemon_pids) == 3
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no cleanup code runs
        proc.wait()
    state_path_for(testbed_prefix).unlink(missing_ok=True)  # and the state file is lost too
    assert leftovers(testbed_prefix)
    result = subprocess.run([D3, "testbed", "down", "--prefix", testbed_prefix], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert leftovers(testbed_prefix) == []
    time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
                   for pid in daemon_pids)


@needs_root
def test_up_refuses_a_second_testbed_with_the_same_prefix(testbed_prefix):
    up(TestbedConfig(edge_nodes=1, edge_cpu=[0.5], prefix=testbed_prefix, start_daemons=False),
       progress=lambda line: None)
    result = subprocess.run([D3, "testbed", "up", "--prefix", testbed_prefix, "--no-daemons"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "already exists" in result.stderr
    status_json = json.loads(subprocess.run([D3, "testbed", "status", "--prefix", testbed_prefix, "--json"],
                                            capture_output=True, text=True, timeout=60).stdout)
    assert status_json["status"] == "up" and len(status_json["namespaces"]) == 4

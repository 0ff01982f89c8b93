"""Trace replay: the rates set per step follow the trace, in-process and on the testbed's tc classes."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from traces.formats import BandwidthTrace, constant_trace
from traces.replay import InProcessApplier, replay

D3 = str(Path(sys.executable).with_name("d3"))


class RecordingApplier:
    def __init__(self):
        self.calls = []

    def apply(self, link, bps):
        self.calls.append((time.monotonic(), link, bps))

    def measured_bps(self, link):
        return None

    def close(self):
        pass


def test_replay_sets_each_steps_mean_rate_on_schedule():
    trace = BandwidthTrace(np.array([0.0, 1.0, 2.0, 3.0]), np.array([4.0, 8.0, 2.0, 6.0]), end_s=4.0)
    applier = RecordingApplier()
    start = time.monotonic()
    records = replay({"device-edge": trace, "edge-cloud": constant_trace(100)}, applier, step_s=2.0, speed=10.0,
                     duration_s=4.0)
    elapsed = time.monotonic() - start
    assert [r.set_bps["device-edge"] for r in records] == [6e6, 4e6]  # means of [4,8] and [2,6]
    assert all(r.set_bps["edge-cloud"] == 100e6 for r in records)
    assert [call[1] for call in applier.calls] == ["device-edge", "edge-cloud"] * 2
    assert elapsed == pytest.approx(0.4, abs=0.15)  # 4 s of trace at 10x
    assert applier.calls[2][0] - applier.calls[0][0] == pytest.approx(0.2, abs=0.08)


def test_in_process_replay_shapes_the_probe_traffic():
    trace = BandwidthTrace(np.array([0.0, 1.0]), np.array([4.0, 16.0]), end_s=2.0)
    applier = InProcessApplier(["device-edge"])
    try:
        records = replay({"device-edge": trace}, applier, step_s=0.5, speed=1.0, duration_s=2.0)
        final = applier.measured_bps("device-edge")
    finally:
        applier.close()
    # a record's measurement covers the step before it: 4 Mbit/s, then (after the change) 16 Mbit/s
    assert records[2].measured_bps["device-edge"] == pytest.approx(4e6, rel=0.2)
    assert final == pytest.approx(16e6, rel=0.2)


def test_replay_cli_in_process_logs_every_step(tmp_path):
    log = tmp_path / "replay.jsonl"
    result = subprocess.run([D3, "replay", "const:4", "--link", "device-edge", "--link", "edge-cloud", "backbone",
                             "--mode", "inprocess", "--step", "250ms", "--speed", "2", "--duration", "1",
                             "--log", str(log)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 4 and all(line["set_bps"]["device-edge"] == 4e6 for line in lines)
    assert lines[0]["mode"] == "inprocess" and "edge-cloud" in lines[0]["set_bps"]
    assert result.stdout.count("t=") == 4 and "done: 4 steps" in result.stdout


@pytest.mark.parametrize("argv,message", [
    (["const:4", "--link", "uplink"], "unknown link 'uplink'"),
    (["nothing.csv", "--link", "device-edge"], "neither a file nor a built-in"),
    (["const:4", "--link", "device-edge", "--step", "fast"], "bad step"),
    (["const:4", "--link", "device-edge", "--mode", "tc", "--prefix", "d3tbnone-"], "no running testbed"),
])
def test_replay_cli_bad_input_gives_one_clear_line(argv, message):
    result = subprocess.run([D3, "replay", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_trace_cli_summarises_a_trace(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("0,2\n1,6\n")
    result = subprocess.run([D3, "trace", str(path), "--json"], capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout)["mean_mbps"] == 4.0


def test_replay_on_the_testbed_changes_the_tc_rate():
    from deploy import netns
    from deploy.testbed import TestbedConfig, down, refusal_reason, up
    from traces.replay import TcApplier

    if reason := refusal_reason():
        pytest.skip(reason)
    prefix = "d3tbrp-"
    down(prefix, progress=lambda line: None)
    try:
        up(TestbedConfig(edge_nodes=1, edge_cpu=[0.5], prefix=prefix, start_daemons=False),
           progress=lambda line: None)
        seen = []

        def on_step(record):
            stats = netns.htb_class_stats(prefix + "device", "eth0")
            seen.append(stats[10]["rate"])

        trace = BandwidthTrace(np.array([0.0, 1.0, 2.0]), np.array([5.0, 12.0, 0.5]), end_s=3.0)
        replay({"device-edge": trace}, TcApplier(prefix), step_s=1.0, speed=5.0, on_step=on_step)
        assert seen == ["5Mbit", "12Mbit", "500Kbit"]
    finally:
        down(prefix, progress=lambda line: None)

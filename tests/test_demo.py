"""`d3 demo` end to end on a small model, and the pieces its numbers rest on: the slowdown emulation
(CPU-time based, nesting-safe), the links' RTTs from the traces, the output check."""
import re
import time

import pytest
import torch

from tiers.demo import DEFAULT_STRATEGIES, output_check, tolerance
from tiers.runtime import timed_run


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_slowdown_stretches_cpu_time_and_nested_calls_are_not_slowed_twice():
    _, one = timed_run(lambda: burn(0.05), 1.0)
    _, three = timed_run(lambda: burn(0.05), 3.0)
    assert three >= 0.15 * 0.95 and three < one + 0.3
    # a local tile (nested, already slowed) inside the coordinator's slowed run: 3 x 0.05 once, plus
    # 3 x the coordinator's own 0.02 of CPU
    _, nested = timed_run(lambda: (timed_run(lambda: burn(0.05), 3.0), burn(0.02)), 3.0)
    assert 0.21 * 0.95 <= nested < 0.21 + 0.3
    assert nested < 2 * 0.15  # slowing the nested call twice would give >= 0.45 + 0.06


def test_links_from_traces_carry_the_trace_rtts():
    from tiers.links import links_from_traces, make_shapers

    links = links_from_traces({"device_edge": "wifi-home", "device_cloud": "lte-driving"})
    assert 0.005 < links.device_edge_rtt_s < links.device_cloud_rtt_s < 0.2
    assert links.edge_cloud_rtt_s == 0.0  # no trace: no RTT assumed
    shaper = make_shapers({"device_cloud": "lte-driving"})["device_cloud"]
    assert 0.0 < shaper.delay_s < 0.2  # half the trace's RTT, paid per message


def test_output_check_is_absolute_whatever_the_scale_of_the_output():
    reference = torch.tensor([[100.0, -3.0, 5.0]])
    assert tolerance(reference) == pytest.approx(1e-5)
    diff, same = output_check(reference + 5e-4, reference)
    assert diff == pytest.approx(5e-4, rel=2e-2) and same and diff > tolerance(reference)
    assert output_check(torch.tensor([[0.0, 0.0, 200.0]]), reference)[1] is False


@pytest.mark.slow
def test_demo_prints_every_strategy_and_checks_every_output(capsys):
    from deploy.cli import main

    status = main(["demo", "--model", "resnet18", "--input", "1x3x64x64", "--edge-nodes", "2", "--requests", "2",
                   "--device-slowdown", "3", "--edge-slowdown", "2", "--cloud-slowdown", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    table = out[out.index("strategy "):]
    for strategy in DEFAULT_STRATEGIES:
        row = re.search(rf"^{strategy} +([\d.]+) +([\d.]+)x +([\d.e+-]+) +same ", table, re.M)
        assert row, f"{strategy} missing from the table:\n{table}"
        assert float(row.group(1)) > 0
        assert float(row.group(3)) <= 1e-5
    assert "outputs within the tolerance" in out
    assert len(re.findall(r"^    #\d plan v\d+ +d3 ", out, re.M)) == 2  # per-request lines for D3

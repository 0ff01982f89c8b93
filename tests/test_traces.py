"""Trace formats: reading the three formats, normalising, reshaping, errors with line numbers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from traces.formats import (BandwidthTrace, TraceFormatError, builtin_trace, builtin_trace_names,
                            constant_trace, detect_format, load_trace, resolve_trace)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mahimahi"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_mahimahi_counts_1500_byte_opportunities_per_bin(tmp_path):
    # second 0: 3 packets; second 1: 1 packet; trace ends at 2000 ms
    path = write(tmp_path, "link.up", "0\n5\n5\n1500\n2000\n")
    trace = load_trace(path)
    assert detect_format(path) == "mahimahi"
    assert trace.duration_s == pytest.approx(2.0)
    # bin 0 holds 0,5,5 (3 pkts); bin 1 holds 1500 and 2000 (the last stamp falls in the last bin)
    np.testing.assert_allclose(trace.mbps, [3 * 1500 * 8 / 1e6, 2 * 1500 * 8 / 1e6])
    fine = load_trace(path, bin_s=0.5)
    assert len(fine) == 4 and fine.mean_mbps == pytest.approx(trace.mean_mbps)


def test_time_throughput_pairs_are_shifted_to_zero(tmp_path):
    path = write(tmp_path, "report_bus_0001.log", "1000.5 2.0\n1001.5 4.0\n1002.5 0.5\n")
    trace = load_trace(path)
    assert detect_format(path) == "time_throughput"
    np.testing.assert_allclose(trace.times_s, [0, 1, 2])
    assert trace.bps_at(1.2) == pytest.approx(4e6)
    assert trace.rtt_ms is None


def test_csv_with_header_and_rtt(tmp_path):
    path = write(tmp_path, "t.csv", "t_s,mbps,rtt_ms\n0,10,50\n2,20,60\n")
    trace = load_trace(path)
    assert trace.mbps_at(1.9) == 10 and trace.mbps_at(2.1) == 20
    assert trace.rtt_ms_at(2.5) == 60
    # one median step after the last sample, then it loops
    assert trace.duration_s == 4 and trace.mbps_at(4.5) == 10
    assert trace.mean_mbps == pytest.approx(15)


@pytest.mark.parametrize("name,text,where,reason", [
    ("a.up", "0\n10\nabc\n", ":3:", "integer millisecond"),
    ("a.up", "0\n10\n5\n", ":3:", "goes back in time"),
    ("a.csv", "t,mbps\n0,1\n1,x\n", ":3:", "bandwidth is not a number"),
    ("a.csv", "0,1\n1,2,3,4\n", ":2:", "2 or 3 columns"),
    ("a.csv", "0,1\n0,2\n", ":2:", "not after the previous"),
    ("a.csv", "0,1\n1,-2\n", ":2:", "negative"),
    ("a.csv", "0,1,30\n1,2\n", ":2:", "rtt_ms column"),
    ("a.log", "0 1\n1 2 3\n", ":2:", "2 columns"),
    ("a.up", "# only a comment\n", "", "no timestamps"),
])
def test_malformed_files_name_line_and_reason(tmp_path, name, text, where, reason):
    path = write(tmp_path, name, text)
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    message = str(info.value)
    assert str(path) + where in message and reason in message


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(write(tmp_path, "a.csv", "0,1\n"), fmt="pcap")


def test_resample_preserves_bytes_and_averages():
    trace = BandwidthTrace(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0, 7.0]), end_s=4.0)
    half = trace.resample(2.0)
    np.testing.assert_allclose(half.mbps, [2.0, 6.0])
    odd = trace.resample(1.5)  # bins [0,1.5) [1.5,3) [3,4)
    np.testing.assert_allclose(odd.mbps, [(1 + 1.5) / 1.5, (1.5 + 5) / 1.5, 7.0])
    assert odd.mean_mbps == pytest.approx(trace.mean_mbps)
    assert odd.duration_s == pytest.approx(4.0)


def test_scale_clip_loop():
    trace = BandwidthTrace(np.array([0.0, 1.0]), np.array([2.0, 10.0]), np.array([40.0, 80.0]), end_s=2.0)
    np.testing.assert_allclose(trace.scaled(0.5).mbps, [1.0, 5.0])
    np.testing.assert_allclose(trace.clipped(3.0, 8.0).mbps, [3.0, 8.0])
    looped = trace.looped(5.0)
    assert looped.duration_s == 5.0
    np.testing.assert_allclose(looped.mbps, [2, 10, 2, 10, 2])
    np.testing.assert_allclose(looped.rtt_ms, [40, 80, 40, 80, 40])
    assert trace.bps_at(3.5) == 10e6 and trace.bps_at(np.array([0.5, 2.5])).tolist() == [2e6, 2e6]
    assert trace.bits_between(0.5, 4.5) == pytest.approx((1 + 10 + 2 + 10 + 1) * 1e6)
    with pytest.raises(ValueError, match="clip bounds"):
        trace.clipped(5, 1)


def test_a_window_carries_the_same_bits_as_that_span_of_the_trace():
    trace = BandwidthTrace(np.array([10.0, 11.0, 13.0]), np.array([2.0, 10.0, 4.0]), np.array([40.0, 80.0, 60.0]),
                           end_s=14.0)
    for offset, duration in ((0.0, 4.0), (0.5, 2.0), (2.5, 3.0), (3.5, 6.0)):  # inside, across samples, looping
        part = trace.window(offset, duration)
        assert part.start_s == 0.0 and part.duration_s == pytest.approx(duration)
        assert part.bits_between(0.0, duration) == pytest.approx(trace.bits_between(10.0 + offset, 10.0 + offset + duration))
    part = trace.window(1.5, 2.0)
    np.testing.assert_allclose(part.times_s, [0.0, 1.5])
    np.testing.assert_allclose(part.mbps, [10.0, 4.0])
    np.testing.assert_allclose(part.rtt_ms, [80.0, 60.0])
    with pytest.raises(ValueError, match="window"):
        trace.window(-1.0, 2.0)


def test_builtin_traces_load_and_are_reproducible(tmp_path):
    from traces.generate import write_all

    names = builtin_trace_names()
    assert {"lte-driving", "3g-hsdpa", "wifi-home", "backbone"} <= set(names)
    lte, umts = builtin_trace("lte-driving"), builtin_trace("3g-hsdpa")
    assert lte.duration_s == 120 and lte.rtt_ms is not None
    assert 5 < lte.mean_mbps < 40 and 0.5 < umts.mean_mbps < 5  # the levels their names promise
    # the generator is deterministic: regenerating gives the shipped bytes
    for path in write_all(tmp_path):
        shipped = Path(__file__).resolve().parents[1] / "traces" / "data" / path.name
        assert path.read_bytes() == shipped.read_bytes(), path.name
    with pytest.raises(ValueError, match="built-in traces: "):
        builtin_trace("5g-magic")


def test_resolve_trace_accepts_paths_names_and_constants(tmp_path):
    assert resolve_trace("const:12.5").mbps_at(100) == 12.5
    assert resolve_trace("backbone").name == "backbone"
    assert resolve_trace(str(write(tmp_path, "x.csv", "0,3\n"))).mean_mbps == 3
    with pytest.raises(ValueError, match="neither a file"):
        resolve_trace("nothing-here")
    assert constant_trace(4, 10).bits_between(0, 10) == pytest.approx(40e6)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real traces not present at {SHARED}")
@pytest.mark.parametrize("name,mean_mbps,duration_s", [
    ("ATT-LTE-driving-2016.up", 1.91, 120), ("Verizon-LTE-short.up", 5.95, 140),
    ("TMobile-UMTS-driving.down", 2.02, 928),
])
def test_real_mahimahi_traces_match_their_documented_means(name, mean_mbps, duration_s):
    trace = load_trace(SHARED / name)
    assert trace.mean_mbps == pytest.approx(mean_mbps, abs=0.01)
    assert trace.duration_s == pytest.approx(duration_s, abs=1)
    assert trace.resample(5.0).mean_mbps == pytest.approx(trace.mean_mbps)

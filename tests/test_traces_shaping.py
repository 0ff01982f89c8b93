"""User-space shaping: pushing N bytes takes the time the rate implies (within ~10%)."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from traces.formats import BandwidthTrace
from traces.shaping import TokenBucket, TraceShaper

CHUNK = 16 * 1024


def push(bucket, total_bytes, chunk=CHUNK):
    start = time.monotonic()
    sent = 0
    while sent < total_bytes:
        size = min(chunk, total_bytes - sent)
        bucket.consume(size)
        sent += size
    return time.monotonic() - start


def test_blocking_consume_matches_rate():
    rate_bps, burst, total = 8e6, 64 * 1024, 1_000_000  # 1 MB/s
    elapsed = push(TokenBucket(rate_bps, burst), total)
    expected = (total - burst) * 8 / rate_bps
    assert elapsed == pytest.approx(expected, rel=0.10)


def test_threads_share_the_rate():
    rate_bps, burst = 16e6, 32 * 1024
    bucket = TokenBucket(rate_bps, burst)
    per_thread = 300_000
    threads = [threading.Thread(target=push, args=(bucket, per_thread)) for _ in range(4)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    assert bucket.bytes_sent == 4 * per_thread
    assert elapsed == pytest.approx((4 * per_thread - burst) * 8 / rate_bps, rel=0.10)


def test_async_consume_matches_rate_and_lets_others_run():
    rate_bps, burst, total = 8e6, 16 * 1024, 600_000
    bucket = TokenBucket(rate_bps, burst)
    ticks = []

    async def sender():
        for _ in range(total // 20_000):
            await bucket.consume_async(20_000)

    async def ticker():
        for _ in range(5):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    async def main():
        start = time.monotonic()
        await asyncio.gather(sender(), ticker())
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert elapsed == pytest.approx((total - burst) * 8 / rate_bps, rel=0.10)
    assert len(ticks) == 5 and ticks[-1] - ticks[0] < 0.4  # the event loop was not blocked


def test_set_rate_takes_effect_mid_transfer():
    bucket = TokenBucket(4e6, 16 * 1024)
    timer = threading.Timer(0.5, bucket.set_rate, args=(16e6,))
    timer.start()
    elapsed = push(bucket, 16 * 1024 + 250_000 + 1_000_000)  # 0.5 s at 0.5 MB/s, then 1 MB at 2 MB/s
    timer.join()
    assert elapsed == pytest.approx(0.5 + 0.5, rel=0.10)


def test_trace_shaper_follows_the_trace():
    # 1 MB/s for 0.5 s, then 4 MB/s: 1.5 MB takes 0.5 s + 1 MB / 4 MB/s = 0.75 s
    trace = BandwidthTrace(np.array([0.0, 0.5]), np.array([8.0, 32.0]), end_s=10.0)
    shaper = TraceShaper(trace, burst_bytes=8 * 1024)
    elapsed = push(shaper, 8 * 1024 + 1_500_000, chunk=8 * 1024)
    assert elapsed == pytest.approx(0.75, rel=0.10)
    assert shaper.current_bps() == 32e6


def test_trace_shaper_delay_from_rtt_and_speed():
    trace = BandwidthTrace(np.array([0.0, 1.0]), np.array([80.0, 80.0]), np.array([100.0, 300.0]), end_s=2.0)
    clock_now = [100.0]
    shaper = TraceShaper(trace, speed=2.0, clock=lambda: clock_now[0])
    assert shaper.delay_s == pytest.approx(0.05)
    clock_now[0] += 0.6  # 1.2 s of trace time at speed 2
    assert shaper.delay_s == pytest.approx(0.15)
    assert TraceShaper(trace, delay_s=0.01).delay_s == 0.01
    with pytest.raises(TypeError):
        shaper.set_rate(1e6)


def test_transmit_adds_the_delay_once_per_message():
    bucket = TokenBucket(1e9, 1 << 20, delay_s=0.1)
    start = time.monotonic()
    bucket.transmit(1000)
    assert time.monotonic() - start == pytest.approx(0.1, abs=0.05)


@pytest.mark.parametrize("kwargs,match", [
    ({"rate_bps": -1}, "rate"), ({"rate_bps": 1e6, "burst_bytes": 0}, "burst"),
    ({"rate_bps": 1e6, "delay_s": -1}, "delay"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenBucket(**kwargs)

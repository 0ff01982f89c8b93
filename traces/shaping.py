"""User-space link shaping: a token bucket (blocking and asyncio) and a shaper whose rate follows a trace.

Used where tc cannot shape (no root, the local demo) and for propagation delay everywhere, since netem is
not available on these kernels. Senders call ``consume(n)`` before putting ``n`` bytes on the wire, in
chunks of at most ``burst_bytes`` for smooth pacing; ``transmit(n)`` also waits the one-way delay.

The bucket is a FIFO of reservations: each call reserves the next ``n`` bytes of the link and waits
until the link has earned them. So concurrent senders share the rate fairly in arrival order and the
total never exceeds rate x time + burst. Waits re-check every ``POLL_S`` so a rate change (set_rate, or
the trace moving on) takes effect within that time even in the middle of a long wait.
"""
from __future__ import annotations

import asyncio
import threading
import time

from traces.formats import BandwidthTrace

DEFAULT_BURST_BYTES = 64 * 1024
POLL_S = 0.05


class TokenBucket:
    def __init__(self, rate_bps: float, burst_bytes: int = DEFAULT_BURST_BYTES, delay_s: float = 0.0,
                 clock=time.monotonic):
        if burst_bytes <= 0:
            raise ValueError(f"burst_bytes must be > 0, got {burst_bytes}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self._check_rate(rate_bps)
        self._rate_bps = float(rate_bps)
        self.burst_bytes = int(burst_bytes)
        self.delay_s = float(delay_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()
        self._reserved = 0.0               # bytes promised to callers so far
        self._earned = float(burst_bytes)  # bytes the link has allowed so far (starts with a full bucket)
        self.bytes_sent = 0

    @staticmethod
    def _check_rate(rate_bps: float) -> None:
        if not rate_bps >= 0:
            raise ValueError(f"rate must be >= 0 bit/s, got {rate_bps}")

    # Subclasses change how bytes are earned over time (TraceShaper follows a trace).
    def _bytes_earned(self, t0: float, t1: float) -> float:
        return self._rate_bps * (t1 - t0) / 8

    def current_bps(self) -> float:
        return self._rate_bps

    @property
    def rate_bps(self) -> float:
        return self.current_bps()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._last:
            self._earned += self._bytes_earned(self._last, now)
            self._last = now
        # an idle link does not bank more than one burst
        self._earned = min(self._earned, self._reserved + self.burst_bytes)

    def set_rate(self, rate_bps: float) -> None:
        self._check_rate(rate_bps)
        with self._lock:
            self._refill()  # bytes earned so far count at the old rate
            self._rate_bps = float(rate_bps)

    def _reserve(self, nbytes: int) -> float:
        if nbytes < 0:
            raise ValueError(f"cannot consume a negative byte count ({nbytes})")
        with self._lock:
            self._refill()
            self._reserved += nbytes
            self.bytes_sent += nbytes
            return self._reserved

    def _wait_s(self, position: float) -> float:
        """Seconds until the link has earned up to ``position`` at today's rate, at most POLL_S."""
        with self._lock:
            self._refill()
            missing = position - self._earned
        if missing <= 0:
            return 0.0
        rate = self.current_bps()
        return POLL_S if rate <= 0 else min(POLL_S, missing * 8 / rate)

    def consume(self, nbytes: int) -> None:
        """Block until ``nbytes`` may go on the wire (thread-safe)."""
        position = self._reserve(nbytes)
        while (wait := self._wait_s(position)) > 0:
            time.sleep(wait)

    async def consume_async(self, nbytes: int) -> None:
        """The asyncio form of :meth:`consume`; other tasks run while this one waits."""
        position = self._reserve(nbytes)
        while (wait := self._wait_s(position)) > 0:
            await asyncio.sleep(wait)

    def transmit(self, nbytes: int) -> None:
        """A whole message: pace its bytes, then the one-way propagation delay."""
        self.consume(nbytes)
        if self.delay_s:
            time.sleep(self.delay_s)

    async def transmit_async(self, nbytes: int) -> None:
        await self.consume_async(nbytes)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)


class TraceShaper(TokenBucket):
    """A token bucket whose rate follows ``trace`` over wall time from ``start_time`` (default: now).

    ``speed`` > 1 plays the trace faster. The one-way delay is ``delay_s`` if given, else half the
    trace's RTT at the current time where the trace has one, else 0."""

    def __init__(self, trace: BandwidthTrace, start_time: float | None = None,
                 burst_bytes: int = DEFAULT_BURST_BYTES, delay_s: float | None = None, speed: float = 1.0,
                 clock=time.monotonic):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.trace = trace
        self.speed = float(speed)
        self.start_time = clock() if start_time is None else float(start_time)
        self._fixed_delay_s = delay_s
        super().__init__(trace.bps_at(trace.start_s), burst_bytes, delay_s or 0.0, clock)

    def trace_time(self, wall: float | None = None) -> float:
        wall = self._clock() if wall is None else wall
        return self.trace.start_s + max(0.0, wall - self.start_time) * self.speed

    def _bytes_earned(self, t0: float, t1: float) -> float:
        return self.trace.bits_between(self.trace_time(t0), self.trace_time(t1)) / self.speed / 8

    def current_bps(self) -> float:
        return self.trace.bps_at(self.trace_time())

    def set_rate(self, rate_bps: float) -> None:
        raise TypeError("a TraceShaper's rate follows its trace; use a TokenBucket to set rates by hand")

    @property
    def delay_s(self) -> float:
        if self._fixed_delay_s is not None:
            return self._fixed_delay_s
        rtt = self.trace.rtt_ms_at(self.trace_time())
        return 0.0 if rtt is None else rtt / 2000.0

    @delay_s.setter
    def delay_s(self, value: float) -> None:  # TokenBucket.__init__ assigns it
        pass

"""An input that crosses the device->edge link in row bands (see ``partitioner/streaming.py``).

The device sends the request's ``infer`` message with the first band of the streamed tensor and the meta
``stream = {"name", "shape", "bands": [[row0, row1], ...]}``, then one ``band`` message per further band
(same request id, meta ``{"rows": [row0, row1]}``, the band as the tensor under the same name). ZeroMQ keeps
one connection's messages in order, so the edge node sees the ``infer`` first. The edge node copies every
band into one buffer of the whole shape as it arrives; work on the buffer waits for the rows it needs.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import torch

from tiers.wire import Message

STREAM_META = "stream"
BAND_KIND = "band"


class StreamError(ValueError):
    """A band that does not fit the stream, or rows that did not arrive in time."""


def split_message(request: Message, name: str, bands: list[tuple[int, int]], tiles: int) -> list[Message]:
    """``request`` as its first message (the first band of ``name``) and one band message per other band;
    ``tiles``: how many row tiles the bands were cut for (the edge node plans the same)."""
    full = request.tensors[name]
    pieces = [full[..., r0:r1, :].contiguous() for r0, r1 in bands]
    first = Message(kind=request.kind, request_id=request.request_id, model=request.model,
                    plan_version=request.plan_version, plan_id=request.plan_id, model_digest=request.model_digest,
                    meta={**request.meta, STREAM_META: {"name": name, "shape": list(full.shape), "tiles": tiles,
                                                        "bands": [list(b) for b in bands]}},
                    tensors={**request.tensors, name: pieces[0]})
    rest = [Message(kind=BAND_KIND, request_id=request.request_id, meta={"rows": list(band)}, tensors={name: piece})
            for band, piece in zip(bands[1:], pieces[1:])]
    return [first, *rest]


class RowStream:
    """The buffer a streamed tensor is assembled in, and waiting for its rows (from threads or the loop)."""

    def __init__(self, message: Message):
        spec = message.meta.get(STREAM_META)
        try:
            self.name = str(spec["name"])
            shape = tuple(int(s) for s in spec["shape"])
            self.bands = [(int(a), int(b)) for a, b in spec["bands"]]
            self.tiles = int(spec.get("tiles", len(self.bands)))  # row tiles the device planned the bands for
        except (TypeError, KeyError, ValueError) as exc:
            raise StreamError(f"meta stream must give name, shape and bands: {exc!r}") from None
        first = message.tensors.get(self.name)
        if first is None or len(shape) != 4 or not self.bands:
            raise StreamError(f"streamed tensor {self.name!r} is missing or not a 4-D map")
        if self.bands[0][0] != 0 or self.bands[-1][1] != shape[-2] or \
                any(a >= b for a, b in self.bands) or any(b != c for (_, b), (c, _) in zip(self.bands, self.bands[1:])):
            raise StreamError(f"bands {self.bands} do not cover rows 0..{shape[-2]} in order")
        self.buffer = torch.empty(shape, dtype=first.dtype)
        self.rows = 0  # rows [0, rows) have arrived
        self.first_at = self.arrived_at = time.perf_counter()  # the first band's arrival, the latest one's
        self.error: str | None = None
        self._condition = threading.Condition()
        self._complete = asyncio.Event()
        self._place(first, self.bands[0])
        message.tensors[self.name] = self.buffer

    @property
    def transfer_s(self) -> float:
        """From the first band to the latest (all of them, once complete)."""
        return self.arrived_at - self.first_at

    @property
    def complete(self) -> bool:
        return self.rows >= self.buffer.shape[-2]

    def feed(self, message: Message) -> None:
        """One band message (on the event loop)."""
        try:
            rows = (int(message.meta["rows"][0]), int(message.meta["rows"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise StreamError(f"band message without rows: {message.meta}") from None
        band = message.tensors.get(self.name)
        if band is None:
            raise StreamError(f"band message without tensor {self.name!r}")
        self._place(band, rows)

    def _place(self, band: torch.Tensor, rows: tuple[int, int]) -> None:
        if rows[0] != self.rows or rows not in self.bands:
            raise StreamError(f"band rows {rows} out of order: rows 0..{self.rows} have arrived")
        expected = tuple(self.buffer.shape[:-2]) + (rows[1] - rows[0], self.buffer.shape[-1])
        if tuple(band.shape) != expected or band.dtype != self.buffer.dtype:
            raise StreamError(f"band {rows} is {tuple(band.shape)} {band.dtype}, expected {expected} {self.buffer.dtype}")
        self.buffer[..., rows[0]:rows[1], :] = band
        with self._condition:
            self.rows = rows[1]
            self.arrived_at = time.perf_counter()
            self._condition.notify_all()
        if self.complete:
            self._complete.set()

    def fail(self, reason: str) -> None:
        """A bad band: whatever waits for rows gives up with ``reason``."""
        with self._condition:
            self.error = reason
            self._condition.notify_all()
        self._complete.set()

    def wait_rows(self, row: int, timeout_s: float) -> None:
        """Block (a worker thread) until rows [0, row) are in the buffer."""
        with self._condition:
            arrived = self._condition.wait_for(lambda: self.rows >= row or self.error, timeout_s)
            if self.error:
                raise StreamError(self.error)
            if not arrived:
                raise StreamError(f"rows up to {row} of {self.name!r} did not arrive within {timeout_s:.0f} s "
                                  f"(have {self.rows})")

    async def wait_complete(self, timeout_s: float) -> Any:
        try:
            await asyncio.wait_for(self._complete.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise StreamError(f"{self.name!r} did not arrive completely within {timeout_s:.0f} s "
                              f"(rows 0..{self.rows} of {self.buffer.shape[-2]})") from None
        if self.error:
            raise StreamError(self.error)
        return self.buffer

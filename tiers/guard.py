"""Request hygiene shared by the edge and cloud servers: deadlines, replayed request ids, dtypes, and the
cloud's admission limit. Each check raises ``RequestError`` with one line for the sender."""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

import torch

from tiers.runtime import RequestError

DEADLINE_KEY = "deadline_ms"  # meta field: the request's remaining time budget when sent (relative:
# clocks of different machines disagree, a budget does not; link time eats into it on the way)


def deadline_from(meta: dict, received_s: float | None = None) -> float | None:
    """The monotonic time by which the request must be answered, or None when it carries no deadline."""
    budget_ms = meta.get(DEADLINE_KEY)
    if budget_ms is None:
        return None
    if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float)) or not math.isfinite(budget_ms):
        raise RequestError(f"meta.{DEADLINE_KEY} must be a number of milliseconds, got {budget_ms!r:.40}")
    if budget_ms <= 0:
        raise RequestError(f"request deadline already passed ({budget_ms:.0f} ms budget)", "deadline")
    return (received_s if received_s is not None else time.monotonic()) + budget_ms / 1e3


def remaining_s(deadline: float | None, default_s: float) -> float:
    return default_s if deadline is None else min(default_s, deadline - time.monotonic())


def check_deadline(deadline: float | None, where: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RequestError(f"request deadline passed {where}", "deadline")


def with_budget(meta: dict, deadline: float | None) -> dict:
    """``meta`` carrying what is left of the deadline, to pass on to the next tier."""
    if deadline is None:
        return meta
    return {**meta, DEADLINE_KEY: round((deadline - time.monotonic()) * 1e3, 3)}


class ReplayGuard:
    """Refuses a request id seen in the last ``window_s`` seconds (bounded memory: oldest ids go first)."""

    def __init__(self, window_s: float = 600.0, max_ids: int = 200_000):
        self.window_s, self.max_ids = window_s, max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def check(self, request_id: str) -> None:
        if not request_id or len(request_id) > 128:
            raise RequestError("request_id must be a non-empty string of at most 128 characters")
        now = time.monotonic()
        with self._lock:
            while self._seen and (len(self._seen) >= self.max_ids
                                  or now - next(iter(self._seen.values())) > self.window_s):
                self._seen.popitem(last=False)
            if request_id in self._seen:
                self.refused += 1
                raise RequestError(f"request id {request_id!r:.40} was already used: replayed requests are refused",
                                   "replayed")
            self._seen[request_id] = now


def check_dtypes(tensors: dict[str, torch.Tensor], names: list[str], graph, what: str) -> None:
    """Every value ``what`` needs has the traced dtype (a wrong dtype would fail deep inside ATen)."""
    for name in names:
        record = graph.records.get(name)
        tensor = tensors.get(name)
        if record is None or tensor is None or not isinstance(record.dtype, str):
            continue
        if str(tensor.dtype).removeprefix("torch.") != record.dtype:
            raise RequestError(f"value {name!r} for {what} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                               f"the plan expects {record.dtype}")


class Admission:
    """At most ``limit`` requests inside the server (reading, queued or computing); the rest are told to
    come back later instead of piling up memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.inside = 0
        self.refused = 0

    def try_enter(self) -> bool:
        if self.inside >= self.limit:
            self.refused += 1
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1

    def retry_after_s(self, typical_s: float, workers: int) -> int:
        """Seconds until a slot is likely free: the queue drained by ``workers`` at ``typical_s`` each."""
        return max(1, math.ceil(self.inside * max(typical_s, 0.001) / max(workers, 1)))

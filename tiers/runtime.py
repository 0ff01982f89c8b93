"""What every tier keeps between requests: traced models, plans by digest, and their segments.

A plan travels as JSON with the first request of its version (and again whenever a tier answers
``unknown_plan``, e.g. after a restart); afterwards requests name it by ``plan_id`` (a digest of the
JSON, because version numbers of different devices collide). Segments are built once per plan.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from partitioner.plan import Plan
from tiers import wire
from tiers.wire import Message


class RequestError(ValueError):
    """A request this tier cannot serve; ``code`` goes back to the sender with the text."""

    def __init__(self, text: str, code: str = "bad_request"):
        super().__init__(text)
        self.code = code


@dataclass
class PlanEntry:
    plan: Plan
    plan_json: str
    graph: Any  # ModelGraph
    segmented: Any  # SegmentedModel


class ModelStore:
    """Graphs per (model, input shape), plans per digest. Thread-safe; builds happen once."""

    def __init__(self, allowed_models: list[str] | None = None, weights: dict[str, str] | None = None,
                 max_plans: int = 64):
        self.allowed_models = allowed_models
        self.weights = weights or {}
        self.max_plans = max_plans
        self._lock = threading.Lock()
        self._graphs: dict[tuple, Any] = {}
        self._digests: dict[tuple, str] = {}
        self._plans: dict[str, PlanEntry] = {}

    def graph(self, model: str, shape: tuple[int, ...]):
        from partitioner.graph import load_graph

        if self.allowed_models is not None and model not in self.allowed_models:
            raise RequestError(f"model {model!r} is not served here; served: {self.allowed_models}", "bad_model")
        key = (model, tuple(shape))
        with self._lock:
            if key not in self._graphs:
                try:
                    self._graphs[key] = load_graph(model, tuple(shape), self.weights.get(model))
                except ValueError as exc:
                    raise RequestError(str(exc), "bad_model") from None
                self._digests[key] = wire.model_digest(self._graphs[key].module)
            return self._graphs[key]

    def digest(self, model: str, shape: tuple[int, ...]) -> str:
        self.graph(model, shape)
        return self._digests[(model, tuple(shape))]

    def has_plan(self, plan_id: str) -> bool:
        return plan_id in self._plans

    def resolve(self, message: Message) -> PlanEntry:
        """The plan a request names: from the cache, or from the plan JSON it carries."""
        entry = self._plans.get(message.plan_id)
        if entry is None:
            plan_json = message.meta.get("plan")
            if not isinstance(plan_json, str):
                raise RequestError(f"plan {message.plan_id!r} is unknown here; send it with the request",
                                   "unknown_plan")
            entry = self.add_plan(plan_json, message.plan_id)
        if message.model and message.model != entry.plan.model:
            raise RequestError(f"request is for {message.model!r} but plan {message.plan_id} is for "
                               f"{entry.plan.model!r}")
        ours = self._digests[(entry.plan.model, tuple(entry.plan.input_shape))]
        if message.model_digest and message.model_digest != ours:
            raise RequestError(f"model digest {message.model_digest} differs from this tier's {ours}: "
                               f"the tiers run different weights of {entry.plan.model}", "model_mismatch")
        return entry

    def add_plan(self, plan_json: str, plan_id: str | None = None) -> PlanEntry:
        from partitioner.segments import build_segments

        digest = wire.plan_digest(plan_json)
        if plan_id and plan_id != digest:
            raise RequestError(f"plan_id {plan_id!r} does not match the digest of the plan sent ({digest})")
        try:
            plan = Plan.from_json(plan_json)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"plan JSON is not a valid plan: {exc}") from None
        graph = self.graph(plan.model, tuple(plan.input_shape))
        try:
            segmented = build_segments(graph, plan.assignment)
        except ValueError as exc:
            raise RequestError(f"plan {digest} cannot be executed: {exc}") from None
        entry = PlanEntry(plan, plan_json, graph, segmented)
        with self._lock:
            if len(self._plans) >= self.max_plans:  # forget the oldest plan; a device resends if needed
                self._plans.pop(next(iter(self._plans)))
            self._plans[digest] = entry
        return entry


def check_inputs(tensors: dict[str, torch.Tensor], names: list[str], graph, what: str) -> None:
    """Every value the segment needs is there with the traced shape and dtype."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise RequestError(f"{what} needs values {missing} that the request does not carry")
    for name in names:
        record = graph.records.get(name)
        expected = tuple(record.output_shape) if record is not None and record.output_shape else None
        if expected is not None and tuple(tensors[name].shape) != expected:
            raise RequestError(f"value {name!r} has shape {tuple(tensors[name].shape)}, the plan expects {expected}")


@dataclass
class Metrics:
    """Request counts, latencies and bytes, served as JSON on /metrics (or a ZeroMQ ``status``)."""

    started: float = field(default_factory=time.time)
    requests: dict[str, int] = field(default_factory=dict)  # by outcome: ok, error codes
    bytes_in: int = 0
    bytes_out: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=1000))
    in_flight: int = 0

    def record(self, outcome: str, latency_s: float, bytes_in: int, bytes_out: int) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1
        self.latencies_ms.append(latency_s * 1e3)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def snapshot(self) -> dict:
        values = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

        return {"uptime_s": round(time.time() - self.started, 1), "requests": dict(self.requests),
                "requests_total": sum(self.requests.values()), "in_flight": self.in_flight,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "count": len(values)}}


class JoinTable:
    """Values a device sends straight to the cloud (a branch that skips the edge), held until the edge's
    forward of the same request names them: ``meta["join"]`` = the id both parts carry; the device's part
    has ``meta["part"] = "device"`` and gets an ``ack``; the edge's part lists ``meta["expect"]`` and waits
    for it (within its deadline). Parts whose partner never comes are forgotten, oldest first."""

    def __init__(self, max_joins: int = 1024, wait_s: float = 60.0):
        self.max_joins = max_joins
        self.wait_s = wait_s
        self._parts: dict[str, Any] = {}  # join id -> asyncio.Future of the device's tensors

    def _future(self, join_id: str):
        import asyncio

        if join_id not in self._parts:
            if len(self._parts) >= self.max_joins:
                self._parts.pop(next(iter(self._parts)))
            self._parts[join_id] = asyncio.get_running_loop().create_future()
        return self._parts[join_id]

    async def take_part(self, message: Message, deadline: float | None = None) -> Message | None:
        """An ``ack`` for a device part; None after merging the device part into an edge part (or for a
        request that is no join)."""
        import asyncio

        join_id = message.meta.get("join")
        if join_id is None:
            return None
        if not isinstance(join_id, str) or not join_id:
            raise RequestError(f"meta join must be a request id string, got {join_id!r}")
        if message.meta.get("part") == "device":
            future = self._future(join_id)
            if not future.done():
                future.set_result(dict(message.tensors))
            return Message(kind="ack", request_id=message.request_id, meta={"join": join_id,
                                                                              "bytes": message.tensor_bytes})
        expect = message.meta.get("expect") or []
        if not isinstance(expect, list) or not all(isinstance(n, str) for n in expect):
            raise RequestError(f"meta expect must list value names, got {expect!r}")
        wait_s = self.wait_s if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            device_values = await asyncio.wait_for(asyncio.shield(self._future(join_id)), wait_s)
        except asyncio.TimeoutError:
            raise RequestError(f"the device's direct values {expect} for request {join_id} did not arrive "
                               f"within {wait_s:.1f} s", "deadline") from None
        finally:
            if self._parts.get(join_id) is not None and self._parts[join_id].done():
                self._parts.pop(join_id, None)
        missing = [n for n in expect if n not in device_values]
        if missing:
            raise RequestError(f"the device's direct part of request {join_id} lacks {missing}")
        message.tensors.update({n: device_values[n] for n in expect})
        return None


CLOUD_JOINS = JoinTable()  # one cloud endpoint per process


_nested = threading.local()  # (CPU s, wall s) of nested timed_run calls on this thread, already slowed down


def emulate_slowdown(cpu_s: float, slowdown: float, wall_s: float = 0.0) -> None:
    """Make this tier ``slowdown`` times slower than the machine: stretch a call that used ``cpu_s`` of
    CPU (``wall_s`` of wall time so far) to ``slowdown`` x ``cpu_s``. Sleeping (not spinning) keeps the CPU
    free, so emulated nodes on one machine still run in parallel."""
    if slowdown > 1.0:
        time.sleep(max(0.0, slowdown * cpu_s - wall_s))


def timed_run(function, slowdown: float = 1.0) -> tuple[Any, float]:
    """Run ``function()`` under no_grad, then the emulated slowdown; returns (result, seconds in all).

    The slowdown applies to the *thread CPU time* of the call, not its wall time: on a shared machine
    (several emulated tiers and other work on a few cores) the wall time includes waiting for a core, and
    multiplying that would make a node's speed depend on its neighbours' load. Each tier runs torch at
    one thread, so the calling thread's CPU time is its compute. Work that a nested ``timed_run`` on the
    same thread already slowed down (a local tile inside the tiled edge segment) is not slowed twice."""
    start, cpu_start = time.perf_counter(), time.thread_time()
    outer = getattr(_nested, "totals", (0.0, 0.0))
    _nested.totals = (0.0, 0.0)
    try:
        with torch.no_grad():
            result = function()
        nested_cpu, nested_wall = _nested.totals
        own_cpu = max(0.0, time.thread_time() - cpu_start - nested_cpu)
        emulate_slowdown(own_cpu, slowdown, time.perf_counter() - start - nested_wall)
    finally:
        elapsed = time.perf_counter() - start
        _nested.totals = (outer[0] + time.thread_time() - cpu_start, outer[1] + elapsed)
    return result, elapsed

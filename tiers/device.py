"""The device SDK: ``Client(model, edge=..., cloud=...)``, ``client.infer(x)`` -> the local model's output.

The client runs the device segment of its current plan, sends the crossing values to the edge node it
knows (ZeroMQ DEALER) or, when the plan has no edge segment, straight to the cloud (HTTP), and assembles
the model output from what comes back. Every reply says how long the tiers computed, so the rest of the
round trip is link time: the client keeps an estimate of each link's bandwidth from real transfers (and
from ``probe()`` when idle) and feeds it to the incremental re-partitioner. A plan changes only between
requests: each request carries the plan id it was started with (and the plan JSON the first time a tier
sees it), so no request ever mixes two plans.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
import zmq.asyncio

from partitioner.plan import Plan
from partitioner.streaming import DEFAULT_BANDS, plan_streamed_head
from tiers import transport, wire
from tiers.runtime import ModelStore, PlanEntry, timed_run
from tiers.wire import Message, WireError

MIN_MEASURE_BYTES = 32 * 1024  # smaller transfers say more about latency than bandwidth
EWMA = 0.5


class TierError(ValueError):
    """A tier answered with an error (its text and code), or did not answer in time."""

    def __init__(self, text: str, code: str = "error"):
        super().__init__(text)
        self.code = code


@dataclass
class RequestTiming:
    """Where one request's time went (seconds), as measured on the device and reported by the tiers."""

    plan_version: int
    strategy: str
    total_s: float = 0.0
    device_s: float = 0.0
    edge_s: float = 0.0
    cloud_s: float = 0.0
    links_s: dict[str, float] = field(default_factory=dict)  # device_edge, edge_cloud, device_cloud
    bytes: dict[str, int] = field(default_factory=dict)
    edge_nodes: int = 0
    edge_strategy: str = ""  # the edge strategy the coordinating edge node ran ("whole": not split)


class LinkEstimator:
    """Bandwidth per link from real transfers: an EWMA of bytes x 8 / link seconds."""

    def __init__(self, initial_bps: dict[str, float] | None = None):
        self.bps: dict[str, float] = dict(initial_bps or {})
        self.samples: dict[str, int] = {}

    def observe(self, link: str, nbytes: int, seconds: float) -> None:
        if nbytes < MIN_MEASURE_BYTES or seconds <= 0:
            return
        sample = nbytes * 8 / seconds
        old = self.bps.get(link)
        self.bps[link] = sample if old is None or not self.samples.get(link) else EWMA * sample + (1 - EWMA) * old
        self.samples[link] = self.samples.get(link, 0) + 1


COMPUTE_TIERS = ("device", "edge", "cloud")
# Learning a tier's real speed from measured stage times: each request moves the correction toward measured /
# predicted (in log space), within these bounds; stages predicted shorter than the floor say little. The edge's
# and the cloud's times include splitting, scheduling among nodes and the edge's strategy trials, so one request
# moves them halfway. The device times its own stage in process, with nothing else in it: one measurement is
# taken whole. Halfway there, the re-partitioner went back to a device plan measured 1.5-2x its prediction
# (mobilenet_v2 at 448x448 on a 0.1-CPU device: 4 re-partitions, each device request 600-800 ms).
COMPUTE_LEARNING_RATES = {"device": 1.0, "edge": 0.5, "cloud": 0.5}
COMPUTE_FACTOR_BOUNDS, COMPUTE_STAGE_FLOOR_MS = (0.25, 4.0), 5.0
# A full re-plan for conditions near a solved point waits this long after the last one (partitioner/
# repartition.py): the device re-plans after every request, and on a slow device a re-solve costs
# hundreds of ms between requests (and leaves its TCP connection idle long enough to restart slow).
DEVICE_FULL_REPLAN_INTERVAL_S = 5.0


def learned_compute_factors(factors: dict[str, float], stages_ms: dict | None,
                            timing: RequestTiming) -> dict[str, float]:
    """Each tier's measured compute against the plan's prediction for it, folded into that tier's
    correction factor: the planner learns how much slower (or faster) a tier really is than its model
    says, as it learns link bandwidths. (The tiled edge measured ~1.6x its prediction in the demo:
    scatter/gather, processes sharing cores.) The prediction already includes the current factor, so
    measured == predicted leaves it where it is."""
    low, high = COMPUTE_FACTOR_BOUNDS
    learned = dict(factors)
    for tier in COMPUTE_TIERS:
        predicted_ms, measured_s = (stages_ms or {}).get(tier, 0.0), getattr(timing, f"{tier}_s", 0.0)
        if predicted_ms >= COMPUTE_STAGE_FLOOR_MS and measured_s > 0:
            factor = learned[tier] * (measured_s * 1e3 / predicted_ms) ** COMPUTE_LEARNING_RATES[tier]
            learned[tier] = min(high, max(low, factor))
    return learned


class _Planner:
    """The re-partitioner when the partition engineer's is installed; else plan_d3 re-run per update;
    else a fixed plan."""

    def __init__(self, graph, plan: Plan | None, links, tiers, edge_weights):
        self.fixed = plan is not None
        self.repartitioner = None
        if plan is not None:
            self.plan = plan
            return
        try:
            from partitioner.repartition import Repartitioner

            self.repartitioner = Repartitioner(graph, tiers, links, edge_weights=tuple(edge_weights),
                                               full_replan_interval_s=DEVICE_FULL_REPLAN_INTERVAL_S)
            self.base_slowdowns = {tier: tiers.slowdown(tier) for tier in COMPUTE_TIERS}
            self.plan = self.repartitioner.plan
        except ImportError:
            from partitioner.hpa import plan_d3

            self._replan = lambda links: plan_d3(graph, links, tiers, tuple(edge_weights))
            self.plan = self._replan(links)

    def update(self, links, slowdowns: dict[str, float] | None = None) -> Plan:
        if self.fixed:
            return self.plan
        if self.repartitioner is not None:
            self.plan = self.repartitioner.update(links=links, slowdowns=slowdowns)
            return self.plan
        candidate = self._replan(links)
        if candidate.assignment != self.plan.assignment:
            candidate.version = self.plan.version + 1
            self.plan = candidate
        return self.plan


class Client:
    """One device. Thread-safe: ``infer`` may be called from several threads (requests overlap)."""

    _ids = itertools.count()

    def __init__(self, model: str, edge: str | None = None, cloud: str | None = None,
                 input_shape: tuple[int, ...] | None = None, plan: Plan | None = None,
                 weights: str | None = None, links=None, tiers=None, edge_weights=(1.0,),
                 slowdown: float = 1.0, shapers: dict | None = None, repartition: bool = True,
                 timeout_s: float = 120.0, store: ModelStore | None = None, security=None,
                 edge_strategy: str | None = None, stream_bands: int = DEFAULT_BANDS):
        self.model = model
        self.edge_address = edge
        self.cloud_url = cloud.rstrip("/") if cloud else None
        self.slowdown = slowdown
        self.shapers = shapers or {}
        self.timeout_s = timeout_s
        self.attempt_timeout_s = timeout_s  # budget one try gets (a failover client keeps time for a retry)
        self.security = security  # tiers.security.NodeSecurity: CURVE to the edge, token/TLS to the cloud
        self.store = store or ModelStore(weights={model: weights} if weights else None)
        self._fixed_plan = plan
        self._links0, self._tiers, self._edge_weights = links, tiers, edge_weights
        self.repartition = repartition and plan is None
        self.edge_strategy = edge_strategy  # None: as each plan says; a name: stamped on every plan sent
        # row bands the edge input is sent in when the edge may compute on it as it arrives (0/1: one message)
        self.stream_bands = stream_bands
        self._stream_splits: dict[tuple, tuple | None] = {}  # (plan digest, strategy) -> (name, bands, tiles)
        self.input_shape = tuple(plan.input_shape) if plan is not None else input_shape
        self.planner: _Planner | None = None
        self.links = LinkEstimator()
        self.timings: list[RequestTiming] = []
        # measured / predicted compute per tier, learned from requests (see _learn_compute)
        self.compute_factors = {tier: 1.0 for tier in COMPUTE_TIERS}
        self._sent_plans: set[tuple[str, str]] = set()  # (tier, plan id) that tier has been sent
        self._plan_lock = threading.Lock()
        self._name = f"device-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self._name, daemon=True)
        self._thread.start()
        self._call(self._open())
        if self.input_shape is not None:
            self._ensure_planner(self.input_shape)

    # ----------------------------------------------------------------------------------- lifecycle
    async def _open(self) -> None:
        import aiohttp

        from tiers.security import session_kwargs

        self._session = aiohttp.ClientSession(**session_kwargs(self.security))
        self._context = zmq.asyncio.Context()
        self._pending: dict[str, asyncio.Future] = {}
        self._dealer = None
        if self.edge_address:
            self._dealer = self._context.socket(zmq.DEALER)
            transport.configure_zmq_socket(self._dealer)
            self._dealer.setsockopt(zmq.IDENTITY, self._name.encode())
            if self.security is not None:  # CURVE client of the edge node (before connect)
                self.security.secure_client(self._dealer, self.security.edge_name)
            self._dealer.connect(self.edge_address)
            self._reader = asyncio.create_task(self._read_replies())

    async def _read_replies(self) -> None:
        while True:
            _, message = await transport.recv_zmq(self._dealer)
            if isinstance(message, WireError):
                continue  # cannot tell whose reply it was; that request times out with a clear error
            future = self._pending.pop(message.request_id, None)
            if future is not None and not future.done():
                future.set_result(message)

    async def _close(self) -> None:
        if self._dealer is not None:
            self._reader.cancel()
        await self._session.close()
        self._context.destroy(linger=0)

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    # ----------------------------------------------------------------------------------- planning
    def _ensure_planner(self, shape: tuple[int, ...]) -> None:
        with self._plan_lock:
            if self.planner is not None:
                return
            graph = self.store.graph(self.model, tuple(shape))
            links, tiers = self._links0, self._tiers
            if self._fixed_plan is None:
                from partitioner.cost import Links, TierModels

                links = links or Links.mbps(50, 100, 10)
                tiers = tiers or TierModels.default()
            self._links0 = links
            if links is not None:
                self.links = LinkEstimator({"device_edge": links.device_edge_bps, "edge_cloud": links.edge_cloud_bps,
                                            "device_cloud": links.device_cloud_bps})
                self.links.samples.clear()
            self.planner = _Planner(graph, self._fixed_plan, links, tiers, self._edge_weights)
            self.input_shape = tuple(shape)

    @property
    def plan(self) -> Plan:
        if self.planner is None:
            raise ValueError("no plan yet: give input_shape or call infer() once")
        return self.planner.plan

    def _entry(self, plan: Plan) -> PlanEntry:
        plan_json = plan.to_wire_json()
        digest = wire.plan_digest(plan_json)
        if not self.store.has_plan(digest):
            self.store.add_plan(plan_json)
        entry = self.store._plans[digest]
        self._stream_split(entry, plan)  # planned here, off the request's path
        return entry

    def _stream_split(self, entry: PlanEntry, plan: Plan) -> tuple | None:
        """(tensor name, row bands, row tiles) to send this plan's edge input in, or None for one message.
        Only where the edge may run the first stage on the bands as they come: ``auto`` over several edge
        nodes measures that beside its other candidates (``STREAM`` in partitioner/edge_strategies/online.py)."""
        key = (wire.plan_digest(entry.plan_json), plan.edge_strategy)
        if key not in self._stream_splits:
            split = None
            segment = entry.segmented.edge
            if self.stream_bands >= 2 and plan.edge_strategy == "auto" and len(plan.edge_weights) > 1 \
                    and segment.node_names:
                head = plan_streamed_head(entry.graph, segment.node_names, segment.input_names,
                                          segment.output_names, self.stream_bands)
                if head is not None:
                    split = (head.stream_name, head.bands(), len(head.head.tiles))
            self._stream_splits[key] = split
        return self._stream_splits[key]

    def _with_edge_strategy(self, plan: Plan) -> Plan:
        if self.edge_strategy is None or plan.edge_strategy == self.edge_strategy:
            return plan
        import dataclasses

        return dataclasses.replace(plan, edge_strategy=self.edge_strategy)

    def _learn_compute(self, plan: Plan, timing: RequestTiming) -> None:
        self.compute_factors = learned_compute_factors(self.compute_factors, getattr(plan, "stages_ms", None), timing)

    def _replan(self) -> None:
        if not self.repartition or self.planner is None:
            return
        bps = self.links.bps
        links = self._links0.replace(device_edge_bps=bps["device_edge"], edge_cloud_bps=bps["edge_cloud"],
                                     device_cloud_bps=bps["device_cloud"])
        base = getattr(self.planner, "base_slowdowns", None)
        slowdowns = {tier: base[tier] * self.compute_factors[tier] for tier in COMPUTE_TIERS} if base else None
        with self._plan_lock:
            self.planner.update(links, slowdowns)

    # ----------------------------------------------------------------------------------- inference
    def infer(self, x: torch.Tensor) -> Any:
        """The model's output for ``x``, computed across the tiers the current plan names."""
        return self._call(self.ainfer(x), self.timeout_s + 5)

    async def ainfer(self, x: torch.Tensor) -> Any:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"infer() takes a tensor, got {type(x).__name__}")
        if self.planner is None:
            await self._loop.run_in_executor(None, self._ensure_planner, tuple(x.shape))
        if tuple(x.shape) != tuple(self.input_shape):
            raise ValueError(f"input has shape {tuple(x.shape)} but the plan is for {tuple(self.input_shape)}")
        with self._plan_lock:
            plan = self._with_edge_strategy(self.planner.plan)  # this request's plan, whatever re-planning does
        entry = await self._loop.run_in_executor(None, self._entry, plan)
        start = time.perf_counter()
        timing = RequestTiming(plan.version, plan.strategy)
        segmented = entry.segmented
        values: dict[str, Any] = {segmented.input_names[0]: x}
        device_out, timing.device_s = await self._loop.run_in_executor(
            None, lambda: timed_run(lambda: segmented.device.run(values), self.slowdown))
        values.update(device_out)
        # device values the cloud segment reads go straight to the cloud (the cost model prices them on the
        # device->cloud link), not through the edge node; the cloud joins them with the edge's by request id
        direct = [n for n in segmented.cloud.input_names if n in values] \
            if segmented.edge.node_names and segmented.cloud.node_names and self.cloud_url else []
        if segmented.edge.node_names and direct:
            join_id = uuid.uuid4().hex
            edge_values = {n: values[n] for n in segmented.edge.input_names}
            reply, _ = await asyncio.gather(
                self._send_edge(entry, plan, edge_values, timing, {"cloud_direct": direct, "join": join_id}),
                self._send_cloud_part(plan, {n: values[n] for n in direct}, join_id, timing))
            values.update(reply.tensors)
        elif segmented.edge.node_names:
            needed = segmented.edge.input_names + [n for n in segmented.cloud.input_names if n in values]
            reply = await self._send_edge(entry, plan, {n: values[n] for n in dict.fromkeys(needed)}, timing)
            values.update(reply.tensors)
        elif segmented.cloud.node_names:
            reply = await self._send_cloud(entry, plan, {n: values[n] for n in segmented.cloud.input_names}, timing)
            values.update(reply.tensors)
        timing.total_s = time.perf_counter() - start
        self.timings.append(timing)
        self._learn_compute(plan, timing)
        await self._loop.run_in_executor(None, self._replan)
        return segmented.assemble_output(values)

    def _budget_s(self) -> float:
        """Time this request may still take (a failover client narrows it per try)."""
        return self.attempt_timeout_s

    def _request(self, tier: str, entry: PlanEntry, plan: Plan, tensors: dict, resend_plan: bool,
                 extra_meta: dict | None = None) -> Message:
        plan_id = wire.plan_digest(entry.plan_json)
        meta: dict[str, Any] = {"link": "device_cloud"} if tier == "cloud" else {}
        meta.update(extra_meta or {})
        meta["deadline_ms"] = self._budget_s() * 1e3  # the tiers give up (with an error) when it is spent
        if resend_plan or (tier, plan_id) not in self._sent_plans:
            meta["plan"] = entry.plan_json
        digest = self.store.digest(plan.model, tuple(plan.input_shape))
        return Message(kind="infer", request_id=uuid.uuid4().hex, model=plan.model, plan_version=plan.version,
                       plan_id=plan_id, model_digest=digest, meta=meta, tensors=tensors)

    async def _with_plan_retry(self, tier: str, entry: PlanEntry, plan: Plan, tensors: dict, send,
                               extra_meta: dict | None = None) -> Message:
        for attempt in range(2):
            request = self._request(tier, entry, plan, tensors, resend_plan=attempt > 0, extra_meta=extra_meta)
            reply, elapsed = await send(request)
            if reply.kind == "error" and reply.meta.get("code") == "unknown_plan" and attempt == 0:
                continue  # the tier restarted or forgot the plan: send it again
            if reply.kind == "error":
                raise TierError(f"{tier}: {reply.meta.get('error')}", reply.meta.get("code", "error"))
            self._sent_plans.add((tier, request.plan_id))
            return reply, elapsed, request
        raise TierError(f"{tier} keeps refusing plan {plan.version}", "unknown_plan")

    async def _send_edge(self, entry: PlanEntry, plan: Plan, tensors: dict, timing: RequestTiming,
                         extra_meta: dict | None = None) -> Message:
        split = self._stream_split(entry, plan)

        async def send(request: Message):
            future = self._loop.create_future()
            self._pending[request.request_id] = future
            start = time.perf_counter()
            messages = [request]
            if split is not None and split[0] in request.tensors:
                from tiers.bands import split_message

                messages = split_message(request, *split)
            try:
                for message in messages:
                    await transport.send_zmq(self._dealer, message, shaper=self.shapers.get("device_edge"))
                reply = await asyncio.wait_for(future, self.timeout_s)
            except asyncio.TimeoutError:
                raise TierError(f"edge node {self.edge_address} did not answer within {self.timeout_s:.0f} s",
                                "timeout") from None
            finally:
                self._pending.pop(request.request_id, None)
            return reply, time.perf_counter() - start

        if self._dealer is None:
            raise TierError("this plan has an edge segment but the client has no edge address", "no_edge")
        reply, elapsed, request = await self._with_plan_retry("edge", entry, plan, tensors, send, extra_meta)
        server_s = float(reply.meta.get("server_s", 0.0))
        up_bytes = request.tensor_bytes
        timing.edge_s = float(reply.meta.get("edge_s", 0.0))
        timing.cloud_s = float(reply.meta.get("cloud_s", 0.0))
        timing.edge_nodes = int(reply.meta.get("edge_nodes", 0))
        timing.edge_strategy = str(reply.meta.get("edge_strategy", ""))
        timing.links_s["device_edge"] = max(elapsed - server_s, 0.0)
        timing.bytes["device_edge"] = up_bytes + reply.tensor_bytes
        self._observe("device_edge", timing.bytes["device_edge"], timing.links_s["device_edge"])
        if "edge_cloud_s" in reply.meta:
            timing.links_s["edge_cloud"] = float(reply.meta["edge_cloud_s"])
            timing.bytes["edge_cloud"] = int(reply.meta.get("edge_cloud_bytes", 0))
            self._observe("edge_cloud", timing.bytes["edge_cloud"], timing.links_s["edge_cloud"])
        return reply

    async def _send_cloud(self, entry: PlanEntry, plan: Plan, tensors: dict, timing: RequestTiming) -> Message:
        import aiohttp

        if not self.cloud_url:
            raise TierError("this plan sends to the cloud but the client has no cloud URL", "no_cloud")

        async def send(request: Message):
            start = time.perf_counter()
            try:
                reply = await transport.post_message(self._session, self.cloud_url + "/v1/infer", request,
                                                     self.shapers.get("device_cloud"), self.timeout_s)
            except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:  # refused, reset, timed out
                raise TierError(f"cloud {self.cloud_url} is unreachable: {exc or type(exc).__name__}",
                                "unreachable") from None
            return reply, time.perf_counter() - start

        reply, elapsed, request = await self._with_plan_retry("cloud", entry, plan, tensors, send)
        timing.cloud_s = float(reply.meta.get("cloud_s", 0.0))
        server_s = float(reply.meta.get("server_s", timing.cloud_s))
        timing.links_s["device_cloud"] = max(elapsed - server_s, 0.0)
        timing.bytes["device_cloud"] = request.tensor_bytes + reply.tensor_bytes
        self._observe("device_cloud", timing.bytes["device_cloud"], timing.links_s["device_cloud"])
        return reply

    async def _send_cloud_part(self, plan: Plan, tensors: dict, join_id: str, timing: RequestTiming) -> None:
        """The device's direct values for the cloud segment; the cloud holds them for the edge's forward."""
        import aiohttp

        request = Message(kind="infer", request_id=uuid.uuid4().hex, model=plan.model, plan_version=plan.version,
                          meta={"link": "device_cloud", "join": join_id, "part": "device",
                                "deadline_ms": self._budget_s() * 1e3}, tensors=tensors)
        start = time.perf_counter()
        try:
            reply = await transport.post_message(self._session, self.cloud_url + "/v1/infer", request,
                                                 self.shapers.get("device_cloud"), self.timeout_s)
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise TierError(f"cloud {self.cloud_url} is unreachable: {exc or type(exc).__name__}",
                            "unreachable") from None
        if reply.kind == "error":
            raise TierError(f"cloud: {reply.meta.get('error')}", reply.meta.get("code", "error"))
        timing.links_s["device_cloud"] = time.perf_counter() - start
        timing.bytes["device_cloud"] = request.tensor_bytes
        self._observe("device_cloud", request.tensor_bytes, timing.links_s["device_cloud"])

    def _observe(self, link: str, nbytes: int, seconds: float) -> None:
        """A transfer's bandwidth sample: its link time less the link's known round trip (the planner
        prices the RTT separately, so leaving it in would count it twice)."""
        rtt_s = float(getattr(self._links0, f"{link}_rtt_s", 0.0) or 0.0)
        self.links.observe(link, nbytes, seconds - rtt_s if seconds > 2 * rtt_s else seconds / 2)

    # ----------------------------------------------------------------------------------- probes
    def probe(self, nbytes: int = 256 * 1024) -> dict[str, float]:
        """Light bandwidth probe of the device's links when idle; returns the updated estimates (bit/s)."""
        return self._call(self._probe(nbytes), self.timeout_s)

    async def _probe(self, nbytes: int) -> dict[str, float]:
        payload = {"probe": torch.zeros(nbytes // 4)}
        if self._dealer is not None:
            request = Message(kind="probe", request_id=uuid.uuid4().hex, tensors=payload)
            future = self._loop.create_future()
            self._pending[request.request_id] = future
            start = time.perf_counter()
            await transport.send_zmq(self._dealer, request, shaper=self.shapers.get("device_edge"))
            await asyncio.wait_for(future, self.timeout_s)
            self._observe("device_edge", nbytes, time.perf_counter() - start)
        await self._loop.run_in_executor(None, self._replan)
        return dict(self.links.bps)

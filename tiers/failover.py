"""A device client that degrades instead of breaking: ``FailoverClient`` (same API as ``tiers.device.Client``).

Every request has one deadline (``timeout_s``). A try gets part of it (``attempt_fraction``), so when a
tier fails there is time left to answer another way:

* the cloud refuses the connection, resets it, answers 503 or runs past the try's budget -> the cloud is
  marked down, its links are priced at ~0 bit/s, the re-partitioner moves the work to device+edge and
  the request is re-run on that plan; a watcher polls ``/healthz`` and, when the cloud answers again,
  restores the measured bandwidths, so the next plans use the cloud again;
* the edge node does not answer in time (a collapsed device-edge link, a dead node) -> the same for
  the edge (re-measured by small probes until it answers).
* edge nodes that die while tiles are in flight are handled by the edge daemon itself (tiles re-run
  on the others), so the device sees only a slower answer.
* the coordinator (the edge node the device talks to) dies: with ``edges=[...]`` (every node of the
  cluster file can coordinate) the client moves to the next address: at once when ZeroMQ reports the
  connection lost (a socket monitor; the requests in flight fail with ``edge_unreachable`` and are re-sent
  there), or after a try's budget runs out with no answer. Only when no edge node answers is the edge
  tier marked down.

A request whose every try failed raises ``TierError`` (code ``deadline`` or the tier's code) within its
deadline; no answer is ever assembled from parts of two plans (each try runs one plan end to end).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from typing import Sequence

import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tiers import device as _device
from tiers import transport
from tiers.device import TierError
from tiers.wire import Message

# The client without retries that FailoverClient builds on: tiers.device.Client today; read from the
# module's dict so that device.py may rename it BasicClient and make ``Client`` this module's class
# (a lazy module __getattr__) without an import cycle.
BasicClient = _device.__dict__.get("BasicClient") or _device.__dict__["Client"]
Client = BasicClient  # the name this module has always exported

log = logging.getLogger("d3.failover")

DOWN_BPS = 1e3  # what a tier that is down is priced at: 1 kbit/s, near zero but keeps the cost model finite
CLOUD_FAULTS = {"cloud_unreachable", "unreachable", "overloaded", "deadline", "cloud_error"}
EDGE_FAULTS = {"timeout", "try_timeout", "edge_unreachable"}
_try_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("d3_try_deadline", default=None)


class FailoverClient(BasicClient):
    """``Client`` that retries on another plan or another edge node within the request's deadline.

    ``edges``: the addresses of every edge node the device may send to (first = the coordinator it
    starts with); ``edge_names``: their names, for CURVE keys when the cluster runs with security.
    ``edge=...`` alone still works (one edge node)."""

    def __init__(self, *args, attempt_fraction: float = 0.45, max_attempts: int = 3,
                 health_every_s: float = 0.5, edges: Sequence[str] | None = None,
                 edge_names: Sequence[str] | None = None, **kwargs):
        if not 0.0 < attempt_fraction <= 1.0:
            raise ValueError(f"attempt_fraction must be in (0, 1], got {attempt_fraction}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        edges = list(edges or ())
        if kwargs.get("edge") and kwargs["edge"] not in edges:
            edges.insert(0, kwargs["edge"])
        if edge_names is not None and len(edge_names) != len(edges):
            raise ValueError(f"{len(edge_names)} edge names for {len(edges)} edge addresses")
        self.edges: list[str] = edges
        self.edge_names: list[str] | None = list(edge_names) if edge_names is not None else None
        self.edge_switches = 0  # times the client moved to another edge node
        self._monitor_task: asyncio.Task | None = None
        if edges:
            kwargs["edge"] = edges[0]
        super().__init__(*args, **kwargs)
        self.attempt_timeout_s = self.timeout_s * attempt_fraction
        self.max_attempts = max_attempts
        self.health_every_s = health_every_s
        self.down: set[str] = set()  # "cloud", "edge"
        self.faults: dict[str, int] = {}  # fault code -> count
        self.recoveries: dict[str, int] = {}  # tier -> times it came back
        self.retried = 0  # requests answered on a later try
        self._watchers: dict[str, asyncio.Task] = {}
        self._warm_versions: set[int] = set()  # plan versions that have answered once

    # ----------------------------------------------------------------------------------- edge nodes
    async def _open(self) -> None:
        await super()._open()
        self._watch_connection()

    def _watch_connection(self) -> None:
        if self._dealer is not None:
            monitor = self._dealer.get_monitor_socket(
                zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
            self._monitor_task = asyncio.ensure_future(self._on_disconnect(monitor, self._dealer))

    async def _on_disconnect(self, monitor, dealer) -> None:
        """The coordinator's connection dropped (its process died or its host went away), or it cannot
        be reached at all (ZeroMQ retries the connect every 100 ms): the requests waiting on it will never
        be answered, so fail them now (they are re-sent to another node)."""
        connected = False
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if dealer is not self._dealer:
                    continue
                if event["event"] == zmq.EVENT_CONNECTED:
                    connected = True
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    connected = False
                    log.warning("%s: lost the connection to edge node %s", self._name, self.edge_address)
                    self._fail_pending(f"lost the connection to edge node {self.edge_address}")
                elif event["event"] == zmq.EVENT_CONNECT_RETRIED and not connected and self._pending:
                    self._fail_pending(f"cannot connect to edge node {self.edge_address}")
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            monitor.close(linger=0)

    def _fail_pending(self, text: str) -> None:
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(TierError(text, "edge_unreachable"))

    async def _switch_edge(self, failed_address: str) -> bool:
        """Send from now on to the edge node after ``failed_address``; False when there is none.
        Concurrent requests that saw the same node fail move the client once."""
        if len(self.edges) < 2:
            return False
        if self.edge_address != failed_address:
            return True  # another request already moved on
        index = (self.edges.index(failed_address) + 1) % len(self.edges)
        old_dealer = self._dealer
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        self._reader.cancel()
        self._fail_pending(f"edge node {failed_address} stopped answering")
        self.edge_address = self.edges[index]
        self._dealer = self._context.socket(zmq.DEALER)
        transport.configure_zmq_socket(self._dealer)
        self._dealer.setsockopt(zmq.IDENTITY, self._name.encode())
        if self.security is not None:
            name = self.edge_names[index] if self.edge_names else self.security.edge_name
            self.security.secure_client(self._dealer, name)
        self._dealer.connect(self.edge_address)
        old_dealer.close(linger=0)
        self._reader = asyncio.create_task(self._read_replies())
        self._watch_connection()
        self._sent_plans = {(tier, plan_id) for tier, plan_id in self._sent_plans if tier != "edge"}
        self.edge_switches += 1
        log.warning("%s: edge node %s failed; sending to %s", self._name, failed_address, self.edge_address)
        return True

    # ----------------------------------------------------------------------------------- requests
    async def ainfer(self, x: torch.Tensor):
        deadline = time.monotonic() + self.timeout_s
        last_error = "no try was made"
        timeouts_switched = False  # a timeout may be the link, not the node: move on it once per request
        moved = False
        for attempt in range(self.max_attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                break
            plan = self.planner.plan if self.planner is not None else None
            # the first request of a plan is slow everywhere (segments, tiling and graphs are built on
            # first use), so only a plan that has answered before gets the short budget of one try
            # after a move to another edge node the plan is cold there: give the try the rest of the time
            warm = plan is not None and plan.version in self._warm_versions and not moved
            budget = min(remaining, self.attempt_timeout_s) if warm else remaining
            if warm and len(self.edges) > 1 and plan is not None and "edge" in plan.assignment.values():
                budget = min(budget, self.attempt_timeout_s)  # keep time to try another edge node
            _try_deadline.set(time.monotonic() + budget)  # copied into the try's task: its requests carry it
            edge_address = self.edge_address
            try:
                output = await asyncio.wait_for(super().ainfer(x), budget)
                self.retried += attempt > 0
                if plan is not None:
                    self._warm_versions.add(plan.version)
                return output
            except asyncio.TimeoutError:
                code, last_error = "try_timeout", f"no answer within {budget:.1f} s"
            except TierError as exc:
                code, last_error = exc.code, str(exc)
                if code not in CLOUD_FAULTS | EDGE_FAULTS:
                    raise  # a bad request stays bad on any plan: tell the caller at once
            self.faults[code] = self.faults.get(code, 0) + 1
            if self._blames_edge_node(code, plan) and (code == "edge_unreachable" or not timeouts_switched):
                timeouts_switched |= code != "edge_unreachable"
                if await self._switch_edge(edge_address):
                    moved = True
                    continue  # the same plan on another coordinator: no re-plan needed
            if not self._note_fault(code, plan):
                break
            await self._loop.run_in_executor(None, self._replan)
        raise TierError(f"no answer within the {self.timeout_s:.1f} s deadline: {last_error}", "deadline")

    def _blames_edge_node(self, code: str, plan) -> bool:
        return plan is not None and "edge" in plan.assignment.values() and code in EDGE_FAULTS

    def _budget_s(self) -> float:
        deadline = _try_deadline.get()
        return self.attempt_timeout_s if deadline is None else max(deadline - time.monotonic(), 0.001)

    def _note_fault(self, code: str, plan) -> bool:
        """Mark the tier the fault points at as down; False when there is nothing to fall back on."""
        if not self.repartition or plan is None:
            return False
        tiers_used = set(plan.assignment.values())
        if "cloud" in tiers_used and code in CLOUD_FAULTS:
            tier = "cloud"
        elif "edge" in tiers_used and code in EDGE_FAULTS:
            tier = "edge"
        elif "cloud" in tiers_used and code == "try_timeout":
            tier = "cloud"  # a device+cloud plan that ran out of time: the cloud or its link is too slow
        else:
            return False
        if tier not in self.down:
            log.warning("%s: %s looks down (%s); re-planning without it", self._name, tier, code)
            self.down.add(tier)
            self._watchers[tier] = asyncio.ensure_future(self._watch(tier))
        return True

    def _replan(self) -> None:
        if not self.repartition or self.planner is None:
            return
        bps = dict(self.links.bps)
        if "cloud" in self.down:
            bps["edge_cloud"] = bps["device_cloud"] = DOWN_BPS
        if "edge" in self.down:
            bps["device_edge"] = DOWN_BPS
        links = self._links0.replace(device_edge_bps=bps["device_edge"], edge_cloud_bps=bps["edge_cloud"],
                                     device_cloud_bps=bps["device_cloud"])
        with self._plan_lock:
            self.planner.update(links)

    # ----------------------------------------------------------------------------------- recovery
    async def _watch(self, tier: str) -> None:
        try:
            while tier in self.down:
                await asyncio.sleep(self.health_every_s)
                if await (self._cloud_healthy() if tier == "cloud" else self._edge_healthy()):
                    self.down.discard(tier)
                    self.recoveries[tier] = self.recoveries.get(tier, 0) + 1
                    log.warning("%s: %s is back; re-planning with it", self._name, tier)
                    await self._loop.run_in_executor(None, self._replan)
        finally:
            self._watchers.pop(tier, None)

    async def _cloud_healthy(self) -> bool:
        import aiohttp

        if not self.cloud_url:
            return False
        try:
            async with self._session.get(self.cloud_url + "/healthz",
                                         timeout=aiohttp.ClientTimeout(total=1.0)) as response:
                return response.status == 200
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError):
            return False

    async def _edge_healthy(self) -> bool:
        """Small probes through the (shaped) device-edge link: the first says it passes again, the
        second's time is the new bandwidth estimate (the first may have waited out the outage)."""
        return self._dealer is not None and await self._probe_edge() and await self._probe_edge(measure=True)

    async def _probe_edge(self, nbytes: int = 64 * 1024, measure: bool = False) -> bool:
        request = Message(kind="probe", request_id=uuid.uuid4().hex, tensors={"probe": torch.zeros(nbytes // 4)})
        future = self._loop.create_future()
        self._pending[request.request_id] = future
        start = time.perf_counter()
        try:
            async def exchange():
                await transport.send_zmq(self._dealer, request, shaper=self.shapers.get("device_edge"))
                return await future

            await asyncio.wait_for(exchange(), max(1.0, self.health_every_s * 2))
        except (asyncio.TimeoutError, OSError, TierError):
            return False
        finally:
            self._pending.pop(request.request_id, None)
        if measure:
            self.links.bps["device_edge"] = nbytes * 8 / max(time.perf_counter() - start, 1e-6)
        return True

    async def _close(self) -> None:
        self.down.clear()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        for task in list(self._watchers.values()):
            task.cancel()
        await super()._close()

    def uses(self, tier: str) -> bool:
        """Whether the current plan puts any work on ``tier`` (device, edge, cloud)."""
        return tier in set(self.plan.assignment.values())

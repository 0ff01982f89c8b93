"""The edge daemon: one process per edge node, ZeroMQ between them (ROUTER for everything coming in,
one DEALER per peer for tiles and heartbeats going out; never REQ/REP, whose lock-step would serialise
concurrent requests).

The node a device sends a request to coordinates it: it plans the edge segment for the live nodes' speeds
with the plan's edge strategy (``partitioner.edge_strategies.plan_edge``: tiles, hetero_lp, zones, dpfl,
auction, iop; cached per plan, strategy and node speeds; ``auto`` plans them all and measures the best
predicted few, and the unsplit segment, on live requests, see ``partitioner/edge_strategies/online.py``), runs it with ``run_edge_plan`` whose
``item_runner`` sends each work item to the node the strategy chose (itself included), combines, then forwards the cloud segment's inputs to the cloud endpoint
over HTTP (or answers the device at once when the cloud segment is empty). Nodes announce themselves
and their speed every ``heartbeat_s``; a peer silent for ``peer_timeout_s`` leaves the tiling, and a tile
sent to a peer that does not answer within ``tile_timeout_s`` is re-run on this node. Items travel as
``tile`` messages whose meta names the edge stage and item (``item_meta``); the older tile-only meta
(``stage``/``tile``) is still served. A request whose input comes in row bands (``tiers/bands.py``) is
assembled here as the bands arrive; under ``auto`` the first stage can run on them as they come
(``partitioner/streaming.py``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import zmq
import zmq.asyncio

from tiers import guard, transport, wire
from tiers.bands import BAND_KIND, STREAM_META, RowStream, StreamError
from tiers.runtime import Metrics, ModelStore, PlanEntry, RequestError, check_inputs, timed_run
from tiers.wire import Message, WireError

log = logging.getLogger("d3.edge")


@dataclass
class EdgeConfig:
    name: str
    bind: str  # e.g. tcp://127.0.0.1:5600
    peers: dict[str, str] = field(default_factory=dict)  # other edge nodes: name -> address
    cloud_url: str | None = None  # http://host:port
    speed: float | None = None  # relative speed announced to peers (default 1/slowdown)
    slowdown: float = 1.0  # emulated: sleep (k-1) x compute time
    heartbeat_s: float = 0.5
    peer_timeout_s: float = 2.0
    tile_timeout_s: float = 20.0
    workers: int = 8
    tiling: bool = True
    # None: each plan's Plan.edge_strategy; a strategy name overrides every plan this node coordinates
    edge_strategy: str | None = None
    edge_link_bps: float = 1e9  # the LAN between edge nodes, as the edge planner prices it
    max_message_bytes: int = 256 << 20
    shapers: dict = field(default_factory=dict)  # device_edge (replies), edge_cloud, edge_edge
    security: object = None  # tiers.security.NodeSecurity (CURVE keys, cloud token, TLS); None = open

    @property
    def announced_speed(self) -> float:
        return self.speed if self.speed is not None else 1.0 / max(self.slowdown, 1e-9)


@dataclass
class PeerState:
    address: str
    speed: float = 1.0
    last_seen: float = 0.0  # monotonic; 0 = never / dropped


class EdgeDaemon:
    def __init__(self, config: EdgeConfig, store: ModelStore | None = None):
        self.config = config
        self.store = store or ModelStore()
        self.metrics = Metrics()
        self.peers = {name: PeerState(address) for name, address in config.peers.items() if name != config.name}
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix=f"{config.name}")
        self._pending: dict[str, asyncio.Future] = {}
        self._tilings: dict[tuple, object] = {}  # (plan digest, strategy, node speeds) -> EdgePlan
        self._selectors: dict[tuple, object] = {}  # the same key, strategy "auto" -> OnlineSelector
        self._streams: dict[str, RowStream] = {}  # request id -> its input arriving in bands
        self._streamed_heads: dict[tuple, object] = {}  # (edge work, tiles) -> StreamedHead or None
        self._cloud_plans: set[str] = set()  # plan ids the cloud has been sent
        self._tasks: list[asyncio.Task] = []
        self.tiles_rerun = 0
        self.replays = guard.ReplayGuard()
        self.auth = None  # the ZAP authenticator when CURVE is on
        self.refusals: dict[str, int] = {}  # handshake failures seen by the socket monitor

    # ------------------------------------------------------------------------------------- lifecycle
    async def run(self, ready=None) -> None:
        import aiohttp

        self.loop = asyncio.get_running_loop()
        from tiers import security as sec

        self.context = zmq.asyncio.Context()
        security = self.config.security
        if security is not None and security.curve is not None:
            self.auth = sec.start_authenticator(self.context, security.keys_dir, f"edge {self.config.name}")
        self.router = self.context.socket(zmq.ROUTER)
        transport.configure_zmq_socket(self.router)
        if security is not None:
            security.secure_server(self.router)  # before bind: only allow-listed CURVE peers get through
        self.router.bind(self.config.bind)
        self.dealers = {}
        for name, peer in self.peers.items():
            dealer = self.context.socket(zmq.DEALER)
            transport.configure_zmq_socket(dealer)
            dealer.setsockopt(zmq.IDENTITY, self.config.name.encode())
            dealer.setsockopt(zmq.IMMEDIATE, 1)  # never queue tiles for a peer that is not connected
            if security is not None:
                security.secure_client(dealer, name)
            dealer.connect(peer.address)
            self.dealers[name] = dealer
        self.session = aiohttp.ClientSession(**sec.session_kwargs(security))
        try:
            self._tasks = [asyncio.create_task(self._router_loop()), asyncio.create_task(self._heartbeat_loop())]
            if self.auth is not None:
                self._tasks.append(asyncio.create_task(
                    sec.log_handshake_failures(self.router, f"edge {self.config.name}", self.refusals)))
            self._tasks += [asyncio.create_task(self._dealer_loop(d)) for d in self.dealers.values()]
            if ready is not None:
                ready()
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            await self.session.close()
            if self.auth is not None:
                self.auth.stop()
            self.context.destroy(linger=0)
            self.executor.shutdown(wait=False, cancel_futures=True)

    def alive_nodes(self) -> list[tuple[str, float]]:
        """(name, speed) of the nodes tiles may go to: this one first, then live peers by name."""
        now = time.monotonic()
        nodes = [(self.config.name, self.config.announced_speed)]
        nodes += [(name, peer.speed) for name, peer in sorted(self.peers.items())
                  if peer.last_seen and now - peer.last_seen < self.config.peer_timeout_s]
        return nodes

    # ------------------------------------------------------------------------------------- loops
    async def _heartbeat_loop(self) -> None:
        while True:
            hello = Message(kind="hello", meta={"name": self.config.name, "speed": self.config.announced_speed})
            frames = wire.encode_frames(hello)
            for dealer in self.dealers.values():
                try:
                    await dealer.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected (yet): the peer will not see us until it is
            await asyncio.sleep(self.config.heartbeat_s)

    async def _dealer_loop(self, dealer) -> None:
        while True:
            _, message = await transport.recv_zmq(dealer, max_message_bytes=self.config.max_message_bytes)
            if isinstance(message, WireError):
                log.warning("bad frame from a peer: %s", message)
                continue
            future = self._pending.get(message.request_id)
            if future is not None and not future.done():
                future.set_result(message)

    async def _router_loop(self) -> None:
        while True:
            identity, message = await transport.recv_zmq(self.router, with_identity=True,
                                                         max_message_bytes=self.config.max_message_bytes)
            if isinstance(message, Message) and message.kind == "hello":
                self._note_hello(message)
                continue
            if isinstance(message, Message) and message.kind == BAND_KIND:
                self._feed_band(message)
                continue
            if isinstance(message, Message) and message.kind == "infer" and STREAM_META in message.meta:
                # registered before the next message is read: the request's bands follow right behind it
                try:
                    self._streams[message.request_id] = RowStream(message)
                except StreamError as exc:
                    message.meta["stream_error"] = str(exc)
            asyncio.create_task(self._serve(identity, message))

    def _feed_band(self, message: Message) -> None:
        stream = self._streams.get(message.request_id)
        if stream is None:  # the request already failed (or never streamed): nothing waits for it
            log.debug("band for unknown request %s dropped", message.request_id)
            return
        try:
            stream.feed(message)
        except StreamError as exc:
            stream.fail(str(exc))

    def _note_hello(self, message: Message) -> None:
        name, speed = message.meta.get("name"), message.meta.get("speed", 1.0)
        if name in self.peers and isinstance(speed, (int, float)) and speed > 0:
            self.peers[name].speed = float(speed)
            self.peers[name].last_seen = time.monotonic()

    async def _serve(self, identity: bytes, message) -> None:
        start = time.perf_counter()
        request_id, bytes_in, shaper = "", 0, None
        self.metrics.in_flight += 1
        try:
            if isinstance(message, WireError):
                raise message
            request_id, bytes_in = message.request_id, message.tensor_bytes
            if message.kind == "infer":
                reply = await self._infer(message)
                shaper = self.config.shapers.get("device_edge")
            elif message.kind == "tile":
                reply = await self._tile(message)
                shaper = self.config.shapers.get("edge_edge")
            elif message.kind == "status":
                reply = Message(kind="status", request_id=request_id, meta=self.status())
            elif message.kind == "probe":  # bandwidth probe: echo nothing, the sender times the upload
                reply = Message(kind="probe", request_id=request_id, meta={"bytes": bytes_in})
                shaper = self.config.shapers.get("device_edge")
            else:
                raise RequestError(f"edge nodes serve infer, tile, status, probe and hello; got {message.kind!r}")
            outcome = "ok"
        except WireError as exc:
            reply, outcome = wire.error_message(request_id, str(exc), "bad_frame"), "bad_frame"
        except RequestError as exc:
            reply, outcome = wire.error_message(request_id, str(exc), exc.code), exc.code
        except Exception as exc:  # one bad request must not take the node down
            log.exception("request %s failed", request_id)
            reply, outcome = wire.error_message(request_id, f"{type(exc).__name__}: {exc}", "internal"), "internal"
        finally:
            self.metrics.in_flight -= 1
            self._streams.pop(request_id, None)
        if message is not None and getattr(message, "kind", "") != "status":
            self.metrics.record(outcome, time.perf_counter() - start, bytes_in, reply.tensor_bytes)
        try:
            await transport.send_zmq(self.router, reply, identity, shaper)
        except zmq.ZMQError as exc:  # the sender went away
            log.warning("could not answer %s: %s", request_id, exc)

    def status(self) -> dict:
        refused = {**self.refusals, "zap": self.auth.refused if self.auth else 0, "replayed": self.replays.refused}
        # auto's measurements per edge segment it coordinated: median ms per candidate (None: untried)
        auto = {key[0][:12]: {"ms": selector.summary(), "transfer_ms": round(selector.transfer_s * 1e3, 1),
                              "stream_expected_ms": (round(selector.expected_s("stream") * 1e3, 1)
                                                     if selector.stream_times else None)}
                for key, selector in self._selectors.items()}
        return {"name": self.config.name, "alive": [name for name, _ in self.alive_nodes()],
                "speed": self.config.announced_speed, "tiles_rerun": self.tiles_rerun, "refused": refused,
                "metrics": self.metrics.snapshot(), "auto": auto}

    # ------------------------------------------------------------------------------------- requests
    async def _resolve(self, message: Message) -> PlanEntry:
        if self.store.has_plan(message.plan_id):  # cached: a few dict lookups, not worth a thread hop per tile
            return self.store.resolve(message)
        return await self.loop.run_in_executor(self.executor, self.store.resolve, message)

    async def _infer(self, message: Message) -> Message:
        start = time.perf_counter()
        deadline = guard.deadline_from(message.meta)
        if "stream_error" in message.meta:
            raise RequestError(f"streamed input: {message.meta['stream_error']}", "bad_stream")
        stream = self._streams.get(message.request_id) if STREAM_META in message.meta else None
        entry = await self._resolve(message)
        self.replays.check(message.request_id)  # after resolve: a resend for unknown_plan is no replay
        edge, cloud = entry.segmented.edge, entry.segmented.cloud
        check_inputs(message.tensors, edge.input_names, entry.graph, "the edge segment")
        guard.check_dtypes(message.tensors, edge.input_names, entry.graph, "the edge segment")
        guard.check_deadline(deadline, "before the edge started computing")
        # the plan says over how many nodes to spread the edge segment (1 = untiled, e.g. a baseline)
        nodes = self.alive_nodes()[:max(1, len(entry.plan.edge_weights))]
        edge_outputs, edge_s, edge_strategy = await self._run_edge(entry, message.tensors, nodes, stream,
                                                                   guard.remaining_s(deadline, 120.0))
        if stream is not None:  # whatever ran, the whole input is here now (the cloud may read it too)
            await self._complete(stream, guard.remaining_s(deadline, 120.0))
            start = max(start, stream.arrived_at)  # the device times the upload until the last band
        values = {**message.tensors, **edge_outputs}
        outputs = {name: values[name] for name in entry.graph.output_names
                   if name in edge_outputs}
        meta = {"edge_s": edge_s, "edge_nodes": len(nodes) if edge.node_names else 0, "edge_strategy": edge_strategy}
        direct = message.meta.get("cloud_direct") or []  # values the device sends the cloud itself
        if not isinstance(direct, list) or not all(isinstance(n, str) for n in direct):
            raise RequestError(f"meta cloud_direct must list value names, got {direct!r}")
        if cloud.node_names:
            missing = [name for name in cloud.input_names if name not in values and name not in direct]
            if missing:
                raise RequestError(f"the cloud segment needs {missing}, which neither the device sent nor "
                                   f"the edge computed")
            guard.check_deadline(deadline, "before the edge forwarded to the cloud")
            join = {"join": message.meta.get("join") or message.request_id, "expect": direct} if direct else {}
            cloud_reply, link_s = await self._post_cloud(
                entry, message, {n: values[n] for n in cloud.input_names if n not in direct}, deadline, join)
            outputs.update(cloud_reply.tensors)
            meta.update(cloud_s=cloud_reply.meta.get("cloud_s", 0.0), edge_cloud_s=link_s,
                        edge_cloud_bytes=sum(t.numel() * t.element_size() for n, t in values.items()
                                             if n in cloud.input_names and n not in direct)
                        + cloud_reply.tensor_bytes)
        meta["server_s"] = time.perf_counter() - start
        return Message(kind="result", request_id=message.request_id, model=message.model,
                       plan_version=message.plan_version, plan_id=message.plan_id, meta=meta, tensors=outputs)

    async def _post_cloud(self, entry: PlanEntry, message: Message, tensors: dict,
                          deadline: float | None = None, join: dict | None = None) -> tuple[Message, float]:
        """Forward to the cloud (with the plan JSON the first time); returns (reply, link seconds)."""
        import aiohttp

        if not self.config.cloud_url:
            raise RequestError("this plan has a cloud segment but the edge node has no cloud URL", "no_cloud")
        url = self.config.cloud_url.rstrip("/") + "/v1/infer"
        for attempt in range(2):
            meta = guard.with_budget({"link": "edge_cloud", **(join or {})}, deadline)
            if message.plan_id not in self._cloud_plans or attempt:
                meta["plan"] = entry.plan_json
            request = Message(kind="infer", request_id=message.request_id, model=message.model,
                              plan_version=message.plan_version, plan_id=message.plan_id,
                              model_digest=message.model_digest, meta=meta, tensors=tensors)
            start = time.perf_counter()
            try:
                reply = await transport.post_message(self.session, url, request, self.config.shapers.get("edge_cloud"),
                                                     max(guard.remaining_s(deadline, 120.0), 0.001))
            except (OSError, aiohttp.ClientError) as exc:  # refused, reset, disconnected, timed out
                raise RequestError(f"cloud endpoint {url} is unreachable: {exc or type(exc).__name__}",
                                   "cloud_unreachable") from None
            elapsed = time.perf_counter() - start
            if reply.kind == "error" and reply.meta.get("code") == "unknown_plan" and not attempt:
                self._cloud_plans.discard(message.plan_id)
                continue
            if reply.kind == "error":
                raise RequestError(f"cloud: {reply.meta.get('error')}", reply.meta.get("code", "cloud_error"))
            self._cloud_plans.add(message.plan_id)
            return reply, max(elapsed - float(reply.meta.get("server_s", reply.meta.get("cloud_s", 0.0))), 1e-6)
        raise RequestError("cloud kept refusing the plan", "unknown_plan")

    async def _complete(self, stream: RowStream, timeout_s: float) -> None:
        try:
            await stream.wait_complete(timeout_s)
        except StreamError as exc:
            raise RequestError(str(exc), "incomplete_stream") from None

    async def _run_edge(self, entry: PlanEntry, values: dict, nodes: list[tuple[str, float]],
                        stream: RowStream | None = None, timeout_s: float = 120.0) -> tuple[dict, float, str]:
        """(edge segment outputs, seconds, the edge strategy that ran: a name, "whole", "stream" or "").
        On a streamed input the seconds count from the last band's arrival (what the request waits)."""
        from partitioner.edge_strategies.online import STREAM, WHOLE

        segment = entry.segmented.edge
        if not segment.node_names:
            return {}, 0.0, ""
        edge_plan = await self._tiling_for(entry, nodes) if len(nodes) > 1 else None
        selector = self._selectors.get(self._tiling_key(entry, nodes)) if len(nodes) > 1 and \
            self.edge_strategy_of(entry) == "auto" else None
        head = await self._streamed_head(entry, stream) if stream is not None and selector is not None else None
        if head is not None:
            selector.add_candidate(STREAM)
        if head is not None and selector.choose_name() == STREAM:
            outputs, seconds, times = await self._run_streamed(entry, head, values, stream, timeout_s)
            selector.note_transfer(stream.transfer_s)
            selector.record_stream(times, seconds)
            return outputs, seconds, STREAM
        if stream is not None:
            await self._complete(stream, timeout_s)
            if selector is not None:
                selector.note_transfer(stream.transfer_s)
        if edge_plan is None:
            outputs, seconds = await self.loop.run_in_executor(
                self.executor, lambda: timed_run(lambda: segment.run(values), self.config.slowdown))
            ran = "whole"
        else:
            from partitioner.edge_strategies import run_edge_plan

            runner = self._tile_runner(entry, edge_plan, [name for name, _ in nodes])
            outputs, seconds = await self.loop.run_in_executor(
                self.executor, lambda: timed_run(lambda: run_edge_plan(entry.graph, edge_plan, values, runner)))
            ran = edge_plan.strategy
        if selector is not None:  # feed the measurement back to auto's trial ("whole" is one of its candidates)
            selector.record(WHOLE if edge_plan is None else ran, seconds)
        return outputs, seconds, ran

    async def _streamed_head(self, entry: PlanEntry, stream: RowStream):
        """The segment's streamed head for this stream's tiling (cached per edge work), or None."""
        from partitioner.streaming import plan_streamed_head

        segment = entry.segmented.edge
        key = (self._tiling_key(entry, [])[0], stream.name, stream.tiles)
        if key not in self._streamed_heads:
            head = await self.loop.run_in_executor(self.executor, lambda: plan_streamed_head(
                entry.graph, segment.node_names, segment.input_names, segment.output_names, stream.tiles))
            self._streamed_heads[key] = head if head is not None and head.stream_name == stream.name else None
        return self._streamed_heads[key]

    async def _run_streamed(self, entry: PlanEntry, head, values: dict, stream: RowStream,
                            timeout_s: float) -> tuple[dict, float, object]:
        """The head's tiles here as their rows arrive, then the rest whole: (outputs, seconds after the
        last band, StreamTimes)."""
        from partitioner.streaming import run_streamed_head
        from partitioner.tiling import run_tile

        slowdown = self.config.slowdown

        def tile_here(tile, slices):  # each tile slowed down as it runs, so emulated nodes overlap too
            return timed_run(lambda: run_tile(entry.graph, head.head, tile, slices), slowdown)[0]

        def run():
            return run_streamed_head(entry.graph, head, values, lambda row: stream.wait_rows(row, timeout_s),
                                     tile_here)

        started = time.perf_counter()
        try:
            (outputs, times), _ = await self.loop.run_in_executor(self.executor, lambda: timed_run(run, slowdown))
        except StreamError as exc:
            raise RequestError(str(exc), "incomplete_stream") from None
        return outputs, time.perf_counter() - max(started, stream.arrived_at), times

    def edge_strategy_of(self, entry: PlanEntry) -> str:
        return self.config.edge_strategy or getattr(entry.plan, "edge_strategy", None) or "tiles"

    def _tiling_key(self, entry: PlanEntry, nodes: list[tuple[str, float]]) -> tuple:
        """Splits (and auto's measurements) belong to the edge segment, not to the plan around it: a
        re-partition that keeps the edge's work keeps them, and auto does not try its candidates again."""
        segment = entry.segmented.edge
        speeds = tuple(round(speed, 3) for _, speed in nodes)
        work = wire.plan_digest("|".join([entry.plan.model, str(tuple(entry.plan.input_shape)),
                                          ",".join(segment.node_names), ",".join(segment.input_names),
                                          ",".join(segment.output_names)]))
        return (work, self.edge_strategy_of(entry), speeds)

    async def _tiling_for(self, entry: PlanEntry, nodes: list[tuple[str, float]]):
        """The edge segment planned by the plan's edge strategy for these nodes (node 0 = this one)."""
        if not self.config.tiling:
            return None
        from partitioner.edge_strategies import STRATEGY_NAMES, plan_edge

        strategy = self.edge_strategy_of(entry)
        if strategy not in STRATEGY_NAMES:
            raise RequestError(f"unknown edge strategy {strategy!r}; this node runs {', '.join(STRATEGY_NAMES)}")
        key = self._tiling_key(entry, nodes)
        speeds = key[2]
        if strategy == "auto":  # plan them all once, then measure the best predicted (see online.py)
            if key not in self._selectors:
                from partitioner.edge_strategies import plan_all
                from partitioner.edge_strategies.online import OnlineSelector

                segment = entry.segmented.edge
                plans = await self.loop.run_in_executor(
                    self.executor, lambda: plan_all(entry.graph, segment.node_names, segment.input_names,
                                                    segment.output_names, list(speeds), self.config.edge_link_bps))
                self._selectors[key] = OnlineSelector.from_plans(plans)
            return self._selectors[key].choose()
        if key not in self._tilings:
            segment = entry.segmented.edge
            self._tilings[key] = await self.loop.run_in_executor(
                self.executor, lambda: plan_edge(entry.graph, segment.node_names, segment.input_names,
                                                 segment.output_names, list(speeds), self.config.edge_link_bps,
                                                 strategy))
        return self._tilings[key]

    def _tile_runner(self, entry: PlanEntry, edge_plan, node_names: list[str]):
        """The seam run_edge_plan calls (from its worker threads) for each work item."""
        from partitioner.edge_strategies import item_meta, run_item

        # the planner prices one node's items as run one after another: a node never computes two at once
        busy = {name: threading.Lock() for name in node_names}

        def run_here(stage_index, item, slices):
            stage = edge_plan.stages[stage_index]
            with busy[self.config.name]:
                outputs, _ = timed_run(lambda: run_item(entry.graph, stage, item, slices), self.config.slowdown)
            return outputs

        def rerun_here(stage_index, item, slices):
            self.tiles_rerun += 1
            return run_here(stage_index, item, slices)

        def runner(stage_index, item, slices):
            node = node_names[item.node % len(node_names)]
            if node == self.config.name:
                return run_here(stage_index, item, slices)
            if not self.peers[node].last_seen:  # dropped during this request: do not wait on it again
                return rerun_here(stage_index, item, slices)
            meta = item_meta(edge_plan, stage_index, item)
            try:
                with busy[node]:
                    future = asyncio.run_coroutine_threadsafe(self._remote_tile(node, entry, meta, slices), self.loop)
                    return future.result()
            except (asyncio.TimeoutError, RequestError, zmq.ZMQError) as exc:
                log.warning("item %d/%d on %s failed (%s); re-running it here", stage_index, item.index, node, exc)
                self.peers[node].last_seen = 0.0  # dropped until its next heartbeat
                return rerun_here(stage_index, item, slices)

        return runner

    async def _remote_tile(self, node: str, entry: PlanEntry, item_meta: dict, slices) -> dict:
        request_id = uuid.uuid4().hex
        message = Message(kind="tile", request_id=request_id, model=entry.plan.model,
                          plan_id=wire.plan_digest(entry.plan_json),
                          meta={"plan": entry.plan_json, **item_meta}, tensors=slices)
        future = self.loop.create_future()
        self._pending[request_id] = future

        async def exchange() -> Message:
            await transport.send_zmq(self.dealers[node], message, shaper=self.config.shapers.get("edge_edge"))
            return await future

        try:
            reply = await asyncio.wait_for(exchange(), self.config.tile_timeout_s)
        finally:
            self._pending.pop(request_id, None)
        if reply.kind == "error":
            raise RequestError(f"{node}: {reply.meta.get('error')}", reply.meta.get("code", "tile_error"))
        return reply.tensors

    async def _tile(self, message: Message) -> Message:
        """A peer's work item: a pure function of (stage, item spec, input slices)."""
        entry = await self._resolve(message)
        compute = (self._item_function(entry, message) if "edge_stage" in message.meta
                   else self._tile_function(entry, message))
        outputs, seconds = await self.loop.run_in_executor(
            self.executor, lambda: timed_run(compute, self.config.slowdown))
        return Message(kind="tile_result", request_id=message.request_id, meta={"tile_s": seconds},
                       tensors=outputs)

    @staticmethod
    def _item_function(entry: PlanEntry, message: Message):
        from partitioner.edge_strategies import edge_stage_from_dict, item_from_dict, run_item

        try:
            stage = edge_stage_from_dict(message.meta["edge_stage"])
            item = item_from_dict(message.meta["item"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RequestError(f"tile message has a bad edge stage or item spec: {exc!r}") from None
        return lambda: run_item(entry.graph, stage, item, message.tensors)

    @staticmethod
    def _tile_function(entry: PlanEntry, message: Message):
        """The tile-only meta of earlier coordinators (``stage`` + ``tile``)."""
        from partitioner.tiling import TiledStage, TileSpec, run_tile, stage_from_dict

        try:
            stage = stage_from_dict(message.meta["stage"])
            tile = TileSpec.from_dict(message.meta["tile"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError(f"tile message has a bad stage or tile spec: {exc}") from None
        if not isinstance(stage, TiledStage):
            raise RequestError("tile message names a serial stage")
        return lambda: run_tile(entry.graph, stage, tile, message.tensors)


def run_edge_daemon(config: EdgeConfig, store: ModelStore | None = None, ready=None, threads: int = 1) -> None:
    """Run a node until interrupted (uvloop)."""
    import uvloop

    torch.set_num_threads(threads)
    uvloop.run(EdgeDaemon(config, store).run(ready))

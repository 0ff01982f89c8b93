"""The cloud endpoint: aiohttp on uvloop.

``POST /v1/infer`` takes one wire body (tensors the cloud segment needs + the plan id, and the plan JSON
with the first request of a version), runs the cloud segment of that plan in a thread pool (torch releases
the GIL, so requests from many devices overlap) and answers the cloud segment's outputs. ``GET /healthz``
and ``GET /metrics`` (JSON: counts by outcome, latency percentiles, bytes). Bodies are streamed into their
tensors with our own size limit: aiohttp's ``client_max_size`` does not cover ``request.content``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from aiohttp import web

from tiers import guard, transport, wire
from tiers.runtime import Metrics, ModelStore, RequestError, check_inputs, timed_run
from tiers.wire import Message, WireError

INFER_PATH = "/v1/infer"
log = logging.getLogger("d3.cloud")


@dataclass
class CloudConfig:
    executor: ThreadPoolExecutor
    slowdown: float = 1.0  # emulated: sleep (k-1) x compute time
    max_message_bytes: int = 256 << 20
    shapers: dict = field(default_factory=dict)  # link name -> token bucket for replies
    security: object = None  # tiers.security.NodeSecurity: bearer tokens (TLS is the site's); None = open
    admission: guard.Admission = field(default_factory=lambda: guard.Admission(256))
    replays: guard.ReplayGuard = field(default_factory=guard.ReplayGuard)
    workers: int = 4
    service_s: float = 0.1  # EWMA of one request's compute time: what a queued request waits per place


STORE_KEY = web.AppKey("store", ModelStore)
METRICS_KEY = web.AppKey("metrics", Metrics)
CONFIG_KEY = web.AppKey("config", CloudConfig)


def _refuse(request: web.Request, status: int, code: str, text: str, headers: dict | None = None) -> web.Response:
    """An error answer sent before reading the body (closing the connection: the rest is not read)."""
    requests = request.app[METRICS_KEY].requests  # counted, but kept out of the latency percentiles
    requests[code] = requests.get(code, 0) + 1
    response = web.Response(status=status, headers=headers,
                            body=transport.make_payload(wire.error_message("", text, code)))
    response.force_close()
    return response


async def handle_infer(request: web.Request) -> web.Response:
    config: CloudConfig = request.app[CONFIG_KEY]
    security = config.security
    if security is not None and security.token_check is not None:
        principal = security.token_check.who(request.headers.get("Authorization"))
        if principal is None:  # refused before the body is read: its bytes never reach a model
            log.warning("cloud: refused a request from %s: missing or unknown bearer token", request.remote)
            return _refuse(request, 401, "unauthorized", "missing or unknown bearer token",
                           {"WWW-Authenticate": 'Bearer realm="d3"'})
    if not config.admission.try_enter():
        retry = config.admission.retry_after_s(config.service_s, config.workers)
        return _refuse(request, 503, "overloaded", f"the cloud has {config.admission.inside} requests in hand "
                       f"(limit {config.admission.limit}); retry after {retry} s", {"Retry-After": str(retry)})
    try:
        return await _handle_admitted(request)
    finally:
        config.admission.leave()


async def _handle_admitted(request: web.Request) -> web.Response:
    app = request.app
    metrics: Metrics = app[METRICS_KEY]
    start = time.perf_counter()
    metrics.in_flight += 1
    request_id, bytes_in = "", request.content_length or 0
    try:
        message = await transport.read_body(request.content, request.content_length,
                                            app[CONFIG_KEY].max_message_bytes)
        request_id = message.request_id
        received = time.perf_counter()
        deadline = guard.deadline_from(message.meta)
        reply = await _infer(app, message, deadline)
        reply.meta["server_s"] = time.perf_counter() - received  # the sender's link time is the rest
        shaper = app[CONFIG_KEY].shapers.get(message.meta.get("link", "edge_cloud"))
        response, outcome, status = reply, "ok", 200
    except WireError as exc:
        response, outcome, status = wire.error_message(request_id, str(exc), "bad_frame"), "bad_frame", 400
        shaper = None
    except RequestError as exc:
        response, outcome = wire.error_message(request_id, str(exc), exc.code), exc.code
        status = {"deadline": 504, "replayed": 409}.get(exc.code, 400)
        shaper = None
    except Exception as exc:  # a bug in one request must not take the endpoint down
        response = wire.error_message(request_id, f"{type(exc).__name__}: {exc}", "internal")
        outcome, status, shaper = "internal", 500, None
    finally:
        metrics.in_flight -= 1
    payload = transport.make_payload(response, shaper)  # encoded once: its size is what the metrics count
    metrics.record(outcome, time.perf_counter() - start, bytes_in, payload.size)
    reply = web.Response(status=status, body=payload)
    if status != 200:
        reply.force_close()  # the client may still be sending a body we refused: do not read the rest
    return reply


async def _infer(app: web.Application, message: Message, deadline: float | None = None) -> Message:
    if message.kind != "infer":
        raise RequestError(f"the cloud serves 'infer' messages, got {message.kind!r}")
    from tiers.runtime import CLOUD_JOINS

    ack = await CLOUD_JOINS.take_part(message, deadline)  # device->cloud direct values (edge-integration)
    if ack is not None:
        return ack
    store: ModelStore = app[STORE_KEY]
    loop = asyncio.get_running_loop()
    entry = await loop.run_in_executor(app[CONFIG_KEY].executor, store.resolve, message)
    app[CONFIG_KEY].replays.check(message.request_id)  # after resolve: a resend for unknown_plan is no replay
    segment = entry.segmented.cloud
    check_inputs(message.tensors, segment.input_names, entry.graph, "the cloud segment")
    guard.check_dtypes(message.tensors, segment.input_names, entry.graph, "the cloud segment")
    guard.check_deadline(deadline, "before the cloud started computing")
    try:
        outputs, seconds = await asyncio.wait_for(loop.run_in_executor(
            app[CONFIG_KEY].executor,
            lambda: timed_run(lambda: segment.run(message.tensors), app[CONFIG_KEY].slowdown)),
            guard.remaining_s(deadline, 3600.0))
    except asyncio.TimeoutError:
        raise RequestError("request deadline passed while the cloud was computing", "deadline") from None
    config = app[CONFIG_KEY]
    config.service_s = 0.8 * config.service_s + 0.2 * seconds
    return Message(kind="result", request_id=message.request_id, model=message.model,
                   plan_version=message.plan_version, plan_id=message.plan_id,
                   meta={"cloud_s": seconds}, tensors=outputs)


async def handle_healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "tier": "cloud"})


async def handle_metrics(request: web.Request) -> web.Response:
    return web.json_response(request.app[METRICS_KEY].snapshot())


def make_cloud_app(store: ModelStore | None = None, workers: int = 4, slowdown: float = 1.0,
                   max_message_bytes: int = 256 << 20, shapers: dict | None = None,
                   threads: int | None = None, security=None, max_queue: int = 256) -> web.Application:
    """The cloud endpoint as an aiohttp app. ``shapers``: link name -> token bucket for the replies."""
    app = web.Application(client_max_size=1 << 20)
    app[STORE_KEY] = store or ModelStore()
    app[METRICS_KEY] = Metrics()
    init = (lambda: torch.set_num_threads(threads)) if threads else None
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloud", initializer=init)
    app[CONFIG_KEY] = CloudConfig(executor, slowdown, max_message_bytes, shapers or {}, security,
                                  guard.Admission(max_queue), workers=workers)
    app.router.add_post(INFER_PATH, handle_infer)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/metrics", handle_metrics)

    async def shutdown(app: web.Application) -> None:
        app[CONFIG_KEY].executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(shutdown)
    return app


async def serve_cloud(host: str, port: int, app: web.Application, ready=None, ssl_context=None) -> None:
    transport.tune_malloc_for_streaming()
    runner = web.AppRunner(app, access_log=None, **transport.server_runner_kwargs())
    await runner.setup()
    await web.SockSite(runner, transport.listen_socket(host, port), ssl_context=ssl_context).start()
    if ready is not None:
        ready()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

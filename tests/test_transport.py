"""HTTP tensor transport over a live aiohttp endpoint: large bodies arrive exact whatever their framing
(Content-Length or chunked), the size limit holds for streamed bodies, and the sockets get the sizes the
benchmark's raw-TCP ceiling uses."""
from __future__ import annotations

import asyncio
import socket

import pytest
import torch
import uvloop
from aiohttp import web

from tiers import transport, wire
from tiers.wire import Message, WireError

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")
LIMIT = 32 << 20


async def _echo(request: web.Request) -> web.Response:
    """Decode the body, answer the same tensors back (what the cloud does with its inputs)."""
    try:
        message = await transport.read_body(request.content, request.content_length, LIMIT)
    except WireError as exc:  # as the cloud does: answer, then close rather than read the rest
        response = web.Response(status=400, body=transport.make_payload(wire.error_message("", str(exc))))
        response.force_close()
        return response
    return web.Response(body=transport.make_payload(Message(kind="result", request_id=message.request_id,
                                                            tensors=message.tensors)))


async def _with_server(body):
    """Run ``body(url, session)`` against an echo endpoint set up as serve_cloud sets up the cloud."""
    import aiohttp

    app = web.Application()
    app.router.add_post("/echo", _echo)
    runner = web.AppRunner(app, access_log=None, **transport.server_runner_kwargs())
    await runner.setup()
    listener = transport.listen_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    await web.SockSite(runner, listener).start()
    try:
        async with aiohttp.ClientSession(**transport.client_session_kwargs()) as session:
            return await body(f"http://127.0.0.1:{port}/echo", session)
    finally:
        await runner.cleanup()


def test_large_tensors_round_trip_exactly_over_http():
    tensors = {"a": torch.randn(3, 1000, 1000), "b": torch.arange(1_000_003, dtype=torch.int64),
               "c": torch.randn(7, 5).to(torch.bfloat16), "empty": torch.empty(0, 4)}

    async def body(url, session):
        return await transport.post_message(session, url, Message(kind="infer", request_id="r1", tensors=tensors))

    reply = uvloop.run(_with_server(body))
    assert reply.kind == "result" and reply.request_id == "r1"
    assert list(reply.tensors) == list(tensors)
    for name, tensor in tensors.items():
        assert reply.tensors[name].dtype == tensor.dtype and torch.equal(reply.tensors[name], tensor)
    reply.tensors["a"].add_(1)  # the receiver owns writable memory


def test_a_chunked_body_is_read_across_http_chunk_boundaries():
    message = Message(kind="infer", request_id="chunked", tensors={"x": torch.randn(300_000)})
    parts = wire.encode_body(message)

    async def pieces():  # no Content-Length: aiohttp sends Transfer-Encoding: chunked
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, view.nbytes, 100_003):
                yield bytes(view[start:start + 100_003])

    async def body(url, session):
        async with session.post(url, data=pieces()) as response:
            assert response.headers.get("Content-Length") is not None
            return await transport.read_body(response.content, response.content_length)

    reply = uvloop.run(_with_server(body))
    assert torch.equal(reply.tensors["x"], message.tensors["x"])


def test_streamed_bodies_over_the_limit_are_refused_with_a_clear_error():
    async def body(url, session):
        big = Message(kind="infer", tensors={"x": torch.zeros(LIMIT // 4 + 1024)})
        return await transport.post_message(session, url, big)

    reply = uvloop.run(_with_server(body))
    assert reply.kind == "error" and "over the" in reply.meta["error"]

    async def lying(url, session):  # chunked, so no Content-Length to refuse up front
        async def pieces():
            for _ in range(LIMIT // (1 << 20) + 4):
                yield bytes(1 << 20)
        async with session.post(url, data=pieces()) as response:
            return response.status, await response.read()

    status, answer = uvloop.run(_with_server(lying))
    assert status == 400 and "d3 message" in wire.decode_body(answer).meta["error"]


def test_the_body_reader_refuses_extra_and_missing_bytes_when_streamed():
    async def chunks(data: bytes):
        for start in range(0, len(data), 7):
            yield data[start:start + 7]

    good = wire.encode_body_bytes(Message(kind="infer", tensors={"x": torch.ones(10)}))
    assert torch.equal(asyncio.run(transport.read_body(chunks(good), len(good))).tensors["x"], torch.ones(10))
    with pytest.raises(WireError, match="extra"):
        asyncio.run(transport.read_body(chunks(good + b"!"), None))
    with pytest.raises(WireError, match="truncated"):
        asyncio.run(transport.read_body(chunks(good[:-1]), None))
    with pytest.raises(WireError, match="over the"):
        asyncio.run(transport.read_body(chunks(good), 10**12, max_message_bytes=1000))


def test_sockets_get_the_tensor_buffer_sizes():
    listener = transport.listen_socket("127.0.0.1", 0)
    client = transport.tensor_socket((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 0)))
    try:
        for sock in (listener, client):  # Linux doubles what was asked; less would mean it was not set
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= min(
                wire.SOCKET_BUFFER_BYTES, int(open("/proc/sys/net/core/rmem_max").read()))
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= min(
            wire.SOCKET_BUFFER_BYTES, int(open("/proc/sys/net/core/wmem_max").read()))
        assert not client.getblocking()
    finally:
        listener.close()
        client.close()
    assert transport.tune_malloc_for_streaming() is transport.tune_malloc_for_streaming()  # idempotent

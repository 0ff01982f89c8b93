"""Moving wire messages: ZeroMQ multipart (edge cluster) and HTTP bodies (cloud), both without extra copies.

ZeroMQ: ``send_multipart(copy=False)`` hands libzmq memoryviews of the tensors; pyzmq's Frame objects hold
a reference to each buffer until libzmq has sent it, so the tensor stays alive without our bookkeeping.
HTTP: :class:`MessagePayload` writes the header and each tensor's buffer straight to the socket (no
``b"".join`` of a 40 MB body); :func:`read_body` streams a body into its tensors with our own size limit
(aiohttp's ``client_max_size`` does not apply to ``request.content``).
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

import zmq
import zmq.asyncio

from tiers import wire
from tiers.wire import Message, WireError

STREAM_CHUNK_BYTES = 1 << 20


class AsyncShaper(Protocol):
    async def consume_async(self, nbytes: int) -> None: ...


async def pace(shaper: AsyncShaper, nbytes: int) -> None:
    """Wait until the link lets ``nbytes`` through, then its one-way propagation delay where the shaper
    models one (``transmit_async``; a bare token bucket only paces)."""
    transmit = getattr(shaper, "transmit_async", None)
    await (transmit(nbytes) if transmit is not None else shaper.consume_async(nbytes))


def configure_zmq_socket(socket: zmq.Socket) -> None:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDBUF, wire.SOCKET_BUFFER_BYTES)
    socket.setsockopt(zmq.RCVBUF, wire.SOCKET_BUFFER_BYTES)
    # A ROUTER must not silently drop a reply to a device that went away and came back under the same id.
    if socket.type == zmq.ROUTER:
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)


async def send_zmq(socket: zmq.asyncio.Socket, message: Message, identity: bytes | None = None,
                   shaper: AsyncShaper | None = None) -> int:
    """Send one message (after the link's token bucket lets its bytes through); returns the byte count."""
    frames = wire.encode_frames(message, wire.TENSOR_FRAME_BYTES)  # one frame per tensor: no receive copy
    nbytes = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
    if shaper is not None:
        await pace(shaper, nbytes)
    prefix = [identity] if identity is not None else []
    await socket.send_multipart(prefix + frames, copy=False)
    return nbytes


async def recv_zmq(socket: zmq.asyncio.Socket, with_identity: bool = False,
                   max_message_bytes: int = wire.MAX_MESSAGE_BYTES) -> tuple[bytes | None, Any]:
    """(identity or None, Message | WireError). A bad message is returned, not raised: the server answers
    the sender with the error text and goes on serving."""
    frames = await socket.recv_multipart(copy=False)
    identity = None
    if with_identity:
        identity, frames = frames[0].bytes, frames[1:]
    try:
        return identity, wire.decode_frames(frames, max_message_bytes)
    except WireError as exc:
        return identity, exc


def message_size(message: Message) -> int:
    return sum(len(part) if isinstance(part, bytes) else part.nbytes for part in wire.encode_body(message))


def make_payload(message: Message, shaper: AsyncShaper | None = None):
    """An aiohttp payload writing the message's buffers one by one (Content-Length known up front)."""
    from aiohttp.payload import Payload

    class MessagePayload(Payload):
        def __init__(self, parts: list):
            super().__init__(parts, content_type="application/octet-stream")
            self._size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            raise TypeError("a d3 message body is binary")

        async def write(self, writer) -> None:
            if shaper is not None:
                await pace(shaper, self._size)
            for part in self._value:
                for start in range(0, len(part), 16 * STREAM_CHUNK_BYTES):
                    await writer.write(part[start:start + 16 * STREAM_CHUNK_BYTES])

        async def write_with_length(self, writer, content_length) -> None:
            await self.write(writer)

    return MessagePayload(wire.encode_body(message))


async def read_body(chunks: AsyncIterator[bytes], content_length: int | None,
                    max_message_bytes: int = wire.MAX_MESSAGE_BYTES) -> Message:
    """Stream an HTTP body into a Message, refusing anything larger than the limit before reading it."""
    limit = max_message_bytes + wire.MAX_HEADER_BYTES + wire.BODY_PREFIX_BYTES
    if content_length is not None and content_length > limit:
        raise WireError(f"body of {content_length} bytes is over the {limit}-byte limit")
    reader = wire.BodyReader(max_message_bytes)
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise WireError(f"body is over the {limit}-byte limit")
        reader.feed(chunk)
    return reader.finish()


async def post_message(session, url: str, message: Message, shaper: AsyncShaper | None = None,
                       timeout_s: float = 120.0, max_message_bytes: int = wire.MAX_MESSAGE_BYTES) -> Message:
    """POST a message to a d3 HTTP endpoint and return its reply (an ``error`` reply is returned too)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.post(url, data=make_payload(message, shaper), timeout=timeout) as response:
        if response.content_type != "application/octet-stream":
            text = (await response.text())[:300]
            raise WireError(f"{url} answered HTTP {response.status} {response.content_type}: {text}")
        return await read_body(response.content.iter_any(), response.content_length,
                               max_message_bytes)

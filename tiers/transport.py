"""Moving wire messages: ZeroMQ multipart (edge cluster) and HTTP bodies (cloud), both without extra copies.

ZeroMQ: ``send_multipart(copy=False)`` hands libzmq memoryviews of the tensors; pyzmq's Frame objects hold
a reference to each buffer until libzmq has sent it, so the tensor stays alive without our bookkeeping.
HTTP: :class:`MessagePayload` writes the header and each tensor's buffer straight to the socket (no
``b"".join`` of a 40 MB body); :func:`read_body` streams a body into its tensors with our own size limit
(aiohttp's ``client_max_size`` does not apply to ``request.content``).
"""
from __future__ import annotations

import socket
from typing import Any, AsyncIterator, Protocol

import zmq
import zmq.asyncio

from tiers import wire
from tiers.wire import Message, WireError

STREAM_CHUNK_BYTES = 1 << 20
# aiohttp's StreamReader stops reading the socket once 2x read_bufsize bytes wait for the handler; its
# 64 KiB default pauses and resumes the socket several times per MB of body.
HTTP_READ_BUFSIZE = 1 << 20


def _set_socket_buffers(sock: socket.socket) -> None:
    # A loopback send of 4 MB with the default 16 KiB-to-autotuned send buffer goes out in many
    # EPOLLOUT rounds; the ZeroMQ sockets and the raw-TCP baseline use the same sizes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wire.SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wire.SOCKET_BUFFER_BYTES)


def tensor_socket(addr_info) -> socket.socket:
    """aiohttp ``TCPConnector(socket_factory=...)``: a client socket sized for tensors."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    try:
        sock.setblocking(False)
        _set_socket_buffers(sock)
    except OSError:
        sock.close()
        raise
    return sock


def client_session_kwargs(security=None) -> dict:
    """``aiohttp.ClientSession(**kwargs)`` for a session that moves tensors: the bearer token and TLS of
    ``security`` (tiers.security.NodeSecurity or None), sized socket buffers and a read buffer that does
    not pause the socket every 128 KiB. Create it inside the event loop that will use it."""
    import aiohttp

    from tiers.security import session_kwargs

    kwargs = session_kwargs(security)
    ssl_context = getattr(security, "ssl_client", None)
    kwargs["connector"] = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True,
                                               socket_factory=tensor_socket)
    kwargs["read_bufsize"] = HTTP_READ_BUFSIZE
    return kwargs


HTTP_LINGERING_S = 2.0


def server_runner_kwargs() -> dict:
    """web.AppRunner options for an endpoint that receives tensors. ``lingering_time``: after refusing a
    body before reading it (over the size limit, no token), aiohttp reads and drops the rest so that the
    sender gets the answer rather than a reset; its 10 s default held each refused connection (and a
    shutdown) 10 s when the sender stopped sending on the early answer."""
    return {"read_bufsize": HTTP_READ_BUFSIZE, "lingering_time": HTTP_LINGERING_S}


def listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket for ``web.SockSite`` with the tensor socket buffers (set before listen:
    the receive window's scale is fixed in the handshake; accepted sockets inherit them)."""
    family, type_, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _set_socket_buffers(sock)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_TRIM_THRESHOLD_BYTES = 64 << 20
MALLOC_MMAP_THRESHOLD_BYTES = 1 << 20
_malloc_tuned = False


def tune_malloc_for_streaming() -> bool:
    """Keep freed heap memory for reuse in a process that streams large HTTP bodies (glibc only).

    Every receive chunk becomes two short-lived bytes objects of up to 256 KiB (uvloop's read, then
    aiohttp's parser slice). glibc's default trims the top of the heap as soon as 2x its dynamic mmap
    threshold is free, so the next chunk page-faults fresh zeroed pages: perf showed page faults and
    ``brk``/``munmap`` at ~40% of the cloud's receive CPU. A 64 MiB trim threshold keeps those pages;
    buffers of 1 MiB and more (tensors) are still mmapped and returned to the kernel when freed. Process
    wide and idempotent; returns whether it applied (False off glibc)."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _malloc_tuned = bool(libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)
                             and libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
    return _malloc_tuned


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


_payload_class = None


def _message_payload_class():
    """The aiohttp Payload class for d3 bodies, made once (aiohttp imported on first use)."""
    global _payload_class
    if _payload_class is None:
        from aiohttp.payload import Payload

        class MessagePayload(Payload):
            """Writes a message's buffers one by one: no join, Content-Length known up front."""

            def __init__(self, parts: list, shaper: AsyncShaper | None):
                super().__init__(parts, content_type="application/octet-stream")
                self._size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
                self._shaper = shaper

            def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
                raise TypeError("a d3 message body is binary")

            async def write(self, writer) -> None:
                if self._shaper is not None:
                    await pace(self._shaper, self._size)
                for part in self._value:
                    for start in range(0, len(part), 16 * STREAM_CHUNK_BYTES):
                        await writer.write(part[start:start + 16 * STREAM_CHUNK_BYTES])

            async def write_with_length(self, writer, content_length) -> None:
                await self.write(writer)

        _payload_class = MessagePayload
    return _payload_class


def make_payload(message: Message, shaper: AsyncShaper | None = None):
    """An aiohttp payload writing the message's buffers one by one (``.size``: the body's length)."""
    return _message_payload_class()(wire.encode_body(message), shaper)


async def body_chunks(stream) -> AsyncIterator[bytes]:
    """The chunks of an aiohttp ``StreamReader`` (``request.content``/``response.content``) as they arrived.

    Not ``iter_any()``: ``readany`` joins every chunk buffered so far into one new bytes object, an extra
    copy of most of a large body (profiled: ~3 chunks per join, i.e. the whole 40 MB copied once more).
    ``readchunk`` hands over one buffered chunk as it is."""
    while True:
        chunk, _end_of_http_chunk = await stream.readchunk()
        if chunk:
            yield chunk
        elif stream.at_eof():
            return


async def read_body(chunks, content_length: int | None,
                    max_message_bytes: int = wire.MAX_MESSAGE_BYTES) -> Message:
    """Stream an HTTP body into a Message, refusing anything larger than the limit before reading it.

    ``chunks``: an aiohttp ``StreamReader`` (read chunk by chunk, see :func:`body_chunks`) or any async
    iterator of bytes."""
    if hasattr(chunks, "readchunk"):
        chunks = body_chunks(chunks)
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
        return await read_body(response.content, response.content_length, max_message_bytes)

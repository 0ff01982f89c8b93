"""Tensor transport throughput on loopback: our ZeroMQ and HTTP framings vs a raw TCP socket.

Each server runs in its own process (no GIL sharing with the client), receives a tensor into fresh
memory and answers a tiny ack; the client times send -> ack. The three are measured message by message,
interleaved (the order rotates every round) over connections opened once, so a burst of load from other
processes hits all three alike; times are medians, ``paired`` is the median over rounds of raw time /
this time (both sent back to back).

* raw TCP, the ceiling: a length prefix, one ``sendall`` and ``recv_into`` a ``torch.empty`` buffer;
  the same socket buffer sizes, TCP_NODELAY and malloc settings as ours, no header, no validation.
* ZeroMQ (``tiers.transport.send_zmq``/``recv_zmq``): a tensor is one frame that libzmq has read into
  memory of its own and that becomes the tensor without a copy.
* HTTP (``tiers.transport.post_message`` to an aiohttp endpoint set up as ``tiers.cloud.serve_cloud``
  sets up the cloud): the body is streamed into the tensor chunk by chunk, one memcpy per chunk; uvloop
  and aiohttp's parser each copy a chunk once before we see it (no public aiohttp API avoids those).

    .venv/bin/python bench/transport.py [--sizes-mb 4,40] [--repeats 30]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import uvloop  # noqa: E402

from tiers import transport, wire  # noqa: E402
from tiers.wire import Message  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ servers
def raw_tcp_server(port: int, ready) -> None:
    transport.tune_malloc_for_streaming()  # the same allocator settings as the HTTP server: a fair ceiling
    listener = transport.listen_socket("127.0.0.1", port)  # the same socket buffers as the HTTP server
    listener.setblocking(True)
    ready.set()
    while True:
        conn, _ = listener.accept()
        with conn:
            serve_raw_connection(conn)


def serve_raw_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (length,) = struct.unpack("<Q", head)
        # fresh memory per message, allocated as the tensor servers allocate it (torch.empty: no zero
        # fill; a bytearray would memset every byte first and slow the ceiling down)
        view, got = memoryview(torch.empty(length, dtype=torch.uint8).numpy()).cast("B"), 0
        while got < length:
            got += conn.recv_into(view[got:], length - got)
        conn.sendall(b"k")


def zmq_server(port: int, ready) -> None:
    import zmq
    import zmq.asyncio

    async def serve():
        context = zmq.asyncio.Context()
        router = context.socket(zmq.ROUTER)
        transport.configure_zmq_socket(router)
        router.bind(f"tcp://127.0.0.1:{port}")
        ready.set()
        while True:
            identity, message = await transport.recv_zmq(router, with_identity=True)
            await transport.send_zmq(router, Message(kind="ack", request_id=message.request_id), identity)

    torch.set_num_threads(1)
    asyncio.run(serve())


def http_server(port: int, ready) -> None:
    import uvloop
    from aiohttp import web

    async def handle(request):
        message = await transport.read_body(request.content, request.content_length)
        return web.Response(body=transport.make_payload(Message(kind="ack", request_id=message.request_id)))

    async def serve():
        transport.tune_malloc_for_streaming()  # as tiers.cloud.serve_cloud does
        app = web.Application()
        app.router.add_post("/echo", handle)
        runner = web.AppRunner(app, access_log=None, **transport.server_runner_kwargs())
        await runner.setup()
        await web.SockSite(runner, transport.listen_socket("127.0.0.1", port)).start()  # as serve_cloud
        ready.set()
        await asyncio.Event().wait()

    torch.set_num_threads(1)
    uvloop.run(serve())


# ------------------------------------------------------------------------------------------------ clients
class RawTcpClient:
    """The ceiling: a length prefix and one ``sendall`` of the tensor's memory, then a 1-byte ack."""

    def __init__(self, port: int):
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wire.SOCKET_BUFFER_BYTES)
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ZeroMQ and aiohttp do

    async def send(self, tensor: torch.Tensor, request_id: str) -> None:
        payload = memoryview(tensor.numpy()).cast("B")
        self.conn.sendall(struct.pack("<Q", payload.nbytes))
        self.conn.sendall(payload)
        self.conn.recv(1)

    async def close(self) -> None:
        self.conn.close()


class ZmqClient:
    def __init__(self, port: int):
        import zmq
        import zmq.asyncio

        self.context = zmq.asyncio.Context()
        self.dealer = self.context.socket(zmq.DEALER)
        transport.configure_zmq_socket(self.dealer)
        self.dealer.connect(f"tcp://127.0.0.1:{port}")

    async def send(self, tensor: torch.Tensor, request_id: str) -> None:
        await transport.send_zmq(self.dealer, Message(kind="infer", request_id=request_id, tensors={"x": tensor}))
        await transport.recv_zmq(self.dealer)

    async def close(self) -> None:
        self.dealer.close()
        self.context.term()


class HttpClient:
    def __init__(self, port: int):
        import aiohttp

        self.url = f"http://127.0.0.1:{port}/echo"
        self.session = aiohttp.ClientSession(**transport.client_session_kwargs())  # as tiers.device

    async def send(self, tensor: torch.Tensor, request_id: str) -> None:
        await transport.post_message(self.session, self.url,
                                     Message(kind="infer", request_id=request_id, tensors={"x": tensor}))

    async def close(self) -> None:
        await self.session.close()


async def measure(ports: dict[str, int], tensor: torch.Tensor, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Send times per transport, interleaved message by message (the order rotates every round), so a
    burst of load from other processes hits every transport alike."""
    clients = {"raw_tcp": RawTcpClient(ports["raw_tcp"]), "zeromq": ZmqClient(ports["zeromq"]),
               "http": HttpClient(ports["http"])}
    names = list(clients)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for round_index in range(warmup + repeats):
            order = names[round_index % 3:] + names[:round_index % 3]
            for name in order:
                start = time.perf_counter()
                await clients[name].send(tensor, str(round_index))
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        for client in clients.values():
            await client.close()
    return times


def start(target) -> tuple[mp.Process, int]:
    port = free_port()
    ready = mp.Event()
    process = mp.Process(target=target, args=(port, ready), daemon=True)
    process.start()
    if not ready.wait(30):
        raise TimeoutError(f"{target.__name__} did not start")
    return process, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="4,40", help="tensor sizes in MB (comma separated)")
    parser.add_argument("--repeats", type=int, default=30, help="timed messages per transport and size")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    processes = []
    try:
        ports = {}
        for name, target in (("raw_tcp", raw_tcp_server), ("zeromq", zmq_server), ("http", http_server)):
            process, ports[name] = start(target)
            processes.append(process)
        print(f"{'size':>8} {'transport':<10} {'median ms':>10} {'MB/s':>9} {'vs raw TCP':>11} {'paired':>8}")
        for size_mb in sizes:
            tensor = torch.randn(int(size_mb * 1e6 / 4))
            nbytes = tensor.numel() * 4
            results = uvloop.run(measure(ports, tensor, args.repeats))
            raw_median = statistics.median(results["raw_tcp"])
            for name, times in results.items():
                median = statistics.median(times)
                # paired: the median over rounds of raw time / this time, both sent back to back
                paired = statistics.median(r / t for r, t in zip(results["raw_tcp"], times))
                print(f"{size_mb:>6.0f}MB {name:<10} {median * 1e3:>10.2f} {nbytes / median / 1e6:>9.0f} "
                      f"{raw_median / median:>10.0%} {paired:>8.0%}")
    finally:
        for process in processes:
            process.kill()
            process.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

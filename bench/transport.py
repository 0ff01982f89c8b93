"""Tensor transport throughput on loopback: our ZeroMQ and HTTP framings vs a raw TCP socket.

Each server runs in its own process (no GIL sharing with the client), receives a tensor into fresh
memory and answers a tiny ack; the client times send -> ack. ZeroMQ receives each tensor as one frame
that libzmq has already read into memory of its own, which becomes the tensor without a copy; HTTP
copies each received chunk into the tensor once. Raw TCP is the ceiling: one ``sendall`` and
``recv_into`` a preallocated buffer, no header parsing, no tensor. Ratios are measured in the same run;
times are medians over repeats.

    .venv/bin/python bench/transport.py [--sizes-mb 4,40] [--repeats 15]
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
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    ready.set()
    while True:
        conn, _ = listener.accept()
        with conn:
            serve_raw_connection(conn)


def serve_raw_connection(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wire.SOCKET_BUFFER_BYTES)
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
        message = await transport.read_body(request.content.iter_any(),
                                            request.content_length)
        return web.Response(body=transport.make_payload(Message(kind="ack", request_id=message.request_id)))

    async def serve():
        app = web.Application()
        app.router.add_post("/echo", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    torch.set_num_threads(1)
    uvloop.run(serve())


# ------------------------------------------------------------------------------------------------ clients
def time_raw_tcp(port: int, tensor: torch.Tensor, repeats: int) -> list[float]:
    payload = memoryview(tensor.numpy()).cast("B")
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wire.SOCKET_BUFFER_BYTES)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        conn.sendall(struct.pack("<Q", payload.nbytes))
        conn.sendall(payload)
        conn.recv(1)
        times.append(time.perf_counter() - start)
    conn.close()
    return times


async def time_zmq(port: int, tensor: torch.Tensor, repeats: int) -> list[float]:
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    transport.configure_zmq_socket(dealer)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        await transport.send_zmq(dealer, Message(kind="infer", request_id=str(i), tensors={"x": tensor}))
        await transport.recv_zmq(dealer)
        times.append(time.perf_counter() - start)
    dealer.close()
    context.term()
    return times


async def time_http(port: int, tensor: torch.Tensor, repeats: int) -> list[float]:
    import aiohttp

    times = []
    async with aiohttp.ClientSession() as session:
        for i in range(repeats):
            start = time.perf_counter()
            await transport.post_message(session, f"http://127.0.0.1:{port}/echo",
                                         Message(kind="infer", request_id=str(i), tensors={"x": tensor}))
            times.append(time.perf_counter() - start)
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
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    processes = []
    try:
        raw, raw_port = start(raw_tcp_server)
        zmq_proc, zmq_port = start(zmq_server)
        http_proc, http_port = start(http_server)
        processes = [raw, zmq_proc, http_proc]
        print(f"{'size':>8} {'transport':<10} {'median ms':>10} {'MB/s':>9} {'vs raw TCP':>11}")
        for size_mb in sizes:
            tensor = torch.randn(int(size_mb * 1e6 / 4))
            nbytes = tensor.numel() * 4
            results = {}
            # interleave rounds so background load hits every transport alike
            for _ in range(3):
                for name, run in (("raw_tcp", lambda: time_raw_tcp(raw_port, tensor, args.repeats)),
                                  ("zeromq", lambda: uvloop.run(time_zmq(zmq_port, tensor, args.repeats))),
                                  ("http", lambda: uvloop.run(time_http(http_port, tensor, args.repeats)))):
                    results.setdefault(name, []).extend(run()[1:])  # first of each round warms up
            raw_median = statistics.median(results["raw_tcp"])
            for name, times in results.items():
                median = statistics.median(times)
                print(f"{size_mb:>6.0f}MB {name:<10} {median * 1e3:>10.2f} {nbytes / median / 1e6:>9.0f} "
                      f"{raw_median / median:>10.0%}")
    finally:
        for process in processes:
            process.kill()
            process.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

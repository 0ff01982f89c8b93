"""Fuzz the live servers: malformed ZeroMQ messages at an edge daemon and malformed HTTP bodies at the cloud
endpoint (both real child processes, as ``d3 demo`` starts them), then check that every one got an error
answer, that no process died or hung, and that a real request still gets the local model's output.

    .venv/bin/python bench/fuzz.py                      # 6000 frames at the edge + 6000 bodies at the cloud
    .venv/bin/python bench/fuzz.py --frames 20000 --bodies 20000 --seed 3

Cases (drawn at random, each malformed in one or more ways): random bytes; valid messages truncated,
extended, bit-flipped or with bytes inserted/deleted; headers with wrong field types, unknown dtypes,
negative/huge/empty shapes, byte counts that disagree with shapes, duplicate names, a wrong protocol;
frames split wrongly; well-formed requests that are wrong for the plan (dtype, shape, missing value,
unknown plan, wrong model digest, bad deadline, unknown kind, a tile with a bad spec).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tiers import wire  # noqa: E402
from tiers.wire import Message, WireError  # noqa: E402

SHAPE = (1, 3, 64, 64)
NO_REPLY_KINDS = {"hello"}  # a well-formed hello is a heartbeat: never answered
NON_ERROR_KINDS = {"status", "probe", "hello"}


# ------------------------------------------------------------------------------------------ generators
def _header(**fields) -> dict:
    header = {"protocol": 1, "kind": "infer", "request_id": "fz", "model": "resnet18", "plan_version": 0,
              "plan_id": "", "model_digest": "", "meta": {}, "tensors": []}
    header.update(fields)
    return header


class Cases:
    """Malformed messages from a few valid templates."""

    def __init__(self, rng: random.Random, plan_json: str, digest: str):
        self.rng = rng
        self.plan_json, self.plan_id, self.digest = plan_json, wire.plan_digest(plan_json), digest
        x = torch.rand(SHAPE)
        self.templates = [
            Message(kind="infer", request_id="t1", model="resnet18", plan_id=self.plan_id, model_digest=digest,
                    meta={"plan": plan_json}, tensors={"x": x}),
            Message(kind="infer", request_id="t2", model="resnet18", tensors={"a": torch.ones(3, 5), "b": torch.arange(7)}),
            Message(kind="tile", request_id="t3", model="resnet18", plan_id=self.plan_id,
                    meta={"plan": plan_json, "stage": {"kind": "tiled"}, "stage_index": 0, "tile": {}},
                    tensors={"x": torch.rand(1, 3, 8, 8)}),
        ]
        self.frames = [[bytes(f) for f in wire.encode_frames(t, chunk_bytes=4096)] for t in self.templates]

    def _mutate_bytes(self, data: bytes) -> bytes:
        data = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            if not data:
                break
            position = self.rng.randrange(len(data))
            action = self.rng.choice("fcid")
            if action == "f":
                data[position] ^= 1 << self.rng.randrange(8)
            elif action == "c":
                del data[position:]
            elif action == "i":
                data[position:position] = self.rng.randbytes(self.rng.randint(1, 8))
            else:
                del data[position:position + self.rng.randint(1, 8)]
        return bytes(data)

    def bad_header(self) -> dict:
        rng = self.rng
        choice = rng.randrange(12)
        if choice == 0:
            return _header(protocol=rng.choice([0, 2, "1", None, 1.0 + 1e-9]))
        if choice == 1:
            key = rng.choice(["kind", "request_id", "model", "plan_version", "meta", "tensors", "plan_id"])
            return _header(**{key: rng.choice([None, 1, "x", [], {}, True, 1.5])}) if key != "kind" else _header(kind=7)
        if choice == 2:
            return _header(tensors=[["x", rng.choice(["float33", "complex64", "", None, 1]), [2], 8]])
        if choice == 3:
            return _header(tensors=[["x", "float32", [rng.choice([-1, 2**40, 2**62, -2**63])], 4]])
        if choice == 4:
            shape = [0] + [2**39] * rng.randint(1, 5)
            return _header(tensors=[["x", "float32", shape, 0]])
        if choice == 5:
            return _header(tensors=[["x", "float32", [4], rng.choice([15, 17, 0, -16, "16", 16.0])]])
        if choice == 6:
            return _header(tensors=[["x", "float32", [1], 4], ["x", "float32", [1], 4]])
        if choice == 7:
            return _header(tensors=[["x", "float32", [1] * 17, 4]])
        if choice == 8:
            return _header(tensors=[["x", "uint8", [1 << 31], 1 << 31]])
        if choice == 9:
            return _header(tensors=[[rng.choice(["", None, 3]), "float32", [1], 4]])
        if choice == 10:
            return _header(tensors=[["x", "float32", [1], 4]] * 5000)
        return _header(tensors=rng.choice([{}, "x", [1, 2], [[1, 2, 3]]]))

    def bad_semantics(self) -> list[bytes]:
        """Well-formed frames whose request is wrong for the plan or the server."""
        rng = self.rng
        base = self.templates[0]
        change = rng.randrange(9)
        fields = dict(kind="infer", request_id=f"s{rng.getrandbits(48)}", model="resnet18", plan_id=self.plan_id,
                      model_digest=self.digest, meta={"plan": self.plan_json}, tensors=dict(base.tensors))
        if change == 0:
            fields["tensors"] = {"x": base.tensors["x"].double()}
        elif change == 1:
            fields["tensors"] = {"x": torch.rand(1, 3, rng.randint(1, 40), 7)}
        elif change == 2:
            fields["tensors"] = {"y": base.tensors["x"]}
        elif change == 3:
            fields.update(plan_id=f"{rng.getrandbits(64):016x}", meta={})
        elif change == 4:
            fields["model_digest"] = f"{rng.getrandbits(64):016x}"
        elif change == 5:
            fields["meta"] = {"plan": self.plan_json, "deadline_ms": rng.choice([-1, 0, "x", None, float("nan")])}
            if fields["meta"]["deadline_ms"] is None:
                fields["meta"]["deadline_ms"] = []
        elif change == 6:
            fields["kind"] = rng.choice(["teleport", "result", "error", "tile_result", ""])
        elif change == 7:
            fields["meta"] = {"plan": "{not json"}
            fields["plan_id"] = wire.plan_digest("{not json")
        else:
            return self._bad_tile()
        return [bytes(f) for f in wire.encode_frames(Message(**fields))]

    def _bad_tile(self) -> list[bytes]:
        template = self.templates[2]
        meta = dict(template.meta)
        meta[self.rng.choice(["stage", "tile", "stage_index"])] = self.rng.choice([None, "x", {"nodes": 1}, [], -1])
        message = Message(kind="tile", request_id=f"t{self.rng.getrandbits(48)}", model="resnet18",
                          plan_id=self.plan_id, meta=meta, tensors=template.tensors)
        return [bytes(f) for f in wire.encode_frames(message)]

    def frames_case(self) -> tuple[str, list[bytes]]:
        rng = self.rng
        frames = [list(f) for f in self.frames][rng.randrange(len(self.frames))]
        choice = rng.randrange(8)
        if choice == 0:
            return "random", [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))]
        if choice == 1:
            return "truncated", frames[:rng.randint(1, max(1, len(frames) - 1))] if len(frames) > 1 else [frames[0][:-3]]
        if choice == 2:
            return "extra", frames + [rng.randbytes(rng.randint(1, 64))]
        if choice == 3:
            index = rng.randrange(len(frames))
            frames[index] = self._mutate_bytes(frames[index])
            return "mutated", frames
        if choice == 4:
            return "bad header", [json.dumps(self.bad_header()).encode(), rng.randbytes(rng.randint(0, 32))]
        if choice == 5:
            return "not json", [rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"protocol":1}']) + rng.randbytes(4)]
        if choice == 6:
            payload = b"".join(frames[1:])
            cut = rng.randint(0, len(payload))
            return "resplit", [frames[0], payload[:cut], payload[cut:]] if cut else [frames[0], payload[:-1]]
        return "wrong request", self.bad_semantics()

    def body_case(self) -> tuple[str, bytes]:
        rng = self.rng
        name, frames = self.frames_case()
        if name == "wrong request":
            message = wire.decode_frames(frames)
            if message.kind == "infer":  # the cloud serves only infer: give it its own wrong requests
                return name, wire.encode_body_bytes(message)
        header = frames[0]
        choice = rng.randrange(4)
        if choice == 0:
            return "bad prefix", rng.choice([b"", b"D3W", b"D3W2", b"GET "]) + struct.pack("<I", len(header)) + header
        if choice == 1:
            return "bad length", wire.MAGIC + struct.pack("<I", rng.choice([0, 2**31, len(header) + 9])) + header
        return name, wire.MAGIC + struct.pack("<I", len(header)) + b"".join(frames)


def _deadline_ok(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e12)


def expect_error(frames: list[bytes], cases: "Cases") -> bool | None:
    """True: the server must answer an error; None: not a malformed case after all (skip it): a heartbeat,
    a status or probe, or a mutation that left a servable request (e.g. a flipped bit inside the input
    tensor, or the payload split over other frames: both legal)."""
    try:
        message = wire.decode_frames(frames)
    except WireError:
        return True
    if message.kind in NON_ERROR_KINDS:
        return None
    x = message.tensors.get("x")
    servable = (message.kind == "infer" and message.plan_id == cases.plan_id and message.model == "resnet18"
                and message.model_digest in ("", cases.digest) and list(message.tensors) == ["x"]
                and x.dtype == torch.float32 and tuple(x.shape) == SHAPE
                and _deadline_ok(message.meta.get("deadline_ms")))  # meta.plan is not read once the plan is known
    return None if servable else True


# ------------------------------------------------------------------------------------------ runners
async def fuzz_edge(address: str, cases: Cases, count: int, window: int, timeout_s: float, progress) -> Counter:
    import zmq
    import zmq.asyncio

    counts: Counter = Counter()
    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    try:
        sent = 0
        while sent < count:
            batch = []
            while len(batch) < min(window, count - sent):
                name, frames = cases.frames_case()
                if expect_error(frames, cases):
                    batch.append((name, frames))
            for name, frames in batch:
                await dealer.send_multipart(frames)
                counts[f"sent {name}"] += 1
            sent += len(batch)
            for _ in batch:
                if not await dealer.poll(timeout_s * 1000):
                    counts["no answer (hang)"] += 1
                    continue
                reply = await dealer.recv_multipart()
                try:
                    message = wire.decode_frames(reply)
                    counts["error answers" if message.kind == "error" else f"non-error answer {message.kind}"] += 1
                except WireError:
                    counts["unreadable answers"] += 1
            progress.update(len(batch))
    finally:
        dealer.close()
        context.term()
    return counts


async def fuzz_cloud(url: str, cases: Cases, count: int, concurrency: int, timeout_s: float, progress) -> Counter:
    import aiohttp

    counts: Counter = Counter()
    bodies = []
    while len(bodies) < count:
        name, body = cases.body_case()
        try:
            frames = [body]
            message = wire.decode_body(body)
            frames = [bytes(f) for f in wire.encode_frames(message)]
        except WireError:
            pass
        if len(frames) == 1 or expect_error(frames, cases):
            bodies.append((name, body))
    queue: asyncio.Queue = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def worker(session):
        while not queue.empty():
            name, body = queue.get_nowait()
            counts[f"sent {name}"] += 1
            try:
                async with session.post(url + "/v1/infer", data=body, timeout=timeout) as response:
                    data = await response.read()
                    if response.status < 400:
                        counts[f"non-error answer {response.status}"] += 1
                    elif response.content_type == "application/octet-stream" and \
                            wire.decode_body(data).kind == "error":
                        counts["error answers"] += 1
                    else:
                        counts[f"plain HTTP {response.status} answers"] += 1
            except asyncio.TimeoutError:
                counts["no answer (hang)"] += 1
            except (aiohttp.ClientError, OSError, WireError) as exc:
                counts[f"connection error {type(exc).__name__}"] += 1
            progress.update(1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return counts


def check_still_serving(cluster) -> float:
    """A real request through device, edge and cloud: its max abs difference from the local model."""
    from partitioner.graph import load_graph
    from partitioner.plan import Plan
    from partitioner.zoo import example_input
    from tiers.device import Client

    graph = load_graph("resnet18", SHAPE)
    tiers = graph.prefix_assignment(3, 30)
    names = ("device", "edge", "cloud")
    plan = Plan("resnet18", SHAPE, {n: names[t] for n, t in tiers.items() if n in graph.order}, strategy="fixed")
    x = example_input(SHAPE, 5)
    with torch.no_grad():
        expected = graph.module(x)
    with Client("resnet18", edge=cluster.cluster.edges[0].address, cloud=cluster.cluster.cloud_url,
                input_shape=SHAPE, plan=plan, timeout_s=60) as client:
        return float((client.infer(x) - expected).abs().max())


def print_counts(title: str, counts: Counter, total: int) -> None:
    print(f"\n{title}: {total} malformed")
    for key in sorted(k for k in counts if k.startswith("sent ")):
        print(f"  {key:<28} {counts[key]:>7}")
    for key in sorted(k for k in counts if not k.startswith("sent ")):
        print(f"  {key:<28} {counts[key]:>7}")


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from partitioner.graph import load_graph
    from partitioner.plan import Plan
    from tiers.demo import LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6000, help="malformed ZeroMQ messages at the edge")
    parser.add_argument("--bodies", type=int, default=6000, help="malformed HTTP bodies at the cloud")
    parser.add_argument("--window", type=int, default=64, help="ZeroMQ messages in flight at once")
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP requests in flight at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds an answer may take (else: hang)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    graph = load_graph("resnet18", SHAPE)
    digest = wire.model_digest(graph.module)
    # the whole model on the tier under test, so that every wrong input is wrong for that tier
    edge_plan = Plan("resnet18", SHAPE, {n: "edge" for n in graph.order}, strategy="fixed")
    cloud_plan = Plan("resnet18", SHAPE, {n: "cloud" for n in graph.order}, strategy="fixed")
    edge_cases = Cases(random.Random(args.seed), edge_plan.to_json(), digest)
    cloud_cases = Cases(random.Random(args.seed + 1), cloud_plan.to_json(), digest)
    started = time.monotonic()
    with LocalCluster.create(edge_nodes=1, edge_slowdown=1.0, device_slowdown=1.0) as cluster:
        print(f"fuzz: live cloud {cluster.cluster.cloud_url} and edge {cluster.cluster.edges[0].address} "
              f"(child processes, security off), seed {args.seed}")
        with tqdm(total=args.frames, desc="edge frames", unit="msg", file=sys.stderr) as progress:
            edge_counts = asyncio.run(fuzz_edge(cluster.cluster.edges[0].address, edge_cases, args.frames, args.window,
                                                args.timeout, progress))
        with tqdm(total=args.bodies, desc="cloud bodies", unit="req", file=sys.stderr) as progress:
            cloud_counts = asyncio.run(fuzz_cloud(cluster.cluster.cloud_url, cloud_cases, args.bodies, args.concurrency,
                                                  args.timeout, progress))
        alive = {name: process.poll() is None for name, process in cluster.processes.items()}
        diff = check_still_serving(cluster)
    print_counts("edge daemon (ZeroMQ)", edge_counts, args.frames)
    print_counts("cloud endpoint (HTTP)", cloud_counts, args.bodies)
    crashes = sum(not ok for ok in alive.values())
    hangs = edge_counts["no answer (hang)"] + cloud_counts["no answer (hang)"]
    answered = edge_counts["error answers"] + cloud_counts["error answers"]
    unexpected = sum(v for k, v in (edge_counts + cloud_counts).items()
                     if k.startswith(("non-error", "unreadable", "connection error", "plain HTTP")))
    total = args.frames + args.bodies
    print(f"\ntotal {total} malformed messages in {time.monotonic() - started:.0f} s: {answered} error answers, "
          f"{hangs} hangs, {crashes} crashed processes, {unexpected} other outcomes; "
          f"processes alive {alive}; a real request afterwards: max abs diff {diff:.1e}")
    ok = crashes == 0 and hangs == 0 and answered == total and diff <= 1e-4
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

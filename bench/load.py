"""Load on the cloud endpoint: N concurrent devices posting whole-model requests for D seconds, against a
real ``d3 cloud`` child process. Prints throughput, p50/p99 latency, errors by code and the server's memory.

    .venv/bin/python bench/load.py                                   # 64 clients, 60 s, queue limit 256
    .venv/bin/python bench/load.py --max-queue 16 --duration 20      # above the limit: 503 + Retry-After

Each client is one device: its own HTTP connection, fresh request ids, the plan JSON with its first request
only. A client answered 503 waits the Retry-After it was given, as a well-behaved device does. Below the
queue limit every request must be answered 200 (the run fails otherwise); above it the refused ones are
counted, and the latency of the admitted ones stays bounded by the limit instead of growing with the crowd.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tiers import wire  # noqa: E402
from tiers.wire import Message  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_cloud(workers: int, max_queue: int, threads: int) -> tuple[subprocess.Popen, str, Path]:
    from deploy.cluster import Cluster
    from tiers.demo import free_port

    url = f"http://127.0.0.1:{free_port()}"
    directory = Path(tempfile.mkdtemp(prefix="d3-load-"))
    (directory / "cluster.toml").write_text(Cluster(url, []).to_toml())
    log = open(directory / "cloud.log", "w")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "deploy.cli", "cloud", "--cluster", str(directory / "cluster.toml"),
                                "--workers", str(workers), "--max-queue", str(max_queue), "--threads", str(threads)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return process, url, directory
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the cloud did not start:\n{(directory / 'cloud.log').read_text()[-2000:]}")
            time.sleep(0.2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_client(url: str, plan, x: torch.Tensor, stop_at: float, latencies: list, counts: Counter,
                     retry_waits: list) -> None:
    import aiohttp

    plan_json = plan.to_json()
    plan_id = wire.plan_digest(plan_json)
    send_plan = True
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        while time.monotonic() < stop_at:
            meta = {"plan": plan_json} if send_plan else {}
            body = wire.encode_body_bytes(Message(kind="infer", request_id=uuid.uuid4().hex, model=plan.model,
                                                  plan_id=plan_id, meta=meta, tensors={"x": x}))
            started = time.monotonic()
            try:
                async with session.post(url + "/v1/infer", data=body,
                                        timeout=aiohttp.ClientTimeout(total=120)) as response:
                    data = await response.read()
                    elapsed = time.monotonic() - started
                    if response.status == 200:
                        latencies.append(elapsed)
                        counts["ok"] += 1
                        send_plan = False
                        continue
                    code = wire.decode_body(data).meta.get("code", response.status)
                    counts[f"{response.status} {code}"] += 1
                    if response.status == 503:
                        wait = float(response.headers.get("Retry-After", "1"))
                        retry_waits.append(wait)
                        await asyncio.sleep(min(wait, max(stop_at - time.monotonic(), 0)))
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                counts[f"connection {type(exc).__name__}"] += 1
                await asyncio.sleep(0.1)


async def run_load(url: str, plan, clients: int, duration_s: float, progress) -> tuple[list, Counter, list]:
    from partitioner.zoo import example_input

    latencies: list[float] = []
    counts: Counter = Counter()
    retry_waits: list[float] = []
    stop_at = time.monotonic() + duration_s
    inputs = [example_input(tuple(plan.input_shape), seed) for seed in range(clients)]
    tasks = [asyncio.create_task(one_client(url, plan, inputs[i], stop_at, latencies, counts, retry_waits))
             for i in range(clients)]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1.0)
        progress.n = min(int(duration_s), int(duration_s - max(stop_at - time.monotonic(), 0)))
        progress.set_postfix(ok=counts["ok"], refused=sum(v for k, v in counts.items() if k != "ok"))
    await asyncio.gather(*tasks)
    return latencies, counts, retry_waits


def warm_up(url: str, plan) -> None:
    from partitioner.zoo import example_input

    body = wire.encode_body_bytes(Message(kind="infer", request_id=uuid.uuid4().hex, model=plan.model,
                                          plan_id=wire.plan_digest(plan.to_json()), meta={"plan": plan.to_json()},
                                          tensors={"x": example_input(tuple(plan.input_shape))}))
    request = urllib.request.Request(url + "/v1/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        if response.status != 200:
            raise RuntimeError(f"warm-up request answered {response.status}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from partitioner.graph import load_graph
    from partitioner.plan import Plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent devices (default 64)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--max-queue", type=int, default=256, help="the cloud's queue limit (default 256)")
    parser.add_argument("--workers", type=int, default=2, help="requests the cloud computes at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the cloud (default 1)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--shape", default="1x3x64x64", help="input shape (default 1x3x64x64)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_queue < 1:
        parser.error("--clients, --duration and --max-queue must be positive")
    torch.set_num_threads(1)
    shape = tuple(int(d) for d in args.shape.split("x"))
    graph = load_graph(args.model, shape)
    plan = Plan(args.model, shape, {n: "cloud" for n in graph.order}, strategy="cloud_only")
    process, url, directory = start_cloud(args.workers, args.max_queue, args.threads)
    try:
        warm_up(url, plan)  # the first request of a plan builds it: not what a load test measures
        rss_before = rss_mb(process.pid)
        print(f"load: {args.clients} clients x {args.duration:.0f} s -> d3 cloud {url} ({args.model} "
              f"{args.shape}, {args.workers} workers x {args.threads} thread, queue limit {args.max_queue})")
        with tqdm(total=int(args.duration), desc="load", unit="s", file=sys.stderr) as progress:
            latencies, counts, retry_waits = asyncio.run(run_load(url, plan, args.clients, args.duration, progress))
        rss_after = rss_mb(process.pid)
        alive = process.poll() is None
    finally:
        process.kill()
        process.wait(10)
    ok = counts["ok"]
    errors = {k: v for k, v in counts.items() if k != "ok"}
    print(f"  answered 200     {ok} in {args.duration:.0f} s = {ok / args.duration:.1f} req/s")
    print(f"  latency (200s)   p50 {percentile(latencies, 0.5) * 1e3:.0f} ms, p99 {percentile(latencies, 0.99) * 1e3:.0f} ms, "
          f"max {max(latencies, default=float('nan')) * 1e3:.0f} ms, mean "
          f"{(statistics.mean(latencies) if latencies else float('nan')) * 1e3:.0f} ms")
    print(f"  errors           {sum(errors.values())} {dict(errors) if errors else ''}")
    if retry_waits:
        print(f"  Retry-After      {len(retry_waits)} times, median {statistics.median(retry_waits):.0f} s")
    print(f"  cloud memory     {rss_before:.0f} MB before, {rss_after:.0f} MB after; process alive: {alive}")
    below_limit = args.clients <= args.max_queue
    passed = alive and ok > 0 and (not below_limit or not errors)
    print(("PASS" if passed else "FAIL") + (": 0 errors below the queue limit" if below_limit and passed else ""))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time kernels and segments the way the runtime runs them, and write them to a profile (JSON lines).

Clock: at one torch thread every op runs on the calling thread, so the profiler reads that thread's CPU
time (``time.thread_time``): on this shared 2-core machine the wall clock mostly measures the other
tenants (we saw wall = 2x CPU under load), while the thread's CPU time is the latency an uncontended
tier would see. With more threads, or on a tier whose slowness *is* the point (a CPU quota), use the wall
clock (``clock="wall"``, ``--clock wall``).

Allocator: glibc serves large blocks (activations of a few MB) with mmap and returns them on free unless
its *dynamic* threshold has grown, so the same kernel costs 1.7 ms or 3-14 ms (page faults on fresh pages)
depending on the process's allocation history. ``stabilize_allocator()`` pins the thresholds so freed
activations are reused; the profiler calls it, and tier processes should call it too (it also makes them
faster) so that what was profiled is what runs.

Everything timed is an fx ``GraphModule`` made by ``partitioner.segments.extract_subgraph`` (a kernel is
a one-kernel segment), called under ``torch.no_grad`` at a fixed thread count. Timing on a shared machine
is noisy, so calls are measured *interleaved*: each round times every call once, and a call's time is
the lower quartile over rounds (CPU clock; the median for wall-clock samples, see ``_typical``). Kernels are timed *in context* (``ChainJob``): each pass runs a model's
kernels in order on each other's outputs, as a segment does. A call shorter than ``min_sample_s`` can be
repeated inside one sample (default 0: one call, as the runtime makes it). Under a CPU quota (CFS), ``min_sample_s`` should span a few quota
periods so a sample averages over throttling instead of landing on one side of it.

Profile file: first line ``{"type": "meta", host, torch, threads, timestamp, ...}``, then one record per
line: ``overhead`` (empty segment call), ``kernel`` (features, raw and net seconds), ``segment`` (random
contiguous slice of a zoo model's ``order``, measured seconds).
"""
from __future__ import annotations

import functools
import gc
import json
import math
import os
import platform
import random
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm import tqdm

from partitioner.graph import ModelGraph, build_graph
from partitioner.segments import extract_subgraph
from partitioner.zoo import example_input
from predictor.features import FEATURES, group_kernels

DEFAULT_THREADS = 1


@dataclass
class ProfileSettings:
    threads: int = DEFAULT_THREADS
    rounds: int = 25  # in-context passes over a model's kernels; each kernel's lower quartile is kept
    segment_rounds: int = 25  # samples per segment (rounds over all segments)
    min_sample_s: float = 0.0  # 0: one call per sample (cold-ish caches, as the runtime calls a segment)
    fuse: bool = True
    seed: int = 0
    clock: str = "auto"  # "cpu" (thread CPU time), "wall", or "auto": cpu at 1 thread, wall otherwise

    def resolved_clock(self) -> str:
        if self.clock not in ("auto", "cpu", "wall"):
            raise ValueError(f"clock must be auto, cpu or wall, got {self.clock!r}")
        if self.clock == "auto":
            return "cpu" if self.threads == 1 else "wall"
        if self.clock == "cpu" and self.threads != 1:
            raise ValueError("the cpu clock measures one thread; use --clock wall with --threads > 1")
        return self.clock


@dataclass
class Profile:
    """A profile file's contents, several files merged."""

    metas: list[dict] = field(default_factory=list)
    kernels: list[dict] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)
    overheads: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> None:
        kind = record.get("type")
        target = {"meta": self.metas, "kernel": self.kernels, "segment": self.segments,
                  "overhead": self.overheads}.get(kind)
        if target is None:
            raise ValueError(f"profile record has unknown type {kind!r}")
        target.append(record)

    def threads(self) -> int:
        counts = {m.get("threads") for m in self.metas}
        if len(counts) != 1:
            raise ValueError(f"profiles mix thread counts {sorted(counts, key=str)}; fit one tier's profiles at a time")
        return int(counts.pop())


def record_key(record: dict) -> tuple | None:
    """What a record measures (the same in every session that profiled it), or None for a header."""
    base = (record.get("type"), record.get("model"), tuple(record.get("input_shape") or ()))
    kind = record.get("type")
    if kind == "kernel":
        return base + (tuple(record["nodes"]),)
    if kind == "segment":
        return base + (record["start"], record["end"])
    if kind == "overhead":
        return base
    return None


TIME_FIELDS = ("raw_s", "net_s", "median_s")


def merge_sessions(profile: Profile) -> Profile:
    """One record per measured thing: the median time over the sessions that measured it. This machine's
    speed drifts 5-10% over minutes (resnet18's kernels summed to 37.7-43.9 ms in sessions a minute apart,
    also within one process), so each model profiled in several sessions, spread in time, and merged this
    way measures the model rather than the minute."""
    groups: dict[tuple, list[dict]] = {}
    for record in profile.kernels + profile.segments + profile.overheads:
        groups.setdefault(record_key(record), []).append(record)
    merged = Profile(metas=list(profile.metas))
    for records in groups.values():
        record = dict(records[0])
        for name in TIME_FIELDS:
            if name in record:
                record[name] = float(statistics.median(r[name] for r in records))
        if len(records) > 1:
            record["sessions"] = len(records)
        merged.add(record)
    return merged


def read_profiles(paths: Iterable[str | Path], merge: bool = True) -> Profile:
    """Profile files read together; a thing profiled in several of them (sessions) is merged into its
    median (``merge_sessions``) unless ``merge`` is False."""
    profile = Profile()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile {path} does not exist")
        with path.open() as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_number}: not a JSON line ({exc.msg})") from None
                profile.add(record)
    if not profile.metas:
        raise ValueError(f"no profile header (meta line) in {', '.join(map(str, paths))}")
    return merge_sessions(profile) if merge else profile


def profile_meta(settings: ProfileSettings, **extra: Any) -> dict:
    return {
        "type": "meta", "host": socket.gethostname(), "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": settings.threads, "clock": settings.resolved_clock(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "allocator_pinned": stabilize_allocator(), "fuse": settings.fuse, "rounds": settings.rounds, "min_sample_s": settings.min_sample_s,
        "features": list(FEATURES), **extra,
    }


# ---------------------------------------------------------------- measurement

def capture_values(graph: ModelGraph, x: torch.Tensor) -> dict[str, Any]:
    """Every node's output on ``x`` (inputs of the kernels and segments to time)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            values[n.name] = result
            return result

    with torch.no_grad():
        Recorder(graph.module).run(x)
    return values


def slice_io(graph: ModelGraph, node_names: list[str]) -> tuple[list[str], list[str]]:
    """Inputs (values made outside, read inside) and outputs (read outside or model outputs) of a node set."""
    inside = set(node_names)
    position = {name: i for i, name in enumerate(graph.input_names + graph.order)}
    inputs: set[str] = set()
    outputs: set[str] = set()
    for name in node_names:
        inputs.update(p for p in graph.dag.predecessors(name) if p not in inside)
        if name in graph.output_names or any(s not in inside for s in graph.dag.successors(name)):
            outputs.add(name)
    if not outputs:
        outputs.add(node_names[-1])
    return sorted(inputs, key=position.__getitem__), sorted(outputs, key=position.__getitem__)


def empty_call(x: torch.Tensor) -> Callable[[], Any]:
    """A segment with no nodes: the runtime's fixed cost of calling a segment GraphModule."""
    graph = fx.Graph()
    placeholder = graph.placeholder("x")
    graph.output((placeholder,))
    module = fx.GraphModule(nn.Module(), graph, class_name="Segment")
    return lambda: module(x)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def stabilize_allocator() -> bool:
    """Pin glibc's mmap/trim thresholds (see the module notes). False where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


# ---------------------------------------------------------------- profiling

def random_slices(node_count: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    """``count`` distinct (start, end) slices of ``order``: two cut points drawn uniformly."""
    slices: set[tuple[int, int]] = set()
    attempts = 0
    while len(slices) < min(count, node_count * (node_count + 1) // 2) and attempts < count * 50:
        attempts += 1
        a, b = rng.randint(0, node_count), rng.randint(0, node_count)
        if a != b:
            slices.add((min(a, b), max(a, b)))
    return sorted(slices)


def _typical(samples: list[float], clock: str = "cpu") -> float:
    """The lower quartile of a call's CPU-time samples. On this shared VM the CPU time of one resnet50 pass
    varied from 98 to 177 ms across 30 rounds; noise only adds time, and per-kernel medians of a long pass
    then disagreed with segment medians by up to +11%, while lower quartiles agreed within 2% run to run.
    Wall-clock samples (a tier under a CPU quota) keep the median: there throttling is part of the cost, and
    the lower quartile of a few samples picked the lucky ones (segments 15% faster than calibrated)."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 4] if clock == "cpu" else ordered[len(ordered) // 2]


def _touch(args: Iterable[Any]) -> None:
    """Read a call's inputs into cache, untimed: in the runtime a segment's or kernel's input was just
    written (received, or produced by the previous kernel); a stale captured tensor would be cold."""
    for value in args:
        if isinstance(value, torch.Tensor) and value.numel():
            value.sum()


class ChainJob:
    """One model's kernels timed *in context*: each pass runs them as one segment runs them (a single
    GraphModule, the generated code freeing each value after its last reader), with a time stamp taken
    before each kernel's first node; a kernel's time is the gap to the next stamp. So the kernels' times
    of a slice add up to the slice's segment time less one per-call overhead, which is also timed per
    pass (an empty segment call). Timing each kernel as its own GraphModule instead added a cold module
    call per kernel (+10-40% on segments of small kernels); timing a kernel on a loop of itself keeps
    weights and input hot and underestimated MobileNetV2 segments by 13%."""

    def __init__(self, graph: ModelGraph, kernel_list, x: torch.Tensor, clock: str):
        self.graph, self.kernels, self.now = graph, list(kernel_list), CLOCKS[clock]
        nodes = [name for kernel in self.kernels for name in kernel.nodes]
        inputs, outputs = slice_io(graph, sorted(nodes, key=graph.order.index))
        self.stamps = [0.0] * (len(self.kernels) + 1)
        self.module = _stamped_module(graph, self.kernels, inputs, outputs, self._stamp)
        self.args = [x if name in graph.input_names else None for name in inputs]
        if any(arg is None for arg in self.args):
            values = capture_values(graph, x)
            self.args = [values[name] for name in inputs]
        self.empty = empty_call(x)
        self.samples: list[list[float]] = [[] for _ in self.kernels]
        self.overheads: list[float] = []

    def _stamp(self, index: int) -> None:
        self.stamps[index] = self.now()

    def step(self, record: bool = True) -> None:
        now = self.now
        start = now()
        self.empty()
        overhead = now() - start
        _touch(self.args)
        self.module(*self.args)
        if record:
            stamps = self.stamps
            for index, samples in enumerate(self.samples):
                samples.append(stamps[index + 1] - stamps[index])
            self.overheads.append(overhead)


def _stamped_module(graph: ModelGraph, kernels, inputs: list[str], outputs: list[str],
                    stamp: Callable[[int], None]) -> fx.GraphModule:
    """The segment of ``kernels``' nodes with ``stamp(i)`` called before kernel i's first node and
    ``stamp(len(kernels))`` before returning."""
    nodes = [name for kernel in kernels for name in kernel.nodes]
    module = extract_subgraph(graph.module, sorted(nodes, key=graph.order.index), inputs, outputs)
    by_name = {node.name: node for node in module.graph.nodes}
    for index, kernel in enumerate(kernels):
        with module.graph.inserting_before(by_name[kernel.nodes[0]]):
            module.graph.call_function(stamp, (index,))
    output = next(node for node in module.graph.nodes if node.op == "output")
    with module.graph.inserting_before(output):
        module.graph.call_function(stamp, (len(kernels),))
    module.recompile()
    return module


class CallsJob:
    """Independent calls (segments, sweep layers), each touched then timed once per round."""

    def __init__(self, calls: list[tuple[tuple, Callable[[], Any]]], clock: str, min_sample_s: float = 0.0):
        self.calls, self.now, self.min_sample_s = calls, CLOCKS[clock], min_sample_s
        self.repeats = [1] * len(calls)
        self.samples: list[list[float]] = [[] for _ in calls]

    def step(self, record: bool = True) -> None:
        now = self.now
        for index, (args, call) in enumerate(self.calls):
            _touch(args)
            start = now()
            for _ in range(self.repeats[index]):
                call()
            elapsed = (now() - start) / self.repeats[index]
            if record:
                self.samples[index].append(elapsed)
            elif self.min_sample_s:  # warm-up pass: size the repeats of short calls
                self.repeats[index] = max(1, min(1000, math.ceil(self.min_sample_s / max(elapsed, 1e-7))))


def run_jobs(jobs: list[tuple[Any, int]], desc: str = "timing", progress: bool = True) -> None:
    """One warm-up step of every job, then rounds in which every job still short of its count steps once:
    all jobs of a session see the same machine conditions (load drifts hit them alike)."""
    stabilize_allocator()
    rounds = max((count for _, count in jobs), default=0)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # as timeit does: a collection would land, at random, inside some timed call
    try:
        with torch.no_grad(), tqdm(total=rounds + 1, desc=desc, unit="round", disable=not progress,
                                   leave=False) as bar:
            for job, _ in jobs:
                job.step(record=False)  # allocator, oneDNN primitive set-up
            bar.update(1)
            for round_index in range(rounds):
                for job, count in jobs:
                    if round_index < count:
                        job.step()
                bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()


def _segment_calls(graph: ModelGraph, slices: list[tuple[int, int]], x: torch.Tensor) -> list[tuple[tuple, Callable]]:
    values = capture_values(graph, x)
    values.update({name: x for name in graph.input_names})
    calls = [((x,), empty_call(x))]
    for a, b in slices:
        inputs, outputs = slice_io(graph, graph.order[a:b])
        module = extract_subgraph(graph.module, graph.order[a:b], inputs, outputs)
        args = tuple(values[name] for name in inputs)
        calls.append((args, functools.partial(module, *args)))
    return calls


def profile_models(graphs: list[ModelGraph], settings: ProfileSettings, segments: int = 0,
                   segment_models: Iterable[str] | None = None, kernels: bool = True, sweep: int = 0,
                   progress: bool = True) -> list[dict]:
    """Kernel records of every graph (and of ``sweep`` random layers), random segment records of
    ``segment_models`` (default: all), per-call overheads. Each model's kernels and segments are timed in
    a session of their own (interleaved with each other only), and so is each random sweep network."""
    torch.set_num_threads(settings.threads)
    clock = settings.resolved_clock()
    segment_models = set(segment_models) if segment_models is not None else {g.name for g in graphs}
    sessions: list[tuple[str, list[tuple[Any, int]]]] = []  # (label, jobs): one timing session each
    chains, segment_jobs = [], []
    for graph in graphs:
        jobs: list[tuple[Any, int]] = []
        x = example_input(graph.input_shape)
        if kernels:
            chains.append(ChainJob(graph, group_kernels(graph, settings.fuse), x, clock))
            jobs.append((chains[-1], settings.rounds))
        if segments and graph.name in segment_models:
            slices = random_slices(len(graph.order), segments, random.Random(f"{settings.seed}:{graph.name}"))
            job = CallsJob(_segment_calls(graph, slices, x), clock, settings.min_sample_s)
            segment_jobs.append((graph, slices, job))
            jobs.append((job, settings.segment_rounds))
        if jobs:
            sessions.append((graph.name, jobs))
    if sweep:
        # each random network in a session of its own, like a zoo model: timed all interleaved in one
        # session, their kernels ran 12-25% slower than the zoo's (other networks' caches and allocator
        # state), and a predictor fitted with them predicted held-out models that much too slow
        for graph in sweep_graphs(sweep, settings.seed):
            chains.append(ChainJob(graph, group_kernels(graph, settings.fuse), example_input(graph.input_shape), clock))
            sessions.append((graph.name, [(chains[-1], settings.rounds)]))
    # one session per model, as a tier runs one model's segments: timed interleaved with the other models'
    # jobs, the same segments measured 8% (resnet50) to 28% (mobilenet_v2) slower than in their own session
    # (caches and allocator state left by other models), and its kernels no longer added up to its segments
    for number, (label, jobs) in enumerate(sessions, 1):
        desc = f"profiling {label} ({number}/{len(sessions)})"
        if os.environ.get("D3_PROFILE_PHASES"):
            run_jobs([(job, count) for job, count in jobs if isinstance(job, ChainJob)], desc + " kernels", progress)
            run_jobs([(job, count) for job, count in jobs if not isinstance(job, ChainJob)], desc + " segments", progress)
        else:
            run_jobs(jobs, desc, progress)

    records: list[dict] = []
    for chain in chains:
        base = {"model": chain.graph.name, "input_shape": list(chain.graph.input_shape)}
        if chain.graph.name.startswith("sweep_"):
            base["source"] = "sweep"
        overhead = _typical(chain.overheads, clock)
        records.append({"type": "overhead", **base, "median_s": overhead})
        for kernel, samples in zip(chain.kernels, chain.samples):
            # in-segment stamps already exclude the per-call overhead: raw and net are the same
            raw = _typical(samples, clock)
            records.append({"type": "kernel", **base, "nodes": kernel.nodes, "kind": kernel.kind,
                            "features": kernel.features, "raw_s": raw, "net_s": raw})
    for graph, slices, job in segment_jobs:
        base = {"model": graph.name, "input_shape": list(graph.input_shape)}
        medians = [_typical(s, clock) for s in job.samples]
        if not kernels:
            records.append({"type": "overhead", **base, "median_s": medians[0]})
        for (a, b), median in zip(slices, medians[1:]):
            records.append({"type": "segment", **base, "start": a, "end": b, "median_s": median})
    return records


def profile_graph(graph: ModelGraph, settings: ProfileSettings, segments: int = 0, kernels: bool = True,
                  progress: bool = True) -> list[dict]:
    """Kernel (and optionally random segment) records of one graph, plus its per-call overhead."""
    return profile_models([graph], settings, segments, kernels=kernels, progress=progress)


# ---------------------------------------------------------------- synthetic layer sweeps

_CHANNELS = [3, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160, 192, 256, 320, 384, 480, 512, 576, 768, 960, 1024]
_SIZES = [7, 14, 28, 56, 112]


def _random_network(rng: random.Random, layers: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A random plain CNN of about ``layers`` layers (conv regular/pointwise/depthwise, +bn, +activation,
    pools, a bn+relu pre-activation, a linear head), profiled like a zoo model: its kernels run in context."""
    channels, hw = rng.choice(_CHANNELS), rng.choice(_SIZES[1:])
    shape = (1, channels, hw, hw)
    modules: list[nn.Module] = []
    for _ in range(layers):
        choice = rng.random()
        if choice < 0.65:
            depthwise = channels > 3 and rng.random() < 0.3
            cout = channels if depthwise else rng.choice(_CHANNELS[1:])
            k = 3 if depthwise and rng.random() < 0.7 else rng.choice([1, 1, 3, 3, 5, 7])
            stride = 2 if hw > 7 and rng.random() < 0.3 else 1
            while not depthwise and cout > 8 and channels * cout * k * k * hw * hw / (stride * stride) > 1.5e8:
                cout //= 2  # keep each layer under ~0.3 GFLOP: the sweep adds variety, not hours
            modules.append(nn.Conv2d(channels, cout, k, stride, k // 2, groups=channels if depthwise else 1,
                                     bias=rng.random() < 0.3))
            channels, hw = cout, (hw + 2 * (k // 2) - k) // stride + 1
            if rng.random() < 0.75:
                modules.append(nn.BatchNorm2d(channels))
            if rng.random() < 0.75:
                modules.append(rng.choice([nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.SiLU()]))
        elif choice < 0.8 and hw > 7:
            k = rng.choice([2, 3])
            stride = rng.choice([1, 2])
            pool = nn.MaxPool2d(k, stride, k // 2) if rng.random() < 0.6 else nn.AvgPool2d(k, stride)
            modules.append(pool)
            hw = (hw + 2 * (k // 2 if isinstance(pool, nn.MaxPool2d) else 0) - k) // stride + 1
        elif choice < 0.92:
            modules += [nn.BatchNorm2d(channels)] + ([nn.ReLU()] if rng.random() < 0.6 else [])
        else:
            modules.append(rng.choice([nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.SiLU(), nn.Sigmoid()]))
    if rng.random() < 0.5:
        modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, rng.choice([10, 100, 1000, 4096]))]
    return nn.Sequential(*modules), shape


SWEEP_NETWORK_LAYERS = 8


def sweep_graphs(count: int, seed: int = 0) -> list[ModelGraph]:
    """Random networks with about ``count`` layers in all."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    graphs = []
    for index in range(max(1, round(count / SWEEP_NETWORK_LAYERS))):
        module, shape = _random_network(rng, SWEEP_NETWORK_LAYERS)
        graphs.append(build_graph(module, shape, name=f"sweep_{seed}_{index}"))
    return graphs


def profile_sweep(count: int, settings: ProfileSettings, progress: bool = True) -> list[dict]:
    """Kernels of random networks with about ``count`` layers in all, timed in context like a zoo model."""
    return profile_models([], settings, sweep=count, progress=progress)


def write_profile(path: str | Path, meta: dict, records: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as handle:
        handle.write(json.dumps(meta) + "\n")
        for record in records:
            handle.write(json.dumps(record) + "\n")
            count += 1
    return count

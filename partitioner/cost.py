"""The cost model of a monotone device/edge/cloud assignment, shared by every planner and baseline.

Latency of one request (additive stages)::

    device compute + device->edge + device->cloud + edge compute + edge->cloud + cloud compute + return

A transfer is the bytes of every tensor crossing that link (each tensor once per link, however many
nodes read it) / the link's bandwidth, plus half the link's RTT when any byte crosses in that direction.
The result returns from the tier holding each model output straight to the device (edge->device over the
device-edge link, cloud->device over the device-cloud link). A tier's per-call overhead is paid when it
has work; a tier's load (a queue, another tenant) enters as a slowdown factor on its compute.

Edge compute over N edge nodes is calibrated from the tiling engineer's real plans
(``partitioner.tiling.plan_edge_tiling``), computed once per (graph, edge weights) for the whole model as
one edge segment and cached: a node in a tiled stage takes ``t * makespan(stage) / work(stage)`` (the
stage's slowest tile, halo included, over its untiled work), a node of a serial stage runs whole on the
coordinator (node 0): ``t / weights[0]``. Tensors entering the edge are scattered and tensors leaving it
(or entering a serial node) are gathered over the edge-edge link (the share not held by the coordinator);
a tensor that crosses between two tiled stages is gathered by its producer and re-scattered at its first
reader in the later stage, so every extra stage the tiling cuts is priced over ``edge_edge_bps``.

For a fixed assignment every stage is linear in a small parameter vector (slowdowns, seconds per byte of
each link, half RTTs, overheads), so a plan is summarised by a feature vector and its latency under new
conditions is one dot product; the re-partitioner evaluates its whole library of plans that way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from partitioner.graph import ModelGraph
from partitioner.segments import TIERS, normalise_assignment

DEFAULT_EDGE_EDGE_BPS = 1e9  # the edge cluster's own LAN: 1 Gbit/s Ethernet
LINK_NAMES = ("device->edge", "device->cloud", "edge->cloud", "edge->device", "cloud->device", "edge<->edge")
STAGE_NAMES = ("device", "device->edge", "device->cloud", "edge", "edge->cloud", "cloud", "return")


@dataclass
class Links:
    """Bandwidths in bit/s (symmetric: the result returns over the same link) and round-trip times in s."""

    device_edge_bps: float
    edge_cloud_bps: float
    device_cloud_bps: float
    device_edge_rtt_s: float = 0.0
    edge_cloud_rtt_s: float = 0.0
    device_cloud_rtt_s: float = 0.0
    edge_edge_bps: float = DEFAULT_EDGE_EDGE_BPS

    def __post_init__(self) -> None:
        for name in ("device_edge_bps", "edge_cloud_bps", "device_cloud_bps", "edge_edge_bps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Links.{name} must be a positive finite bandwidth in bit/s, got {value!r}")
        for name in ("device_edge_rtt_s", "edge_cloud_rtt_s", "device_cloud_rtt_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Links.{name} must be a finite RTT >= 0 in seconds, got {value!r}")

    @classmethod
    def mbps(cls, device_edge: float, edge_cloud: float, device_cloud: float, **rtts_s: float) -> "Links":
        return cls(device_edge * 1e6, edge_cloud * 1e6, device_cloud * 1e6, **rtts_s)

    def replace(self, **changes) -> "Links":
        return replace(self, **changes)


@dataclass
class TierModels:
    """A latency model per tier (``edge`` is one edge node of weight 1.0) and each tier's current load."""

    device: object  # LatencyModel
    edge: object
    cloud: object
    device_slowdown: float = 1.0
    edge_slowdown: float = 1.0
    cloud_slowdown: float = 1.0

    def __post_init__(self) -> None:
        for tier in TIERS:
            value = getattr(self, f"{tier}_slowdown")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{tier} slowdown must be a positive finite factor, got {value!r}")

    @classmethod
    def default(cls) -> "TierModels":
        """FLOP-rate models: a device ~5x slower than an edge node, a cloud ~4x faster than an edge node."""
        from predictor.base import FlopRateModel

        edge = FlopRateModel()
        return cls(device=edge.scaled(5.0), edge=edge, cloud=edge.scaled(0.25))

    def slowdown(self, tier: str) -> float:
        return getattr(self, f"{tier}_slowdown")

    def with_slowdowns(self, slowdowns: Mapping[str, float] | None) -> "TierModels":
        if not slowdowns:
            return self
        unknown = set(slowdowns) - set(TIERS)
        if unknown:
            raise ValueError(f"slowdowns name unknown tiers {sorted(unknown)}; use {TIERS}")
        return replace(self, **{f"{tier}_slowdown": float(value) for tier, value in slowdowns.items()})


# --- per-graph structure (computed once, cached on the graph) -------------------------------------

@dataclass
class CostGraph:
    """The graph as index arrays. Node index i < n_inputs: a model input (always on the device)."""

    names: list[str]
    n_inputs: int
    src: np.ndarray  # DAG edges (producer index, consumer index)
    dst: np.ndarray
    out_bytes: np.ndarray  # bytes of each node's output tensor
    outputs: np.ndarray  # indices of the model's output nodes
    tileable: np.ndarray  # bool: spatial node before any global op
    serial_gather_bytes: np.ndarray  # bytes of tiled tensors a non-tileable node reads (gathered first)
    index: dict[str, int] = field(default_factory=dict)
    _model_seconds: dict = field(default_factory=dict)
    _edge_model: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.names)

    def base_seconds(self, model) -> np.ndarray:
        """Per-node seconds of ``model`` (inputs: 0), cached per model object."""
        key = id(model)
        if key not in self._model_seconds:
            seconds = model.node_seconds(self._graph)
            values = np.zeros(self.n)
            for name, value in seconds.items():
                if name in self.index:
                    values[self.index[name]] = float(value)
            self._model_seconds[key] = (model, values)  # hold the model so its id stays unique
        return self._model_seconds[key][1]

    def edge_model(self, weights: Sequence[float]) -> "EdgeModel":
        """The calibrated edge tiling for these node weights (cached)."""
        key = tuple(float(w) for w in weights)
        if key not in self._edge_model:
            self._edge_model[key] = _edge_model(self, key)
        return self._edge_model[key]

    def edge_factor(self, weights: Sequence[float]) -> np.ndarray:
        """Per-node multiplier of one weight-1 edge node's time when the edge runs over these weights."""
        return self.edge_model(weights).factor


@dataclass
class EdgeModel:
    """What the real tiling plan of the whole model over some edge weights implies, per node."""

    factor: np.ndarray  # multiplier of one weight-1 node's time (tiled: stage makespan / stage work)
    boundary: np.ndarray  # bool: a tensor read by a later tiled stage (gathered, then re-scattered)
    rescatter_bytes: np.ndarray  # bytes a node re-scatters as the first reader of boundary tensors
    scatter_bytes: np.ndarray  # bytes of a tensor as a tiled stage reads it (halo rows sent twice)
    stages: int  # tiled stages of the whole-model plan
    halo_overhead_pct: float
    predicted_speedup: float

    def entry_scatter(self, out_bytes: np.ndarray) -> np.ndarray:
        """Bytes of a device tensor scattered on entry (a boundary tensor's reader pays its scatter)."""
        return np.where(self.boundary, 0.0, self.scatter_bytes)


def _edge_model(cg: "CostGraph", weights: tuple[float, ...]) -> EdgeModel:
    n = cg.n
    boundary, rescatter, scatter = np.zeros(n, dtype=bool), np.zeros(n), cg.out_bytes.copy()
    if len(weights) == 1:
        return EdgeModel(np.full(n, 1.0 / weights[0]), boundary, rescatter, scatter, 0, 0.0, 1.0)
    from partitioner.halo import region_area
    from partitioner.tiling import TiledStage, plan_edge_tiling

    graph = cg._graph
    share = 1.0 - weights[0] / sum(weights)
    plan = plan_edge_tiling(graph, list(graph.order), list(graph.input_names), list(graph.output_names),
                            list(weights))
    factor = np.full(n, 1.0 / weights[0])
    stage_of = {}
    for number, stage in enumerate(plan.stages):
        for name in stage.nodes:
            stage_of[name] = number
        if isinstance(stage, TiledStage) and stage.flops > 0:
            makespan = max(t.flops / weights[t.node] for t in stage.tiles)
            factor[[cg.index[name] for name in stage.nodes]] = makespan / stage.flops
            for name in stage.input_names:  # what really crosses the LAN, over the share the model assumes
                sent = sum(_pixel_bytes(graph, name) * region_area(t.input_regions[name])
                           for t in stage.tiles if t.node != 0 and name in t.input_regions)
                scatter[cg.index[name]] = sent / share if share > 0 else cg.out_bytes[cg.index[name]]
    tiled = {number for number, stage in enumerate(plan.stages) if isinstance(stage, TiledStage)}
    order = {name: i for i, name in enumerate(cg.names)}
    for number, stage in enumerate(plan.stages):
        if number not in tiled:
            continue
        for name in stage.output_names:
            readers = [r for r in graph.dag.successors(name) if stage_of.get(r) in tiled and stage_of[r] != number]
            if readers:
                p = cg.index[name]
                boundary[p] = True
                rescatter[cg.index[min(readers, key=order.__getitem__)]] += scatter[p]
    return EdgeModel(factor, boundary, rescatter, scatter, len(tiled), plan.halo_overhead_pct, plan.predicted_speedup)


def _pixel_bytes(graph: ModelGraph, name: str) -> float:
    shape = graph.records[name].output_shape
    return graph.records[name].output_bytes / (shape[-2] * shape[-1])


def _spatial(record) -> bool:
    return record.is_tensor and record.output_shape is not None and len(record.output_shape) == 4


def _tileable(graph: ModelGraph, names: list[str], records) -> np.ndarray:
    """Nodes the tiling runs in tiled stages (a spatial model input counts as tiled data)."""
    from partitioner.halo import TileOp
    from partitioner.tiling import tile_ops

    ops = tile_ops(graph)
    return np.array([isinstance(ops.get(name), TileOp) if name in ops else _spatial(record)
                     for name, record in zip(names, records)], dtype=bool)


def cost_graph(graph: ModelGraph) -> CostGraph:
    cached = getattr(graph, "_d3_cost_graph", None)
    if cached is not None:
        return cached
    names = list(graph.input_names) + list(graph.order)
    index = {name: i for i, name in enumerate(names)}
    edges = [(index[s], index[d]) for s, d in graph.dag.edges if s in index and d in index]
    src = np.array([s for s, _ in edges], dtype=np.int64)
    dst = np.array([d for _, d in edges], dtype=np.int64)
    records = [graph.records[name] for name in names]
    out_bytes = np.array([max(r.output_bytes, 1) for r in records], dtype=float)

    tileable = _tileable(graph, names, records)
    serial_gather = np.zeros(len(names))
    for i, record in enumerate(records):
        if i >= len(graph.input_names) and not tileable[i]:
            serial_gather[i] = sum(out_bytes[index[p]] for p in set(record.input_names)
                                   if p in index and tileable[index[p]])
    outputs = np.array([index[name] for name in graph.output_names if name in index], dtype=np.int64)
    result = CostGraph(names, len(graph.input_names), src, dst, out_bytes, outputs, tileable, serial_gather, index)
    result._graph = graph
    graph._d3_cost_graph = result
    return result


# --- features of an assignment and the parameter vector of the conditions --------------------------

# Feature k of a plan times parameter k of the conditions, summed, is the plan's latency.
F_DEVICE_S, F_EDGE_S, F_CLOUD_S, F_DE_BYTES, F_DC_BYTES, F_EC_BYTES, F_EE_BYTES, F_RET_E_BYTES, \
    F_RET_C_BYTES, F_DE_USED, F_DC_USED, F_EC_USED, F_RET_E_USED, F_RET_C_USED, F_EDGE_BUSY, F_CLOUD_BUSY, \
    F_ONE = range(17)
N_FEATURES = 17
STAGE_FEATURES = {
    "device": (F_DEVICE_S, F_ONE),
    "device->edge": (F_DE_BYTES, F_DE_USED),
    "device->cloud": (F_DC_BYTES, F_DC_USED),
    "edge": (F_EDGE_S, F_EE_BYTES, F_EDGE_BUSY),
    "edge->cloud": (F_EC_BYTES, F_EC_USED),
    "cloud": (F_CLOUD_S, F_CLOUD_BUSY),
    "return": (F_RET_E_BYTES, F_RET_C_BYTES, F_RET_E_USED, F_RET_C_USED),
}


@dataclass
class Conditions:
    """Everything that prices a plan: links, tier models with their loads, and the edge node weights."""

    links: Links
    tiers: TierModels
    edge_weights: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        self.edge_weights = tuple(float(w) for w in self.edge_weights)
        if not self.edge_weights or not all(math.isfinite(w) and w > 0 for w in self.edge_weights):
            raise ValueError(f"edge weights must be one positive number per edge node, got {self.edge_weights}")

    @property
    def outside_share(self) -> float:
        """Share of a scattered tensor not kept by the coordinator (what crosses the edge LAN)."""
        return 1.0 - self.edge_weights[0] / sum(self.edge_weights)

    def theta(self) -> np.ndarray:
        links, tiers = self.links, self.tiers
        theta = np.zeros(N_FEATURES)
        theta[F_DEVICE_S] = tiers.device_slowdown
        theta[F_EDGE_S] = tiers.edge_slowdown
        theta[F_CLOUD_S] = tiers.cloud_slowdown
        theta[F_DE_BYTES] = theta[F_RET_E_BYTES] = 8.0 / links.device_edge_bps
        theta[F_DC_BYTES] = theta[F_RET_C_BYTES] = 8.0 / links.device_cloud_bps
        theta[F_EC_BYTES] = 8.0 / links.edge_cloud_bps
        theta[F_EE_BYTES] = 8.0 / links.edge_edge_bps
        theta[F_DE_USED] = theta[F_RET_E_USED] = links.device_edge_rtt_s / 2
        theta[F_DC_USED] = theta[F_RET_C_USED] = links.device_cloud_rtt_s / 2
        theta[F_EC_USED] = links.edge_cloud_rtt_s / 2
        theta[F_EDGE_BUSY] = tiers.edge.per_call_overhead_s * tiers.edge_slowdown
        theta[F_CLOUD_BUSY] = tiers.cloud.per_call_overhead_s * tiers.cloud_slowdown
        theta[F_ONE] = tiers.device.per_call_overhead_s * tiers.device_slowdown
        return theta


@dataclass
class UnitCosts:
    """Per-node seconds on each tier (load included) and per-tensor seconds on each link: what the
    min-cut and MILP solvers price. Equal to the feature model node by node."""

    device_s: np.ndarray
    edge_s: np.ndarray  # includes the edge-LAN gather of a non-tileable node's tiled inputs
    cloud_s: np.ndarray
    de_s: np.ndarray  # seconds to send node i's tensor device->edge (with the scatter inside the cluster)
    dc_s: np.ndarray
    ec_s: np.ndarray  # edge->cloud (with the gather of a tiled tensor first)
    ret_edge_s: np.ndarray  # seconds to return output i from the edge / cloud (bytes only)
    ret_cloud_s: np.ndarray
    theta: np.ndarray


def unit_costs(cg: CostGraph, cond: Conditions) -> UnitCosts:
    theta = cond.theta()
    tiers, share = cond.tiers, cond.outside_share
    ee = theta[F_EE_BYTES] * share
    em = cg.edge_model(cond.edge_weights)
    edge_seconds = cg.base_seconds(tiers.edge) * em.factor * theta[F_EDGE_S]
    # a tiled tensor leaving the edge is gathered first, unless its producer gathers it anyway (boundary)
    gather = np.where(cg.tileable & ~em.boundary, cg.out_bytes, 0.0) * ee
    lan_bytes = cg.serial_gather_bytes + em.rescatter_bytes + np.where(em.boundary, cg.out_bytes, 0.0)
    return UnitCosts(
        device_s=cg.base_seconds(tiers.device) * theta[F_DEVICE_S],
        edge_s=edge_seconds + lan_bytes * ee,
        cloud_s=cg.base_seconds(tiers.cloud) * theta[F_CLOUD_S],
        de_s=cg.out_bytes * theta[F_DE_BYTES] + em.entry_scatter(cg.out_bytes) * ee,
        dc_s=cg.out_bytes * theta[F_DC_BYTES],
        ec_s=cg.out_bytes * theta[F_EC_BYTES] + gather,
        ret_edge_s=cg.out_bytes * theta[F_RET_E_BYTES] + gather,
        ret_cloud_s=cg.out_bytes * theta[F_RET_C_BYTES],
        theta=theta,
    )


def features(cg: CostGraph, labels: np.ndarray, cond: Conditions) -> np.ndarray:
    """The feature vector of an assignment (labels: 0/1/2 per node of ``cg.names``)."""
    labels = np.asarray(labels, dtype=np.int64)
    share = cond.outside_share
    has = np.zeros((cg.n, 3), dtype=bool)
    has[cg.src, labels[cg.dst]] = True
    on_device, on_edge, on_cloud = labels == 0, labels == 1, labels == 2
    de = on_device & has[:, 1]
    dc = on_device & has[:, 2]
    ec = on_edge & has[:, 2]
    out_labels = labels[cg.outputs]
    ret_e = cg.outputs[out_labels == 1]
    ret_c = cg.outputs[out_labels == 2]
    em = cg.edge_model(cond.edge_weights)
    exit_gather = np.where(cg.tileable & ~em.boundary, cg.out_bytes, 0.0)
    lan_bytes = cg.serial_gather_bytes + em.rescatter_bytes + np.where(em.boundary, cg.out_bytes, 0.0)
    f = np.zeros(N_FEATURES)
    f[F_DEVICE_S] = cg.base_seconds(cond.tiers.device)[on_device].sum()
    f[F_EDGE_S] = (cg.base_seconds(cond.tiers.edge) * em.factor)[on_edge].sum()
    f[F_CLOUD_S] = cg.base_seconds(cond.tiers.cloud)[on_cloud].sum()
    f[F_DE_BYTES] = cg.out_bytes[de].sum()
    f[F_DC_BYTES] = cg.out_bytes[dc].sum()
    f[F_EC_BYTES] = cg.out_bytes[ec].sum()
    f[F_EE_BYTES] = share * (em.entry_scatter(cg.out_bytes)[de].sum() + exit_gather[ec].sum()
                             + exit_gather[ret_e].sum() + lan_bytes[on_edge].sum())
    f[F_RET_E_BYTES] = cg.out_bytes[ret_e].sum()
    f[F_RET_C_BYTES] = cg.out_bytes[ret_c].sum()
    f[F_DE_USED] = float(de.any())
    f[F_DC_USED] = float(dc.any())
    f[F_EC_USED] = float(ec.any())
    f[F_RET_E_USED] = float(len(ret_e) > 0)
    f[F_RET_C_USED] = float(len(ret_c) > 0)
    f[F_EDGE_BUSY] = float(on_edge.any())
    f[F_CLOUD_BUSY] = float(on_cloud.any())
    f[F_ONE] = 1.0
    return f


def stage_seconds(f: np.ndarray, theta: np.ndarray) -> dict[str, float]:
    return {stage: float(sum(f[k] * theta[k] for k in keys)) for stage, keys in STAGE_FEATURES.items()}


PIPELINE_STAGES = ("device", "edge", "cloud", "device->edge", "device->cloud", "edge->cloud", "edge->device",
                   "cloud->device")


def pipeline_stage_seconds(f: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Seconds of each pipeline stage (``PIPELINE_STAGES``): compute per tier, bytes per link direction;
    RTTs overlap in a pipeline and do not limit the rate."""
    return np.array([
        f[F_DEVICE_S] * theta[F_DEVICE_S] + theta[F_ONE],
        f[F_EDGE_S] * theta[F_EDGE_S] + f[F_EE_BYTES] * theta[F_EE_BYTES] + f[F_EDGE_BUSY] * theta[F_EDGE_BUSY],
        f[F_CLOUD_S] * theta[F_CLOUD_S] + f[F_CLOUD_BUSY] * theta[F_CLOUD_BUSY],
        f[F_DE_BYTES] * theta[F_DE_BYTES], f[F_DC_BYTES] * theta[F_DC_BYTES], f[F_EC_BYTES] * theta[F_EC_BYTES],
        f[F_RET_E_BYTES] * theta[F_RET_E_BYTES], f[F_RET_C_BYTES] * theta[F_RET_C_BYTES],
    ])


def bottleneck_seconds(f: np.ndarray, theta: np.ndarray) -> float:
    """Throughput objective: the slowest pipeline stage."""
    return float(pipeline_stage_seconds(f, theta).max())


def weighted_unit_costs(cg: CostGraph, cond: Conditions, weights: np.ndarray) -> UnitCosts:
    """Unit costs of ``sum_k weights[k] * pipeline stage k`` (same order as ``PIPELINE_STAGES``): a
    weighted sum of the stages is priced like a latency (RTTs zero), so the min cut minimises it."""
    w_dev, w_edge, w_cloud, w_de, w_dc, w_ec, w_rete, w_retc = (float(x) for x in weights)
    theta = cond.theta()
    ee = theta[F_EE_BYTES] * cond.outside_share
    em = cg.edge_model(cond.edge_weights)
    gather = np.where(cg.tileable & ~em.boundary, cg.out_bytes, 0.0) * ee
    lan_bytes = cg.serial_gather_bytes + em.rescatter_bytes + np.where(em.boundary, cg.out_bytes, 0.0)
    edge_s = cg.base_seconds(cond.tiers.edge) * em.factor * theta[F_EDGE_S] + lan_bytes * ee
    weighted = np.zeros(N_FEATURES)
    weighted[F_ONE] = w_dev * theta[F_ONE]
    weighted[F_EDGE_BUSY] = w_edge * theta[F_EDGE_BUSY]
    weighted[F_CLOUD_BUSY] = w_cloud * theta[F_CLOUD_BUSY]
    return UnitCosts(
        device_s=w_dev * cg.base_seconds(cond.tiers.device) * theta[F_DEVICE_S],
        edge_s=w_edge * edge_s,
        cloud_s=w_cloud * cg.base_seconds(cond.tiers.cloud) * theta[F_CLOUD_S],
        de_s=w_de * cg.out_bytes * theta[F_DE_BYTES] + w_edge * em.entry_scatter(cg.out_bytes) * ee,
        dc_s=w_dc * cg.out_bytes * theta[F_DC_BYTES],
        ec_s=w_ec * cg.out_bytes * theta[F_EC_BYTES] + w_edge * gather,
        ret_edge_s=w_rete * cg.out_bytes * theta[F_RET_E_BYTES] + w_edge * gather,
        ret_cloud_s=w_retc * cg.out_bytes * theta[F_RET_C_BYTES],
        theta=weighted,
    )


def link_bytes(f: np.ndarray) -> dict[str, int]:
    return {"device->edge": int(f[F_DE_BYTES]), "device->cloud": int(f[F_DC_BYTES]),
            "edge->cloud": int(f[F_EC_BYTES]), "edge->device": int(f[F_RET_E_BYTES]),
            "cloud->device": int(f[F_RET_C_BYTES]), "edge<->edge": int(round(f[F_EE_BYTES]))}


# --- assignments <-> label arrays -----------------------------------------------------------------

def labels_of(graph: ModelGraph, assignment: Mapping[str, int | str]) -> np.ndarray:
    cg = cost_graph(graph)
    tiers = normalise_assignment(graph, assignment)  # checks names, tiers and monotonicity
    return np.array([tiers[name] for name in cg.names], dtype=np.int64)


def assignment_of(graph: ModelGraph, labels: np.ndarray) -> dict[str, str]:
    cg = cost_graph(graph)
    return {name: TIERS[int(labels[i])] for i, name in enumerate(cg.names) if i >= cg.n_inputs}


def latency_s(cg: CostGraph, labels: np.ndarray, cond: Conditions) -> float:
    return float(features(cg, labels, cond) @ cond.theta())


def predict_plan_ms(graph: ModelGraph, plan, links: Links, tiers: TierModels
                    ) -> tuple[float, dict[str, float], dict[str, int]]:
    """(total ms, ms per stage, bytes per link) of ``plan`` (a Plan or an assignment dict) under the
    given links and tier models; the edge runs over ``plan.edge_weights``."""
    assignment = plan.assignment if hasattr(plan, "assignment") else plan
    weights = tuple(plan.edge_weights) if hasattr(plan, "edge_weights") else (1.0,)
    cond = Conditions(links, tiers, weights)
    cg = cost_graph(graph)
    f = features(cg, labels_of(graph, assignment), cond)
    stages = {k: v * 1e3 for k, v in stage_seconds(f, cond.theta()).items()}
    return float(sum(stages.values())), stages, link_bytes(f)


def predict_bottleneck_ms(graph: ModelGraph, plan, links: Links, tiers: TierModels) -> float:
    cond = Conditions(links, tiers, tuple(getattr(plan, "edge_weights", (1.0,))))
    cg = cost_graph(graph)
    f = features(cg, labels_of(graph, plan.assignment if hasattr(plan, "assignment") else plan), cond)
    return bottleneck_seconds(f, cond.theta()) * 1e3


def tiled_edge_ms(graph: ModelGraph, plan, links: Links, tiers: TierModels) -> float:
    """The edge stage of ``plan`` (ms) priced from the real tiling plan of its actual edge segment
    (``plan_edge_tiling`` over ``plan.edge_weights``): per tiled stage its slowest tile, halo included,
    and every tile's input and output rectangles that cross the edge LAN; serial stages on the
    coordinator. The planner's calibrated ``stages_ms["edge"]`` should agree with it (a check, not fast)."""
    from partitioner.halo import region_area
    from partitioner.segments import build_segments
    from partitioner.tiling import TiledStage, plan_edge_tiling

    weights = tuple(float(w) for w in getattr(plan, "edge_weights", (1.0,)))
    cond = Conditions(links, tiers, weights)
    theta, cg = cond.theta(), cost_graph(graph)
    segment = build_segments(graph, plan.assignment if hasattr(plan, "assignment") else plan).segments[1]
    if not segment.node_names:
        return 0.0
    tiling = plan_edge_tiling(graph, segment.node_names, segment.input_names, segment.output_names, weights)
    node_s = cg.base_seconds(tiers.edge) * theta[F_EDGE_S]
    pixel_bytes = lambda name: _pixel_bytes(graph, name)  # noqa: E731

    seconds, lan_bytes = theta[F_EDGE_BUSY], 0.0
    for stage in tiling.stages:
        work_s = float(node_s[[cg.index[name] for name in stage.nodes]].sum())
        if not isinstance(stage, TiledStage) or stage.flops <= 0:
            seconds += work_s / weights[0]
            continue
        seconds += work_s * max(t.flops / weights[t.node] for t in stage.tiles) / stage.flops
        for tile in stage.tiles:
            if tile.node != 0:  # the coordinator holds the whole maps already
                lan_bytes += sum(pixel_bytes(n) * region_area(r) for n, r in tile.input_regions.items())
                lan_bytes += sum(pixel_bytes(n) * region_area(r) for n, r in tile.output_regions.items())
    return (seconds + lan_bytes * theta[F_EE_BYTES]) * 1e3

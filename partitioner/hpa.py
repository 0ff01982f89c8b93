"""HPA: the horizontal partition of a model DAG into device / edge / cloud, as a minimum s-t cut.

Each work node v gets two binary variables a_v = [tier >= edge] and b_v = [tier >= cloud] (Ishikawa's
construction for ordered labels): a chain s -> v1 -> v2 -> t whose cut edge is v's tier and whose
capacity is v's compute time there. Infinite edges u1 -> w1 and u2 -> w2 for every DAG edge u -> w keep
the assignment monotone (data only flows device -> edge -> cloud). A tensor read by several consumers is
priced once per link with an auxiliary node, as DADS does: consumers pull the auxiliary node to the
source side with infinite edges, and one edge back to the producer carries the transfer time.

Two costs are not cut-representable and are handled outside the cut:

* An RTT is paid once when any byte crosses a link. We enumerate which links may be used (device only;
  device+cloud; device+edge; device->edge->cloud; all three) and add their RTTs as constants; a pattern
  that forbids a link gives its edges infinite capacity.
* When all three links are allowed, "each tensor once per link" is not submodular (a device tensor read on
  both the edge and the cloud pays both links). The cut uses the tightest cut-representable lower bound of
  that price; every candidate is then priced exactly by the cost model, and a short local search (single
  node moves) closes what is left when the exact price exceeds the cut's lower bound.

scipy's Dinic max-flow (C, integer capacities) does the cut; the flow network's structure is built once per
graph with numpy and only the capacities change between solves. The exact MILP in ``oracle.py`` checks it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from partitioner.cost import (F_DC_BYTES, F_DC_USED, F_DE_BYTES, F_DE_USED, F_EC_BYTES, F_EC_USED, F_EDGE_BUSY,
                              F_EE_BYTES, F_CLOUD_BUSY, F_ONE, F_RET_C_BYTES, F_RET_C_USED, F_RET_E_BYTES,
                              F_RET_E_USED, Conditions, CostGraph, Links, TierModels, UnitCosts,
                              assignment_of, bottleneck_seconds, cost_graph, features, link_bytes,
                              pipeline_stage_seconds, stage_seconds, unit_costs, weighted_unit_costs)
from partitioner.graph import ModelGraph
from partitioner.plan import Plan

MAX_FLOW_UNITS = 2 ** 28  # the optimum is scaled to this many integer units (scipy's flow is int32)

# Link-usage patterns: (edge allowed, device->cloud allowed, edge->cloud allowed).
PATTERNS = ((False, False, False), (False, True, False), (True, False, False), (True, False, True),
            (True, True, True))


@dataclass
class _Network:
    """The flow network of one graph: node numbering and the edge list in capacity-group order."""

    size: int
    work: np.ndarray  # cost-graph indices of the work nodes
    matrix: sp.csr_matrix
    perm: np.ndarray  # csr data slot -> position in the capacity vector
    producers: np.ndarray  # cost-graph indices of nodes whose tensor is read by someone
    v1: np.ndarray  # flow-network node of a_v, per cost-graph node (inputs: the sink)
    v2: np.ndarray
    n_infinite: int


def _network(cg: CostGraph) -> _Network:
    cached = getattr(cg, "_network", None)
    if cached is not None:
        return cached
    n_work = cg.n - cg.n_inputs
    work = np.arange(cg.n_inputs, cg.n)
    v1 = np.ones(cg.n, dtype=np.int64)  # inputs sit on the sink side (tier 0) in both layers
    v2 = np.ones(cg.n, dtype=np.int64)
    v1[work] = 2 + 2 * np.arange(n_work)
    v2[work] = 3 + 2 * np.arange(n_work)
    # A tensor read by one work node needs no auxiliary nodes: its transfer edges go straight from the
    # reader back to the producer (half the flow network on a CNN, where most tensors have one reader).
    readers = np.bincount(cg.src, minlength=cg.n)
    direct = (readers == 1) & (np.arange(cg.n) >= cg.n_inputs)
    all_producers = np.unique(cg.src)
    aux_producers = all_producers[~direct[all_producers]]
    direct_producers = all_producers[direct[all_producers]]
    reader_of = np.zeros(cg.n, dtype=np.int64)
    reader_of[cg.src] = cg.dst
    producers = np.concatenate([aux_producers, direct_producers])
    aux_base = 2 + 2 * n_work
    m1 = aux_base + 3 * np.arange(len(aux_producers))
    m2, m3 = m1 + 1, m1 + 2
    aux_of = np.full(cg.n, -1)
    aux_of[aux_producers] = np.arange(len(aux_producers))
    size = aux_base + 3 * len(aux_producers)

    work_edges = cg.src >= cg.n_inputs  # both ends are work nodes (consumers always are)
    via_aux = ~direct[cg.src]
    consumer_aux = aux_of[cg.src[via_aux]]
    reader = reader_of[direct_producers]
    rows = [np.zeros(n_work, dtype=np.int64), v1[work], v2[work],  # finite: unary chain
            v2[work], v1[cg.src[work_edges]], v2[cg.src[work_edges]],  # infinite from here
            v1[cg.dst[via_aux]], v2[cg.dst[via_aux]], v2[cg.dst[via_aux]],
            m1, v1[reader], m2, v2[reader], m3, v2[reader]]  # finite: transfers (alpha, beta, gamma)
    cols = [v1[work], v2[work], np.ones(n_work, dtype=np.int64),
            v1[work], v1[cg.dst[work_edges]], v2[cg.dst[work_edges]],
            m1[consumer_aux], m2[consumer_aux], m3[consumer_aux],
            v1[aux_producers], v1[direct_producers], v1[aux_producers], v1[direct_producers],
            v2[aux_producers], v2[direct_producers]]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    n_infinite = n_work + 2 * int(work_edges.sum()) + 3 * int(via_aux.sum())
    slots = np.arange(1, len(rows) + 1)
    matrix = sp.csr_matrix((slots, (rows, cols)), shape=(size, size))
    matrix.sum_duplicates()
    if len(matrix.data) != len(rows):
        raise AssertionError("flow network has parallel edges")
    network = _Network(size, work, matrix, matrix.data.astype(np.int64) - 1, producers, v1, v2, n_infinite)
    matrix.data = matrix.data.astype(np.int32)
    cg._network = network
    return network


def _transfer_prices(uc: UnitCosts, pattern) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Capacities (alpha, beta, gamma) of the three auxiliary terms per tensor:
    alpha [x_u = device and some consumer >= edge], beta [x_u = device and some consumer = cloud],
    gamma [x_u <= edge and some consumer = cloud]."""
    edge, device_cloud, edge_cloud = pattern
    de, dc, ec = uc.de_s, uc.dc_s, uc.ec_s
    zero = np.zeros_like(de)
    if not edge:
        return zero, dc, zero
    if not device_cloud and not edge_cloud:
        return de, zero, zero
    if not device_cloud:
        return de, np.full_like(de, np.inf), ec
    gamma = np.minimum(ec, dc)  # lower bound of the exact price (tight unless a device tensor feeds both)
    alpha = np.minimum(de, dc - gamma)
    return alpha, dc - alpha - gamma, gamma


def _pattern_constant(theta: np.ndarray, pattern) -> float:
    edge, device_cloud, edge_cloud = pattern
    constant = theta[F_ONE]
    if edge:
        constant += theta[F_DE_USED] + theta[F_EDGE_BUSY]
    if device_cloud:
        constant += theta[F_DC_USED]
    if edge_cloud:
        constant += theta[F_EC_USED]
    if device_cloud or edge_cloud:
        constant += theta[F_CLOUD_BUSY]
    return float(constant)


def _solve_pattern(cg: CostGraph, net: _Network, uc: UnitCosts, pattern) -> tuple[np.ndarray, float]:
    """Min cut for one link pattern: (labels, the cut's price in seconds: a lower bound of their exact cost)."""
    edge, device_cloud, edge_cloud = pattern
    work = net.work
    device_s = uc.device_s[work]
    edge_s = uc.edge_s[work].copy()
    cloud_s = uc.cloud_s[work].copy()
    outputs = cg.outputs[cg.outputs >= cg.n_inputs] - cg.n_inputs
    edge_s[outputs] += uc.ret_edge_s[cg.outputs[cg.outputs >= cg.n_inputs]] + uc.theta[F_RET_E_USED]
    cloud_s[outputs] += uc.ret_cloud_s[cg.outputs[cg.outputs >= cg.n_inputs]] + uc.theta[F_RET_C_USED]
    if not edge:
        edge_s[:] = np.inf
    if not (device_cloud or edge_cloud):
        cloud_s[:] = np.inf
    alpha, beta, gamma = _transfer_prices(uc, pattern)
    producers = net.producers
    finite_head = np.concatenate([device_s, edge_s, cloud_s])
    finite_tail = np.concatenate([alpha[producers], beta[producers], gamma[producers]])
    # Everything on the device is a feasible cut of value sum(device_s): no min cut is dearer, so
    # capacities above twice that never decide a cut and are clamped before scaling to integers.
    bound = max(float(device_s.sum()), 1e-12)
    scale = MAX_FLOW_UNITS / bound
    head = np.rint(np.minimum(finite_head, 2 * bound) * scale)
    tail = np.rint(np.minimum(finite_tail, 2 * bound) * scale)
    caps = np.concatenate([head, np.full(net.n_infinite, 2 ** 30), tail]).astype(np.int32)
    matrix = net.matrix
    matrix.data = caps[net.perm]
    result = maximum_flow(matrix, 0, 1)
    residual = (matrix - result.flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    source_side = np.zeros(net.size, dtype=bool)
    source_side[breadth_first_order(residual, 0, directed=True, return_predecessors=False)] = True
    labels = np.zeros(cg.n, dtype=np.int64)
    labels[work] = source_side[net.v1[work]].astype(np.int64) + source_side[net.v2[work]]
    return labels, result.flow_value / scale + _pattern_constant(uc.theta, pattern)


@dataclass
class Solution:
    labels: np.ndarray
    features: np.ndarray
    seconds: float  # the objective under the conditions it was solved for
    lower_bound_s: float
    candidates: list[np.ndarray]  # every distinct cut found (the re-partitioner keeps them as a library)


def objective_seconds(f: np.ndarray, theta: np.ndarray, objective: str) -> float:
    return bottleneck_seconds(f, theta) if objective == "throughput" else float(f @ theta)


def _local_search(cg: CostGraph, cond: Conditions, labels: np.ndarray, seconds: float, theta: np.ndarray,
                  allowed: Sequence[int], objective: str, max_rounds: int = 20) -> tuple[np.ndarray, float]:
    """Move single nodes one tier up or down (keeping monotone) while that lowers the exact price."""
    producers_of = getattr(cg, "_producers_of", None)
    if producers_of is None:
        producers_of = [cg.src[cg.dst == i] for i in range(cg.n)]
        consumers_of = [cg.dst[cg.src == i] for i in range(cg.n)]
        cg._producers_of, cg._consumers_of = producers_of, consumers_of
    consumers_of = cg._consumers_of
    labels = labels.copy()
    for _ in range(max_rounds):
        best = (seconds, None, None)
        for i in range(cg.n_inputs, cg.n):
            low = labels[producers_of[i]].max() if len(producers_of[i]) else 0
            high = labels[consumers_of[i]].min() if len(consumers_of[i]) else 2
            for new in (labels[i] - 1, labels[i] + 1):
                if low <= new <= high and new in allowed:
                    old, labels[i] = labels[i], new
                    price = objective_seconds(features(cg, labels, cond), theta, objective)
                    labels[i] = old
                    if price < best[0] - 1e-12:
                        best = (price, i, new)
        if best[1] is None:
            break
        seconds = best[0]
        labels[best[1]] = best[2]
    return labels, seconds


def solve(cg: CostGraph, cond: Conditions, allowed_tiers: Sequence[int] = (0, 1, 2), objective: str = "latency",
          refine_gap: float = 0.002, edge_patterns_only: bool = False) -> Solution:
    """The best assignment under ``cond`` using only ``allowed_tiers`` (``edge_patterns_only``: only the
    link patterns that use the edge, for a second solve with other edge weights)."""
    if objective == "throughput":
        return solve_throughput(cg, cond, allowed_tiers)
    net = _network(cg)
    uc = unit_costs(cg, cond)
    theta = uc.theta
    patterns = [p for p in PATTERNS if (1 in allowed_tiers or not p[0]) and (2 in allowed_tiers or not (p[1] or p[2]))
                and (p[0] or not edge_patterns_only)]
    candidates, lower_bound = [], np.inf
    for pattern in patterns:
        if pattern == (False, False, False):
            labels, price = np.zeros(cg.n, dtype=np.int64), None
        else:
            labels, price = _solve_pattern(cg, net, uc, pattern)
            lower_bound = min(lower_bound, price)
        if not any(np.array_equal(labels, c) for c in candidates):
            candidates.append(labels)
    feats = [features(cg, c, cond) for c in candidates]
    prices = [float(f @ theta) for f in feats]
    best = int(np.argmin(prices))
    labels, seconds = candidates[best], prices[best]
    lower_bound = min(lower_bound, seconds)
    if seconds > lower_bound * (1 + refine_gap):
        labels, seconds = _local_search(cg, cond, labels, seconds, theta, allowed_tiers, objective)
        if not any(np.array_equal(labels, c) for c in candidates):
            candidates.append(labels)
    return Solution(labels, features(cg, labels, cond), seconds, lower_bound, candidates)


@dataclass
class _ChainCuts:
    """Bytes crossing each link for every two-cut split of the topological order (device: positions < i,
    edge: [i, j), cloud: >= j), as (m+1) x (m+1) matrices over (i, j); per graph, prices applied later."""

    m: int
    order: np.ndarray  # cost-graph indices of the work nodes in this topological order
    de_index: tuple[np.ndarray, np.ndarray, np.ndarray]  # (i, j, producer): producer's tensor starts crossing
    dc_bytes: np.ndarray
    ec_index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # rectangle corners per producer
    outputs: np.ndarray  # positions of work-node outputs
    cache: dict


def _topological_orders(cg: CostGraph) -> list[np.ndarray]:
    """The program order, and the order that always runs the ready node latest in program order (each
    fork's other branch first), so that a split putting parallel branches on different tiers is a
    two-cut split of one of them."""
    import heapq

    indegree = np.bincount(cg.dst, minlength=cg.n)
    consumers = [[] for _ in range(cg.n)]
    for u, v in zip(cg.src.tolist(), cg.dst.tolist()):
        consumers[u].append(v)
    ready = [-v for v in range(cg.n) if indegree[v] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        v = -heapq.heappop(ready)
        order.append(v)
        for c in consumers[v]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, -c)
    late_first = np.array([v for v in order if v >= cg.n_inputs], dtype=np.int64)
    program = np.arange(cg.n_inputs, cg.n)
    return [program] if np.array_equal(late_first, program) else [program, late_first]


def _all_chain_cuts(cg: CostGraph) -> list["_ChainCuts"]:
    cached = getattr(cg, "_chain_cuts", None)
    if cached is None:
        cached = cg._chain_cuts = [_chain_cuts(cg, order) for order in _topological_orders(cg)]
    return cached


def _chain_cuts(cg: CostGraph, order: np.ndarray) -> _ChainCuts:
    m = cg.n - cg.n_inputs
    position = np.full(cg.n, -1)  # model inputs: before everything (always on the device)
    position[order] = np.arange(m)
    rows, cols, owners, dc = [], [], [], np.zeros((m + 2, m + 2))
    ec_corners = []
    for p in np.unique(cg.src):
        readers = np.sort(position[cg.dst[cg.src == p]])
        own, last, size = max(position[p], -1), readers[-1], cg.out_bytes[p]
        starts = np.arange(own + 1, last + 1)  # i: the producer is on the device
        # device->edge from cut i on, when its first reader at or after i is on the edge (j beyond it)
        rows.append(starts)
        cols.append(readers[np.searchsorted(readers, starts)] + 1)
        owners.append(np.full(len(starts), p))
        dc[own + 1, 0] += size  # device->cloud: i > own and j <= last reader
        dc[own + 1, last + 1] -= size
        if position[p] >= 0:  # edge->cloud: i <= own < j <= last reader
            ec_corners.append((p, own, last))
    dc_bytes = np.cumsum(np.cumsum(dc, axis=1), axis=0)[:m + 1, :m + 1]
    ec = np.array(ec_corners, dtype=np.int64).reshape(-1, 3)
    result = _ChainCuts(m, order, (np.concatenate(rows), np.concatenate(cols), np.concatenate(owners)), dc_bytes,
                        (ec[:, 0], ec[:, 1], ec[:, 2], np.zeros(0)), cg.outputs[cg.outputs >= cg.n_inputs]
                        - cg.n_inputs, {})
    return result


def _crossing(chain: _ChainCuts, key: str, de_bytes: np.ndarray | None = None,
              ec_bytes: np.ndarray | None = None) -> np.ndarray:
    """Bytes per (i, j) of the tensors crossing device->edge (weighted by ``de_bytes``) or edge->cloud."""
    if key in chain.cache:
        return chain.cache[key]
    m = chain.m
    grid = np.zeros((m + 2, m + 2))
    if de_bytes is not None:
        i, j, p = chain.de_index
        np.add.at(grid, (i, j), de_bytes[p])
        result = np.cumsum(grid, axis=1)[:m + 1, :m + 1]
    else:
        p, own, last, _ = chain.ec_index
        size = ec_bytes[p]
        for r, c, sign in ((0, own + 1, 1), (0, last + 1, -1), (own + 1, own + 1, -1), (own + 1, last + 1, 1)):
            np.add.at(grid, (np.broadcast_to(r, p.shape), c), sign * size)
        result = np.cumsum(np.cumsum(grid, axis=1), axis=0)[:m + 1, :m + 1]
    if len(chain.cache) > 64:
        chain.cache.clear()
    chain.cache[key] = result
    return result


def chain_stage_seconds(cg: CostGraph, cond: Conditions, chain: _ChainCuts) -> np.ndarray:
    """Pipeline stage seconds (``PIPELINE_STAGES`` x (m+1) x (m+1)) of every two-cut split of the
    chain's topological order; entries with j < i are infinite."""
    uc, theta, m = unit_costs(cg, cond), cond.theta(), chain.m
    em = cg.edge_model(cond.edge_weights)
    weights_key = tuple(cond.edge_weights)
    ee = theta[F_EE_BYTES] * cond.outside_share
    exit_gather = np.where(cg.tileable & ~em.boundary, cg.out_bytes, 0.0)
    de = _crossing(chain, "de", de_bytes=cg.out_bytes)
    dc = chain.dc_bytes
    ec = _crossing(chain, "ec", ec_bytes=cg.out_bytes)
    scatter = _crossing(chain, f"scatter{weights_key}", de_bytes=em.entry_scatter(cg.out_bytes))
    gather = _crossing(chain, f"gather{weights_key}", ec_bytes=exit_gather)
    work = chain.order
    prefix = lambda values: np.concatenate([[0.0], np.cumsum(values[work])])  # noqa: E731
    device, edge, cloud = prefix(uc.device_s), prefix(uc.edge_s), prefix(uc.cloud_s)
    out_e, out_c = np.zeros(cg.n), np.zeros(cg.n)
    out_e[cg.outputs] = cg.out_bytes[cg.outputs]
    out_c[cg.outputs] = exit_gather[cg.outputs]
    returned, returned_gather = prefix(out_e), prefix(out_c)
    i, j = np.arange(m + 1)[:, None], np.arange(m + 1)[None, :]
    edge_used, cloud_used = (j > i).astype(float), (j < m).astype(float)
    stages = np.empty((8, m + 1, m + 1))
    stages[0] = device[i] + theta[F_ONE] + 0 * j
    stages[1] = (edge[j] - edge[i] + ee * (scatter + gather + returned_gather[j] - returned_gather[i])
                 + edge_used * theta[F_EDGE_BUSY])
    stages[2] = cloud[m] - cloud[j] + cloud_used * theta[F_CLOUD_BUSY] + 0 * i
    stages[3] = de * theta[F_DE_BYTES]
    stages[4] = dc * theta[F_DC_BYTES]
    stages[5] = ec * theta[F_EC_BYTES]
    stages[6] = (returned[j] - returned[i]) * theta[F_RET_E_BYTES]
    stages[7] = (returned[m] - returned[j] + 0 * i) * theta[F_RET_C_BYTES]
    stages[:, j < i] = np.inf
    return stages


def _dual_weights(planes: np.ndarray) -> tuple[np.ndarray, float]:
    """argmax over the simplex of min_l weights . planes[l] (a small LP), and that max."""
    from scipy.optimize import linprog

    count, stages = planes.shape
    cost = np.zeros(stages + 1)
    cost[-1] = -1.0  # maximise t
    scale = max(float(planes.max()), 1e-12)
    a_ub = np.hstack([-planes / scale, np.ones((count, 1))])  # t <= w . S_l
    result = linprog(cost, A_ub=a_ub, b_ub=np.zeros(count), A_eq=np.append(np.ones(stages), 0.0)[None, :],
                     b_eq=[1.0], bounds=[(0, None)] * stages + [(None, None)], method="highs")
    if result.x is None:
        return np.full(stages, 1.0 / stages), np.inf
    return np.maximum(result.x[:stages], 1e-9), float(-result.fun * scale)


def solve_throughput(cg: CostGraph, cond: Conditions, allowed_tiers: Sequence[int] = (0, 1, 2),
                     iterations: int = 20) -> Solution:
    """Minimise the slowest pipeline stage (a min-max: NP-hard over all DAG assignments, so no min cut
    solves it exactly). Candidates: the exact optimum over every two-cut split of the topological order
    (all (i, j) at once from per-graph crossing-byte matrices, a few ms), the latency planner's cuts, and
    min cuts of weighted stage sums whose weights solve the Lagrangian dual by Kelley's cutting planes
    (the cuts that balance the bottleneck stages, e.g. one branch up each link); a local search polishes
    the best. The MILP in ``oracle.py`` is the exact check (tests, bench)."""
    theta = cond.theta()
    m = cg.n - cg.n_inputs
    candidates = []
    for chain_cuts in _all_chain_cuts(cg):
        bottleneck = chain_stage_seconds(cg, cond, chain_cuts).max(axis=0)
        i, j = np.arange(m + 1)[:, None], np.arange(m + 1)[None, :]
        allowed = np.ones_like(bottleneck, dtype=bool)
        if 0 not in allowed_tiers:
            allowed &= i == 0
        if 1 not in allowed_tiers:
            allowed &= i == j
        if 2 not in allowed_tiers:
            allowed &= j == m
        cut_i, cut_j = divmod(int(np.argmin(np.where(allowed, bottleneck, np.inf))), m + 1)
        chain = np.zeros(cg.n, dtype=np.int64)
        chain[chain_cuts.order[cut_i:]] = 1
        chain[chain_cuts.order[cut_j:]] = 2
        candidates.append(chain)
    candidates += list(solve(cg, cond, allowed_tiers).candidates)
    net = _network(cg)
    # every link pattern: with one stage weighted lightly the all-links cut alone underprices the others
    patterns = [p for p in PATTERNS if any(p) and (1 in allowed_tiers or not p[0])
                and (2 in allowed_tiers or not (p[1] or p[2]))]
    planes = [pipeline_stage_seconds(features(cg, c, cond), theta) for c in candidates]
    upper = min(float(plane.max()) for plane in planes)
    lower = 0.0
    for _ in range(iterations if patterns else 0):
        # Kelley's cutting planes on the Lagrangian dual: the stage weights that maximise the lowest
        # weighted sum over the cuts found so far; the min cuts for them are the next cuts
        weights, dual_upper = _dual_weights(np.array(planes))
        uc = weighted_unit_costs(cg, cond, weights)
        solved = [_solve_pattern(cg, net, uc, pattern) for pattern in patterns]
        lower = max(lower, min(bound for _, bound in solved))
        new = [cut for cut, _ in solved if not any(np.array_equal(cut, c) for c in candidates)]
        if not new:
            break  # the dual has converged: no new cut for these weights
        for cut in new:
            candidates.append(cut)
            planes.append(pipeline_stage_seconds(features(cg, cut, cond), theta))
            upper = min(upper, float(planes[-1].max()))
        if dual_upper <= lower * (1 + 1e-6) or upper <= lower * (1 + 1e-6):
            break
    prices = [bottleneck_seconds(features(cg, c, cond), theta) for c in candidates]
    best = int(np.argmin(prices))
    labels, upper = _local_search(cg, cond, candidates[best], prices[best], theta, allowed_tiers, "throughput",
                                  max_rounds=10)
    if not any(np.array_equal(labels, c) for c in candidates):
        candidates.append(labels)
    return Solution(labels, features(cg, labels, cond), upper, min(lower, upper), candidates)


def make_plan(graph: ModelGraph, cond: Conditions, labels: np.ndarray, strategy: str) -> Plan:
    cg = cost_graph(graph)
    f = features(cg, labels, cond)
    stages = {k: v * 1e3 for k, v in stage_seconds(f, cond.theta()).items()}
    return Plan(model=graph.name, input_shape=tuple(graph.input_shape), assignment=assignment_of(graph, labels),
                edge_weights=list(cond.edge_weights), strategy=strategy, predicted_ms=float(sum(stages.values())),
                stages_ms=stages, link_bytes=link_bytes(f))


def check_objective(objective: str) -> None:
    if objective not in ("latency", "throughput"):
        raise ValueError(f"objective must be 'latency' or 'throughput', got {objective!r}")


def solve_d3(cg: CostGraph, links: Links, tiers: TierModels, edge_weights: Sequence[float],
             objective: str = "latency") -> tuple[tuple[Solution, Conditions], list[tuple[Solution, Conditions]]]:
    """Best of: the edge tiled over all ``edge_weights`` nodes, and the edge segment whole on the coordinator
    (tiling does not pay when halo and scatter/gather cost more than the split saves). The plan's
    ``edge_weights`` say which: one entry means "not tiled". Returns (best, all solved)."""
    tiled = Conditions(links, tiers, tuple(edge_weights))
    solved = [(solve(cg, tiled, objective=objective), tiled)]
    if len(tiled.edge_weights) > 1:
        whole = Conditions(links, tiers, tiled.edge_weights[:1])
        solved.append((solve(cg, whole, objective=objective, edge_patterns_only=objective == "latency"), whole))
    return min(solved, key=lambda item: item[0].seconds), solved


def plan_d3(graph: ModelGraph, links: Links, tiers: TierModels, edge_weights: Sequence[float] = (1.0,),
            objective: str = "latency") -> Plan:
    """The D3 plan: a three-way split of the DAG with the edge segment tiled over ``edge_weights`` nodes.
    ``predicted_ms`` is the one-request latency; with ``objective="throughput"`` the plan minimises the
    slowest pipeline stage instead (its value is in ``stages_ms["bottleneck"]``)."""
    check_objective(objective)
    started = time.perf_counter()
    (solution, cond), _ = solve_d3(cost_graph(graph), links, tiers, edge_weights, objective)
    plan = make_plan(graph, cond, solution.labels, "d3")
    if objective == "throughput":
        plan.stages_ms["bottleneck"] = bottleneck_seconds(solution.features, cond.theta()) * 1e3
    plan.solve_ms = (time.perf_counter() - started) * 1e3  # not a Plan field: not serialised
    return plan

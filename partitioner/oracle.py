"""Exact oracle: the optimal monotone device/edge/cloud assignment under the cost model, as a MILP.

Variables (HiGHS through ``scipy.optimize.milp``): per work node a = [tier >= edge], b = [tier >= cloud]
(binary, b <= a, a_u <= a_w and b_u <= b_w along every DAG edge); per tensor one continuous indicator per
link (sent device->edge, device->cloud, edge->cloud), bounded below by the labels of its producer and each
consumer, so each tensor is paid once per link; binary flags for "link used" (its RTT), "tier busy" (its
per-call overhead) and "result returned from the edge / cloud". The objective is the cost model's latency
exactly (or, for ``objective="throughput"``, a bottleneck variable above every stage). It is the checker
for the fast min-cut planner (``hpa.py``) in tests and benchmarks, not on the hot path.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from partitioner.cost import (F_CLOUD_BUSY, F_DC_USED, F_DE_USED, F_EC_USED, F_EDGE_BUSY, F_EE_BYTES, F_ONE,
                              F_RET_C_USED, F_RET_E_USED, F_DC_BYTES, F_DE_BYTES, F_EC_BYTES, F_RET_C_BYTES,
                              F_RET_E_BYTES, Conditions, CostGraph, bottleneck_seconds, cost_graph, features,
                              unit_costs)
from partitioner.graph import ModelGraph


class _Rows:
    """Collects sparse constraint rows  lower <= sum(coef * x) <= upper."""

    def __init__(self) -> None:
        self.rows, self.cols, self.vals, self.lower, self.upper = [], [], [], [], []

    def add(self, terms: dict[int, float], lower: float = -np.inf, upper: float = np.inf) -> None:
        row = len(self.lower)
        for col, val in terms.items():
            self.rows.append(row)
            self.cols.append(col)
            self.vals.append(val)
        self.lower.append(lower)
        self.upper.append(upper)

    def constraint(self, n_vars: int) -> LinearConstraint:
        matrix = sp.csr_array((self.vals, (self.rows, self.cols)), shape=(len(self.lower), n_vars))
        return LinearConstraint(matrix, self.lower, self.upper)


def solve_milp(cg: CostGraph, cond: Conditions, allowed_tiers: Sequence[int] = (0, 1, 2),
               objective: str = "latency", time_limit_s: float = 60.0):
    from partitioner.hpa import Solution

    uc = unit_costs(cg, cond)
    theta = uc.theta
    work = np.arange(cg.n_inputs, cg.n)
    n_work = len(work)
    producers = np.unique(cg.src)
    n_prod = len(producers)
    a = {int(v): k for k, v in enumerate(work)}
    b = {int(v): n_work + k for k, v in enumerate(work)}
    base = 2 * n_work
    y_de = {int(p): base + k for k, p in enumerate(producers)}
    y_dc = {int(p): base + n_prod + k for k, p in enumerate(producers)}
    y_ec = {int(p): base + 2 * n_prod + k for k, p in enumerate(producers)}
    flags = base + 3 * n_prod
    U_DE, U_DC, U_EC, R_E, R_C, E_BUSY, C_BUSY = range(flags, flags + 7)
    T = flags + 7
    n_vars = T + 1

    cost = np.zeros(n_vars)
    constant = float(uc.device_s[work].sum() + theta[F_ONE])
    cost[[a[v] for v in work]] = uc.edge_s[work] - uc.device_s[work]
    cost[[b[v] for v in work]] = uc.cloud_s[work] - uc.edge_s[work]
    cost[[y_de[p] for p in producers]] = uc.de_s[producers]
    cost[[y_dc[p] for p in producers]] = uc.dc_s[producers]
    cost[[y_ec[p] for p in producers]] = uc.ec_s[producers]
    outputs = [int(o) for o in cg.outputs if o >= cg.n_inputs]
    for o in outputs:  # returned from the edge if a - b = 1, from the cloud if b = 1
        cost[a[o]] += uc.ret_edge_s[o]
        cost[b[o]] += uc.ret_cloud_s[o] - uc.ret_edge_s[o]
    cost[U_DE], cost[U_DC], cost[U_EC] = theta[F_DE_USED], theta[F_DC_USED], theta[F_EC_USED]
    cost[R_E], cost[R_C] = theta[F_RET_E_USED], theta[F_RET_C_USED]
    cost[E_BUSY], cost[C_BUSY] = theta[F_EDGE_BUSY], theta[F_CLOUD_BUSY]

    rows = _Rows()
    lower, upper = np.zeros(n_vars), np.ones(n_vars)
    upper[T] = np.inf
    for v in work:
        rows.add({a[v]: 1, b[v]: -1}, lower=0)  # b <= a
        rows.add({E_BUSY: 1, a[v]: -1, b[v]: 1}, lower=0)
        rows.add({C_BUSY: 1, b[v]: -1}, lower=0)
        if 1 not in allowed_tiers:
            rows.add({a[v]: 1, b[v]: -1}, upper=0)
        if 2 not in allowed_tiers:
            upper[b[v]] = 0
        if 0 not in allowed_tiers:
            lower[a[v]] = 1
    for o in outputs:
        rows.add({R_E: 1, a[o]: -1, b[o]: 1}, lower=0)
        rows.add({R_C: 1, b[o]: -1}, lower=0)
    for p, w in zip(cg.src.tolist(), cg.dst.tolist()):
        from_input = p < cg.n_inputs
        if not from_input:
            rows.add({a[w]: 1, a[p]: -1}, lower=0)  # monotone
            rows.add({b[w]: 1, b[p]: -1}, lower=0)
        # y_de >= a_w - b_w - a_p ; y_dc >= b_w - a_p ; y_ec >= a_p - b_p + b_w - 1
        rows.add({y_de[p]: 1, a[w]: -1, b[w]: 1, **({} if from_input else {a[p]: 1})}, lower=0)
        rows.add({y_dc[p]: 1, b[w]: -1, **({} if from_input else {a[p]: 1})}, lower=0)
        if not from_input:
            rows.add({y_ec[p]: 1, a[p]: -1, b[p]: 1, b[w]: -1}, lower=-1)
    for p in producers:
        rows.add({U_DE: 1, y_de[p]: -1}, lower=0)
        rows.add({U_DC: 1, y_dc[p]: -1}, lower=0)
        rows.add({U_EC: 1, y_ec[p]: -1}, lower=0)

    integrality = np.zeros(n_vars)
    integrality[:base] = 1
    integrality[flags:flags + 7] = 1
    if objective == "throughput":
        _add_stage_rows(rows, cg, cond, uc, a, b, y_de, y_dc, y_ec, outputs, E_BUSY, C_BUSY, T)
        latency_cost = cost
        cost = latency_cost * 1e-4  # among equal bottlenecks prefer the lower latency
        cost[T] = 1.0
    result = milp(cost, constraints=rows.constraint(n_vars), integrality=integrality,
                  bounds=Bounds(lower, upper), options={"time_limit": time_limit_s, "mip_rel_gap": 1e-7})
    if result.x is None:
        raise RuntimeError(f"MILP oracle failed: {result.message}")
    x = np.rint(result.x[:base]).astype(np.int64)
    labels = np.zeros(cg.n, dtype=np.int64)
    labels[work] = x[:n_work] + x[n_work:]
    f = features(cg, labels, cond)
    seconds = bottleneck_seconds(f, theta) if objective == "throughput" else float(f @ theta)
    bound = getattr(result, "mip_dual_bound", None)
    lower_bound = float(bound) + (constant if objective != "throughput" else 0.0) if bound is not None else seconds
    return Solution(labels, f, seconds, min(lower_bound, seconds), [labels])


def _add_stage_rows(rows: _Rows, cg, cond, uc, a, b, y_de, y_dc, y_ec, outputs, E_BUSY, C_BUSY, T) -> None:
    """T >= every pipeline stage of the bottleneck objective (same terms as cost.bottleneck_seconds)."""
    theta = uc.theta
    work = range(cg.n_inputs, cg.n)
    share_ee = theta[F_EE_BYTES] * cond.outside_share
    em = cg.edge_model(cond.edge_weights)
    tiled = np.where(cg.tileable & ~em.boundary, cg.out_bytes, 0.0)  # gathered on the way out
    entry = em.entry_scatter(cg.out_bytes)  # scattered on the way in
    device_total = float(uc.device_s[list(work)].sum()) + theta[F_ONE]
    rows.add({T: 1, **{a[v]: uc.device_s[v] for v in work}}, lower=device_total)  # sum cD (1 - a) <= T
    edge_terms = {T: 1.0, E_BUSY: -theta[F_EDGE_BUSY]}
    for v in work:
        edge_terms[a[v]] = -uc.edge_s[v]
        edge_terms[b[v]] = uc.edge_s[v]
    for p in y_de:
        edge_terms[y_de[p]] = -entry[p] * share_ee
        edge_terms[y_ec[p]] = -tiled[p] * share_ee
    for o in outputs:
        edge_terms[a[o]] -= tiled[o] * share_ee
        edge_terms[b[o]] += tiled[o] * share_ee
    rows.add(edge_terms, lower=0)
    rows.add({T: 1, C_BUSY: -theta[F_CLOUD_BUSY], **{b[v]: -uc.cloud_s[v] for v in work}}, lower=0)
    for y, k in ((y_de, F_DE_BYTES), (y_dc, F_DC_BYTES), (y_ec, F_EC_BYTES)):
        rows.add({T: 1, **{y[p]: -cg.out_bytes[p] * theta[k] for p in y}}, lower=0)
    ret_e = {T: 1.0}
    for o in outputs:
        ret_e[a[o]] = -cg.out_bytes[o] * theta[F_RET_E_BYTES]
        ret_e[b[o]] = cg.out_bytes[o] * theta[F_RET_E_BYTES]
    rows.add(ret_e, lower=0)
    rows.add({T: 1, **{b[o]: -cg.out_bytes[o] * theta[F_RET_C_BYTES] for o in outputs}}, lower=0)


def oracle_plan(graph: ModelGraph, links, tiers, edge_weights=(1.0,), objective: str = "latency"):
    """The optimal Plan under the cost model (slow: a MILP)."""
    from partitioner.hpa import check_objective, make_plan

    check_objective(objective)
    cond = Conditions(links, tiers, tuple(edge_weights))
    solution = solve_milp(cost_graph(graph), cond, objective=objective)
    plan = make_plan(graph, cond, solution.labels, "oracle")
    if objective == "throughput":
        plan.stages_ms["bottleneck"] = solution.seconds * 1e3
    return plan

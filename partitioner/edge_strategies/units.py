"""Shared pieces of the strategies: the segment as layer units, share sizing by LP, share rounding.

A *unit* is one sliding-window op (conv/pool) with the element-wise ops that follow it in program order at
the same map size (a layer in the DeepZoning/CoEdge sense), or a maximal run of non-tileable nodes
(flatten, linear, global pooling), which always runs whole on the coordinator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linprog

from partitioner.graph import ModelGraph
from partitioner.halo import TileOp
from partitioner.tiling import tile_ops

from partitioner.edge_strategies.core import WINDOW_KINDS, CostModel, stage_io


@dataclass
class Unit:
    nodes: list[str]
    tileable: bool
    inputs: list[str]
    outputs: list[str]

    def base_s(self, cost: CostModel) -> float:
        return sum(cost.base_s[n] for n in self.nodes)


def layer_units(graph: ModelGraph, ordered_nodes: Sequence[str], segment_outputs: Sequence[str]) -> list[Unit]:
    ops = tile_ops(graph)
    groups: list[tuple[bool, list[str], tuple | None]] = []
    for name in ordered_nodes:
        op = ops[name]
        if not isinstance(op, TileOp):
            if groups and not groups[-1][0]:
                groups[-1][1].append(name)
            else:
                groups.append((False, [name], None))
            continue
        size = op.output_size
        if groups and groups[-1][0] and op.kind not in WINDOW_KINDS and groups[-1][2] == size:
            groups[-1][1].append(name)
        else:
            groups.append((True, [name], size))
    io = stage_io(graph, [nodes for _, nodes, _ in groups], segment_outputs)
    return [Unit(nodes, tileable, inputs, outputs) for (tileable, nodes, _), (inputs, outputs) in zip(groups, io)]


def lp_shares(work_s: Sequence[float], fixed_s: Sequence[float], link_s_per_share: Sequence[float],
              link_fixed_s: Sequence[float] | None = None) -> tuple[np.ndarray, float]:
    """Shares x_k >= 0 (sum 1) minimising the finish time T with node k busy
    ``x_k * (work_s[k] + link_s_per_share[k]) + fixed_s[k]`` (if it gets any work) and the coordinator's
    link busy ``sum x_k * link_s_per_share[k] + link_fixed_s``, both <= T. HiGHS via
    scipy.optimize.linprog.

    A node's fixed cost (e.g. receiving a whole input) only applies if it takes part, which an LP
    cannot express; so the LP is solved for the k fastest nodes, k = 1..N, and the best kept."""
    count = len(work_s)
    link_fixed_s = list(link_fixed_s) if link_fixed_s is not None else [0.0] * count
    order = sorted(range(count), key=lambda k: work_s[k] + fixed_s[k] if k else -1.0)  # node 0 always in
    best = None
    for used in range(1, count + 1):
        members = order[:used]
        n = len(members)
        # variables: x (n), T; minimise T
        c = np.zeros(n + 1)
        c[-1] = 1.0
        rows, rhs = [], []
        for j, k in enumerate(members):
            row = np.zeros(n + 1)
            row[j], row[-1] = work_s[k] + link_s_per_share[k], -1.0  # a remote node also waits for its bytes
            rows.append(row)
            rhs.append(-fixed_s[k])
        link = np.zeros(n + 1)
        for j, k in enumerate(members):
            link[j] = link_s_per_share[k]
        link[-1] = -1.0
        rows.append(link)
        rhs.append(-sum(link_fixed_s[k] for k in members if k != 0))
        equality = np.zeros((1, n + 1))
        equality[0, :n] = 1.0
        result = linprog(c, A_ub=np.array(rows), b_ub=np.array(rhs), A_eq=equality, b_eq=[1.0],
                         bounds=[(0, 1)] * n + [(0, None)], method="highs")
        if result.status != 0:
            continue
        if best is None or result.fun < best[1] - 1e-12:
            shares = np.zeros(count)
            shares[members] = result.x[:n]
            best = (shares, float(result.fun))
    if best is None:  # cannot happen for positive inputs; keep everything on the coordinator
        shares = np.zeros(count)
        shares[0] = 1.0
        return shares, float(work_s[0] + fixed_s[0])
    return best


def round_shares(shares: Sequence[float], length: int) -> list[tuple[int, int, int]]:
    """Integer ranges (start, stop, node) of [0, length) by largest remainder; empty ranges dropped."""
    shares = np.asarray(shares, dtype=float)
    shares = np.clip(shares, 0, None)
    shares = shares / shares.sum() if shares.sum() > 0 else np.eye(len(shares))[0]
    exact = shares * length
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts))[:length - counts.sum()]:
        counts[k] += 1
    ranges, start = [], 0
    for node, size in enumerate(counts):
        if size > 0:
            ranges.append((start, start + int(size), node))
            start += int(size)
    return ranges

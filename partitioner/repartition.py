"""Incremental re-partitioning: keep the plan right as bandwidths and tier loads change, cheaply.

For a fixed assignment every stage of the cost model is linear in a small parameter vector theta (tier
slowdowns, seconds per byte of each link, half RTTs, overheads; see ``cost.py``), so a plan is a feature
vector and its latency under new conditions is one dot product. The re-partitioner keeps a *library*: every
distinct cut the min-cut planner has produced (each full re-plan yields up to five, one per link pattern,
plus the local-search result). One ``update``:

1. prices the whole library under the new conditions (one small matrix-vector product);
2. the local move: the cheapest library cut. It is accepted without solving when it is *certified*
   within ``tolerance`` of the optimum (a lower bound from every earlier full solve: costs only grow when a
   parameter grows, so opt(theta) >= opt(theta_k) * min_i theta_i / theta_k,i), or when the conditions are
   within ``neighbourhood`` (relative, per parameter) of a point that was fully solved;
3. otherwise falls back to a full re-plan (min cut), whose cuts join the library. With
   ``full_replan_interval_s`` set, a full re-plan for conditions within ``far`` (relative, on every
   parameter) of a solved point waits until that long after the last one, and the library's cheapest cut
   stands in meanwhile: on a device, planning time is time the device cannot spend on requests (a
   0.1-CPU device spent ~300 ms re-solving MobileNetV2 after every request of a Wi-Fi trace whose noise
   kept leaving the certified region, and a TCP connection idle that long restarts slow: its next upload
   ran at 0.53 of the link's rate against 0.77). Farther moves (a link collapsing) are re-solved at once.

Hysteresis is measured in predicted time saved: the plan changes when the best candidate saves at least
``min_gain`` of the current plan's time *and* at least ``min_gain_ms`` (switching has a cost: the tiers
reload segments), so a real gain of a few percent is taken at once. Noise makes a plan flap by going
*back* to a plan it left under nearly the same conditions, so a return to a plan left earlier needs the
conditions to have moved by ``flap_distance`` (relative, on some link or load) from where it was left, or
the larger ``hysteresis`` saving, or the gain to last ``2 * patience`` updates. ``version`` and
``repartitions`` count real changes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from partitioner.cost import Conditions, Links, TierModels, cost_graph, features
from partitioner.graph import ModelGraph
from partitioner.hpa import make_plan, solve_d3
from partitioner.plan import Plan

MAX_LIBRARY = 256


@dataclass
class StepStats:
    steps: int = 0
    full_replans: int = 0
    deferred_replans: int = 0  # full re-plans put off by full_replan_interval_s
    step_seconds: list[float] = field(default_factory=list)


class Repartitioner:
    def __init__(self, graph: ModelGraph, tiers: TierModels, links: Links, edge_weights: Sequence[float] = (1.0,),
                 hysteresis: float = 0.05, tolerance: float = 0.02, neighbourhood: float = 0.10, patience: int = 2,
                 min_gain: float = 0.015, min_gain_ms: float = 0.5, flap_distance: float = 0.25,
                 full_replan_interval_s: float = 0.0, far: float = 0.5, clock=time.monotonic):
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        if not 0 <= min_gain < 1 or min_gain_ms < 0:
            raise ValueError(f"min_gain must be in [0, 1) and min_gain_ms >= 0, got {min_gain}, {min_gain_ms}")
        self.graph = graph
        self.cg = cost_graph(graph)
        self.hysteresis, self.tolerance, self.neighbourhood = hysteresis, tolerance, neighbourhood
        self.cond = Conditions(links, tiers, tuple(edge_weights))
        self.repartitions = 0
        self.patience = patience
        self.min_gain, self.min_gain_s = min(min_gain, hysteresis), min_gain_ms / 1e3
        self._better_steps = 0  # consecutive steps on which some plan beat the current one by > min_gain
        self.flap_distance = flap_distance
        if full_replan_interval_s < 0 or far <= 0:
            raise ValueError(f"full_replan_interval_s must be >= 0 and far > 0, got {full_replan_interval_s}, {far}")
        self.full_replan_interval_s, self.far, self._clock = full_replan_interval_s, far, clock
        self._last_full_replan = float("-inf")
        self._left_at: dict[int, tuple[int, np.ndarray]] = {}  # library index -> (update number, theta) when left
        self.stats = StepStats()
        self._labels: list[np.ndarray] = []
        self._tiled: list[bool] = []  # False: the edge segment runs whole on the coordinator
        self._features = np.zeros((0, 17))
        self._solved_theta = np.zeros((0, 17))  # conditions of each full solve and its optimum
        self._solved_opt = np.zeros(0)
        self._current = self._full_replan(self.cond.theta())
        self.plan = self._make_plan(self._current, version=0)

    # --- public ---------------------------------------------------------------------------------
    @property
    def links(self) -> Links:
        return self.cond.links

    @property
    def tiers(self) -> TierModels:
        return self.cond.tiers

    def update(self, links: Links | None = None, slowdowns: Mapping[str, float] | None = None,
               edge_weights: Sequence[float] | None = None) -> Plan:
        """New estimates in, the plan to use out (the same object, re-priced, if it did not change)."""
        started = time.perf_counter()
        weights_changed = edge_weights is not None and tuple(float(w) for w in edge_weights) != self.cond.edge_weights
        self.cond = Conditions(links or self.cond.links, self.cond.tiers.with_slowdowns(slowdowns),
                               tuple(edge_weights) if edge_weights is not None else self.cond.edge_weights)
        if weights_changed:  # the edge's tiling factors change every plan's features: re-derive them
            self._features = np.array([features(self.cg, labels, self._cond_for(tiled))
                                       for labels, tiled in zip(self._labels, self._tiled)])
            self._solved_theta, self._solved_opt = np.zeros((0, 17)), np.zeros(0)
        theta = self.cond.theta()
        prices = self._features @ theta
        best = int(np.argmin(prices))
        if not self._acceptable(theta, prices[best]):
            if self._may_solve(theta):
                best = self._full_replan(theta)
                prices = self._features @ theta
            else:
                self.stats.deferred_replans += 1
        if best != self._current and self._should_switch(best, prices[best], prices[self._current], theta):
            self._left_at[self._current] = (self.stats.steps, theta)
            self._better_steps = 0
            self._current = best
            self.repartitions += 1
            self.plan = self._make_plan(best, version=self.plan.version + 1)
        else:
            if best == self._current:
                self._better_steps = 0
            self._reprice(prices[self._current])
        self.stats.steps += 1
        self.stats.step_seconds.append(time.perf_counter() - started)
        return self.plan

    def best_known_ms(self) -> float:
        """Price of the cheapest library plan now (without hysteresis)."""
        return float((self._features @ self.cond.theta()).min() * 1e3)

    # --- internals ------------------------------------------------------------------------------
    def _should_switch(self, best: int, best_price: float, current_price: float, theta: np.ndarray) -> bool:
        saving = current_price - best_price
        worth_it = saving >= max(self.min_gain * current_price, self.min_gain_s)
        self._better_steps = self._better_steps + 1 if worth_it else 0
        if not worth_it:
            return False
        left_step, left_theta = self._left_at.get(best, (None, None))
        if left_step is None:
            return True
        # Going back to a plan left earlier: noise around a crossover does that; a real swing of the
        # bandwidth (or a large saving, or a lasting one) moves the conditions far from where it was left.
        with np.errstate(divide="ignore", invalid="ignore"):
            moved = np.abs(np.log(theta / left_theta))
        moved = float(np.nanmax(np.where(np.isfinite(moved), moved, 0.0)))
        return (saving >= self.hysteresis * current_price or moved >= np.log1p(self.flap_distance)
                or self._better_steps >= 2 * self.patience)

    def _acceptable(self, theta: np.ndarray, price: float) -> bool:
        if not len(self._solved_opt):
            return False
        solved = self._solved_theta
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(solved > 0, theta / solved, np.where(theta > 0, np.inf, 1.0))
        lower_bound = float((self._solved_opt * ratio.min(axis=1)).max())
        if price <= lower_bound * (1 + self.tolerance):
            return True
        return self._log_distance_to_solved(theta) <= np.log1p(self.neighbourhood)

    def _log_distance_to_solved(self, theta: np.ndarray) -> float:
        """max_i |log(theta_i / solved_i)| to the nearest fully solved point (inf if none)."""
        solved = self._solved_theta
        if not len(solved):
            return float("inf")
        with np.errstate(divide="ignore", invalid="ignore"):
            log_distance = np.abs(np.log(np.where((solved > 0) & (theta > 0), theta / np.where(solved > 0, solved, 1), 1.0)))
        zero_mismatch = ((solved > 0) != (theta > 0)).any(axis=1)
        return float(np.where(zero_mismatch, np.inf, log_distance.max(axis=1)).min())

    def _may_solve(self, theta: np.ndarray) -> bool:
        if self._clock() - self._last_full_replan >= self.full_replan_interval_s:
            return True
        return self._log_distance_to_solved(theta) > np.log1p(self.far)

    def _cond_for(self, tiled: bool) -> Conditions:
        if tiled:
            return self.cond
        return Conditions(self.cond.links, self.cond.tiers, self.cond.edge_weights[:1])

    def _full_replan(self, theta: np.ndarray) -> int:
        (best, best_cond), solved = solve_d3(self.cg, self.cond.links, self.cond.tiers, self.cond.edge_weights)
        self.stats.full_replans += 1
        self._last_full_replan = self._clock()
        self._solved_theta = np.vstack([self._solved_theta, theta])[-MAX_LIBRARY:]
        self._solved_opt = np.append(self._solved_opt, best.seconds)[-MAX_LIBRARY:]
        best_index = None
        for solution, cond in solved:
            tiled = len(cond.edge_weights) == len(self.cond.edge_weights)
            for labels in solution.candidates:
                index = self._add(labels, tiled)
                if solution is best and np.array_equal(labels, solution.labels):
                    best_index = index
        return best_index

    def _add(self, labels: np.ndarray, tiled: bool) -> int:
        for index, known in enumerate(self._labels):
            if self._tiled[index] == tiled and np.array_equal(known, labels):
                return index
        if len(self._labels) >= MAX_LIBRARY:  # drop the oldest cut that is not the current plan
            drop = next(i for i in range(len(self._labels)) if i != getattr(self, "_current", -1))
            del self._labels[drop]
            del self._tiled[drop]
            self._features = np.delete(self._features, drop, axis=0)
            self._left_at = {i - (i > drop): left for i, left in self._left_at.items() if i != drop}
            if getattr(self, "_current", None) is not None and self._current > drop:
                self._current -= 1
        self._labels.append(labels)
        self._tiled.append(tiled)
        self._features = np.vstack([self._features, features(self.cg, labels, self._cond_for(tiled))])
        return len(self._labels) - 1

    def _make_plan(self, index: int, version: int) -> Plan:
        plan = make_plan(self.graph, self._cond_for(self._tiled[index]), self._labels[index], "d3")
        plan.version = version
        return plan

    def _reprice(self, price_s: float) -> None:
        """Keep the plan (and its version) but refresh its predicted figures for the new conditions."""
        from partitioner.cost import link_bytes, stage_seconds

        f = self._features[self._current]
        stages = {k: v * 1e3 for k, v in stage_seconds(f, self.cond.theta()).items()}
        self.plan.stages_ms = stages
        self.plan.predicted_ms = float(price_s * 1e3)
        self.plan.link_bytes = link_bytes(f)
        self.plan.edge_weights = list(self._cond_for(self._tiled[self._current]).edge_weights)

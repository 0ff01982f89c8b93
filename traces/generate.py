"""Generate the small traces shipped in traces/data/ (run: ``python -m traces.generate``).

Model: a Markov-modulated (Gilbert-Elliott style) link. A hidden Markov chain over link states (e.g. good
/ fair / bad coverage) moves once per step with the transition matrix below; in each state the bandwidth
is log-normal around the state's mean (sigma = ``jitter``) and the RTT is normal around the state's RTT.
This reproduces what real cellular traces show: long stretches at one level, abrupt drops, short outages.
Fixed seeds make the files reproducible byte for byte (a test checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces.formats import DATA_DIR, BandwidthTrace


@dataclass(frozen=True)
class LinkModel:
    name: str
    description: str
    state_mbps: tuple[float, ...]
    state_rtt_ms: tuple[float, ...]
    transitions: tuple[tuple[float, ...], ...]  # row i: probabilities of moving from state i, per step
    jitter: float = 0.25
    duration_s: int = 120
    step_s: float = 1.0
    seed: int = 0
    floor_mbps: float = 0.05  # a link that never drops to exactly 0 keeps tc and token buckets sane


MODELS = [
    LinkModel("lte-driving", "LTE while driving: good/fair/bad coverage, frequent changes",
              (24.0, 9.0, 1.5), (45.0, 70.0, 160.0),
              ((0.85, 0.12, 0.03), (0.15, 0.75, 0.10), (0.10, 0.25, 0.65)), jitter=0.30, seed=1),
    LinkModel("lte-walking", "LTE while walking: mostly good, occasional fades",
              (30.0, 14.0, 4.0), (40.0, 55.0, 110.0),
              ((0.92, 0.07, 0.01), (0.15, 0.80, 0.05), (0.10, 0.30, 0.60)), jitter=0.20, seed=2),
    LinkModel("3g-hsdpa", "3G HSDPA on the move (like the Norway traces): low, bursty, with outages",
              (3.0, 1.2, 0.3), (110.0, 180.0, 400.0),
              ((0.80, 0.17, 0.03), (0.20, 0.70, 0.10), (0.10, 0.30, 0.60)), jitter=0.35, seed=3),
    LinkModel("wifi-home", "home Wi-Fi: high with contention dips",
              (60.0, 30.0, 8.0), (6.0, 12.0, 40.0),
              ((0.90, 0.09, 0.01), (0.30, 0.65, 0.05), (0.30, 0.30, 0.40)), jitter=0.15, seed=4),
    LinkModel("backbone", "edge-to-cloud backbone: fast, with congestion periods",
              (200.0, 100.0, 40.0), (25.0, 35.0, 60.0),
              ((0.90, 0.08, 0.02), (0.20, 0.75, 0.05), (0.20, 0.30, 0.50)), jitter=0.10, seed=5),
]


def generate(model: LinkModel) -> BandwidthTrace:
    rng = np.random.default_rng(model.seed)
    transitions = np.asarray(model.transitions)
    if not np.allclose(transitions.sum(axis=1), 1.0):
        raise ValueError(f"{model.name}: transition rows must sum to 1")
    steps = int(round(model.duration_s / model.step_s))
    states = np.empty(steps, dtype=int)
    states[0] = 0
    for i in range(1, steps):
        states[i] = rng.choice(len(model.state_mbps), p=transitions[states[i - 1]])
    means = np.asarray(model.state_mbps)[states]
    # log-normal with the state's mean: exp(N(mu, s)) has mean exp(mu + s^2/2)
    mbps = means * np.exp(rng.normal(-model.jitter ** 2 / 2, model.jitter, steps))
    rtt = np.asarray(model.state_rtt_ms)[states] * (1 + 0.1 * rng.standard_normal(steps))
    times = model.step_s * np.arange(steps)
    return BandwidthTrace(times, np.maximum(mbps, model.floor_mbps), np.maximum(rtt, 1.0), model.name,
                          end_s=float(model.duration_s))


def write_all(directory: Path = DATA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in MODELS:
        path = directory / f"{model.name}.csv"
        generate(model).to_csv(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all():
        print(written)

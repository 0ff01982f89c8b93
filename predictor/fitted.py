"""The fitted predictor: per-op-kind regressors over kernels, plus the measured per-call overhead.

A segment's predicted time = per_call_overhead_s + the sum of its nodes' ``node_seconds`` (a fused
kernel's time sits on its first node). ``scaled(k)`` is the same tier k times slower, which is how a
quick calibration on another tier is applied. Saved as JSON (no pickle): loading a predictor file can
never run code.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from partitioner.graph import ModelGraph
from predictor.features import ELEMENTWISE, ELEMENTWISE_KINDS, FEATURES, group_kernels, regressor_key
from predictor.profiler import Profile
from predictor.regressors import FAMILIES, Regressor, select_and_fit

FORMAT = "d3-kernel-predictor/1"
# Nodes of these kinds do no arithmetic; without a regressor they cost the fallback (Python dispatch).
_TRIVIAL_KINDS = {"getitem", "shape", "flatten", "identity", "dropout"}


@dataclass
class KernelPredictor:
    regressors: dict[str, Regressor]
    overhead_s: float  # measured cost of one segment call, before scaling
    fallback_s: float  # seconds of a kernel whose kind has no regressor
    threads: int  # the torch thread count it was profiled at; predictions hold for that count only
    fuse: bool = True
    scale: float = 1.0  # slowdown of the tier this instance predicts, relative to where it was fitted
    meta: dict = field(default_factory=dict)

    @property
    def per_call_overhead_s(self) -> float:
        return self.overhead_s * self.scale

    def regressor_key_for(self, kind: str, features) -> str | None:
        """The kernel's own regressor; else its op kind's (files fitted before depthwise convs had theirs);
        else, for a kind that does arithmetic, the pooled elementwise one; else None (the fallback)."""
        for key in (regressor_key(kind, features), kind):
            if key in self.regressors:
                return key
        return ELEMENTWISE if kind not in _TRIVIAL_KINDS and ELEMENTWISE in self.regressors else None

    def kernel_seconds(self, kinds: list[str], features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=float).reshape(len(kinds), len(FEATURES))
        seconds = np.full(len(kinds), self.fallback_s)
        rows_by_key: dict[str, list[int]] = defaultdict(list)
        for index, kind in enumerate(kinds):
            key = self.regressor_key_for(kind, features[index])
            if key is not None:
                rows_by_key[key].append(index)
        for key, rows in rows_by_key.items():
            seconds[rows] = self.regressors[key].predict(features[rows])
        return seconds * self.scale

    def node_seconds(self, graph: ModelGraph) -> dict[str, float]:
        kernels = group_kernels(graph, self.fuse)
        seconds = {name: 0.0 for name in graph.order}
        if not kernels:
            return seconds
        predicted = self.kernel_seconds([k.kind for k in kernels], np.array([k.features for k in kernels]))
        for kernel, value in zip(kernels, predicted):
            seconds[kernel.nodes[0]] = float(value)
        return seconds

    def segment_seconds(self, graph: ModelGraph, node_names, node_seconds: dict[str, float] | None = None) -> float:
        node_seconds = node_seconds if node_seconds is not None else self.node_seconds(graph)
        return self.per_call_overhead_s + sum(node_seconds[n] for n in node_names)

    def scaled(self, slowdown: float) -> "KernelPredictor":
        if not slowdown > 0:
            raise ValueError(f"slowdown must be positive, got {slowdown}")
        return replace(self, scale=self.scale * slowdown)

    def families(self) -> dict[str, str]:
        return {kind: r.family for kind, r in sorted(self.regressors.items())}

    # ------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": FORMAT, "features": list(FEATURES), "threads": self.threads, "fuse": self.fuse,
                "scale": self.scale, "overhead_s": self.overhead_s, "fallback_s": self.fallback_s,
                "meta": self.meta, "regressors": {k: r.to_dict() for k, r in sorted(self.regressors.items())}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "predictor") -> "KernelPredictor":
        if data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a d3 kernel predictor (format {data.get('format')!r}, want {FORMAT!r})")
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"{source} was fitted on features {data.get('features')}, this version uses {list(FEATURES)}")
        return cls({k: Regressor.from_dict(v) for k, v in data["regressors"].items()}, float(data["overhead_s"]),
                   float(data["fallback_s"]), int(data["threads"]), bool(data.get("fuse", True)),
                   float(data.get("scale", 1.0)), dict(data.get("meta", {})))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "KernelPredictor":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"predictor file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"predictor file {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, str(path))


def fit_predictor(profile: Profile, exclude_models: tuple[str, ...] = (), families: tuple[str, ...] = FAMILIES,
                  progress: bool = True, with_sweeps: bool = False,
                  kernels_from_segments: bool = True) -> KernelPredictor:
    """One regressor per op kind over the profile's kernels (minus ``exclude_models``). Where the profile
    holds random segments of a model, its kernel costs are first re-derived from them
    (``decompose.segment_consistent``) unless ``kernels_from_segments`` is False. Synthetic sweep
    kernels are left out unless ``with_sweeps``: held out in turn, resnet50 / mobilenet_v2 / densenet121
    segments were predicted +12% / +25% / +12% too slow with them and +2% / -7% / -1% without (their
    random networks' depthwise convs, for one, ran slower than the zoo's fused ones)."""
    from tqdm import tqdm

    threads = profile.threads()
    if kernels_from_segments:
        from predictor.decompose import segment_consistent

        profile = segment_consistent(profile)
    fuse_values = {bool(m.get("fuse", True)) for m in profile.metas}
    if len(fuse_values) != 1:
        raise ValueError("profiles mix fused and per-node kernels; profile them the same way")
    kernels = [k for k in profile.kernels if k["model"] not in exclude_models
               and (with_sweeps or not k["model"].startswith("sweep_"))]
    if not kernels:
        raise ValueError("the profiles hold no kernel records to fit (after exclusions)")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for record in kernels:
        by_kind[regressor_key(record["kind"], record["features"])].append(record)
        if record["kind"] in ELEMENTWISE_KINDS:
            by_kind[ELEMENTWISE].append(record)
    regressors = {}
    for kind, records in tqdm(sorted(by_kind.items()), desc="fitting", disable=not progress, leave=False):
        x = np.array([r["features"] for r in records], dtype=float)
        y = np.array([r["net_s"] for r in records], dtype=float)
        groups = np.array([r["model"] for r in records])
        # the pooled regressor stands in for kinds nobody profiled: only the roofline-style family
        # extrapolates to them
        regressors[kind] = select_and_fit(x, y, groups, ("linear",) if kind == ELEMENTWISE else families)
    overheads = [o["median_s"] for o in profile.overheads if o["model"] not in exclude_models]
    trivial = [k["net_s"] for k in kernels if k["kind"] in _TRIVIAL_KINDS]
    return KernelPredictor(
        regressors, float(np.median(overheads)) if overheads else 2e-6,
        float(np.median(trivial)) if trivial else 2e-6, threads, fuse_values.pop(),
        meta={"fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": profile.metas[0].get("host"),
              "torch": profile.metas[0].get("torch"), "kernels": len(kernels),
              "models": sorted({k["model"] for k in kernels if not k["model"].startswith("sweep_")}),
              "sweep_kernels": sum(1 for k in kernels if k["model"].startswith("sweep_")),
              "kernels_from_segments": sorted({k["model"] for k in kernels if k.get("derived")}),
              "excluded": list(exclude_models)},
    )

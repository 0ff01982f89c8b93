"""Kernel costs as a segment call sees them: a profiled model's kernel times re-derived from its segments.

Kernels are timed in whole-model passes (``profiler.ChainJob``), but the runtime calls short segments, and on
this VM the two disagree by model: MobileNetV2's kernels summed to 27.2 ms in a pass while its random
segments implied 22.2 ms (one 300-segment profile; its memory-bound kernels run faster in a short call, cache state), so its own
measured kernels were within 10% of only 65-78% of its own segments, whatever a regressor learnt from them.
Where a profile holds random segments of a model, its kernel costs are therefore solved for from them:

    minimise  sum_s ((overhead + sum_{j in s} k_j - m_s) / m_s)^2  +  prior^2 sum_j ((k_j - c_j) / max(c_j, floor))^2,   k >= 0

over kernel seconds ``k`` (kernel j is in segment s when its first node is, as ``KernelPredictor`` sums a
segment), with ``m_s`` the segment's measured time and ``c_j`` the kernel's in-pass time, which keeps a
kernel that few segments isolate near what was measured. ``scipy.optimize.lsq_linear`` solves it (bounded
least squares). Derived from three quarters of a model's 100 segments, the costs predicted the other quarter
within 10% for 0.88 (mobilenet_v2) to 1.00 (googlenet) of them, where the in-pass times reached 0.87-0.94
(``bench/predictor.py --all-segments --segments 100 --sessions 1``: "derived bound" against "kernel-sum bound").
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from predictor.profiler import Profile

DEFAULT_PRIOR = 0.1  # 0.1-0.2 scored best held out (0.3 and 1.0 let the in-pass times back in)
MIN_SEGMENTS = 20  # fewer and the prior decides everything: keep the in-pass times
_FLOOR_S = 2e-5  # relative deviations from the prior are taken against at least this


def segment_consistent(profile: Profile, prior: float = DEFAULT_PRIOR, min_segments: int = MIN_SEGMENTS) -> Profile:
    """A copy of ``profile`` whose kernels of every model with >= ``min_segments`` segments carry costs derived
    from those segments (``net_s``; the in-pass time stays in ``chain_s``); other models' kernels unchanged."""
    from scipy.optimize import lsq_linear

    from predictor.evaluate import _graph

    kernels_by_model, segments_by_model = defaultdict(list), defaultdict(list)
    for record in profile.kernels:
        kernels_by_model[(record["model"], tuple(record["input_shape"]))].append(record)
    for record in profile.segments:
        segments_by_model[(record["model"], tuple(record["input_shape"]))].append(record)
    overheads = {(o["model"], tuple(o.get("input_shape") or ())): o["median_s"] for o in profile.overheads}
    result = Profile(metas=list(profile.metas), segments=list(profile.segments), overheads=list(profile.overheads))
    for key, kernels in kernels_by_model.items():
        segments = segments_by_model.get(key, [])
        if len(segments) < min_segments:
            result.kernels.extend(kernels)
            continue
        position = {name: index for index, name in enumerate(_graph(*key).order)}
        first = np.array([position[k["nodes"][0]] for k in kernels])
        chain = np.array([k["net_s"] for k in kernels])
        measured = np.array([s["median_s"] for s in segments])
        inside = np.array([(first >= s["start"]) & (first < s["end"]) for s in segments], dtype=float)
        weight = 1.0 / measured
        prior_weight = prior / np.maximum(chain, _FLOOR_S)
        design = np.vstack([inside * weight[:, None], np.diag(prior_weight)])
        target = np.concatenate([(measured - overheads.get(key, 0.0)) * weight, prior_weight * chain])
        solution = lsq_linear(design, target, bounds=(0.0, np.inf)).x
        result.kernels.extend({**k, "chain_s": k["net_s"], "net_s": float(value), "derived": True}
                              for k, value in zip(kernels, solution))
    return result

"""Per-op-kind regressors, chosen by cross-validation, stored as plain JSON (never pickle).

Families (all scikit-learn for fitting; prediction here in numpy from the exported parameters, so a
predictor file is data, not code):

- ``linear``: non-negative least squares on raw [FLOPs, in/out elements, parameter bytes] -> seconds.
  The roofline-style model (time = a*FLOPs + b*bytes + c) Neurosurgeon uses; extrapolates sanely.
- ``ridge_log``: Ridge on log1p(features) -> log(seconds). A power law per feature; captures
  the sub-linear efficiency of small kernels.
- ``forest_log``: RandomForest on log1p(features) -> log(seconds), exported as sklearn ``tree_`` arrays.
- ``gbrt_log``: GradientBoosting on log1p(features) -> log(seconds), exported the same way.

Folds are grouped by source model (GroupKFold), so the score is how well a family predicts a model it
has not seen: the question the planner asks of it. Score: mean absolute percentage error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from predictor.features import FEATURES

LINEAR_COLUMNS = ("flops", "in_elements", "out_elements", "param_bytes")
# Fixed unit scales so the least-squares problem is well conditioned and the stored numbers readable.
_LINEAR_SCALE = np.array([1e9, 1e6, 1e6, 1e6])
FAMILIES = ("linear", "ridge_log", "forest_log", "gbrt_log")
_MIN_SECONDS = 1e-7
# Relative errors are taken against at least this: below it a kernel's time is dispatch and timer noise,
# and a 100% error on 2 us matters as little to a segment as a 10% error on 20 us.
ERROR_FLOOR_S = 2e-5


def _log_features(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(x, 0.0))


def _linear_design(x: np.ndarray) -> np.ndarray:
    columns = [FEATURES.index(c) for c in LINEAR_COLUMNS]
    return x[:, columns] / _LINEAR_SCALE


def _export_tree(tree) -> dict:
    t = tree.tree_
    return {"left": t.children_left.tolist(), "right": t.children_right.tolist(), "feature": t.feature.tolist(),
            "threshold": t.threshold.tolist(), "value": t.value[:, 0, 0].tolist()}


def _predict_tree(tree: dict, x: np.ndarray) -> np.ndarray:
    left, right = np.asarray(tree["left"]), np.asarray(tree["right"])
    feature, threshold = np.asarray(tree["feature"]), np.asarray(tree["threshold"])
    node = np.zeros(len(x), dtype=np.int64)
    rows = np.arange(len(x))
    while True:
        inner = left[node] != -1
        if not inner.any():
            break
        go_left = x[rows, np.where(inner, feature[node], 0)] <= threshold[node]
        node = np.where(inner, np.where(go_left, left[node], right[node]), node)
    return np.asarray(tree["value"])[node]


@dataclass
class Regressor:
    """One op kind's fitted regressor: ``family`` plus its parameters, JSON as is."""

    family: str
    params: dict = field(default_factory=dict)
    cv_mape: float | None = None
    samples: int = 0
    cv_scores: dict = field(default_factory=dict)  # every candidate family's grouped-CV MAPE

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Seconds for each row of ``x`` (columns in FEATURES order)."""
        x = np.atleast_2d(np.asarray(x, dtype=float))
        p = self.params
        if self.family == "constant":
            return np.full(len(x), p["seconds"])
        if self.family == "linear":
            return np.maximum(_linear_design(x) @ np.asarray(p["coef"]) + p["intercept"], 0.0)
        z = _log_features(x)
        if self.family == "ridge_log":
            log_t = z @ np.asarray(p["coef"]) + p["intercept"]
        elif self.family == "forest_log":
            log_t = np.mean([_predict_tree(t, z) for t in p["trees"]], axis=0)
        elif self.family == "gbrt_log":
            log_t = p["init"] + p["learning_rate"] * np.sum([_predict_tree(t, z) for t in p["trees"]], axis=0)
        else:
            raise ValueError(f"unknown regressor family {self.family!r}")
        return np.exp(log_t)

    def to_dict(self) -> dict:
        return {"family": self.family, "cv_mape": self.cv_mape, "cv_scores": self.cv_scores,
                "samples": self.samples, "params": self.params}

    @classmethod
    def from_dict(cls, data: dict) -> "Regressor":
        return cls(data["family"], data.get("params", {}), data.get("cv_mape"), data.get("samples", 0),
                   data.get("cv_scores", {}))


def fit_family(family: str, x: np.ndarray, seconds: np.ndarray, seed: int = 0) -> Regressor:
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import LinearRegression, Ridge

    seconds = np.maximum(seconds, _MIN_SECONDS)
    if family == "constant":
        return Regressor("constant", {"seconds": float(np.median(seconds))}, samples=len(x))
    if family == "linear":
        # Relative error is what matters: weight rows by 1/t so small kernels count as much as big ones.
        model = LinearRegression(positive=True).fit(_linear_design(x), seconds, sample_weight=1.0 / np.maximum(seconds, ERROR_FLOOR_S))
        return Regressor("linear", {"coef": model.coef_.tolist(), "intercept": float(model.intercept_),
                                    "columns": list(LINEAR_COLUMNS), "column_scale": _LINEAR_SCALE.tolist()},
                         samples=len(x))
    z, log_t = _log_features(x), np.log(seconds)
    if family == "ridge_log":
        model = Ridge(alpha=1e-2).fit(z, log_t)
        return Regressor("ridge_log", {"coef": model.coef_.tolist(), "intercept": float(model.intercept_)},
                         samples=len(x))
    if family == "forest_log":
        model = RandomForestRegressor(n_estimators=40, min_samples_leaf=2, max_features=0.6, random_state=seed,
                                      n_jobs=1).fit(z, log_t)
        return Regressor("forest_log", {"trees": [_export_tree(t) for t in model.estimators_]}, samples=len(x))
    if family == "gbrt_log":
        model = GradientBoostingRegressor(n_estimators=150, max_depth=3, learning_rate=0.08, subsample=0.9,
                                          random_state=seed).fit(z, log_t)
        return Regressor("gbrt_log", {"init": float(model.init_.constant_.ravel()[0]),
                                      "learning_rate": model.learning_rate,
                                      "trees": [_export_tree(t) for t in model.estimators_[:, 0]]},
                         samples=len(x))
    raise ValueError(f"unknown regressor family {family!r}; choose from {FAMILIES}")


def mape(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Mean absolute percentage error, each against max(measured, ERROR_FLOOR_S)."""
    return float(np.mean(np.abs(predicted - measured) / np.maximum(measured, ERROR_FLOOR_S)))


def cross_validated_mape(family: str, x: np.ndarray, seconds: np.ndarray, groups: np.ndarray,
                         folds: int = 5) -> float:
    from sklearn.model_selection import GroupKFold, KFold

    distinct = len(set(groups.tolist()))
    if distinct >= 3:
        splitter, split_args = GroupKFold(n_splits=min(folds, distinct)), (x, seconds, groups)
    else:
        splitter, split_args = KFold(n_splits=min(folds, len(x)), shuffle=True, random_state=0), (x,)
    errors, weights = [], []
    for train, test in splitter.split(*split_args):
        model = fit_family(family, x[train], seconds[train])
        errors.append(mape(model.predict(x[test]), seconds[test]))
        weights.append(len(test))
    return float(np.average(errors, weights=weights))


def select_and_fit(x: np.ndarray, seconds: np.ndarray, groups: np.ndarray,
                   families: tuple[str, ...] = FAMILIES, min_samples: int = 8) -> Regressor:
    """The family with the lowest grouped-CV MAPE, refitted on all rows."""
    if len(x) < min_samples:
        family = "linear" if len(x) >= 3 else "constant"
        return fit_family(family, x, seconds)
    scores = {family: cross_validated_mape(family, x, seconds, groups) for family in families}
    best = min(scores, key=scores.get)
    regressor = fit_family(best, x, seconds)
    regressor.cv_mape = scores[best]
    regressor.cv_scores = scores
    return regressor

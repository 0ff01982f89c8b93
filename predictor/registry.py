"""``load_predictor("default" | path)``: the planner's way to get a fitted latency model."""
from __future__ import annotations

from pathlib import Path

from predictor.fitted import KernelPredictor

DEFAULT_PREDICTOR_PATH = Path(__file__).with_name("default_predictor.json")


def resolve_predictor_path(name: str | Path) -> Path:
    return DEFAULT_PREDICTOR_PATH if str(name) == "default" else Path(name)


def load_predictor(name: str | Path = "default") -> KernelPredictor:
    """The predictor shipped with the package (``"default"``, fitted on this machine at 1 torch thread)
    or a predictor JSON file written by ``d3 predictor fit`` / ``d3 profile --install-default``."""
    path = resolve_predictor_path(name)
    if str(name) == "default" and not path.is_file():
        raise ValueError(f"no default predictor shipped at {path}; run `d3 profile --install-default`")
    return KernelPredictor.load(path)

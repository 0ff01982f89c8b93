"""Leave-one-model-out accuracy of the kernel predictor (and, with --quota, of a calibrated CPU-quota tier).

    .venv/bin/python bench/predictor.py [--sweep 400] [--segments 60] [--refresh] [--quota]

Profiles (cached in bench/out/, one file per model) are taken at 1 torch thread. For each held-out model
(resnet50, googlenet, mobilenet_v2, densenet121) a predictor is fitted on every other zoo model plus the
synthetic sweeps, then scored on the held-out model's random contiguous segments.

--quota: make a cgroup v1 CPU quota of 25% of one CPU, and in child processes inside it calibrate the
default predictor (40 kernels) and time resnet50/mobilenet_v2 segments; report both predictors' accuracy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from predictor.cli import DEFAULT_TRAINING_MODELS  # noqa: E402

OUT = ROOT / "bench" / "out"
HELD_OUT = ("resnet50", "googlenet", "mobilenet_v2", "densenet121")
D3 = [sys.executable, "-m", "deploy.cli"]


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)


def ensure_profiles(args) -> list[Path]:
    """One profiling session (all models' kernels, the sweep and the held-out models' segments
    interleaved round by round, so machine load drifts hit training and test measurements alike)."""
    path = OUT / f"profile_zoo_sweep{args.sweep}_seg{args.segments}.jsonl"
    if args.refresh or not path.exists():
        t = time.perf_counter()
        run(D3 + ["profile", *DEFAULT_TRAINING_MODELS, "--sweep", str(args.sweep), "--segments", str(args.segments),
                  "--segment-models", ",".join(HELD_OUT), "--out", str(path)])
        print(f"# profiled {len(DEFAULT_TRAINING_MODELS)} models + {args.sweep} sweep layers + "
              f"{len(HELD_OUT) * args.segments} segments in {time.perf_counter() - t:.0f} s", flush=True)
    return [path]


def leave_one_out(paths: list[Path]) -> dict:
    from predictor.evaluate import evaluate
    from predictor.fitted import fit_predictor
    from predictor.profiler import read_profiles

    profile = read_profiles(paths)
    rows = {}
    print(f"{'held out':<14}{'segments':>9}{'within 10%':>12}{'median |err|':>14}{'bias':>8}{'kernel MAPE':>13}"
          f"   conv / add / bn families")
    for model in HELD_OUT:
        predictor = fit_predictor(profile, exclude_models=(model,), progress=False)
        result = evaluate(predictor, profile, models=(model,))
        rows[model] = result
        families = predictor.families()
        print(f"{model:<14}{result['segments']:>9}{result['segment_within_10pct']:>12.3f}"
              f"{result['segment_median_abs_error'] * 100:>13.1f}%{result['segment_bias'] * 100:>7.1f}%"
              f"{result['kernel_mape']:>13.3f}   {families.get('conv')} / {families.get('add')} / {families.get('bn')}",
              flush=True)
    total = sum(r["segments"] for r in rows.values())
    pooled = sum(r["segment_within_10pct"] * r["segments"] for r in rows.values()) / total
    print(f"{'all':<14}{total:>9}{pooled:>12.3f}")
    predictor = fit_predictor(profile, progress=False)
    print("families on the full zoo + sweeps: " + ", ".join(f"{k}={v}" for k, v in predictor.families().items()))
    return rows


def quota_demo(args) -> None:
    from predictor.cgroup import cgroup_unavailable_reason, cpu_quota_cgroup, run_in_cgroup
    from predictor.evaluate import evaluate
    from predictor.profiler import read_profiles
    from predictor.registry import load_predictor

    reason = cgroup_unavailable_reason()
    if reason:
        print(f"quota demo skipped: {reason}")
        return
    calibrated_path, segments_path = OUT / "quota_calibrated.json", OUT / "quota_segments.jsonl"
    with cpu_quota_cgroup(0.25) as cgroup:
        t = time.perf_counter()
        run_in_cgroup(cgroup, D3 + ["predictor", "calibrate", "default", "--out", str(calibrated_path),
                                    "--kernels", "40", "--json"],
                      check=True, cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        calibration = json.loads(calibrated_path.read_text())["meta"]["calibration"]
        print(f"calibration in the 25% cgroup: scale {calibration['scale']:.2f} from {calibration['kernels']} kernels "
              f"in {time.perf_counter() - t:.1f} s wall ({calibration['seconds']:.1f} s timing)")
        t = time.perf_counter()
        run_in_cgroup(cgroup, D3 + ["profile", "resnet50", "mobilenet_v2", "--no-kernels", "--segments", str(args.quota_segments),
                                    "--rounds", "3", "--min-sample-ms", "300", "--clock", "wall", "--out", str(segments_path)],
                      check=True, cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        print(f"timed {2 * args.quota_segments} segments in the cgroup in {time.perf_counter() - t:.0f} s")
    profile = read_profiles([segments_path])
    for label, predictor in (("default (uncalibrated)", load_predictor("default")),
                             ("default calibrated", load_predictor(calibrated_path))):
        result = evaluate(predictor, profile)
        print(f"  {label:<24} within 10%: {result['segment_within_10pct']:.3f} of {result['segments']}  "
              f"median |err| {result['segment_median_abs_error'] * 100:.1f}%  bias {result['segment_bias'] * 100:+.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=int, default=400, help="random single-layer models to profile")
    parser.add_argument("--segments", type=int, default=60, help="random segments per held-out model")
    parser.add_argument("--refresh", action="store_true", help="re-profile even if bench/out/ has profiles")
    parser.add_argument("--quota", action="store_true", help="also run the 25%% CPU-quota calibration demo")
    parser.add_argument("--quota-segments", type=int, default=25)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = ensure_profiles(args)
    leave_one_out(paths)
    if args.quota:
        quota_demo(args)
    print(f"# total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`d3 profile` and `d3 predictor fit|eval|calibrate|show`."""
from __future__ import annotations

import argparse
import json
import os
import sys

# oneDNN keeps 1024 conv primitives by default: a profile of the zoo plus a sweep holds more, and every
# eviction re-creates a primitive inside a timed kernel (+14-26% on segments). Read at its first conv.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")

# The zoo the default predictor is fitted on (the conftest's ZOO_MODELS).
DEFAULT_TRAINING_MODELS = ("alexnet", "vgg16", "resnet18", "resnet50", "googlenet", "mobilenet_v2", "inception_v3",
                           "densenet121", "efficientnet_b0", "squeezenet1_1")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_commands(subparsers) -> None:
    profile = subparsers.add_parser(
        "profile", help="time each kernel (and random segments) of models on this tier; write a profile",
        description="Times every kernel (conv+bn+activation fused) of each model as the runtime runs it "
                    "(fx segment calls, torch.no_grad, fixed thread count), interleaved rounds, medians.")
    profile.add_argument("models", nargs="*", metavar="MODEL", help="zoo model names (default with "
                         "--install-default: the 10-model zoo)")
    profile.add_argument("--out", required=True, metavar="FILE", help="profile to write (JSON lines)")
    profile.add_argument("--sweep", type=_positive_int, default=0, metavar="N",
                         help="also time N random single-layer models (conv/linear/pool/bn/activation)")
    profile.add_argument("--segments", type=_positive_int, default=0, metavar="N",
                         help="also time N random contiguous segments per model (for `d3 predictor eval`)")
    profile.add_argument("--segment-models", type=_names, default=None, metavar="M1,M2",
                         help="time segments of these models only (default: every MODEL)")
    profile.add_argument("--no-kernels", action="store_true", help="segments only (e.g. on a throttled tier)")
    profile.add_argument("--threads", type=int, default=1, help="torch threads of this tier (default 1)")
    profile.add_argument("--rounds", type=int, default=25,
                         help="in-context passes over each model's kernels, and samples per segment (lower "
                              "quartile kept)")
    profile.add_argument("--min-sample-ms", type=float, default=0.0,
                         help="repeat a segment call until a sample lasts this long (0: one call; use >= 300 under "
                              "a CPU quota so a sample spans several 100 ms quota periods)")
    profile.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                         help="auto: the thread's CPU time at 1 thread (robust to other tenants), wall otherwise; "
                              "use wall on a CPU-quota tier")
    profile.add_argument("--per-node", action="store_true", help="time every node alone (no conv+bn+act fusion)")
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument("--install-default", action="store_true",
                         help="fit on this profile and replace the predictor shipped with the package")
    profile.set_defaults(handler=run_profile)

    predictor = subparsers.add_parser("predictor", help="fit, evaluate, calibrate latency predictors")
    actions = predictor.add_subparsers(dest="action", required=True, metavar="ACTION")
    fit = actions.add_parser("fit", help="fit one regressor per op kind (family chosen by grouped CV)")
    fit.add_argument("profiles", nargs="+", metavar="PROFILE")
    fit.add_argument("--out", required=True, metavar="PREDICTOR", help="predictor JSON to write")
    fit.add_argument("--exclude", type=_names, default=(), metavar="M1,M2", help="leave these models out")
    fit.add_argument("--with-sweeps", action="store_true",
                     help="also fit on the synthetic sweep kernels (off: they biased zoo predictions upward)")
    fit.add_argument("--in-pass-kernels", action="store_true",
                     help="fit on kernel times as timed in whole-model passes, even for models whose random "
                          "segments were profiled (default: their kernel costs are re-derived from the segments)")
    fit.add_argument("--families", type=_names, default=None, metavar="F1,F2",
                     help="candidate families (default: linear,ridge_log,forest_log,gbrt_log)")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(handler=run_fit)

    evaluate = actions.add_parser("eval", help="kernel MAPE and share of segments within +-10%% on a profile")
    evaluate.add_argument("predictor", metavar="PREDICTOR", help="predictor JSON, or `default`")
    evaluate.add_argument("--on", required=True, nargs="+", metavar="PROFILE")
    evaluate.add_argument("--models", type=_names, default=None, metavar="M1,M2", help="only these models")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=run_eval)

    calibrate = actions.add_parser("calibrate", help="rescale a predictor to this tier from a few dozen kernels")
    calibrate.add_argument("predictor", metavar="PREDICTOR", help="predictor JSON, or `default`")
    calibrate.add_argument("--out", required=True, metavar="PREDICTOR")
    calibrate.add_argument("--models", type=_names, default=("resnet18", "mobilenet_v2"), metavar="M1,M2")
    calibrate.add_argument("--kernels", type=int, default=40, help="kernels to time, split across --models")
    calibrate.add_argument("--rounds", type=int, default=30,
                           help="passes over the kernels (30 x 40 kernels: a few seconds, ~15 s under a 25%% quota)")
    calibrate.add_argument("--clock", choices=("auto", "cpu", "wall"), default="wall",
                           help="wall (default): a slow tier's throttling or contention is what to measure")
    calibrate.add_argument("--json", action="store_true")
    calibrate.set_defaults(handler=run_calibrate)

    show = actions.add_parser("show", help="which regressor family won per op kind, thread count, scale")
    show.add_argument("predictor", metavar="PREDICTOR", help="predictor JSON, or `default`")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=run_show)


def _settings(args):
    import torch

    from predictor.profiler import ProfileSettings, stabilize_allocator

    stabilize_allocator()
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    return ProfileSettings(threads=args.threads, rounds=args.rounds, segment_rounds=args.rounds,
                           min_sample_s=args.min_sample_ms / 1e3, fuse=not args.per_node, seed=args.seed,
                           clock=args.clock)


def run_profile(args: argparse.Namespace) -> int:
    from partitioner.graph import load_graph
    from predictor.profiler import profile_meta, profile_models, write_profile

    models = list(args.models) or (list(DEFAULT_TRAINING_MODELS) if args.install_default else [])
    if not models and not args.sweep:
        raise ValueError("name at least one MODEL or --sweep N")
    if args.no_kernels and not args.segments:
        raise ValueError("--no-kernels needs --segments N (otherwise nothing is timed)")
    if args.install_default and args.no_kernels:
        raise ValueError("--install-default fits kernels; drop --no-kernels")
    settings = _settings(args)
    graphs = [load_graph(name) for name in models]  # fail on a bad name before any timing
    unknown = set(args.segment_models or ()) - set(models)
    if unknown:
        raise ValueError(f"--segment-models names {sorted(unknown)}, which are not among the MODELs profiled")
    # one timing session per model (and one for the sweep), see profile_models
    records = profile_models(graphs, settings, args.segments, args.segment_models, kernels=not args.no_kernels,
                             sweep=args.sweep)
    count = write_profile(args.out, profile_meta(settings, models=models, sweep=args.sweep), records)
    print(f"wrote {count} records to {args.out} (threads {settings.threads})")
    if args.install_default:
        from predictor.fitted import fit_predictor
        from predictor.profiler import read_profiles
        from predictor.registry import DEFAULT_PREDICTOR_PATH

        predictor = fit_predictor(read_profiles([args.out]))
        predictor.save(DEFAULT_PREDICTOR_PATH)
        print(f"installed default predictor {DEFAULT_PREDICTOR_PATH} ({_family_line(predictor)})")
    return 0


def _family_line(predictor) -> str:
    return ", ".join(f"{kind}: {family}" for kind, family in predictor.families().items())


def run_fit(args: argparse.Namespace) -> int:
    from predictor.fitted import fit_predictor
    from predictor.profiler import read_profiles
    from predictor.regressors import FAMILIES

    families = args.families or FAMILIES
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    predictor = fit_predictor(read_profiles(args.profiles), tuple(args.exclude), tuple(families),
                              with_sweeps=args.with_sweeps, kernels_from_segments=not args.in_pass_kernels)
    predictor.save(args.out)
    summary = _summary(predictor)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
        print(f"wrote {args.out}")
    return 0


def _summary(predictor) -> dict:
    return {"threads": predictor.threads, "fuse": predictor.fuse, "scale": predictor.scale,
            "per_call_overhead_s": predictor.per_call_overhead_s, "meta": predictor.meta,
            "kinds": {kind: {"family": r.family, "samples": r.samples, "cv_mape": r.cv_mape, "cv_scores": r.cv_scores}
                      for kind, r in sorted(predictor.regressors.items())}}


def _print_summary(summary: dict) -> None:
    print(f"threads {summary['threads']}  fused kernels {summary['fuse']}  scale {summary['scale']:.3f}  "
          f"per-call overhead {summary['per_call_overhead_s'] * 1e6:.1f} us")
    print(f"  {'op kind':<14}{'samples':>8}  {'family':<11}{'cv MAPE':>8}   others (cv MAPE)")
    for kind, info in summary["kinds"].items():
        others = ", ".join(f"{f} {s:.2f}" for f, s in info["cv_scores"].items() if f != info["family"])
        cv = f"{info['cv_mape']:.3f}" if info["cv_mape"] is not None else "-"
        print(f"  {kind:<14}{info['samples']:>8}  {info['family']:<11}{cv:>8}   {others}")


def run_eval(args: argparse.Namespace) -> int:
    from predictor.evaluate import evaluate
    from predictor.profiler import read_profiles
    from predictor.registry import load_predictor

    predictor = load_predictor(args.predictor)
    profile = read_profiles(args.on)
    if profile.threads() != predictor.threads:
        print(f"warning: predictor fitted at {predictor.threads} threads, profile taken at {profile.threads()}",
              file=sys.stderr)
    result = evaluate(predictor, profile, args.models)
    if args.json:
        print(json.dumps(result))
        return 0
    mape = "-" if result["kernel_mape"] is None else f"{result['kernel_mape']:.3f}"
    within = "-" if result["segment_within_10pct"] is None else f"{result['segment_within_10pct']:.3f}"
    print(f"kernel MAPE {mape} ({result.get('kernels', 0)} kernels >= 10 us)   "
          f"segments within 10%: {within} of {result['segments']}")
    for model, info in result.get("per_model", {}).items():
        print(f"  {model:<16} {info['segments']:>4} segments  within 10% {info['within_10pct']:.3f}  "
              f"median |error| {info['median_abs_error'] * 100:.1f}%")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from predictor.calibrate import calibrate
    from predictor.profiler import ProfileSettings
    from predictor.registry import load_predictor

    predictor = load_predictor(args.predictor)
    torch.set_num_threads(predictor.threads)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    settings = ProfileSettings(threads=predictor.threads, rounds=args.rounds, fuse=predictor.fuse, clock=args.clock)
    calibrated, info = calibrate(predictor, args.models, args.kernels, settings)
    calibrated.save(args.out)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"this tier is {info['scale']:.2f}x the predictor's (CPU {info['cpu_scale']:.2f}x, runs us "
              f"1/{info['stall_factor']:.2f} of the time; {info['kernels']} kernels, {info['rounds']} passes, "
              f"{info['seconds']:.1f} s); wrote {args.out}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from predictor.registry import load_predictor

    summary = _summary(load_predictor(args.predictor))
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0

"""Latency predictor: kernels, JSON regressors, profile files, fit/eval, the shipped default, CPU-quota tiers."""
import json
import os
import sys

import numpy as np
import pytest

from predictor.features import FEATURES, group_kernels
from predictor.fitted import KernelPredictor, fit_predictor
from predictor.profiler import ProfileSettings, profile_graph, profile_meta, read_profiles, write_profile
from predictor.regressors import FAMILIES, Regressor, _export_tree, _predict_tree, fit_family, select_and_fit
from predictor.registry import DEFAULT_PREDICTOR_PATH, load_predictor

SMALL = (1, 3, 64, 64)


def test_kernels_fuse_conv_bn_relu_and_cover_every_node_once(graph_of):
    graph = graph_of("resnet18")
    kernels = group_kernels(graph)
    assert kernels[0].nodes == ["conv1", "bn1", "relu"] and kernels[0].kind == "conv"
    features = dict(zip(FEATURES, kernels[0].features))
    assert features["has_bn"] == 1 and features["has_act"] == 1 and features["kernel_area"] == 49
    covered = [n for k in kernels for n in k.nodes]
    assert sorted(covered) == sorted(graph.order) and len(covered) == len(set(covered))
    # a conv whose bn output feeds the residual add is fused with its bn only
    assert ["layer1_0_conv2", "layer1_0_bn2"] in [k.nodes for k in kernels]
    assert len(group_kernels(graph, fuse=False)) == len(graph.order)


def test_exported_tree_predicts_like_sklearn():
    from sklearn.tree import DecisionTreeRegressor

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5, size=(300, 4))
    y = np.sin(x[:, 0]) + x[:, 1] ** 2 - x[:, 2]
    tree = DecisionTreeRegressor(max_depth=6, random_state=0).fit(x, y)
    exported = json.loads(json.dumps(_export_tree(tree)))
    np.testing.assert_allclose(_predict_tree(exported, x), tree.predict(x))


def _synthetic_kernels(count=120, seed=0):
    """Kernels whose time is exactly 10 ns/FLOP + 4 us: a linear-in-FLOPs op kind."""
    rng = np.random.default_rng(seed)
    x = np.zeros((count, len(FEATURES)))
    x[:, FEATURES.index("flops")] = rng.uniform(1e5, 1e8, count)
    x[:, FEATURES.index("out_elements")] = rng.uniform(1e3, 1e5, count)
    seconds = x[:, FEATURES.index("flops")] * 1e-11 + 4e-6
    return x, seconds, np.array([f"m{i % 6}" for i in range(count)])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_survives_json_and_fits_its_training_data(family):
    x, seconds, _ = _synthetic_kernels()
    regressor = fit_family(family, x, seconds)
    restored = Regressor.from_dict(json.loads(json.dumps(regressor.to_dict())))
    np.testing.assert_allclose(restored.predict(x), regressor.predict(x))
    relative = np.abs(restored.predict(x) - seconds) / seconds
    assert np.median(relative) < 0.15, f"{family} misfits its own training data: {np.median(relative):.2f}"


def test_cross_validation_picks_the_linear_family_for_linear_timings():
    x, seconds, groups = _synthetic_kernels()
    regressor = select_and_fit(x, seconds, groups)
    assert set(regressor.cv_scores) == set(FAMILIES)
    assert regressor.family == "linear", regressor.cv_scores
    assert regressor.cv_mape < 0.02


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory):
    """resnet18 at 64x64: kernels and 12 random segments, timed at 1 thread (a few seconds)."""
    from tests.conftest import zoo_graph

    graph = zoo_graph("resnet18", SMALL)
    settings = ProfileSettings(threads=1, rounds=9, segment_rounds=5)
    try:
        records = profile_graph(graph, settings, segments=12, progress=False)
    finally:
        import torch

        torch.set_num_threads(2)  # the rest of the suite runs at 2 threads
    path = tmp_path_factory.mktemp("profile") / "resnet18.jsonl"
    write_profile(path, profile_meta(settings, models=["resnet18"]), records)
    return path


def test_profile_file_is_json_lines_with_host_torch_threads_and_time(small_profile, graph_of):
    lines = [json.loads(line) for line in small_profile.read_text().splitlines()]
    meta = lines[0]
    assert meta["type"] == "meta" and meta["threads"] == 1 and meta["clock"] == "cpu"
    assert meta["host"] and meta["torch"] and meta["timestamp"]
    kinds = {line["type"] for line in lines[1:]}
    assert kinds == {"overhead", "kernel", "segment"}
    segments = [line for line in lines if line["type"] == "segment"]
    node_count = len(graph_of("resnet18", SMALL).order)
    assert len(segments) == 12 and all(0 <= s["start"] < s["end"] <= node_count and s["median_s"] > 0
                                       for s in segments)
    kernels = [line for line in lines if line["type"] == "kernel"]
    assert sorted(n for k in kernels for n in k["nodes"]) == sorted(graph_of("resnet18", SMALL).order)


def test_fitted_predictor_predicts_its_own_models_segments(small_profile, tmp_path):
    from predictor.evaluate import evaluate

    profile = read_profiles([small_profile])
    predictor = fit_predictor(profile, progress=False)
    path = tmp_path / "p.json"
    predictor.save(path)
    restored = load_predictor(path)
    result = evaluate(restored, profile)
    assert {"kernel_mape", "segment_within_10pct", "segments", "models"} <= set(result)
    assert result["segments"] == 12 and result["models"] == ["resnet18"]
    # Trained on these very kernels: segment sums must be close (noise aside), so this catches a broken sum,
    # a missing overhead or a fused kernel counted twice.
    assert result["segment_median_abs_error"] < 0.25, result


def test_default_predictor_ships_as_json_and_folds_fused_kernels(graph_of):
    assert DEFAULT_PREDICTOR_PATH.is_file(), "predictor/default_predictor.json must ship with the package"
    json.loads(DEFAULT_PREDICTOR_PATH.read_text())  # plain JSON, not a pickle
    predictor = load_predictor("default")
    assert predictor.threads == 1 and predictor.per_call_overhead_s > 0
    graph = graph_of("resnet18")
    seconds = predictor.node_seconds(graph)
    assert list(seconds) == graph.order and all(v >= 0 for v in seconds.values())
    assert seconds["conv1"] > 0 and seconds["bn1"] == 0 and seconds["relu"] == 0
    total = sum(seconds.values())
    assert 1e-3 < total < 1.0  # resnet18 at one thread: tens of milliseconds
    slower = predictor.scaled(4.0)
    assert sum(slower.node_seconds(graph).values()) == pytest.approx(4 * total)
    assert slower.per_call_overhead_s == pytest.approx(4 * predictor.per_call_overhead_s)


def test_default_predictor_tracks_fresh_segments_on_this_host(graph_of):
    """The shipped predictor against fresh measurements of resnet18 segments (only on the host it was fitted on).
    The issue's goal is 90% within +-10%; on this loaded 2-core box back-to-back runs drifted by 18%, so the
    test holds a bound that catches a wrong scale, a lost overhead or double-counted fused kernels."""
    import socket

    from predictor.evaluate import evaluate
    from predictor.profiler import Profile

    predictor = load_predictor("default")
    if predictor.meta.get("host") != socket.gethostname():
        pytest.skip(f"default predictor was fitted on {predictor.meta.get('host')}, this is {socket.gethostname()}")
    settings = ProfileSettings(threads=1, rounds=5, segment_rounds=5)
    try:
        records = profile_graph(graph_of("resnet18"), settings, segments=15, kernels=False, progress=False)
    finally:
        import torch

        torch.set_num_threads(2)
    profile = Profile(metas=[profile_meta(settings)])
    for record in records:
        profile.add(record)
    result = evaluate(predictor, profile)
    assert result["segment_median_abs_error"] < 0.5, result


def test_load_predictor_rejects_bad_files_with_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_predictor(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("\x80\x04 not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_predictor(garbage)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a d3 kernel predictor"):
        KernelPredictor.load(other)


def test_cli_eval_json_and_bad_input(small_profile, capsys):
    from deploy.cli import main

    assert main(["predictor", "eval", "default", "--on", str(small_profile), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"kernel_mape", "segment_within_10pct", "segments", "models"} <= set(result)
    assert result["segments"] == 12
    assert main(["profile", "resnet_typo", "--out", "/tmp/unused.jsonl"]) == 2
    assert "unknown model 'resnet_typo'" in capsys.readouterr().err
    assert main(["predictor", "fit", "/nonexistent/profile.jsonl", "--out", "/tmp/unused.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.root
@pytest.mark.skipif(os.environ.get("CI") == "true" and not os.environ.get("D3_SLOW_TESTS"),
                    reason="a calibration run inside a 25% CPU quota takes 3-5 minutes on a fresh venv; "
                           "run with D3_SLOW_TESTS=1 (bench/predictor.py --quota measures the same)")
def test_cpu_quota_cgroup_slows_a_child_and_calibration_sees_it(tmp_path):
    """25% of one CPU: a child's CPU-bound loop is throttled to 1/4; calibration there finds a ~4x scale."""
    from predictor.cgroup import CPU_CGROUP_ROOT, cgroup_unavailable_reason, cpu_quota_cgroup, run_in_cgroup

    reason = cgroup_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # 0.4 s of CPU at 25% of one CPU needs >= 1.6 s of wall time (less one period's head start),
    # whatever else the machine is doing: a bound that holds under load, unlike a free-vs-throttled ratio.
    spin = [sys.executable, "-c",
            "import time\nt=time.perf_counter(); c=time.process_time()\n"
            "while time.process_time() - c < 0.4: pass\nprint(time.perf_counter() - t)"]
    out = tmp_path / "calibrated.json"
    with cpu_quota_cgroup(0.25) as cgroup:
        quota, period = (int((cgroup / name).read_text()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        assert quota / period == 0.25 and period == 10_000, (quota, period)
        assert str(os.getpid()) not in (cgroup / "cgroup.procs").read_text().split()
        throttled = float(run_in_cgroup(cgroup, spin, capture_output=True, text=True, check=True).stdout)
        stats = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())
        run_in_cgroup(cgroup, [sys.executable, "-m", "deploy.cli", "predictor", "calibrate", "default", "--out",
                               str(out), "--models", "resnet18", "--kernels", "10", "--rounds", "10"],
                      check=True, capture_output=True, timeout=600)
    assert not cgroup.exists() and not any(p.name == cgroup.name for p in CPU_CGROUP_ROOT.iterdir())
    assert throttled > 1.2 and int(stats["nr_throttled"]) > 0, (throttled, stats)
    calibrated = load_predictor(out)
    assert 2.5 < calibrated.scale < 12, calibrated.meta["calibration"]
    assert calibrated.meta["calibration"]["kernels"] == 10


def test_each_model_is_timed_in_a_session_of_its_own(graph_of, monkeypatch):
    """Timed together, another model's jobs changed a model's segment times by 8-28%: every timing session
    (``run_jobs`` call) holds one model's kernels and segments, or one random sweep network, never a mix."""
    import torch

    import predictor.profiler as profiler

    sessions = []
    real_run_jobs = profiler.run_jobs

    def record_session(jobs, desc="", progress=True):
        sessions.append({job.graph.name if isinstance(job, profiler.ChainJob) else job.model for job, _ in jobs})
        real_run_jobs(jobs, desc, progress)

    real_calls_job = profiler.CallsJob

    class NamedCallsJob(real_calls_job):  # remember which model a segment job belongs to
        def __init__(self, calls, clock, min_sample_s=0.0):
            super().__init__(calls, clock, min_sample_s)
            self.model = current[0]

    current = [None]
    real_segment_calls = profiler._segment_calls

    def segment_calls(graph, slices, x):
        current[0] = graph.name
        return real_segment_calls(graph, slices, x)

    monkeypatch.setattr(profiler, "run_jobs", record_session)
    monkeypatch.setattr(profiler, "CallsJob", NamedCallsJob)
    monkeypatch.setattr(profiler, "_segment_calls", segment_calls)
    graphs = [graph_of("resnet18", SMALL), graph_of("mobilenet_v2", SMALL)]
    try:
        profiler.profile_models(graphs, ProfileSettings(threads=1, rounds=1, segment_rounds=1), segments=2,
                                sweep=2 * profiler.SWEEP_NETWORK_LAYERS, progress=False)
    finally:
        torch.set_num_threads(2)
    assert sessions[:2] == [{"resnet18"}, {"mobilenet_v2"}]
    assert len(sessions) == 4 and all(len(names) == 1 and next(iter(names)).startswith("sweep_")
                                      for names in sessions[2:])


def test_sessions_of_one_model_merge_into_the_median_of_each_kernel_and_segment(tmp_path):
    """The machine's speed drifts between sessions: read together, profiles of the same model give one
    record per kernel and per segment, at the median of the sessions' times."""
    settings = ProfileSettings()
    paths = []
    for session, scale in enumerate((1.0, 1.3, 0.9)):
        records = [{"type": "overhead", "model": "m", "input_shape": [1, 3, 8, 8], "median_s": 1e-5 * scale},
                   {"type": "kernel", "model": "m", "input_shape": [1, 3, 8, 8], "nodes": ["conv"], "kind": "conv",
                    "features": [1.0], "raw_s": 1e-3 * scale, "net_s": 1e-3 * scale},
                   {"type": "segment", "model": "m", "input_shape": [1, 3, 8, 8], "start": 0, "end": 2,
                    "median_s": 2e-3 * scale}]
        paths.append(tmp_path / f"m_{session}.jsonl")
        write_profile(paths[-1], profile_meta(settings, models=["m"]), records)
    merged = read_profiles(paths)
    assert len(merged.kernels) == len(merged.segments) == len(merged.overheads) == 1
    assert merged.kernels[0]["net_s"] == pytest.approx(1e-3) and merged.kernels[0]["sessions"] == 3
    assert merged.segments[0]["median_s"] == pytest.approx(2e-3)
    assert len(read_profiles(paths, merge=False).kernels) == 3


def _kernel_record(model, kind, seconds, **features):
    values = [float(features.get(name, 0.0)) for name in FEATURES]
    return {"type": "kernel", "model": model, "input_shape": [1, 3, 8, 8], "nodes": [f"{model}_{kind}_{seconds}"],
            "kind": kind, "features": values, "raw_s": seconds, "net_s": seconds}


def test_depthwise_convs_get_their_own_regressor_and_unseen_elementwise_kinds_a_pooled_one(tmp_path):
    """Depthwise convs move a byte per few FLOPs: fitted with dense convs they were predicted 47% too fast
    (MobileNetV2 held out). A kind no profile holds (DenseNet's pre-activation batch norm, held out) was
    predicted at the 2 us fallback; it now streams its tensor at the pooled elementwise rate."""
    from predictor.features import ELEMENTWISE

    rng = np.random.default_rng(0)
    records = []
    for index in range(60):
        model = f"m{index % 4}"
        flops, elements = rng.uniform(1e6, 1e8), rng.uniform(1e4, 1e6)
        records.append(_kernel_record(model, "conv", 1e-11 * flops + 1e-6, flops=flops, out_elements=elements,
                                      in_elements=elements, groups=1, in_channels=64))
        # depthwise: few FLOPs, time set by the bytes it moves
        records.append(_kernel_record(model, "conv", 2e-9 * elements + 1e-6, flops=9 * elements, out_elements=elements,
                                      in_elements=elements, groups=64, in_channels=64, depthwise=1))
        records.append(_kernel_record(model, "activation", 0.5e-9 * elements + 1e-6, out_elements=elements,
                                      in_elements=elements))
        records.append(_kernel_record(model, "add", 0.8e-9 * elements + 1e-6, out_elements=elements,
                                      in_elements=2 * elements, n_inputs=2))
    path = tmp_path / "synthetic.jsonl"
    write_profile(path, profile_meta(ProfileSettings(threads=1), models=["m0", "m1", "m2", "m3"]),
                  records + [{"type": "overhead", "model": "m0", "input_shape": [1, 3, 8, 8], "median_s": 1e-5}])
    predictor = fit_predictor(read_profiles([path]), progress=False)
    assert {"conv", "conv_dw", ELEMENTWISE} <= set(predictor.regressors)
    assert predictor.regressors[ELEMENTWISE].family == "linear"
    restored = KernelPredictor.from_dict(json.loads(json.dumps(predictor.to_dict())))
    depthwise = [r for r in records if r["features"][FEATURES.index("depthwise")]][:10]
    predicted = restored.kernel_seconds(["conv"] * 10, np.array([r["features"] for r in depthwise]))
    measured = np.array([r["net_s"] for r in depthwise])
    assert np.all(np.abs(predicted / measured - 1) < 0.1), predicted / measured
    # a batch norm + relu over 1M elements: no "bn" regressor, so the pooled one, not the 2 us fallback
    bn = _kernel_record("x", "bn", 0.0, out_elements=1e6, in_elements=1e6, has_act=1)["features"]
    [bn_seconds] = restored.kernel_seconds(["bn"], np.array([bn]))
    assert 2e-4 < bn_seconds < 2e-3
    # kinds that do no arithmetic keep the fallback
    [flatten_seconds] = restored.kernel_seconds(["flatten"], np.array([bn]))
    assert flatten_seconds == pytest.approx(restored.fallback_s)
    # a predictor file from before depthwise convs had their own regressor predicts them with "conv"
    older = KernelPredictor({"conv": predictor.regressors["conv"]}, 1e-5, 2e-6, 1)
    [old_seconds] = older.kernel_seconds(["conv"], np.array([depthwise[0]["features"]]))
    assert old_seconds == pytest.approx(predictor.regressors["conv"].predict(np.array([depthwise[0]["features"]]))[0])



def test_calibration_splits_cpu_speed_from_the_time_the_tier_does_not_run_us():
    """At one thread the scale is CPU speed (kernels on the CPU clock, the fit's statistic) times wall/CPU over
    whole passes: a free tier shows a stall factor near 1 (a 25% quota shows ~4, see the root test)."""
    import torch

    from predictor.calibrate import calibrate

    predictor = load_predictor("default")
    try:
        calibrated, info = calibrate(predictor, ("resnet18",), kernels=6,
                                     settings=ProfileSettings(threads=1, rounds=5, clock="wall"), progress=False)
    finally:
        torch.set_num_threads(2)
    assert info["kernels"] == 6 and info["clock"] == "wall"
    assert 0.95 <= info["stall_factor"] < 2.0, info  # wall time can only exceed this thread's CPU time
    assert 0.3 < info["cpu_scale"] < 3.0, info
    assert calibrated.scale == pytest.approx(info["cpu_scale"] * info["stall_factor"])
    assert calibrated.meta["calibration"]["scale"] == pytest.approx(calibrated.scale)


def test_kernel_costs_are_rederived_from_segments_where_a_model_has_them(graph_of):
    """Kernels timed in a whole-model pass ran 25% slow in the first half of the model (cache state), so they
    did not add up to the segments the runtime calls: costs solved from the model's random segments do, and a
    model without segments keeps its in-pass times."""
    import random

    from predictor.decompose import segment_consistent
    from predictor.profiler import Profile, random_slices

    graph = graph_of("resnet18", SMALL)
    kernels = group_kernels(graph)
    rng = np.random.default_rng(0)
    true_s = rng.uniform(2e-5, 1e-3, len(kernels))
    in_pass_s = np.where(np.arange(len(kernels)) < len(kernels) // 2, 1.25 * true_s, true_s)
    overhead_s = 2e-5
    position = {name: index for index, name in enumerate(graph.order)}
    first = np.array([position[k.nodes[0]] for k in kernels])

    def segment_s(start, end, costs):
        return overhead_s + costs[(first >= start) & (first < end)].sum()

    base = {"model": "resnet18", "input_shape": list(SMALL)}
    records = [{"type": "kernel", **base, "nodes": k.nodes, "kind": k.kind, "features": k.features,
                "raw_s": float(c), "net_s": float(c)} for k, c in zip(kernels, in_pass_s)]
    records += [{**r, "model": "other"} for r in records[:5]]  # a model without segments
    slices = random_slices(len(graph.order), 80, random.Random(0))
    segments = [{"type": "segment", **base, "start": a, "end": b, "median_s": float(segment_s(a, b, true_s))}
                for a, b in slices]
    profile = Profile(metas=[profile_meta(ProfileSettings(threads=1))], kernels=records, segments=segments,
                      overheads=[{"type": "overhead", **base, "median_s": overhead_s}])
    derived = segment_consistent(profile)
    costs = np.array([k["net_s"] for k in derived.kernels if k["model"] == "resnet18"])
    assert all(k.get("derived") for k in derived.kernels if k["model"] == "resnet18")
    assert [k["net_s"] for k in derived.kernels if k["model"] == "other"] == [r["net_s"] for r in records[:5]]

    def within(costs, tolerance):
        return np.mean([abs(segment_s(s["start"], s["end"], costs) / s["median_s"] - 1) <= tolerance for s in segments])

    assert within(in_pass_s, 0.05) < 0.6  # the in-pass times do not add up to the segments
    assert within(costs, 0.05) >= 0.95, within(costs, 0.05)
    assert derived.kernels[0]["chain_s"] == pytest.approx(in_pass_s[0])

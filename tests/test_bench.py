"""The benchmark harness: traffic model, plan, timers, float64 ground truth, error metric,
record arithmetic, and an end-to-end ``python -m fastpbn bench --tiny`` run (no timing
assertions: only structure and correctness of what is reported)."""

import copy
import json
import re

import pytest
import torch
from torch import nn

from fastpbn.bench import batchnorm, main, recompute, report, timing
from fastpbn.reference import batch_stats_reference

CPU = torch.device("cpu")
REQUIRED_TOP = {"device", "torch", "triton", "cuda", "date", "copy_gbps", "records"}
REQUIRED_RECORD = {"bench", "shape", "dtype", "layout", "pass", "impl", "baseline", "ms",
                   "baseline_ms", "speedup", "gbps", "median", "p20", "p80"}


def test_bytes_moved_follows_the_traffic_model():
    shape = (2, 3, 4, 5)  # 120 values
    assert batchnorm.bytes_moved(shape, torch.float32, "stats", "train") == 120 * 4
    assert batchnorm.bytes_moved(shape, torch.bfloat16, "forward", "train") == 120 * 2 * 3
    assert batchnorm.bytes_moved(shape, torch.float16, "backward", "train") == 120 * 2 * 4
    assert batchnorm.bytes_moved(shape, torch.float32, "forward_backward", "train") == 120 * 28
    assert batchnorm.bytes_moved(shape, torch.float32, "forward", "eval") == 120 * 4 * 2


def test_full_plan_is_the_bench_md_shape_set():
    cases = batchnorm.plan("full", CPU, compile_=True)
    assert len(batchnorm.FULL_SHAPES) == 31
    assert len(cases) == 31 * 3 * 2  # shapes x dtypes x layouts
    assert {c.shape for c in cases} == set(batchnorm.FULL_SHAPES)
    assert (128, 2048, 7, 7) in {c.shape for c in cases}
    compiled = [c for c in cases if c.compile]
    assert compiled and all(c.dtype != torch.float16 for c in compiled)
    assert all(c.shape[0] == 128 or c.shape in batchnorm.BAD_SHAPES for c in compiled)
    assert not any(c.graph for c in cases)  # CUDA graphs only on a CUDA device
    assert all("forward_backward" in c.passes["train"] for c in cases)
    assert not any(c.compile for c in batchnorm.plan("full", CPU, compile_=False))


def test_quick_and_tiny_plans():
    quick = batchnorm.plan("quick", CPU, compile_=True)
    assert len(quick) == len(batchnorm.QUICK_SHAPES) * 2 * 2
    assert sum(c.compile for c in quick) == 2
    tiny = batchnorm.plan("tiny", CPU, compile_=True)
    assert len(tiny) == 1 and not tiny[0].compile
    assert not any(c.graph for c in quick + tiny)
    # on CUDA the quick shapes (all small) get CUDA-graph rows too, as BENCH.md asks
    cuda = torch.device("cuda")  # (planning touches no device)
    assert all(c.graph for c in batchnorm.plan("quick", cuda, compile_=True))
    assert not batchnorm.plan("tiny", cuda, compile_=True)[0].graph
    with pytest.raises(ValueError, match="preset"):
        batchnorm.plan("huge", CPU, compile_=True)


def test_time_fn_cpu_quantiles_are_ordered():
    x = torch.randn(256, 256) + 3.0
    t = timing.time_fn(lambda: x @ x, CPU, min_run_time=0.02)
    assert 0 < t.p20 <= t.median <= t.p80


def test_time_fn_cpu_takes_several_blocks(monkeypatch):
    """A CPU timing is the median of at least five blocks: blocked_autorange may end after
    one block that a hiccup stretched past its run time, which was then the whole timing."""
    from torch.utils import benchmark

    class OneBlockTimer:  # blocked_autorange: one 2.5 ms block; each further block 0.1 ms
        def __init__(self, *args, **kwargs):
            pass

        def blocked_autorange(self, min_run_time):
            return benchmark.Measurement(100, [0.25], benchmark.TaskSpec("fn()", ""))

        def timeit(self, number):
            return benchmark.Measurement(number, [number * 1e-4], benchmark.TaskSpec("fn()", ""))

    monkeypatch.setattr(benchmark, "Timer", OneBlockTimer)
    t = timing.time_fn(lambda: None, CPU)
    assert t.median == pytest.approx(0.1) and t.p20 == pytest.approx(0.1)
    assert t.p80 > 0.1  # the stretched block is still there, as one of five


def test_time_fn_graph_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        timing.time_fn(lambda: None, CPU, graph=True)


def test_device_stamp_and_slug():
    name = timing.device_name(CPU)
    assert "CPU" in name and f"{torch.get_num_threads()} threads" in name
    slug = timing.device_slug(CPU)
    assert slug.startswith("cpu-") and re.fullmatch(r"[a-z0-9-]+", slug)


def _tiny_setup(**kw):
    return recompute.Setup("t", lambda: recompute._input_bn_cnn(4), 4, (3, 8, 8), 6, **kw)


def _capture_by_concatenation(model, batches):
    """Independent route: keep every BN input, concatenate, reduce once in float64."""
    seen = {}
    for name, bn in recompute.bn_layers(model).items():
        bn.register_forward_pre_hook(
            lambda mod, a, name=name: seen.setdefault(name, []).append(a[0].double()))
    with torch.no_grad():
        for b in batches:
            model(b)
    return {name: batch_stats_reference(torch.cat(xs)) for name, xs in seen.items()}


@pytest.mark.parametrize("batch_size", [None, 8])
def test_ground_truth_is_the_float64_models_statistics(batch_size):
    model, batches = recompute.prepare(_tiny_setup(data_mean=50.0, data_std=3.0), CPU)
    truth = recompute.ground_truth(model, batches, batch_size)
    m = copy.deepcopy(model).double().eval()
    for bn in recompute.bn_layers(m).values():
        bn.train()
    ref = _capture_by_concatenation(m, [b.double() for b in
                                        recompute._regroup(batches, batch_size)])
    assert set(truth) == set(ref) and len(truth) == 4
    for name, (mean, m2, n) in truth.items():
        ref_mean, ref_var, ref_n = ref[name]
        assert n == ref_n
        torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m2 / n, ref_var, rtol=1e-10, atol=1e-12)
    for bn in recompute.bn_layers(model).values():  # the model itself is untouched
        assert not bn.training and bn.weight.dtype == torch.float32


def test_float64_capture_merges_calls_exactly_and_leaves_modes():
    model, batches = recompute.prepare(_tiny_setup(data_mean=-20.0, data_std=0.5), CPU)
    model.train()
    capture = recompute.Float64Capture(model)
    with torch.no_grad():
        for b in batches:
            model(b)
    capture.remove()
    assert model.training
    got = capture.truth()
    ref = _capture_by_concatenation(copy.deepcopy(model), batches)  # same inputs: eval=train
    for name, (mean, m2, n) in got.items():
        torch.testing.assert_close(mean, ref[name][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m2 / n, ref[name][1], rtol=1e-10, atol=1e-12)


def test_stats_error_metric():
    model, batches = recompute.prepare(_tiny_setup(), CPU)
    truth = recompute.ground_truth(model, batches)
    layers = recompute.bn_layers(model)
    for name, (mean, m2, n) in truth.items():
        layers[name].running_mean.copy_(mean)
        layers[name].running_var.copy_(m2 / (n - 1))
    err = recompute.stats_error(model, truth)
    assert err["max"] < 1e-6
    assert recompute.stats_error(model, truth, biased=True)["var"] > 0.5 / max(
        n for _, _, n in truth.values())
    name = next(iter(truth))
    layers[name].running_var.mul_(1.01)
    assert recompute.stats_error(model, truth)["var"] == pytest.approx(0.01, rel=1e-3)


def test_recompute_peers_errors_are_what_they_are():
    """fvcore's float32 E[x²] − E[x]² breaks on an input BN with |mean|/std = 1e4;
    swa_utils.update_bn's average of per-batch variances misses the spread of batch means."""
    setup = _tiny_setup(data_mean=1e4, data_std=1.0)
    model, batches = recompute.prepare(setup, CPU)
    truth = recompute.ground_truth(model, batches)
    ms = recompute.methods(CPU, setup.batch)
    errs = {}
    for name in ("fvcore", "torch-swa-update_bn"):
        m = ms[name].prep(copy.deepcopy(model))
        ms[name].run(m, batches)
        errs[name] = recompute.stats_error(m, truth, ms[name].biased)
    assert errs["fvcore"]["var"] > 0.1
    assert errs["torch-swa-update_bn"]["var"] > 1e-4


def test_cli_quick_end_to_end(tmp_path):
    """The preset a user runs on a CPU-only machine, whole (about a minute on one thread)."""
    out = tmp_path / "quick"
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    # no time budget: a slow machine must not skip cases, which the assertions below forbid
    # --device cpu: a CUDA machine would default to CUDA (a different path, slower here)
    rc = main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out),
               "--no-progress", "--budget", "1e9"])
    # the caller's thread setting and random state are restored
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    result = json.loads((out / "results.json").read_text())
    assert rc == 0, result["errors"]
    assert result["preset"] == "quick" and not result["skipped"]
    kern = [r for r in result["records"] if r["bench"] == "batch_norm"]
    assert len({tuple(r["shape"]) for r in kern}) == len(batchnorm.QUICK_SHAPES)
    assert {r["baseline"] for r in kern} >= {"torch-eager", "torch-compile", "torch-var_mean"}
    # compiled FastPreciseBN2d against compiled stock: every compiled stock row has its twin
    compiled = [r for r in kern if r["baseline"] == "torch-compile"]
    ours = [r for r in compiled if r["impl"] == batchnorm.COMPILED]
    assert ours and 2 * len(ours) == len(compiled)
    rec = [r for r in result["records"] if r["bench"] == "recompute"]
    setups = recompute.setups("quick", CPU)
    assert {r["model"] for r in rec} == {s.name for s in setups}
    assert sum(r["headline"] for r in rec) == len(setups) * len(recompute.BASELINES)
    assert all(r["err"] < 1e-5 for r in rec)  # every fastpbn row exact to float32
    for png in ("speedup.png", "roofline.png", "recompute.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_recompute_feature_rows_by_device():
    """Rows that switch one throughput feature off; the host-copy rows only where the batches
    can be copied to a device, with the batches handed over in host memory."""
    cpu, cuda = recompute.methods(CPU, 8), recompute.methods(torch.device("cuda"), 8)
    host = ("fastpbn(pinned host batches)", "fastpbn(pageable host batches)")
    assert "fastpbn(stop_early=True)" in cpu and not set(host) & set(cpu)
    assert set(host) <= set(cuda) and "fastpbn+cuda_graph" in cuda
    batch = torch.ones(2, 3)
    assert cpu["fastpbn"].data([batch])[0] is batch
    moved = cuda["fastpbn(pageable host batches)"].data([batch])[0]
    assert moved.device.type == "cpu" and torch.equal(moved, batch)


def _record(shape=(2, 3, 4, 4)):
    case = batchnorm.Case(shape, torch.float32, True)
    t, tb = timing.Timing(2.0, 1.5, 2.5), timing.Timing(3.0, 2.9, 3.3)
    return batchnorm.make_record(case, "forward", "train", "fastpbn[torch]", "torch-eager",
                                 t, tb, copy_gbps=0.0001)


def test_make_record_arithmetic():
    r = _record()
    assert REQUIRED_RECORD <= set(r)
    assert r["layout"] == "channels_last" and r["shape"] == [2, 3, 4, 4]
    assert r["speedup"] == pytest.approx(1.5)
    assert r["bytes"] == 96 * 4 * 3
    assert r["gbps"] == pytest.approx(r["bytes"] / 2.0e-3 / 1e9)
    assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / 0.0001)
    assert (r["p20"], r["p80"], r["baseline_p80"]) == (1.5, 2.5, 3.3)


def test_summary_median_and_worst():
    recs = []
    for s in (0.5, 2.0, 4.0):
        r = _record()
        r["speedup"] = s
        recs.append(r)
    (row,) = report.summary(recs)
    assert (row["n"], row["median"], row["min"], row["fastpbn"]) == (3, 2.0, 0.5, "eager")
    recs[0]["impl"] = batchnorm.COMPILED  # compiled fastpbn: a group of its own
    assert sorted((r["fastpbn"], r["n"]) for r in report.summary(recs)) == [
        ("compiled", 1), ("eager", 2)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cli_tiny_end_to_end(tmp_path, device):
    out = tmp_path / "res"
    rc = main(["--tiny", "--device", device, "--threads", "1", "--out", str(out),
               "--no-progress"])
    result = json.loads((out / "results.json").read_text())
    assert rc == 0, result["errors"]
    assert REQUIRED_TOP <= set(result)
    cuda = device == "cuda"
    assert result["cuda_device"] == cuda
    if cuda:
        assert result["cuda"] == torch.version.cuda is not None
        assert result["device"] == torch.cuda.get_device_name()
    else:
        assert result["cuda"] is None and "CPU" in result["device"]
    assert result["copy_gbps"] > 0 and result["preset"] == "tiny"
    records = result["records"]
    assert all(REQUIRED_RECORD <= set(r) for r in records)
    kern = [r for r in records if r["bench"] == "batch_norm"]
    assert {r["pass"] for r in kern} == {"stats", "forward", "forward_backward"}
    for r in kern:
        assert r["ms"] > 0 and r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"])
        assert r["p20"] <= r["median"] <= r["p80"]
    rec = [r for r in records if r["bench"] == "recompute"]
    assert {r["baseline"] for r in rec} == set(recompute.BASELINES)
    headline = [r for r in rec if r["headline"]]
    assert len(headline) == 2 * len(recompute.BASELINES)  # per setup and baseline
    assert "fastpbn(stop_early=True)" in {r["impl"] for r in rec}  # a feature's own row
    # CUDA only: the CUDA-graph row and the rows fed from host memory
    graphed = {"fastpbn+cuda_graph"}
    assert ({"fastpbn(pinned host batches)", "fastpbn(pageable host batches)"} | graphed
            <= {r["impl"] for r in rec}) == cuda
    eager_f64 = {r["model"]: r["err_f64"] for r in rec if r["impl"] == "fastpbn"}
    for r in rec:
        assert r["samples_per_s"] == pytest.approx(r["samples"] / (r["ms"] * 1e-3))
        assert r["err_f64"] >= 0 and r["baseline_err_f64"] >= 0
        if r["impl"] in graphed:
            # hooks do not run in a graph replay: no ``err``; against the float64 model it is
            # as close as the eager pass (a batch missed or counted twice is off by percents)
            assert r["err"] is None and r["err_f64"] <= 4 * eager_f64[r["model"]] + 1e-5, r
        elif r["impl"].startswith("fastpbn"):
            assert r["err"] < 1e-5, r  # float32 buffers: ~1e-7 is the floor
    stress = [r for r in rec if r["data"].startswith("mean 10000")]
    assert stress and all(r["baseline_err"] > 0.1 for r in stress if r["baseline"] == "fvcore")
    md = (out / "results.md").read_text()
    assert ("CPU results" in md) != cuda and "| shape |" in md and "## Recompute" in md
    for png in ("speedup.png", "roofline.png", "recompute.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--quick", "--tiny"])
    with pytest.raises(SystemExit):
        main(["--tiny", "--device", "mps", "--no-progress"])
    with pytest.raises(SystemExit, match="--device must be cpu or cuda"):
        main(["--tiny", "--device", "foo", "--no-progress"])
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="--out"):
        main(["--tiny", "--out", str(tmp_path / "afile"), "--no-progress"])
    with pytest.raises(SystemExit, match="--threads"):
        main(["--tiny", "--out", str(tmp_path / "b"), "--threads", "0", "--no-progress"])
    for budget in ("-1", "nan"):  # (ran every recompute case and skipped every kernel one)
        with pytest.raises(SystemExit, match="--budget must be a positive number"):
            main(["--tiny", "--out", str(tmp_path / "b"), "--budget", budget, "--no-progress"])
    monkeypatch.setenv("FASTPBN_BACKEND", "bogus")  # (failed in every case, then exit 1)
    with pytest.raises(SystemExit, match="FASTPBN_BACKEND='bogus'"):
        main(["--tiny", "--out", str(tmp_path / "b"), "--no-progress"])
    assert not (tmp_path / "b").exists()  # nothing created for rejected arguments


def test_regroup_matches_loader_of_that_batch_size():
    batches = [torch.full((3, 1), float(i)) for i in range(5)]  # 15 samples
    groups = recompute._regroup(batches, 4)
    assert [len(g) for g in groups] == [4, 4, 4, 3]
    assert torch.equal(torch.cat(groups), torch.cat(batches))
    assert recompute._regroup(batches, None) is batches


def test_input_bn_model_sees_raw_inputs():
    model = recompute._input_bn_cnn(4)
    assert isinstance(model[0], nn.BatchNorm2d) and model[0].num_features == 3


def test_pass_fns_rotate_inputs_and_compute_the_right_gradients():
    case = batchnorm.Case((4, 3, 5, 5), torch.float32, False)
    sets = batchnorm._inputs(case, CPU, copies=3)
    assert all(x.mean() > 3.0 for x, _ in sets)  # shifted data, never zeros
    fast, stock = batchnorm._modules(3, CPU)
    fwd = batchnorm._pass_fn(fast, "forward", "train", sets)
    outs = [fwd() for _ in range(4)]
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[3])
    fb = batchnorm._pass_fn(fast, "forward_backward", "train", sets)
    ref = batchnorm._pass_fn(stock, "forward_backward", "train", sets)
    for got, want in zip(fb(), ref()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ev = batchnorm._pass_fn(fast, "forward", "eval", sets)
    assert not fast.training and not ev().requires_grad
    with pytest.raises(ValueError, match="one input set"):
        batchnorm._pass_fn(fast, "backward", "train", sets)


def test_run_case_reports_failures_without_losing_the_other_rows(monkeypatch):
    case = batchnorm.Case((4, 8, 3, 3), torch.float32, False,
                          {"train": ("stats", "forward"), "eval": ("forward",)})
    # a broken baseline: only its rows go missing, the failure is reported
    monkeypatch.setattr(batchnorm, "_stats_fns", lambda x: {"broken": lambda: 1 / 0})
    errors = []
    recs = batchnorm.run_case(case, CPU, None, dict(min_run_time=0.01), errors)
    assert [(r["pass"], r["mode"]) for r in recs] == [("forward", "train"), ("forward", "eval")]
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0][1]
    assert all(r["pct_copy"] is None for r in recs)  # no copy bandwidth, no percentage


def test_targets_are_judged_from_records():
    recs = []
    for s, base in ((2.0, "torch-eager"), (1.2, "torch-eager"), (0.9, "torch-eager"),
                    (1.3, "torch-compile")):
        r = _record()
        r.update({"pass": "forward_backward", "baseline": base, "speedup": s})
        recs.append(r)
    stats = _record((64, 64, 64, 64))  # 64 Mi values, fp32: above the 64 MB threshold
    stats.update({"pass": "stats", "baseline": "torch-var_mean", "pct_copy": 95.0})
    recs.append(stats)
    recs.append({"bench": "recompute", "model": "resnet50", "impl": "fastpbn",
                 "baseline": "fvcore", "speedup": 1.4})
    compiled = _record()  # compiled fastpbn rows do not count towards the targets
    compiled.update({"pass": "forward_backward", "baseline": "torch-compile", "speedup": 0.1,
                     "impl": batchnorm.COMPILED})
    recs.append(compiled)
    got = {t["target"]: (t["measured"], t["met"]) for t in report.targets(recs)}
    assert got["fwd+bwd vs stock eager, median"] == (1.2, False)
    assert got["fwd+bwd vs stock eager, worst"] == (0.9, False)
    assert got["fwd+bwd vs torch.compile, median"] == (1.3, True)
    assert got["stats on >= 64 MB, worst % of copy BW"] == (95.0, True)
    assert got["recompute ResNet-50 vs fvcore"] == (1.4, False)
    assert got["recompute small CNN + CUDA graphs vs fvcore"] == (None, None)


def _fake_result(cuda: bool) -> dict:
    k = _record()
    rc = {"bench": "recompute", "shape": [8, 3, 8, 8], "dtype": "float32", "layout": "NCHW",
          "pass": "stats", "impl": "fastpbn+cuda_graph", "baseline": "fvcore", "ms": 2.0,
          "baseline_ms": 7.0, "speedup": 3.5, "gbps": None, "median": 2.0, "p20": 1.9,
          "p80": 2.1, "model": "small_cnn", "data": "mean 3, std 2", "samples": 64,
          "batch_size": 8, "headline": False, "samples_per_s": 32e3, "err": None,
          "err_f64": 1e-7, "baseline_err": 3e-6, "baseline_err_f64": 3e-6}
    return {"device": "NVIDIA H100" if cuda else "some CPU", "torch": "2.x", "triton": "3.x",
            "cuda": "12.x" if cuda else None, "date": "2026-01-01T00:00:00+00:00",
            "copy_gbps": 3000.0 if cuda else 20.0, "records": [k, rc], "preset": "full",
            "cuda_device": cuda, "runtime_s": 1.0, "skipped": ["kernels x: time budget spent"],
            "errors": []}


@pytest.mark.parametrize("cuda", [False, True])
def test_report_files_for_cpu_and_gpu_results(tmp_path, cuda):
    result = _fake_result(cuda)
    md = open(report.write_markdown(result, str(tmp_path))).read()
    assert ("CPU results" in md) != cuda
    assert ("| recompute small CNN + CUDA graphs vs fvcore | >= 3x | 3.5 | True |" in md) == cuda
    assert "| – |" in md  # a method without a hook-measured error shows a dash, not a number
    assert "time budget spent" in md
    paths = report.write_plots(result, str(tmp_path))
    assert len(paths) == 3 and all(open(p, "rb").read(4) == b"\x89PNG" for p in paths)


def test_recompute_without_fvcore_keeps_the_other_baseline(monkeypatch):
    real = recompute.importlib.util.find_spec
    monkeypatch.setattr(recompute.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fvcore" else real(name, *a))
    setup = recompute.Setup("t", lambda: recompute._input_bn_cnn(4), 4, (3, 8, 8), 4)
    recs = recompute.run_setup(setup, CPU, repeats=1)
    assert recs and {r["baseline"] for r in recs} == {"torch-swa-update_bn"}


def test_recompute_methods_take_turns_and_a_failure_drops_one(monkeypatch):
    """Timed runs alternate between methods (round-robin after one warm-up round), so a drift
    of the machine does not fall on one method; a method that fails is reported and the others
    are still timed and checked."""
    calls = []

    def method(name, fail_at=None):
        def run(model, data):
            calls.append(name)
            if len(calls) == fail_at:
                raise ZeroDivisionError("planted")
            torch.optim.swa_utils.update_bn(data, model)
        return recompute.Method(run)

    ms = {"fastpbn": method("fastpbn"), "bad": method("bad", fail_at=5),
          "torch-swa-update_bn": method("torch-swa-update_bn")}
    monkeypatch.setattr(recompute, "methods", lambda device, batch: dict(ms))
    setup = recompute.Setup("t", lambda: recompute._input_bn_cnn(4), 4, (3, 8, 8), 4)
    errors = []
    recs = recompute.run_setup(setup, CPU, repeats=2, errors=errors)
    # rounds 0-2 alternate; "bad" fails in round 1 and is dropped; one error-capture run each
    assert calls == ["fastpbn", "bad", "torch-swa-update_bn", "fastpbn", "bad",
                     "torch-swa-update_bn", "fastpbn", "torch-swa-update_bn",
                     "fastpbn", "torch-swa-update_bn"]
    assert [e[0] for e in errors] == ["recompute t bad"] and "planted" in errors[0][1]
    (rec,) = recs
    assert rec["impl"] == "fastpbn" and rec["baseline"] == "torch-swa-update_bn"
    assert rec["err"] == rec["baseline_err"] > 0 and rec["ms"] > 0  # the same function

"""``python -m fastpbn demo``: the reduced run end to end, its outputs, and the --data loaders."""

import contextlib
import gzip
import io
import json
import math

import numpy as np
import pytest
import torch

from fastpbn.demo import data as demo_data
from fastpbn.demo import main
from fastpbn.demo.report import sign_test_p

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALLCNN_BN_LAYERS = ["features.1", "features.4", "features.8"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--quick", "--out", str(out), "--no-progress"])
    # the caller's thread setting and random state are restored
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    return rc, out, json.loads((out / "results.json").read_text()), stdout.getvalue()


def test_quick_run_writes_everything(quick_run):
    rc, out, res, _ = quick_run
    assert rc == 0
    for name in ("curves.png", "error_vs_samples.png", "ema_drift.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000, name
        import matplotlib.image

        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400, name
        assert img.std() > 0.01, f"{name} is blank"
    report = (out / "report.md").read_text()
    for needle in ("## Findings", "Test error (%)", "EMA drift", "23.7", "32.0",
                   "![curves.png](curves.png)", "python -m fastpbn demo --quick"):
        assert needle in report, needle


def test_quick_run_numbers_are_sane(quick_run):
    _, _, res, _ = quick_run
    n_train, n_test = res["data"]["n_train"], res["data"]["n_test"]
    assert (n_train, n_test) == (300, 200)
    assert res["num_samples"] == [10, 100, 300]
    assert res["norm_batches"] == [8, 128]
    assert len(res["epochs"]) == 1
    ep = res["epochs"][0]
    assert 0.0 <= ep["ema"]["acc"] <= 1.0 and math.isfinite(ep["ema"]["loss"])
    # better than chance (10 classes) after one epoch, or something is broken
    assert ep["ema"]["acc"] > 0.2 and ep["train_acc"] > 0.2
    grid = {(r["num_samples"], r["batch_size"]) for r in ep["precise"]}
    assert grid == {(n, b) for n in (10, 100, 300) for b in (8, 128)}
    for r in ep["precise"]:
        assert 0.0 <= r["acc"] <= 1.0 and math.isfinite(r["loss"]) and r["time_s"] > 0
        # a last batch of one sample is skipped by design; nothing else goes missing
        assert r["num_samples"] - 1 <= r["samples_used"] <= r["num_samples"]
        assert r["batches"] == math.ceil(r["num_samples"] / r["batch_size"]) - (
            r["samples_used"] < r["num_samples"])
    for b in ("8", "128"):
        rows = ep["drift"][b]
        assert [r["layer"] for r in rows] == SMALLCNN_BN_LAYERS
        assert [r["channels"] for r in rows] == [8, 16, 32]  # width 8 in quick mode
        for r in rows:
            assert 0 <= r["mean_err_avg"] <= r["mean_err_max"] < 10
            assert 0 <= r["std_err_avg"] <= r["std_err_max"] < 10
    # values per channel per sample: 8x8, 8x8 and (after max-pool) 4x4
    assert res["layers"] == dict(zip(SMALLCNN_BN_LAYERS, [64, 64, 16]))
    # the paired counts explain the accuracy gap exactly
    best = next(r for r in ep["precise"] if r["num_samples"] == 300 and r["batch_size"] == 128)
    p = ep["paired"]
    gap = (p["ema_only_wrong"] - p["precise_only_wrong"]) / n_test
    assert best["acc"] - ep["ema"]["acc"] == pytest.approx(gap, abs=1e-9)


def test_quick_run_prints_table(quick_run):
    _, _, res, text = quick_run
    head = ("| epoch | EMA | B=8 N=10 | B=8 N=100 | B=8 N=all (300) | B=128 N=10 | B=128 N=100 "
            "| B=128 N=all (300) |")
    assert head in text and "Precise statistics" in text and "McNemar" in text
    ema_err = 100 * (1 - res["epochs"][0]["ema"]["acc"])
    assert f"| 1 | {ema_err:.2f} |" in text


def _tiny_arrays(rng, n_train=40, n_test=16, hw=6):
    # shifted and scaled pixels: the standardization must remove a mean far from 0
    x_tr = (200 + 30 * rng.random((n_train, hw, hw))).astype(np.float32)
    x_te = (200 + 30 * rng.random((n_test, hw, hw))).astype(np.float32)
    return {"x_train": x_tr, "y_train": rng.integers(0, 3, n_train),
            "x_test": x_te, "y_test": rng.integers(0, 3, n_test)}


def _expected(arrays):
    x, x_test = (arrays[k].astype(np.float64) for k in ("x_train", "x_test"))
    mean, std = x.mean(), x.std()
    return ((x - mean) / std, (x_test - mean) / std)


def test_npz_loader(tmp_path):
    arrays = _tiny_arrays(np.random.default_rng(1))
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    split = demo_data.load_path(str(path))
    x_tr, x_te = _expected(arrays)
    assert split.x_train.shape == (40, 1, 6, 6) and split.x_train.dtype == torch.float32
    torch.testing.assert_close(split.x_train[:, 0].double(), torch.from_numpy(x_tr),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(split.x_test[:, 0].double(), torch.from_numpy(x_te),
                               atol=1e-5, rtol=0)
    assert split.y_train.tolist() == arrays["y_train"].tolist()
    assert split.num_classes == 3 and split.in_channels == 1


def _write_idx(path, arr, compress):
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    blob = header + arr.tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


def test_idx_loader_matches_npz(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {"x_train": rng.integers(0, 256, (24, 5, 7), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 24).astype(np.uint8),
              "x_test": rng.integers(0, 256, (9, 5, 7), dtype=np.uint8),
              "y_test": rng.integers(0, 10, 9).astype(np.uint8)}
    idx = tmp_path / "idx"
    idx.mkdir()
    # two files gzip-compressed, two raw: both must be read
    _write_idx(idx / "train-images-idx3-ubyte.gz", arrays["x_train"], True)
    _write_idx(idx / "train-labels-idx1-ubyte", arrays["y_train"], False)
    _write_idx(idx / "t10k-images-idx3-ubyte", arrays["x_test"], False)
    _write_idx(idx / "t10k-labels-idx1-ubyte.gz", arrays["y_test"], True)
    np.testing.assert_array_equal(demo_data.read_idx(str(idx / "train-images-idx3-ubyte.gz")),
                                  arrays["x_train"])
    from_idx = demo_data.load_path(str(idx))
    np.savez(tmp_path / "same.npz", **arrays)
    from_npz = demo_data.load_path(str(tmp_path / "same.npz"))
    assert from_idx.x_train.shape == (24, 1, 5, 7)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(from_idx, field), getattr(from_npz, field)), field


def test_bad_data_errors(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 16)
    with pytest.raises(ValueError, match="not an IDX file"):
        demo_data.read_idx(str(bad))
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.array([10], dtype=">u4").tobytes() + b"\x00" * 3)
    with pytest.raises(ValueError, match="declares shape"):
        demo_data.read_idx(str(short))
    np.savez(tmp_path / "keys.npz", images=np.zeros((4, 3, 3)))
    with pytest.raises(KeyError, match="found images"):
        demo_data.load_path(str(tmp_path / "keys.npz"))
    with pytest.raises(FileNotFoundError, match="no train-images-idx3-ubyte"):
        (tmp_path / "empty").mkdir()
        demo_data.load_path(str(tmp_path / "empty"))


def test_cli_reports_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path)])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--batch-size", "0"])
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--num-samples", "10,x"])
    assert "--num-samples" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    good = {"x_train": np.random.rand(8, 6, 6), "y_train": np.zeros(8),
            "x_test": np.random.rand(4, 6, 6), "y_test": np.zeros(4)}
    np.savez(tmp_path / "good.npz", **good)
    blob = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(blob[: len(blob) // 2])
    np.savez(tmp_path / "nan.npz", **{**good, "x_train": np.full((8, 6, 6), np.nan)})
    for argv, message in [
        (["--out", str(tmp_path / "afile")], "--out"),  # an existing file
        (["--norm-batch", "1"], "--norm-batch"),
        (["--lr", "-5"], "--lr"),
        (["--data", str(tmp_path / "trunc.npz")], "not a readable .npz"),
        (["--data", str(tmp_path / "nan.npz")], "non-finite"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["--quick", "--no-progress", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_demo_on_local_npz(tmp_path):
    arrays = _tiny_arrays(np.random.default_rng(3))
    np.savez(tmp_path / "tiny.npz", **arrays)
    out = tmp_path / "out"
    # --num-samples without the whole set: N = all is always added (the reference point)
    rc = main(["--data", str(tmp_path / "tiny.npz"), "--epochs", "2", "--width", "4",
               "--batch-size", "4", "--norm-batch", "16", "--repeats", "2", "--num-samples",
               "10,500", "--out", str(out), "--no-progress"])
    res = json.loads((out / "results.json").read_text())
    assert rc == 0 and res["data"]["name"].startswith("tiny.npz")
    assert res["num_samples"] == [10, 40] and res["norm_batches"] == [4, 16]
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    # N < all is drawn twice per B, N = all once
    assert len(res["epochs"][1]["precise"]) == 2 * 2 + 2
    assert all(0 <= r["acc"] <= 1 for e in res["epochs"] for r in e["precise"])


def test_sign_test_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for a, b in ((0, 0), (1, 0), (5, 1), (3, 9), (18, 0), (40, 52)):
        expected = scipy_stats.binomtest(min(a, b), a + b, 0.5).pvalue if a + b else 1.0
        assert sign_test_p(a, b) == pytest.approx(expected, rel=1e-12), (a, b)


def test_help_documents_reduced_mode(capsys):
    from fastpbn.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--quick" in text and "--max-train" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_gpu_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--quick"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_quick_run_on_cuda(tmp_path):
    rc = main(["--quick", "--device", "cuda", "--out", str(tmp_path), "--no-progress"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and res["machine"]["gpu"]
    assert all(0 <= r["acc"] <= 1 for r in res["epochs"][0]["precise"])

"""The CUDA C++ backend: csrc/ and fastpbn/_cuda_ext.py.

Without a GPU: every csrc/*.cu compiles with nvcc for sm_90, the torch binding passes a g++ syntax
check, and the real kernels and launchers run on the CPU through a host emulation
(csrc/emulation/: one fiber per CUDA thread, blocks in several orders) behind the binding's
interface, against the float64 reference; the backend reports itself unavailable with reasons.
With a GPU (marker ``gpu``) the same sweep runs on the built extension, plus agreement with the
Triton backend and compute-sanitizer (memcheck, racecheck, synccheck).
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.resources
import importlib.util
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import types
import warnings
from dataclasses import dataclass

import pytest
import torch

import fastpbn
from fastpbn import _cuda_ext, _scratch
from fastpbn._backend import BackendUnavailable, CudaBackend
from fastpbn.reference import batch_norm_reference, batch_stats_reference

from .conftest import HAS_CUDA, HAS_TRITON

CSRC = pathlib.Path(str(importlib.resources.files("fastpbn._csrc")))
EMULATION = CSRC / "emulation"
NVCC = _cuda_ext._find_nvcc()
GXX = shutil.which("g++")
NAN = float("nan")


_TOOLKIT = _cuda_ext.toolkit_home()
CUDA_INCLUDE = pathlib.Path(_TOOLKIT) / "include" if _TOOLKIT else None


def _emulation_module():
    """csrc/emulation/emulated.py (beside its C++; not installed), or None."""
    path = EMULATION / "emulated.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("fastpbn_emulated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


emulation = _emulation_module()

# ---------------------------------------------------------------------------------------------
# Builds: started together on first use (they are independent); each test waits for its own.


def _compile_cu(cu: pathlib.Path, out: pathlib.Path):
    cmd = [NVCC, "-c", "-gencode=arch=compute_90,code=sm_90", str(cu), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


def _syntax_check_binding(out: pathlib.Path):
    from torch.utils.cpp_extension import include_paths

    # the one generated header a CPU-only wheel leaves out of c10/cuda
    stub = out / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    system = [*include_paths(), str(CUDA_INCLUDE), sysconfig.get_paths()["include"]]
    cmd = [GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-DTORCH_EXTENSION_NAME=t",
           f"-I{out / 'stub'}", f"-I{CSRC}", *(f"-isystem{p}" for p in system),
           str(CSRC / "fastpbn_cuda.cpp")]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_builds")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    jobs = {}
    if NVCC:
        for cu in sorted(CSRC.glob("*.cu")):
            jobs[cu.name] = pool.submit(_compile_cu, cu, out / f"{cu.stem}.o")
    if GXX and CUDA_INCLUDE:
        if (pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
            jobs["binding"] = pool.submit(_syntax_check_binding, out)
        if emulation is not None:
            jobs["emulation"] = pool.submit(emulation.build, CSRC, out / "emulation", GXX,
                                            CUDA_INCLUDE)
    yield jobs
    pool.shutdown(wait=True)


def _job(builds, name, why):
    if name not in builds:
        pytest.skip(why)
    return builds[name].result()


# ---------------------------------------------------------------------------------------------
# Sources and toolchain


def test_sources_ship_without_torch_headers():
    kernels = sorted(p.name for p in CSRC.glob("*.cu"))
    assert kernels == ["grad_input.cu", "grad_reduce.cu", "normalize.cu", "stats.cu"]
    for path in [*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        includes = re.findall(r"#include\s*[<\"]([^>\"]+)", path.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
    assert "PYBIND11_MODULE(TORCH_EXTENSION_NAME" in (CSRC / "fastpbn_cuda.cpp").read_text()
    tree = ast.parse((CSRC / "__init__.py").read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0].value, ast.Constant)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("name", ["grad_input.cu", "grad_reduce.cu", "normalize.cu", "stats.cu"])
def test_cu_compiles_for_sm90(builds, name):
    result = _job(builds, name, "nvcc not on PATH")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


def test_binding_syntax_against_torch_headers(builds):
    result = _job(builds, "binding", "g++, the CUDA headers or Python.h missing")
    assert result.returncode == 0, result.stderr[-4000:]
    assert not re.search(r"fastpbn_cuda\.(cpp|h):\d+:\d+: warning", result.stderr), result.stderr


# ---------------------------------------------------------------------------------------------
# Availability and build caching


def test_import_builds_nothing():
    code = (
        "import sys; import fastpbn._cuda_ext as e; "
        "print('triton' in sys.modules, 'torch.utils.cpp_extension' in sys.modules, e._ext)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "None"]


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_unavailable_without_cuda_lists_reasons(monkeypatch):
    monkeypatch.setattr(_cuda_ext, "_build_error", None)
    reasons = _cuda_ext.not_supported_reasons()
    assert any("CPU-only" in r or "no CUDA device" in r for r in reasons), reasons
    with pytest.raises(_cuda_ext.CudaExtensionError, match="cannot build"):
        _cuda_ext.load()
    assert _cuda_ext._build_error is None  # the environment is reported, not cached as a failure
    x = torch.randn(4, 3, 5) * 2 + 10
    fastpbn.set_backend("cuda")
    for op in (
        lambda: fastpbn.batch_norm(x, None, None, training=True),
        lambda: fastpbn.batch_norm(x, torch.zeros(3), torch.ones(3)),
        lambda: fastpbn.batch_stats(x),
        lambda: fastpbn.WelfordState(3).update(x),
        lambda: fastpbn.FastPreciseBN1d(3)(x),
    ):
        with pytest.raises(BackendUnavailable, match="'cuda' cannot run.*not CUDA"):
            op()


def test_failed_build_is_reported_not_retried(monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("Error building extension: nvcc fatal: boom")

    monkeypatch.setattr(_cuda_ext, "_ext", None)
    monkeypatch.setattr(_cuda_ext, "_build_error", None)
    monkeypatch.setattr(_cuda_ext, "_environment_reasons", lambda: ())
    monkeypatch.setattr(_cuda_ext, "_build", failing_build)
    for _ in range(2):
        with pytest.raises(_cuda_ext.CudaExtensionError, match="nvcc fatal: boom"):
            _cuda_ext.load()
    assert len(calls) == 1
    assert any("boom" in r for r in _cuda_ext.not_supported_reasons())


def test_auto_moves_on_when_the_build_fails(monkeypatch):
    """auto on a CUDA tensor without Triton: a failed build warns once and the torch backend
    serves that call and every later one (the first call used to raise, the later ones
    switched silently); naming the backend raises the build error."""
    from fastpbn import _backend

    monkeypatch.setattr(_cuda_ext, "_ext", None)
    monkeypatch.setattr(_cuda_ext, "_build_error", None)
    monkeypatch.setattr(_cuda_ext, "_environment_reasons", lambda: ())
    monkeypatch.setattr(_cuda_ext, "_build", lambda: (_ for _ in ()).throw(
        RuntimeError("Error building extension: nvcc fatal: boom")))
    monkeypatch.setattr(_backend._INSTANCES["triton"], "not_supported_reasons",
                        lambda x: ["triton is not installed"])
    monkeypatch.setattr(_backend, "_common_reasons", lambda x: [])
    x = types.SimpleNamespace(device=torch.device("cuda"), shape=(4, 3), dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="boom.*torch backend"):
        assert _backend.get_backend(x, "auto").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.get_backend(x, "auto").name == "torch"
    with pytest.raises(BackendUnavailable, match="boom"):
        _backend.get_backend(x, "cuda")


def test_build_targets_the_local_gpu_from_installed_sources(monkeypatch):
    """What _build hands torch.utils.cpp_extension.load (the build itself needs a GPU)."""
    import torch.utils.cpp_extension as cpp_extension

    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs, arch=os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    caps = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[i or 0])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _cuda_ext._build() == "module"
    assert seen["name"] == "fastpbn_cuda_sm90" and seen["arch"] == "9.0"
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # restored
    caps[:] = [(9, 0), (8, 0), (9, 0)]  # GPUs of two generations: one build for both
    assert _cuda_ext._build() == "module"
    assert seen["name"] == "fastpbn_cuda_sm80_sm90" and seen["arch"] == "8.0;9.0"
    names = sorted(pathlib.Path(s).name for s in seen["sources"])
    assert names == ["fastpbn_cuda.cpp", "grad_input.cu", "grad_reduce.cu", "normalize.cu",
                     "stats.cu"]
    assert all(pathlib.Path(s).parent == CSRC for s in seen["sources"])


def test_build_finds_the_toolkit_behind_a_wrapper_nvcc(monkeypatch):
    """torch's CUDA_HOME guess from a wrapper nvcc on PATH (/usr/local/bin/nvcc gives /usr/local)
    has no headers: _build adds the toolkit's include and library dirs; a good guess adds
    nothing."""
    if CUDA_INCLUDE is None:
        pytest.skip("no CUDA toolkit headers here")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    includes, ldflags = _cuda_ext._toolkit_flags("/nonexistent")
    assert len(includes) == 1 and (pathlib.Path(includes[0]) / "cuda_runtime_api.h").exists()
    assert len(ldflags) == 1 and ldflags[0].startswith("-L")
    assert _cuda_ext._toolkit_flags(str(CUDA_INCLUDE.parent)) == ([], [])


# ---------------------------------------------------------------------------------------------
# Runners: the emulated extension (CPU) or the built one (GPU), behind the binding's interface


@dataclass
class Runner:
    """An extension (emulated or built), its device, and the block orders to compare."""

    ext: object
    device: str
    orders: tuple = (None,)
    plans: bool = False  # the emulation can report its tiling, to assert coverage

    def order(self, order):
        if order is not None:
            self.ext.set_block_order(order)

    def workspace(self, x):
        floats, ints = self.ext.workspace_size(x)
        ws = torch.full((max(floats, 1),), NAN, device=self.device)  # partials are written first
        return ws, torch.zeros(max(ints, 1), dtype=torch.int32, device=self.device)


@pytest.fixture(scope="module")
def emulated(builds):
    lib = _job(builds, "emulation", "g++, the CUDA headers or csrc/emulation missing")
    return emulation.EmulatedExtension(lib)


@pytest.fixture(params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def runner(request):
    if request.param == "emulated":
        ext = request.getfixturevalue("emulated")
        ext.sm_count = 8
        return Runner(ext, "cpu", orders=(0, 1, 2), plans=True)
    return Runner(_cuda_ext.load(), "cuda", orders=(None, None))


# ---------------------------------------------------------------------------------------------
# Tensors in every layout, inside NaN guard bands (out-of-bounds reads surface as NaN, writes as
# changed guards)

_MARGIN = 64  # elements: keeps the base 16-byte aligned


def _layout_strides(shape, layout):
    t = torch.empty(shape, device="meta")
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last).stride()
    if layout == "channels_last_3d":
        return t.to(memory_format=torch.channels_last_3d).stride()
    if layout == "transposed":  # (N, C) stored as (C, N)
        return (1, shape[0])
    if layout == "sliced":  # x[..., ::2] of a tensor twice as wide
        wide = torch.empty((*shape[:-1], 2 * shape[-1]), device="meta").stride()
        return (*wide[:-1], 2)
    return t.stride()


@dataclass
class Guarded:
    buf: torch.Tensor  # NaN outside [offset, offset + span)
    t: torch.Tensor
    offset: int
    span: int

    def assert_guards(self):
        assert self.buf[:self.offset].isnan().all(), "write before the tensor"
        assert self.buf[self.offset + self.span:].isnan().all(), "write after the tensor"


def _guarded(shape, layout, dtype, device, values=None):
    strides = _layout_strides(shape, layout)
    offset = _MARGIN + (1 if layout == "misaligned" else 0)
    span = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
    buf = torch.full((span + offset + _MARGIN,), NAN, dtype=dtype, device=device)
    t = buf.as_strided(shape, strides, offset)
    if values is not None:
        t.copy_(values)
    return Guarded(buf, t, offset, span)


def _shifted(shape, scale, shift, generator=None):
    """float64 data far from zero: where wrong formulas break."""
    return torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift


def _out_layout(layout):
    return layout if layout in ("channels_last", "channels_last_3d", "transposed") else "nchw"


@dataclass
class Case:
    shape: tuple
    layout: str
    expect: dict  # tiling facts under the emulation's 8 SMs (coverage)
    note: str = ""


CASES = [
    Case((4, 3, 5, 7), "nchw", {"rows": False, "vector": False}, "odd spatial size: scalar"),
    Case((4, 3, 5, 7), "channels_last", {"rows": True, "vector": False}, "C=3 channels_last"),
    Case((4, 8, 32, 64), "nchw", {"rows": False, "splits": 2, "vector": True}, "vector, 2 splits"),
    Case((4, 8, 32, 64), "channels_last", {"rows": True, "splits": 2, "vector": True}, "rows"),
    Case((1, 3, 96, 96), "nchw", {"csplits": 3, "vector": True}, "N=1: splits along S"),
    Case((1, 3, 97, 95), "nchw", {"csplits": 3, "vector": False}, "N=1, S odd: column tail"),
    Case((600, 12), "nchw", {"rows": True}, "(N, C) contiguous: rows over N"),
    Case((300, 5), "transposed", {"rows": False}, "(N, C) with stride (1, N): planar, S=1"),
    Case((5, 6, 33), "nchw", {"rows": False}, "(N, C, L)"),
    Case((2, 4, 3, 6, 8), "channels_last_3d", {"rows": True, "vector": True}, "3d"),
    Case((3, 5, 6, 4), "sliced", {"rows": False, "vector": False}, "spatial stride 2"),
    Case((4, 16, 8, 8), "misaligned", {"vector": False}, "storage offset 1 element"),
    Case((3, 1, 17, 9), "nchw", {"rows": False}, "one channel"),
    Case((2, 3, 1, 1), "nchw", {"rows": True}, "two values per channel"),
    Case((2, 136, 6, 6), "channels_last", {"rows": True, "vector": True}, "2 channel groups"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_ids = [f"{c.shape}-{c.layout}" for c in CASES]


def _check_plan(runner, case, x):
    if runner.plans and x.dtype == torch.float32:
        plan = runner.ext.plan(x)
        for key, want in case.expect.items():
            assert (plan[key] >= want) if key in ("splits", "csplits") else plan[key] == want, (
                f"{case.note}: tiling {plan} does not cover {case.expect}")


def _lowp_close(out, ref, dtype, atol, what):
    """Error at most twice that of rounding the exact result to ``dtype`` (what PyTorch's own
    kernels cannot beat), plus ``atol``."""
    err = (out.double() - ref).abs().max().item()
    floor = (ref.to(dtype).double() - ref).abs().max().item() if dtype != torch.float32 else 0.0
    assert err <= 2 * floor + atol, f"{what}: error {err:.3g} > 2 * {floor:.3g} + {atol:.3g}"


def _same(a, b):
    return all(torch.equal(u, v) if u is not None else v is None for u, v in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_train(runner, case, dtype):
    dev, c = runner.device, case.shape[1]
    gen = torch.Generator().manual_seed(hash(case.shape) % 1000)
    xg = _guarded(case.shape, case.layout, dtype, dev, _shifted(case.shape, 3.0, 100.0, gen))
    x = xg.t
    _check_plan(runner, case, x)
    w, b = (torch.rand(c, generator=gen) + 0.5).to(dev), torch.randn(c, generator=gen).to(dev)
    rm0, rv0 = torch.randn(c, generator=gen).to(dev), (torch.rand(c, generator=gen) + 1).to(dev)
    acc0 = (torch.full((c,), 7.0, dtype=torch.float64, device=dev),
            torch.randn(c, dtype=torch.float64, device=dev) + 99,
            torch.rand(c, dtype=torch.float64, device=dev) * 60)
    results = []
    for order in runner.orders if dtype == torch.float32 else runner.orders[::2]:
        runner.order(order)
        yg = _guarded(case.shape, _out_layout(case.layout), dtype, dev)
        mean, invstd = (torch.full((c,), NAN, device=dev) for _ in range(2))
        rm, rv, acc = rm0.clone(), rv0.clone(), tuple(a.clone() for a in acc0)
        ws, counters = runner.workspace(x)
        runner.ext.forward_train(x, yg.t, w, b, rm, rv, None, 0.1, 1e-5, *acc, mean, invstd, ws,
                                 counters)
        assert not counters.any(), "the last block must leave its counter at zero"
        xg.assert_guards(), yg.assert_guards()
        results.append((yg.t.clone(), mean, invstd, rm, rv, *acc))
    assert all(_same(results[0], r) for r in results[1:]), "result depends on block order"

    y, mean, invstd, rm, rv, count, acc_mean, acc_m2 = (t.cpu() for t in results[0])
    xc = x.cpu()
    y_ref, rm_ref, rv_ref = batch_norm_reference(xc, rm0.cpu(), rv0.cpu(), w.cpu(), b.cpu(),
                                                 True, 0.1, 1e-5)
    m_ref, v_ref, n = batch_stats_reference(xc)
    std = v_ref.sqrt()
    assert ((mean.double() - m_ref).abs() <= 1e-6 * m_ref.abs() + 2e-6 * std).all()
    assert ((invstd.double() * (v_ref + 1e-5).sqrt() - 1).abs() <= 2e-6).all()
    _lowp_close(y, y_ref, dtype, 3e-5, "y")
    assert torch.allclose(rm.double(), rm_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(rv.double(), rv_ref, rtol=1e-5, atol=1e-7)
    cnt0, m0, s0 = (a.cpu() for a in acc0)
    delta = m_ref - m0
    assert torch.equal(count, cnt0 + n)
    assert torch.allclose(acc_mean, m0 + delta * n / (cnt0 + n), rtol=2e-7, atol=2e-6 * std.max())
    m2_ref = s0 + v_ref * n + delta**2 * cnt0 * n / (cnt0 + n)
    assert torch.allclose(acc_m2, m2_ref, rtol=5e-6)


@pytest.mark.parametrize("momentum", [None, 0.25])
def test_running_stats_momentum_and_dtypes(runner, momentum):
    """momentum None reads 1/num_batches_tracked on the device; half running buffers and no
    affine work; the float64 accumulator may count in int64."""
    dev = runner.device
    x = _shifted((6, 5, 7, 3), 2.0, -50.0).float().to(dev)
    nbt = torch.tensor(3, device=dev)
    rm = torch.randn(5, device=dev).half()
    rv = (torch.rand(5, device=dev) + 1).half()
    acc = (torch.zeros(5, dtype=torch.int64, device=dev),
           torch.zeros(5, dtype=torch.float64, device=dev),
           torch.zeros(5, dtype=torch.float64, device=dev))
    y = torch.empty_like(x)
    mean, invstd = torch.empty(5, device=dev), torch.empty(5, device=dev)
    ws, counters = runner.workspace(x)
    rm0, rv0 = rm.clone(), rv.clone()
    runner.ext.forward_train(x, y, None, None, rm, rv, nbt, momentum, 1e-3, *acc, mean, invstd,
                             ws, counters)
    factor = 1 / 3 if momentum is None else momentum
    y_ref, rm_ref, rv_ref = batch_norm_reference(x.cpu(), rm0.cpu(), rv0.cpu(), None, None, True,
                                                 factor, 1e-3)
    assert torch.allclose(y.cpu().double(), y_ref, atol=3e-5)
    assert torch.allclose(rm.cpu().double(), rm_ref, rtol=1e-3, atol=1e-3)  # half buffers
    assert torch.allclose(rv.cpu().double(), rv_ref, rtol=1e-3)
    m_ref, v_ref, n = batch_stats_reference(x.cpu())
    assert acc[0].dtype == torch.int64 and (acc[0].cpu() == n).all()
    assert torch.allclose(acc[1].cpu(), m_ref, atol=1e-5) and torch.allclose(
        acc[2].cpu(), v_ref * n, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 3, 4, 7, 9, 10)],
                         ids=[_ids[i] for i in (0, 3, 4, 7, 9, 10)])
def test_forward_eval(runner, case, dtype):
    dev, c = runner.device, case.shape[1]
    x = _guarded(case.shape, case.layout, dtype, dev, _shifted(case.shape, 2.0, 30.0)).t
    rm = (torch.randn(c, dtype=torch.float64) + 30).to(dev)  # float64 buffers are accepted
    rv = (torch.rand(c, dtype=torch.float64) * 3 + 1).to(dev)
    w = (torch.rand(c) + 0.5).to(dev, dtype)  # parameters in x's dtype
    yg = _guarded(case.shape, _out_layout(case.layout), dtype, dev)
    runner.ext.forward_eval(x, yg.t, w, None, rm, rv, 1e-5)
    yg.assert_guards()
    y_ref = batch_norm_reference(x.cpu(), rm.cpu(), rv.cpu(), w.cpu(), None, False, 0.1, 1e-5)[0]
    _lowp_close(yg.t.cpu(), y_ref, dtype, 2e-5, "eval y")


# ---------------------------------------------------------------------------------------------
# Backward


def _grad(kind, x, layout, dtype, dev):
    shape = x.shape
    if kind == "stride0":  # the gradient of y.sum()
        return torch.full((), 0.75, dtype=dtype, device=dev).expand(shape)
    if kind == "channel_bcast":  # stride 0 everywhere but the channel dim
        return (torch.rand(1, shape[1], *[1] * (x.dim() - 2)) + 0.5).to(dev, dtype).expand(shape)
    layout = _out_layout(layout) if kind == "like_x" else kind
    return _guarded(shape, layout, dtype, dev, _shifted(shape, 1.0, 0.3)).t


BACKWARD = [  # (case index, gradient kind)
    (0, "like_x"), (2, "like_x"), (3, "like_x"), (3, "nchw"), (4, "stride0"), (5, "like_x"),
    (6, "channel_bcast"), (7, "like_x"), (9, "stride0"), (10, "like_x"), (11, "like_x"),
    (13, "like_x"), (14, "like_x"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index,kind", BACKWARD, ids=[f"{_ids[i]}-{k}" for i, k in BACKWARD])
def test_backward(runner, index, kind, dtype, training):
    torch.manual_seed(index)
    case, dev = CASES[index], runner.device
    c = case.shape[1]
    x = _guarded(case.shape, case.layout, dtype, dev, _shifted(case.shape, 2.0, 40.0)).t
    g = _grad(kind, x, case.layout, dtype, dev)
    w = (torch.rand(c) + 0.5).to(dev)
    rm, rv = (torch.randn(c) + 40).to(dev), (torch.rand(c) * 4 + 1).to(dev)
    if training:
        m_ref, v_ref, _ = batch_stats_reference(x.cpu())
        mean, invstd = m_ref.float().to(dev), torch.rsqrt(v_ref + 1e-5).float().to(dev)
    else:
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
    results = []
    for order in runner.orders[:2]:
        runner.order(order)
        dxg = _guarded(case.shape, _out_layout(case.layout), dtype, dev)
        dw, db = torch.full((c,), NAN, device=dev), torch.full((c,), NAN, device=dev)
        ws, counters = runner.workspace(x)
        runner.ext.backward(g, x, w, mean, invstd, training, dxg.t, dw, db, ws, counters)
        assert not counters.any()
        dxg.assert_guards()
        results.append((dxg.t.clone(), dw, db))
    assert all(_same(results[0], r) for r in results[1:]), "result depends on block order"

    dx, dw, db = (t.cpu() for t in results[0])
    gd = g.cpu().double()
    scale = (gd.abs().sum() / c).item()
    # float64 references: (1) from the statistics the kernel was given, as it must compute;
    # (2) autograd through a float64 batch norm, whose own statistics differ from (1) by the
    # float32 rounding of mean and invstd: with 2 values per channel that moved dx and dw by
    # up to 1e-3 in random draws, so (2) only checks dx's formula, loosely
    dims, per_channel = [0, *range(2, x.dim())], (1, c, *[1] * (x.dim() - 2))
    xd, wd = x.cpu().double().requires_grad_(), w.cpu().double()
    m64, i64 = (t.cpu().double().view(per_channel) for t in (mean, invstd))
    xhat = (xd.detach() - m64) * i64
    dy = gd - gd.mean(dims, keepdim=True) - xhat * (gd * xhat).mean(dims, keepdim=True)
    dx_given = i64 * wd.view(per_channel) * (dy if training else gd)
    assert torch.allclose(db.double(), gd.sum(dims), rtol=1e-5, atol=1e-6 * scale)
    assert torch.allclose(dw.double(), (gd * xhat).sum(dims), rtol=1e-5, atol=1e-6 * scale)
    # dx = a*dy + b*(x - mean) + c cancels to ~0 for a uniform dy: scale by its terms
    terms = dx_given.abs().max() + gd.abs().max() * (invstd * w).max().cpu()
    _lowp_close(dx, dx_given, dtype, 2e-5 * terms.item(), "dx")
    y = batch_norm_reference(xd, rm.cpu(), rv.cpu(), wd, None, training, 0.1, 1e-5)[0]
    (y * gd).sum().backward()
    _lowp_close(dx, xd.grad, dtype, 1e-3 * terms.item(), "dx against autograd")


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True)])
def test_backward_output_mask(runner, mask):
    dev = runner.device
    x = _shifted((4, 6, 5, 5), 1.0, 5.0).float().to(dev)
    g = torch.randn(x.shape, device=dev)
    mean, invstd = x.mean((0, 2, 3)), torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5)
    outs = [torch.full((*x.shape,), NAN, device=dev) if mask[0] else None,
            torch.full((6,), NAN, device=dev) if mask[1] else None,
            torch.full((6,), NAN, device=dev) if mask[2] else None]
    ws, counters = runner.workspace(x)
    runner.ext.backward(g, x, None, mean, invstd, True, *outs, ws, counters)
    ref = torch.ops.aten.native_batch_norm_backward(g.cpu(), x.cpu(), None, None, None,
                                                    mean.cpu(), invstd.cpu(), True, 1e-5, mask)
    for want, out, ref_t in zip(mask, outs, ref):
        assert (out is None) == (not want)
        if out is not None:
            assert torch.allclose(out.cpu(), ref_t, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Statistics and the multi-batch accumulator


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_welford_update_over_uneven_batches(runner, layout):
    """Batches of 1 to 40 samples merged into one float64 state equal the pooled statistics of
    their concatenation (equal weight per sample), and batch_stats matches each batch."""
    dev, c = runner.device, 8
    gen = torch.Generator().manual_seed(3)
    batches = [_shifted((n, c, 5, 4), 4.0, 1e3, gen) for n in (3, 40, 1, 17)]
    count = torch.zeros(c, dtype=torch.float64, device=dev)
    mean, m2 = torch.zeros_like(count), torch.zeros_like(count)
    for xb in batches:
        x = _guarded(xb.shape, layout, torch.float32, dev, xb).t
        ws, counters = runner.workspace(x)
        runner.ext.welford_update(x, count, mean, m2, ws, counters)
        bm, bv = torch.full((c,), NAN, device=dev), torch.full((c,), NAN, device=dev)
        runner.ext.batch_stats(x, bm, bv, ws, counters)
        m_ref, v_ref, _ = batch_stats_reference(x.cpu())
        assert torch.allclose(bm.cpu().double(), m_ref, rtol=1e-7, atol=1e-6 * 4)
        assert torch.allclose(bv.cpu().double(), v_ref, rtol=2e-5)
    pooled = torch.cat([b.float().double() for b in batches])
    n = pooled.numel() // c
    assert (count.cpu() == n).all()
    # batch means come from float32 partials: within two float32 ulps of 1e3
    assert torch.allclose(mean.cpu(), pooled.mean((0, 2, 3)), rtol=0, atol=2 * 2.0**-14)
    ref_m2 = ((pooled - pooled.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3))
    assert torch.allclose(m2.cpu(), ref_m2, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("ratio", [1e3, 3e4, 1e6])
def test_precision_when_mean_dwarfs_std(runner, ratio, layout):
    """Chunks centred on the channel's first value, Chan merges and the float64 merge of the
    split partials keep the variance exact where E[x^2] - E[x]^2 in float32 is 20-40 % off
    (ratio 1e3) or negative (3e4); the training output keeps it too (K2 centres on that
    value). Without the pivot the variance was 3e-5 off at 1e4 and 0.26 at 1e7."""
    dev = runner.device
    x = _shifted((16, 4, 32, 32), 1.0, ratio).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dev)
    if runner.plans:
        assert runner.ext.plan(x)["splits"] > 1, "several partials per channel to merge"
    mean, var = torch.empty(4, device=dev), torch.empty(4, device=dev)
    ws, counters = runner.workspace(x)
    runner.ext.batch_stats(x, mean, var, ws, counters)
    m_ref, v_ref, _ = batch_stats_reference(x.cpu())
    assert ((var.cpu().double() - v_ref).abs() / v_ref).max() < 1e-6
    ulp = 2.0 ** (math.floor(math.log2(ratio)) - 23)  # of float32 at the mean
    assert (mean.cpu().double() - m_ref).abs().max() <= ulp
    y, save_mean, invstd = torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)
    runner.ext.forward_train(x, y, None, None, None, None, None, 0.1, 1e-5, None, None, None,
                             save_mean, invstd, ws, counters)
    y_ref = batch_norm_reference(x.cpu(), None, None, None, None, True, 0.1, 1e-5)[0]
    assert (y.cpu().double() - y_ref).abs().max() < 2e-6


def test_nan_reaches_the_statistics(runner):
    """A NaN in a channel gives that channel a NaN mean and variance, as stock (the merge's
    clamp of a negative rounding must not turn it into 0)."""
    dev = runner.device
    x = _shifted((32, 4, 7, 7), 1.0, 5.0).float()
    x[3, 1, 2, 2] = float("nan")
    x = x.to(dev)
    mean, var = torch.empty(4, device=dev), torch.empty(4, device=dev)
    ws, counters = runner.workspace(x)
    runner.ext.batch_stats(x, mean, var, ws, counters)
    assert mean.isnan().tolist() == var.isnan().tolist() == [False, True, False, False]


def test_overflowing_variance_is_inf_not_nan(runner):
    """A float32 channel whose squared deviations overflow (|x| ~ 1e20) gives variance inf,
    as the Triton kernels do, not NaN (a chunk's first merge took inf x 0)."""
    dev = runner.device
    torch.manual_seed(8)
    x = _shifted((8, 3, 16, 16), 1.0, 0.0).float()
    x[:, 1] *= 1e20
    x = x.to(dev)
    mean, var = torch.empty(3, device=dev), torch.empty(3, device=dev)
    ws, counters = runner.workspace(x)
    runner.ext.batch_stats(x, mean, var, ws, counters)
    assert var.isinf().tolist() == [False, True, False] and not var.isnan().any()
    assert mean.isfinite().all()


# ---------------------------------------------------------------------------------------------
# The Python wrappers (fastpbn/_cuda_ext.py) and the autograd path, on the emulation or the GPU


@pytest.fixture
def cuda_backend(runner, monkeypatch):
    """``set_backend('cuda')`` served by the runner's extension (on CPU tensors when emulated)."""
    if runner.device == "cpu":
        monkeypatch.setattr(_cuda_ext, "_ext", runner.ext)
        monkeypatch.setattr(CudaBackend, "not_supported_reasons", lambda self, x: [])
    fastpbn.set_backend("cuda")
    return runner


def test_wrappers_copy_write_back_and_cast(cuda_backend):
    dev = cuda_backend.device
    base = _shifted((3, 4, 6, 5), 2.0, 20.0).float().to(dev)
    x = base.permute(0, 1, 3, 2)  # spatial dims that cannot be one stride: copied
    store = torch.zeros(4, 2, device=dev)
    rm, rv = store[:, 0], torch.ones(8, device=dev)[::2]  # strided buffers: written back
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, invstd = _cuda_ext.forward_train(x, None, None, rm, rv, None, 0.5, 1e-5, None)
    y_ref, rm_ref, rv_ref = batch_norm_reference(x.cpu(), rm0.cpu(), rv0.cpu(), None, None, True,
                                                 0.5, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.stride() == _scratch.output_like(x).stride()  # what the fake implementation promises
    assert torch.allclose(y.cpu().double(), y_ref, atol=3e-5)
    ye = _cuda_ext.forward_eval(x, None, None, rm, rv, 1e-5)
    assert ye.stride() == _scratch.output_like(x).stride() == y.stride()
    ye_ref = batch_norm_reference(x.cpu(), rm.cpu(), rv.cpu(), None, None, False, 0.0, 1e-5)[0]
    assert torch.allclose(ye.cpu().double(), ye_ref, atol=3e-5)
    assert torch.allclose(store[:, 0].cpu().double(), rm_ref, atol=1e-5) and not store[:, 1].any()
    assert torch.allclose(rv.cpu().double(), rv_ref, rtol=1e-5)
    xh = x.half()
    g = torch.randn(x.shape, device=dev)  # float32 gradient for a half input: cast
    dx, dw, db = _cuda_ext.backward(g, xh, None, mean, invstd, True, (True, True, True))
    assert dx.dtype == torch.float16 and dw.dtype == db.dtype == torch.float32
    assert dx.stride() == _scratch.output_like(xh).stride()
    assert _cuda_ext.backward(g, xh, None, mean, invstd, True, (False,) * 3) == (None,) * 3
    m, v, n = _cuda_ext.batch_stats(x)
    assert n == 3 * 30 and isinstance(n, int) and m.dtype == v.dtype == torch.float32
    state = torch.zeros(4, 3, dtype=torch.float64, device=dev)  # strided columns
    _cuda_ext.welford_update(x, state[:, 0], state[:, 1], state[:, 2])
    assert (state[:, 0] == n).all()
    assert torch.allclose(state[:, 1].cpu(), m.cpu().double(), atol=1e-5)
    assert torch.allclose(state[:, 2].cpu(), v.cpu().double() * n, rtol=1e-5)


def test_empty_input_through_the_wrappers(cuda_backend):
    """No values (N, C or the spatial extent 0): the planner gives a workspace instead of
    dividing by zero (SIGFPE, through every wrapper but forward_eval), and the backward gives
    zero parameter gradients, as the Triton backend does."""
    dev = cuda_backend.device
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0), (0, 5)]:
        floats, counters = cuda_backend.ext.workspace_size(torch.empty(shape, device=dev))
        assert floats >= 0 and counters >= 0, shape
    x = torch.empty(0, 3, 4, 4, device=dev)
    dx, dw, db = _cuda_ext.backward(x, x, None, torch.zeros(3, device=dev),
                                    torch.ones(3, device=dev), True, (True, True, True))
    assert dx.shape == x.shape and dw.tolist() == db.tolist() == [0.0] * 3


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_through_cuda_backend(cuda_backend, momentum):
    """FastPreciseBN2d (custom ops, autograd) on the cuda backend vs nn.BatchNorm2d in float64,
    over two training steps and one eval step."""
    dev = cuda_backend.device
    torch.manual_seed(5)
    ours = fastpbn.FastPreciseBN2d(6, momentum=momentum).to(dev)
    ref = torch.nn.BatchNorm2d(6, momentum=momentum).double().to(dev)
    for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
        with torch.no_grad():
            p_ref.copy_(torch.rand_like(p_ref) + 0.5), p_ours.copy_(p_ref)
    for step in range(2):
        x = (_shifted((5, 6, 7, 7), 2.0, 10.0 * step + 3)).float().to(dev)
        x = x.to(memory_format=torch.channels_last) if step else x
        xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
        g = torch.randn(x.shape, device=dev)
        ya, yb = ours(xa), ref(xb)
        (ya * g).sum().backward(), (yb * g.double()).sum().backward()
        assert torch.allclose(ya.double(), yb, atol=5e-5)
        assert torch.allclose(xa.grad.double(), xb.grad, atol=5e-5)
    for name in ("weight", "bias"):
        assert torch.allclose(getattr(ours, name).grad.double(), getattr(ref, name).grad,
                              rtol=1e-4, atol=1e-4)
    assert torch.allclose(ours.running_mean.double(), ref.running_mean, atol=1e-5)
    assert torch.allclose(ours.running_var.double(), ref.running_var, rtol=1e-5)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    ours.eval(), ref.eval()
    x = _shifted((3, 6, 4, 4), 2.0, 8.0).float().to(dev)
    assert torch.allclose(ours(x).double(), ref(x.double()), atol=3e-5)


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("shape,cl", [((8, 64, 28, 28), False), ((8, 64, 28, 28), True),
                                      ((20, 6, 64, 64), False), ((512, 32), False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_cuda_agrees_with_triton(shape, cl, dtype):
    x0 = _shifted(shape, 2.0, 50.0).to("cuda", dtype)
    x0 = x0.to(memory_format=torch.channels_last) if cl else x0
    g = torch.randn(shape, device="cuda", dtype=dtype)
    out = {}
    for name in ("cuda", "triton"):
        fastpbn.set_backend(name)
        x = x0.clone().requires_grad_()
        w = torch.ones(shape[1], device="cuda", requires_grad=True)
        y = fastpbn.batch_norm(x, None, None, w, None, training=True)
        y.backward(g)
        out[name] = (y.double(), x.grad.double(), w.grad.double())
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(out["cuda"], out["triton"]):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


_BAD_INPUT_SCRIPT = """
import sys
import torch
from fastpbn import _cuda_ext
ext = _cuda_ext.load()
x = torch.randn(4, 3, 5, device="cuda")
floats, ints = ext.workspace_size(x)
ws = torch.zeros(max(floats, 1), device="cuda")
counters = torch.zeros(max(ints, 1), dtype=torch.int32, device="cuda")
f32 = torch.zeros(3, device="cuda")
CALLS = [
    lambda: ext.welford_update(x, f32.double(), f32, f32.double(), ws, counters),
    lambda: ext.forward_eval(x, torch.empty_like(x), None, None, torch.zeros(4, device="cuda"),
                             torch.ones(4, device="cuda"), 1e-5),
    lambda: ext.batch_stats(x, f32.clone(), f32.clone(), ws[:1], counters),
]
for i in map(int, sys.argv[1:]):
    print(f"call {i}", flush=True)
    try:
        CALLS[i]()
    except RuntimeError as e:
        print(f"raised {i}: {e}", flush=True)
    else:
        print(f"returned {i}", flush=True)
torch.cuda.synchronize()
print("bad-input-ok", flush=True)
"""
_BAD_INPUT_ERRORS = ["acc mean and m2 must be float64",
                     "running_mean should contain 3 elements not 4", "workspace must be"]


@pytest.mark.gpu
def test_gpu_binding_rejects_bad_input(tmp_path):
    """Bad input raises RuntimeError from the binding's checks, one after another in a process.
    In a child process: on the first GPU run this test crashed its pytest-xdist worker
    (SIGSEGV at the second call); a crash now fails the test with each call's outcome alone."""
    _cuda_ext.load()  # build here; the child loads the cached extension
    script = tmp_path / "bad_input.py"
    script.write_text(_BAD_INPUT_SCRIPT)

    def run(*calls):
        cmd = [sys.executable, "-X", "faulthandler", str(script), *map(str, calls)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    out = run(*range(len(_BAD_INPUT_ERRORS)))
    if out.returncode != 0 or "bad-input-ok" not in out.stdout:
        report = [f"exit {out.returncode}\n{(out.stdout + out.stderr)[-3000:]}"]
        for i in range(len(_BAD_INPUT_ERRORS)):
            o = run(i)
            report.append(f"--- call {i} alone: exit {o.returncode}\n"
                          f"{(o.stdout + o.stderr)[-1500:]}")
        pytest.fail("\n".join(report))
    for i, message in enumerate(_BAD_INPUT_ERRORS):
        assert re.search(rf"^raised {i}: .*{re.escape(message)}", out.stdout, re.M), out.stdout


_SANITIZE_SCRIPT = """
import torch
from fastpbn import _cuda_ext
CASES = [((4, 8, 16, 16), False, torch.float32), ((4, 8, 16, 16), True, torch.half),
         ((1, 3, 64, 64), False, torch.bfloat16), ((300, 12), False, torch.float32)]
for shape, cl, dtype in CASES:
    x = (torch.randn(shape, device="cuda") * 2 + 9).to(dtype)
    x = x.to(memory_format=torch.channels_last) if cl else x
    c = shape[1]
    acc = tuple(torch.zeros(c, dtype=torch.float64, device="cuda") for _ in range(3))
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    y, m, s = _cuda_ext.forward_train(x, None, None, rm, rv, None, 0.1, 1e-5, acc)
    g = torch.ones((), device="cuda", dtype=dtype).expand(shape)  # stride 0
    _cuda_ext.backward(g, x, None, m, s, True, (True, True, True))
    _cuda_ext.batch_stats(x)
    _cuda_ext.forward_eval(x, None, None, rm, rv, 1e-5)
torch.cuda.synchronize()
print("sanitized-ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="no compute-sanitizer")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_gpu_compute_sanitizer(tool, tmp_path):
    _cuda_ext.load()  # build outside the sanitizer; the child loads the cached extension
    script = tmp_path / "sanitize.py"
    script.write_text(_SANITIZE_SCRIPT)
    cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable,
           str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "sanitized-ok" in out.stdout, (out.stdout + out.stderr)[-4000:]
    # memcheck / synccheck: "ERROR SUMMARY: 0 errors"; racecheck: "RACECHECK SUMMARY:
    # 0 hazards displayed (0 errors, 0 warnings)"
    summary = (r"RACECHECK SUMMARY: \d+ hazards? displayed \(0 errors?," if tool == "racecheck"
               else r"ERROR SUMMARY: 0 errors?\b")
    assert re.search(summary, out.stdout + out.stderr), (out.stdout + out.stderr)[-4000:]

"""Run the CUDA kernels on the CPU: build csrc/*.cu for the host with the emulation runtime
(emulate.h, runtime.cpp) and drive the real launchers through api.cpp.

:class:`EmulatedExtension` has the interface of the torch binding (fastpbn_cuda.cpp), so tests
can run one sweep against it and against the extension built for a GPU. Test tooling only: not
part of the installed package.
"""

from __future__ import annotations

import ctypes
import math
import pathlib
import re
import subprocess

import torch

_LAUNCH = re.compile(r"(\w+_kernel<[^;]*?>)\s*<<<(grid, block), 0, stream>>>\((.*?)\);", re.S)


def build(csrc: pathlib.Path, out: pathlib.Path, gxx: str, cuda_include: pathlib.Path):
    """Compile csrc/*.cu (launches rewritten) with the emulation runtime for the host.

    Args:
        csrc: the kernel sources; out: an empty build directory (created);
        gxx: the C++ compiler; cuda_include: the CUDA toolkit's include directory (headers only).
    Returns:
        The path of the shared library.
    """
    here = pathlib.Path(__file__).parent
    out.mkdir()
    sources = [here / "runtime.cpp", here / "api.cpp"]
    for cu in sorted(csrc.glob("*.cu")):
        text, n = _LAUNCH.subn(r"::emu::launch(\2, [&] { \1(\3); });", cu.read_text())
        if n == 0 or "<<<" in text:
            raise RuntimeError(f"{cu.name}: a launch the emulation cannot rewrite")
        sources.append(out / f"{cu.stem}.cpp")
        sources[-1].write_text(text)
    flags = ["-std=c++17", "-O1", "-fPIC", "-w", "-U_FORTIFY_SOURCE",
             "-include", str(here / "emulate.h"), f"-I{csrc}", f"-I{cuda_include}"]
    objects = [out / f"{s.stem}.o" for s in sources]
    procs = [subprocess.Popen([gxx, *flags, "-c", str(s), "-o", str(o)], stderr=subprocess.PIPE)
             for s, o in zip(sources, objects)]
    for p, s in zip(procs, sources):
        err = p.communicate()[1].decode()
        if p.returncode:
            raise RuntimeError(f"{s.name}:\n{err[-3000:]}")
    lib = out / "libfastpbn_emulated.so"
    subprocess.run([gxx, "-shared", "-o", str(lib), *map(str, objects)], check=True)
    return lib


_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.int64: 4}
_I64P, _INTP, _VP = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int), ctypes.c_void_p


def _geometry(x):
    return (ctypes.c_int64 * 3)(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _strides(t):
    """(sn, sc, ss) as the binding computes them (size-1 dims get stride 0)."""
    ss, span = 0, 0
    for d in range(t.dim() - 1, 1, -1):
        if t.shape[d] == 1:
            continue
        if span == 0:
            ss, span = t.stride(d), t.shape[d]
        elif t.stride(d) != ss * span:
            raise RuntimeError("spatial dims cannot be viewed as one")
        else:
            span *= t.shape[d]
    sn = t.stride(0) if t.shape[0] > 1 else 0
    return (ctypes.c_int64 * 3)(sn, t.stride(1) if t.shape[1] > 1 else 0, ss)


def _ptrs(*ts):
    return (_VP * len(ts))(*[None if t is None else t.data_ptr() for t in ts])


def _dts(*ts, absent=0):
    return (ctypes.c_int * len(ts))(*[absent if t is None else _DT[t.dtype] for t in ts])


def _check(err):
    if err != 0:
        raise RuntimeError(f"launch returned cudaError {err}")


class EmulatedExtension:
    """fastpbn_cuda.cpp's functions over the launchers compiled for the host. ``sm_count``
    drives the split heuristic, so small tensors still get several splits."""

    def __init__(self, path: pathlib.Path, sm_count: int = 8):
        self.lib = lib = ctypes.CDLL(str(path))
        self.sm_count = sm_count
        lib.emu_stats.argtypes = [_INTP, _I64P, _VP, _I64P, _VP, ctypes.c_double, ctypes.c_int,
                                  ctypes.c_double, _VP, _VP, ctypes.c_int]
        lib.emu_normalize.argtypes = [_INTP, _I64P, _VP, _I64P, _VP, _I64P, _VP, ctypes.c_double,
                                      ctypes.c_int]
        lib.emu_grad_reduce.argtypes = [_INTP, _I64P, _VP, _I64P, _VP, _I64P, _VP, _VP, _VP,
                                        ctypes.c_int]
        lib.emu_grad_input.argtypes = [_INTP, _I64P, _VP, _I64P, _VP, _I64P, _VP, _I64P, _VP,
                                       ctypes.c_int]
        lib.emu_plan.argtypes = [_I64P, _VP, _I64P, ctypes.c_int, ctypes.c_int, _I64P]

    def set_block_order(self, order: int) -> None:
        self.lib.emu_set_block_order(order)

    def plan(self, x) -> dict:
        out = (ctypes.c_int64 * 4)()
        vec = 16 // x.element_size()
        self.lib.emu_plan(_geometry(x), x.data_ptr(), _strides(x), vec, self.sm_count, out)
        return {"rows": bool(out[0]), "splits": out[1], "csplits": out[2], "vector": bool(out[3])}

    def workspace_size(self, x):
        out = (ctypes.c_int64 * 2)()
        self.lib.emu_workspace_size(_geometry(x), _strides(x), self.sm_count, out)
        return [out[0], out[1]]

    def _table(self, x, ws):
        floats, c = self.workspace_size(x)[0], x.shape[1]
        return ws[floats - 3 * c:floats]

    def _stats(self, x, p, ws, counters, momentum=0.0, from_counter=False, eps=0.0, dts=None):
        dts = dts or _dts(x, None, None, None, None, absent=3)
        _check(self.lib.emu_stats(dts, _geometry(x), x.data_ptr(), _strides(x), p, momentum,
                                  int(from_counter), eps, ws.data_ptr(), counters.data_ptr(),
                                  self.sm_count))

    def forward_train(self, x, y, weight, bias, rm, rv, nbt, momentum, eps, acc_count, acc_mean,
                      acc_m2, save_mean, save_invstd, ws, counters):
        table = self._table(x, ws)
        from_counter = rm is not None and momentum is None and nbt is not None
        p = _ptrs(save_mean, None, save_invstd, table, weight, bias, rm, rv,
                  nbt if from_counter else None, acc_count, acc_mean, acc_m2)
        dts = _dts(x, weight, bias, rm, acc_count, absent=3)
        self._stats(x, p, ws, counters, momentum or 0.0, from_counter, eps, dts)
        _check(self.lib.emu_normalize(_dts(x, None, None, None, None), _geometry(x), x.data_ptr(),
                                      _strides(x), y.data_ptr(), _strides(y),
                                      _ptrs(table, None, None, None, None), eps, self.sm_count))

    def forward_eval(self, x, y, weight, bias, rm, rv, eps):
        _check(self.lib.emu_normalize(_dts(x, rm, rv, weight, bias), _geometry(x), x.data_ptr(),
                                      _strides(x), y.data_ptr(), _strides(y),
                                      _ptrs(None, rm, rv, weight, bias), eps, self.sm_count))

    def backward(self, g, x, weight, mean, invstd, training, dx, dw, db, ws, counters):
        if x.numel() == 0:
            for t in (dw, db):
                if t is not None:
                    t.zero_()
            return
        coef = self._table(x, ws) if training and dx is not None else None
        if coef is not None or dw is not None or db is not None:
            grad = dw if dw is not None else db
            _check(self.lib.emu_grad_reduce(
                _dts(x, weight, grad), _geometry(x), g.data_ptr(), _strides(g), x.data_ptr(),
                _strides(x), _ptrs(mean, invstd, weight, dw, db, coef), ws.data_ptr(),
                counters.data_ptr(), self.sm_count))
        if dx is not None:
            _check(self.lib.emu_grad_input(
                _dts(x, weight), _geometry(x), g.data_ptr(), _strides(g), x.data_ptr(),
                _strides(x), dx.data_ptr(), _strides(dx), _ptrs(coef, mean, invstd, weight),
                self.sm_count))

    def batch_stats(self, x, mean, var, ws, counters):
        self._stats(x, _ptrs(mean, var, *[None] * 10), ws, counters)

    def welford_update(self, x, count, mean, m2, ws, counters):
        dts = _dts(x, None, None, None, count, absent=3)
        self._stats(x, _ptrs(*[None] * 9, count, mean, m2), ws, counters, dts=dts)

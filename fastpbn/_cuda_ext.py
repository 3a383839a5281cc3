"""The ``cuda`` backend: Python side of the CUDA C++ kernels in ``csrc/`` (``fastpbn._csrc``).

The extension is JIT-built once with ``torch.utils.cpp_extension.load`` (ninja, ``-gencode`` for
the local GPUs' architectures) into torch's extension cache (``TORCH_EXTENSIONS_DIR``), so later
processes only load it. Importing this module builds nothing and imports neither triton nor
``torch.utils.cpp_extension``. A failed build is remembered: :func:`not_supported_reasons` then
reports its message and dispatch moves on instead of rebuilding on every call.

The five backend operations have exactly the signatures and semantics documented on
``fastpbn._backend.Backend``; they allocate outputs and take the reductions' scratch (partials and
counters, which every launch leaves zeroed) from ``fastpbn._scratch``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import math
import os
import pathlib
import shutil
import sys
import tempfile
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

from ._scratch import output_like, workspace

_SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
_ERROR_CHARS = 1500  # how much of a compiler log a reason quotes

_ext = None
_build_error: Optional[str] = None
_lock = threading.Lock()


class CudaExtensionError(RuntimeError):
    """The CUDA extension cannot be built or loaded on this machine."""


def _find_nvcc() -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def _has_cuda_headers(home: Optional[str]) -> bool:
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))


def toolkit_home() -> Optional[str]:
    """The CUDA toolkit directory that holds the runtime headers: ``CUDA_HOME``, ``CUDA_PATH``,
    the directory above the nvcc that runs (links resolved), ``/usr/local/cuda``; or None."""
    nvcc = _find_nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
             "/usr/local/cuda"]
    return next((h for h in homes if _has_cuda_headers(h)), None)


def _toolkit_flags(torch_cuda_home: Optional[str]) -> tuple[list[str], list[str]]:
    """(include dirs, linker flags) for the CUDA toolkit where torch's guess of it has no
    headers. Without CUDA_HOME / CUDA_PATH, torch.utils.cpp_extension takes the directory above
    the nvcc on PATH: for a wrapper script (/usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc) that is /usr/local, and the binding, compiled by the host
    compiler, failed on "cuda_runtime.h: No such file or directory" (nvcc finds its own)."""
    home = None if _has_cuda_headers(torch_cuda_home) else toolkit_home()
    if home is None:
        return [], []
    lib = os.path.join(home, "lib64")
    lib = lib if os.path.isdir(lib) else os.path.join(home, "lib")
    return [os.path.join(home, "include")], [f"-L{lib}"]


def _find_ninja() -> Optional[str]:
    # pip's ninja lands next to the interpreter, which is not on PATH in an unactivated venv
    beside = os.path.join(os.path.dirname(sys.executable), "ninja")
    return shutil.which("ninja") or (beside if os.path.exists(beside) else None)


@functools.lru_cache(maxsize=None)
def _environment_reasons() -> tuple[str, ...]:
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build (torch.version.cuda is None)")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device is visible")
    if _find_nvcc() is None:
        reasons.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if _find_ninja() is None:
        reasons.append("ninja not found (pip install ninja)")
    return tuple(reasons)


def not_supported_reasons() -> list[str]:
    """Why the CUDA extension cannot serve CUDA tensors here (empty: it can, or will once built).

    Returns:
        Human-readable reasons: a CPU-only torch, no GPU, nvcc or ninja missing, or the message
        of an earlier failed build (which is not retried in this process).
    """
    reasons = list(_environment_reasons())
    if _build_error is not None:
        reasons.append(f"building the CUDA extension failed: {_build_error}")
    return reasons


@contextlib.contextmanager
def _source_dir() -> Iterator[pathlib.Path]:
    """The directory holding the installed ``fastpbn._csrc`` sources (copied out of an archive
    if the package is not on a file system)."""
    root = importlib.resources.files("fastpbn._csrc")
    if isinstance(root, pathlib.Path) and root.is_dir():
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="fastpbn_csrc_") as tmp:
        for entry in root.iterdir():
            if entry.name.endswith(_SOURCE_SUFFIXES):
                (pathlib.Path(tmp) / entry.name).write_bytes(entry.read_bytes())
        yield pathlib.Path(tmp)


def _summarize(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= _ERROR_CHARS else "..." + text[-_ERROR_CHARS:]


def _build():
    from torch.utils import cpp_extension

    # every visible GPU's architecture: a process may drive GPUs of different generations
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    ninja = _find_ninja()
    path = os.environ.get("PATH", "")
    if ninja and shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + path
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:  # the local GPUs only (sm_90 on Hopper), without torch's warning
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
    try:
        with _source_dir() as src:
            sources = sorted(str(p) for p in src.glob("*.cu")) + [str(src / "fastpbn_cuda.cpp")]
            includes, ldflags = _toolkit_flags(cpp_extension.CUDA_HOME)
            return cpp_extension.load(
                name="fastpbn_cuda_" + "_".join(f"sm{a}{b}" for a, b in caps),
                sources=sources,
                extra_include_paths=[str(src), *includes],
                extra_ldflags=ldflags,
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                verbose=os.environ.get("FASTPBN_VERBOSE_BUILD", "0") == "1",
            )
    finally:
        if not arch_list:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        os.environ["PATH"] = path


def load():
    """The compiled extension, built on the first call (minutes once, then cached on disk).

    Returns:
        The extension module.
    Raises:
        CudaExtensionError: the environment cannot build it, or the build failed (the failure
            is remembered and re-raised without rebuilding).
    """
    global _ext, _build_error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _build_error is not None:
            raise CudaExtensionError(f"building the CUDA extension failed: {_build_error}")
        reasons = _environment_reasons()
        if reasons:
            raise CudaExtensionError("cannot build the CUDA extension: " + "; ".join(reasons))
        try:
            _ext = _build()
        except Exception as e:
            _build_error = _summarize(e)
            raise CudaExtensionError(f"building the CUDA extension failed: {_build_error}") from e
    return _ext


def _workspace(ext, x: Tensor) -> tuple[Tensor, Tensor]:
    """(float32 scratch, zeroed int32 counters) big enough for x (see fastpbn._scratch)."""
    floats, ints = ext.workspace_size(x)
    return workspace(x.device, floats, ints)


def _viewable(t: Tensor) -> Tensor:
    """t when its spatial dims (2, 3, ...) collapse into one stride, else a contiguous copy."""
    stride, span = None, 1
    for size, st in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if stride is None:
            stride, span = st, size
        elif st != stride * span:
            return t.contiguous()
        else:
            span *= size
    return t


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _write_back(dst: Optional[Tensor], src: Optional[Tensor]) -> None:
    if dst is not None and src is not dst:
        dst.copy_(src)


def _values_per_channel(x: Tensor) -> int:
    return math.prod(x.shape) // x.shape[1] if x.shape[1] else 0


def forward_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    acc: Optional[tuple[Tensor, Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor]:
    """Training batch norm: K1 (statistics, running stats, accumulator) then K2.

    Args:
        x: (N, C, *) fp32 / fp16 / bf16 CUDA tensor, any strides.
        weight, bias: (C,) or None.
        running_mean, running_var: (C,) or None, updated in place (unbiased variance).
        num_batches_tracked: int64 counter, already incremented; read on the device when
            ``momentum`` is None.
        momentum: running-average factor, or None for the cumulative average.
        eps: added to the variance.
        acc: None or a float64 ``(count, mean, m2)`` triple of (C,) tensors, merged in place.
    Returns:
        (y laid out as ``output_like(x)``, float32 save_mean, float32 save_invstd).
    """
    ext = load()
    y = output_like(x)
    x = _viewable(x)
    c = x.shape[1]
    save_mean = x.new_empty(c, dtype=torch.float32)
    save_invstd = x.new_empty(c, dtype=torch.float32)
    rm, rv = _contig(running_mean), _contig(running_var)
    acc_k = tuple(_contig(t) for t in acc) if acc is not None else (None, None, None)
    ws, counters = _workspace(ext, x)
    ext.forward_train(
        x, y, _contig(weight), _contig(bias), rm, rv, num_batches_tracked,
        None if momentum is None else float(momentum), float(eps), *acc_k,
        save_mean, save_invstd, ws, counters,
    )
    _write_back(running_mean, rm)
    _write_back(running_var, rv)
    for dst, src in zip(acc or (), acc_k):
        _write_back(dst, src)
    return y, save_mean, save_invstd


def forward_eval(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """Eval batch norm with the running statistics (K2 alone).

    Returns:
        y laid out as ``output_like(x)``, x's dtype.
    """
    ext = load()
    y = output_like(x)
    ext.forward_eval(
        _viewable(x), y, _contig(weight), _contig(bias), _contig(running_mean),
        _contig(running_var), float(eps),
    )
    return y


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    output_mask: tuple[bool, bool, bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Batch-norm backward: K3 (sums, dw, db, dx coefficients) then K4 (dx), each only when
    ``output_mask`` needs it.

    Args:
        grad_out: x's shape, any strides (stride 0 too).
        mean, invstd: the statistics the forward normalized with (batch or running).
        training: the forward used batch statistics (dx then flows through them).
        output_mask: which of (dx, dw, db) to compute.
    Returns:
        (dx laid out as ``output_like(x)``, dw, db in the weight's dtype, float32 without a
        weight); None where the mask is False.
    """
    ext = load()
    dx = output_like(x) if output_mask[0] else None
    x = _viewable(x)
    g = _viewable(grad_out if grad_out.dtype == x.dtype else grad_out.to(x.dtype))
    c = x.shape[1]
    pdtype = weight.dtype if weight is not None else torch.float32
    dw = x.new_empty(c, dtype=pdtype) if output_mask[1] else None
    db = x.new_empty(c, dtype=pdtype) if output_mask[2] else None
    if dx is None and dw is None and db is None:
        return None, None, None
    ws, counters = _workspace(ext, x)
    ext.backward(
        g, x, _contig(weight), _contig(mean.float()), _contig(invstd.float()), bool(training),
        dx, dw, db, ws, counters,
    )
    return dx, dw, db


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel statistics (K1 alone).

    Returns:
        (float32 mean, float32 biased variance, values per channel).
    """
    ext = load()
    x = _viewable(x)
    c = x.shape[1]
    mean = x.new_empty(c, dtype=torch.float32)
    var = x.new_empty(c, dtype=torch.float32)
    ws, counters = _workspace(ext, x)
    ext.batch_stats(x, mean, var, ws, counters)
    return mean, var, _values_per_channel(x)


def welford_update(x: Tensor, count: Tensor, mean: Tensor, m2: Tensor) -> None:
    """Merge x's per-channel (n, mean, M2) into the float64 state (count, mean, m2) in place,
    inside K1 (no host synchronization)."""
    ext = load()
    x = _viewable(x)
    state = tuple(_contig(t) for t in (count, mean, m2))
    ws, counters = _workspace(ext, x)
    ext.welford_update(x, *state, ws, counters)
    for dst, src in zip((count, mean, m2), state):
        _write_back(dst, src)


__all__ = [
    "CudaExtensionError",
    "backward",
    "batch_stats",
    "forward_eval",
    "forward_train",
    "load",
    "not_supported_reasons",
    "welford_update",
]

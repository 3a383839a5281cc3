"""Backend dispatch: which implementation serves a tensor.

Every backend answers ``not_supported_reasons(x) -> list[str]`` (an empty list means it can run)
and implements the same five operations (see :class:`Backend`). ``auto`` takes, for a CUDA
tensor, the first of ``triton, cuda`` with no reasons, else ``torch`` (always ``torch`` for
other devices); a backend named explicitly (``FASTPBN_BACKEND``
or :func:`set_backend`) that cannot run raises :class:`BackendUnavailable` listing its reasons —
never a silent fallback. The environment variable is read at call time.

Importing this module imports neither triton nor the CUDA extension: the Triton and CUDA
backends import their kernels on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _torch_ops

BACKENDS = ("triton", "cuda", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_override: Optional[str] = None


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot run on the given tensor."""


class Backend:
    """The operations every backend implements. All statistics are per channel (dim 1).

    ``forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
    eps, acc) -> (y, save_mean, save_invstd)``
        Normalize ``x`` (N, C, *) with its batch statistics. ``running_*`` (C,) or None are
        updated in place with PyTorch's rule (``running_var`` gets the unbiased variance);
        ``momentum=None`` means the cumulative average ``1 / num_batches_tracked`` (already
        incremented by the caller; the GPU backends read it on the device). ``acc`` is None
        or a float64 ``(count, mean, m2)`` triple of (C,) tensors into which the batch is
        merged (Chan).
        ``y`` keeps x's shape, dtype and memory format; save_mean / save_invstd are float32
        (float64 for float64 x, which only the torch backend serves).
    ``forward_eval(x, weight, bias, running_mean, running_var, eps) -> y``
    ``backward(grad_out, x, weight, mean, invstd, training, output_mask) -> (dx, dw, db)``
        ``mean``/``invstd`` are the saved batch statistics (training) or the running ones
        (eval). Entries whose ``output_mask`` is False are returned as None.
    ``batch_stats(x) -> (mean, var, count)``: float32 (C,) mean and biased variance, int count.
    ``welford_update(x, count, mean, m2)``: merge x's batch into float64 (C,) state in place.
    """

    name = "?"

    def not_supported_reasons(self, x: Tensor) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether ``auto`` may take this backend, which has no reasons against the input."""
        return True


def _common_reasons(x: Tensor) -> list[str]:
    reasons = []
    if x.dtype not in _FLOAT_DTYPES:
        reasons.append(f"dtype {x.dtype} is not float32/float16/bfloat16")
    if x.dim() < 2:
        reasons.append(f"input must have a channel dim (got {x.dim()}-D)")
    return reasons


class TorchBackend(Backend):
    """Plain PyTorch: serves every device and dtype; the reference path on CPU. Besides the
    five operations it answers ``native_train(x, *params)`` and offers
    ``native_forward_train(...)``:
    eager calls that would run PyTorch's own training kernel call it directly, with PyTorch's
    autograd (see ``ops``)."""

    name = "torch"

    def not_supported_reasons(self, x: Tensor) -> list[str]:
        return []

    def __getattr__(self, op):  # (looked up per call: tests patch _torch_ops' functions)
        return getattr(_torch_ops, op)


class TritonBackend(Backend):
    """Triton kernels (``fastpbn.kernels``): CUDA tensors, or CPU under ``TRITON_INTERPRET=1``."""

    name = "triton"

    def not_supported_reasons(self, x: Tensor) -> list[str]:
        reasons = _common_reasons(x)
        if not _triton_installed():
            reasons.append("triton is not installed (pip install 'fastpbn[triton]')")
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if x.device.type == "cpu" and not interpret:
            reasons.append("tensor is on CPU (Triton runs on CPU only with TRITON_INTERPRET=1)")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"device {x.device.type} is not supported")
        return reasons

    def __getattr__(self, op):
        from . import kernels

        return getattr(kernels, op)


class CudaBackend(Backend):
    """The CUDA C++ extension (``csrc/``), JIT-built with ninja on first use."""

    name = "cuda"

    def not_supported_reasons(self, x: Tensor) -> list[str]:
        reasons = _common_reasons(x)
        if x.device.type != "cuda":
            reasons.append(f"tensor is on {x.device.type}, not CUDA")
            return reasons
        try:
            from . import _cuda_ext
        except ImportError as e:  # pragma: no cover - the module ships with the package
            return reasons + [f"fastpbn._cuda_ext unavailable: {e}"]
        return reasons + _cuda_ext.not_supported_reasons()

    def ready(self) -> bool:
        """Builds the extension on first use. ``auto`` moves on if that fails, with a warning
        (once: the failure is remembered); naming the backend raises the build error."""
        from . import _cuda_ext

        try:
            _cuda_ext.load()
        except _cuda_ext.CudaExtensionError as e:
            warnings.warn(f"fastpbn: {e}; FASTPBN_BACKEND=auto serves CUDA tensors with the "
                          "torch backend instead", RuntimeWarning, stacklevel=2)
            return False
        return True

    def __getattr__(self, op):
        from . import _cuda_ext

        return getattr(_cuda_ext, op)


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    # asked on every call; find_spec searches sys.path each time while triton is not imported
    # (~40 us, which would be paid per BN call by the CUDA fallback on a machine without it)
    return importlib.util.find_spec("triton") is not None


_INSTANCES = {"triton": TritonBackend(), "cuda": CudaBackend(), "torch": TorchBackend()}


def set_backend(name: Optional[str]) -> None:
    """Force a backend in code (``auto``, ``triton``, ``cuda``, ``torch``); None clears it and
    defers to the ``FASTPBN_BACKEND`` environment variable again."""
    if name is not None and name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    global _override
    _override = name


def requested_backend() -> str:
    """The backend asked for: :func:`set_backend`, else ``FASTPBN_BACKEND``, else ``auto``."""
    name = _override or os.environ.get("FASTPBN_BACKEND", "auto") or "auto"
    if name not in (*BACKENDS, "auto"):
        raise ValueError(
            f"FASTPBN_BACKEND={name!r} is not one of auto, {', '.join(BACKENDS)}"
        )
    return name


def get_backend(x: Tensor, name: Optional[str] = None) -> Backend:
    """The backend that serves ``x``: the named one (or the requested one) if it can, else raise."""
    name = name or requested_backend()
    if name != "auto":
        backend = _INSTANCES[name]
        reasons = backend.not_supported_reasons(x)
        if reasons:
            raise BackendUnavailable(
                f"fastpbn backend {name!r} cannot run on this input "
                f"({tuple(x.shape)}, {x.dtype}, {x.device}): " + "; ".join(reasons)
            )
        return backend
    if x.device.type == "cuda":
        for candidate in ("triton", "cuda"):
            backend = _INSTANCES[candidate]
            if not backend.not_supported_reasons(x) and backend.ready():
                return backend
    return _INSTANCES["torch"]


def backend_table(x: Tensor) -> list[tuple[str, list[str]]]:
    """(backend, reasons) for every backend on ``x``: what ``python -m fastpbn info`` prints."""
    return [(name, _INSTANCES[name].not_supported_reasons(x)) for name in BACKENDS]

"""fastpbn: precise BatchNorm statistics and fast BatchNorm kernels for PyTorch.

Importing fastpbn compiles nothing and does not import triton.
"""

from ._backend import BackendUnavailable, set_backend
from .modules import (
    FastPreciseBN1d,
    FastPreciseBN2d,
    FastPreciseBN3d,
    convert_model,
    revert_model,
)
from .ops import batch_norm, batch_stats
from .precise import PopulationStats, recompute_bn_stats, update_bn_stats
from .stats import WelfordState

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "FastPreciseBN1d",
    "FastPreciseBN2d",
    "FastPreciseBN3d",
    "PopulationStats",
    "WelfordState",
    "batch_norm",
    "batch_stats",
    "convert_model",
    "recompute_bn_stats",
    "revert_model",
    "set_backend",
    "update_bn_stats",
]

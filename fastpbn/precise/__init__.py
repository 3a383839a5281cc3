"""Precise BatchNorm statistics: recompute every BN layer's population mean and variance with
the weights fixed ("PreciseBN", Wu & Johnson, *Rethinking "Batch" in BatchNorm*, 2021).

``recompute_bn_stats`` (the full API), ``update_bn_stats`` (fvcore's signature and semantics
on exact arithmetic) and ``PopulationStats`` (the result: apply, save/load, drift report).
"""

from .fvcore_compat import update_bn_stats
from .population import LayerStats, PopulationStats
from .recompute import recompute_bn_stats

__all__ = ["LayerStats", "PopulationStats", "recompute_bn_stats", "update_bn_stats"]

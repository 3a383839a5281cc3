"""``python -m fastpbn demo``: EMA vs precise BatchNorm statistics on real data.

A small CNN trained at a small batch, evaluated after every epoch with its EMA statistics and
with precise statistics recomputed over N samples at two normalization batch sizes; writes a
report, plots and the raw numbers. See ``python -m fastpbn demo --help``.
"""

from .run import main

__all__ = ["main"]

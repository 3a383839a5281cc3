"""``PopulationStats``: the result of a recompute pass, per BN layer (mean, var, count)."""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ._collect import has_running_stats, layer_root

_FORMAT = "fastpbn.PopulationStats/1"
_FIELDS = ("mean", "var", "count")
ESTIMATORS = ("population", "batch_mean")


class LayerStats(NamedTuple):
    """One layer's statistics, float64 (C,) tensors on the CPU. ``var`` is what goes into
    ``running_var`` (unbiased, PyTorch's convention); ``count`` is the values per channel."""

    mean: Tensor
    var: Tensor
    count: Tensor


class PopulationStats(Mapping):
    """Population statistics of BN layers: a mapping ``layer name -> LayerStats``.

    Args:
        layers: layer name (as in ``model.named_modules()``) -> (mean, var, count).
        estimator: "population" or "batch_mean" (how ``var`` was computed).
        num_samples: samples that went through the model (summed over ranks).
        num_batches: normalization batches (forward calls, summed over ranks).
        batch_size: the normalization batch size asked for (None: the loader's).
        converged: with ``tol``, whether every channel converged; else None.
    """

    def __init__(self, layers: Mapping[str, Any], *, estimator: str = "population",
                 num_samples: int = 0, num_batches: int = 0,
                 batch_size: Optional[int] = None, converged: Optional[bool] = None):
        self._layers: dict[str, LayerStats] = {}
        for name, value in layers.items():
            if not isinstance(name, str):
                raise ValueError(f"layer names must be strings, got {name!r}")
            try:
                mean, var, count = (_cpu_f64(v) for v in value)
            except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
                raise ValueError(f"layer {name!r}: (mean, var, count) must be three real "
                                 f"vectors: {e}") from e
            if not (mean.numel() == var.numel() == count.numel()):
                raise ValueError(f"layer {name!r}: mean, var and count differ in length")
            if not (mean.isfinite().all() and var.isfinite().all() and (var >= 0).all()
                    and count.isfinite().all() and (count >= 0).all()
                    and (count == count.floor()).all()):
                raise ValueError(f"layer {name!r}: mean, var and count must be finite, var "
                                 "non-negative, count a non-negative integer")
            self._layers[name] = LayerStats(mean, var, count)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.num_samples = _count(num_samples, "num_samples")
        self.num_batches = _count(num_batches, "num_batches")
        if batch_size is not None:
            batch_size = _count(batch_size, "batch_size")
            if batch_size == 0:
                raise ValueError("batch_size must be None or a positive integer, got 0")
        self.batch_size = batch_size
        if converged is not None and not isinstance(converged, bool):
            raise ValueError(f"converged must be None, True or False, got {converged!r}")
        self.converged = converged

    def __getitem__(self, name: str) -> LayerStats:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """A short readable description: counts, then one line per layer."""
        head = (f"PopulationStats({len(self)} layers, estimator={self.estimator!r}, "
                f"samples={self.num_samples}, batches={self.num_batches}, "
                f"batch_size={self.batch_size}, converged={self.converged})")
        lines = [head]
        for name, s in self._layers.items():
            if s.mean.numel() == 0:
                lines.append(f"  {name or '<model>'}: C=0")
                continue
            lines.append(
                f"  {name or '<model>'}: C={s.mean.numel()} values/channel={int(s.count.max())} "
                f"|mean| max={s.mean.abs().max():.4g} var min={s.var.min():.4g} "
                f"max={s.var.max():.4g}"
            )
        return "\n".join(lines)

    def _layer(self, model: nn.Module, name: str, write: bool = True) -> nn.Module:
        m = layer_root(model)  # a torch.compile'd model: its original module's names
        for part in name.split(".") if name else ():  # get_submodule, minus its overhead
            m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if not isinstance(m, nn.Module):
            raise ValueError(f"model has no layer {name!r}")
        if not has_running_stats(m):
            raise ValueError(f"layer {name!r} ({type(m).__name__}) has no running statistics")
        c = self._layers[name].mean.numel()
        rm, rv = m.running_mean, m.running_var
        if rm.numel() != c or rv.numel() != c:
            raise ValueError(f"layer {name!r} has {rm.numel()} channels, these stats have {c}")
        if write and (rm.is_inference() or rv.is_inference()) \
                and not torch.is_inference_mode_enabled():
            raise ValueError(f"layer {name!r}: its running statistics are inference tensors "
                             "(made under torch.inference_mode); they can only be written "
                             "inside it")
        return m

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Write ``running_mean``/``running_var`` of every layer named here, in place, in the
        buffers' dtype and device. ``num_batches_tracked`` is left alone. Every layer is
        checked first: a missing name, a channel mismatch or statistics that overflow the
        buffers' dtype (float16) raise ``ValueError`` and write nothing (so do inference-tensor
        buffers outside inference mode); a write that still fails puts back what was written
        and raises naming the layer."""
        writes = []
        for name, s in self._layers.items():
            m = self._layer(model, name)
            for buf, value in ((m.running_mean, s.mean), (m.running_var, s.var)):
                value = value.to(buf.dtype)  # on the CPU: checked without a device read
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"layer {name!r}: its statistics overflow its {buf.dtype} "
                                     "running buffers (|mean| up to "
                                     f"{s.mean.abs().max().item():.3g}, var up to "
                                     f"{s.var.max().item():.3g})")
                writes.append((name, buf, value.to(buf.device)))
        written: list[tuple[Tensor, Tensor]] = []
        try:
            for name, buf, value in writes:
                written.append((buf, buf.clone()))  # a failing copy_ may still write
                try:
                    buf.copy_(value)
                except RuntimeError as e:
                    raise RuntimeError(f"layer {name!r}: cannot write its running "
                                       f"statistics: {e}") from e
        except BaseException:
            for buf, saved in reversed(written):
                try:  # the buffer whose write failed may refuse this one too
                    buf.copy_(saved)
                except RuntimeError:
                    pass
            raise

    @torch.no_grad()
    def drift(self, model: nn.Module) -> list[dict]:
        """How far ``model``'s current running statistics (e.g. the training EMA) are from
        these. Per layer: ``mean_err`` is |running_mean - mean| in units of the population std
        (relative to the mean itself is meaningless where means are ~0), ``std_err`` is
        |sqrt(running_var) - std| / std; each as max and mean over channels.

        Returns:
            One dict per layer: layer, channels, mean_err_max, mean_err_avg, std_err_max,
            std_err_avg (floats).
        """
        rows = []
        for name, s in self._layers.items():
            m = self._layer(model, name, write=False)
            rm = m.running_mean.detach().to("cpu", torch.float64)
            rv = m.running_var.detach().to("cpu", torch.float64).clamp_min(0)
            std = s.var.clamp_min(0).sqrt()
            mean_err = _ratio((rm - s.mean).abs(), std)
            std_err = _ratio((rv.sqrt() - std).abs(), std)
            # (a zero-channel layer: no error)
            top = lambda e, f: f(e).item() if e.numel() else 0.0  # noqa: E731
            rows.append({
                "layer": name, "channels": s.mean.numel(),
                "mean_err_max": top(mean_err, torch.max), "mean_err_avg": top(mean_err, torch.mean),
                "std_err_max": top(std_err, torch.max), "std_err_avg": top(std_err, torch.mean),
            })
        return rows

    @staticmethod
    def format_drift(rows: list[dict]) -> str:
        """A plain-text table of :meth:`drift` rows."""
        out = [f"{'layer':<40} {'C':>5} {'mean err max':>13} {'std err max':>12}"]
        for r in rows:
            out.append(f"{r['layer'] or '<model>':<40} {r['channels']:>5} "
                       f"{r['mean_err_max']:>13.3e} {r['std_err_max']:>12.3e}")
        return "\n".join(out)

    def __eq__(self, other: object) -> bool:
        """The same layers with the same values, exactly, and the same metadata (layer order
        aside, as for any mapping)."""
        if not isinstance(other, PopulationStats):
            return NotImplemented
        meta, other_meta = self._metadata(), other._metadata()
        del meta["layers"], other_meta["layers"]
        return (meta == other_meta and self._layers.keys() == other._layers.keys()
                and all(torch.equal(a, b) for name, s in self._layers.items()
                        for a, b in zip(s, other._layers[name])))

    __hash__ = None  # mutable tensors: not hashable, as a dict is not

    def _metadata(self) -> dict[str, str]:
        return {
            "format": _FORMAT, "layers": json.dumps(list(self._layers)),
            "estimator": self.estimator, "num_samples": str(self.num_samples),
            "num_batches": str(self.num_batches), "batch_size": json.dumps(self.batch_size),
            "converged": json.dumps(self.converged),
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save to ``path``: safetensors when installed, else ``torch.save`` (tensors and
        strings only, so :meth:`load` can use ``weights_only=True``)."""
        # own copies: layers' tensors may be views of one buffer (safetensors refuses those)
        tensors = {f"{name}.{f}": getattr(s, f).clone(memory_format=torch.contiguous_format)
                   for name, s in self._layers.items() for f in _FIELDS}
        try:
            from safetensors.torch import save_file
        except ImportError:
            if os.fspath(path).endswith(".safetensors"):
                warnings.warn(f"PopulationStats.save: safetensors is not installed; {path} is "
                              "written in torch.save's format (load reads it back; pip "
                              "install safetensors for the safetensors format)", stacklevel=2)
            torch.save({"metadata": self._metadata(), "tensors": tensors}, path)
        else:
            save_file(tensors, str(path), metadata=self._metadata())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PopulationStats":
        """Load what :meth:`save` wrote (either format), without unpickling code.

        Raises:
            OSError: the file cannot be opened.
            ValueError: it is not a complete, valid saved PopulationStats (naming the file).
        """
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # (a safetensors header may begin with "PK")
        try:
            if is_zip:  # read from a file object: given a path, torch.load picks its reader
                # by the extension (a ".safetensors" name, written where safetensors is not
                # installed, went to the safetensors reader)
                with open(path, "rb") as f:
                    blob = torch.load(f, map_location="cpu", weights_only=True)
                meta, tensors = blob["metadata"], blob["tensors"]
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"not a saved PopulationStats (format {meta.get('format')!r})")
            names = json.loads(meta["layers"])
            if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                    or len(set(names)) != len(names)):
                raise ValueError(f"its layer list is not a list of distinct names: {names!r}")
            expected = {f"{n}.{f}" for n in names for f in _FIELDS}
            if set(tensors) - expected:
                raise ValueError(f"entries no layer names: {sorted(set(tensors) - expected)}")
            for key in sorted(expected & set(tensors)):  # (a missing one: KeyError below)
                t = tensors[key]
                if t.dtype != torch.float64 or t.dim() != 1:
                    raise ValueError(f"entry {key!r} is {t.dtype} of shape {tuple(t.shape)}, "
                                     "not a float64 vector")
            layers = {n: tuple(tensors[f"{n}.{f}"] for f in _FIELDS) for n in names}
            return cls(layers, estimator=meta["estimator"],
                       num_samples=_saved_int(meta["num_samples"], "num_samples"),
                       num_batches=_saved_int(meta["num_batches"], "num_batches"),
                       batch_size=json.loads(meta["batch_size"]),
                       converged=json.loads(meta["converged"]))
        except Exception as e:  # a foreign, truncated or incomplete file (it opened above)
            detail = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: cannot read PopulationStats: {detail}") from e


def _cpu_f64(v: Any) -> Tensor:
    """``v`` as a flat float64 CPU tensor without autograd history, always a copy of its own
    (a caller that changes its tensors afterwards cannot undo the checks)."""
    t = torch.as_tensor(v)
    if t.is_complex():
        raise TypeError(f"complex values ({t.dtype})")
    return t.detach().to("cpu", torch.float64, copy=True).reshape(-1)


def _saved_int(s: Any, name: str) -> int:
    """A count as :meth:`PopulationStats.save` writes it: a string of ASCII digits."""
    if not (isinstance(s, str) and s.isascii() and s.isdigit()):
        raise ValueError(f"{name} is {s!r}, not a count")
    return int(s)


def _count(v: Any, name: str) -> int:
    """``v`` as a non-negative int (an integral float such as 64.0 too), else ValueError."""
    integral = isinstance(v, numbers.Integral) or (
        isinstance(v, numbers.Real) and math.isfinite(v) and v == int(v))
    if isinstance(v, bool) or not integral or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


def _ratio(err: Tensor, scale: Tensor) -> Tensor:
    # a zero-variance channel: exact agreement is 0 error, a NaN stays NaN, anything else
    # infinite
    return torch.where(scale > 0, err / scale.where(scale > 0, 1.0),
                       torch.where(err > 0, torch.inf, err.where(err.isnan(), 0.0)))

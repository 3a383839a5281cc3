"""``python -m fastpbn demo | bench | info``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
from typing import Optional


def _requested(requested_backend) -> str:
    try:
        return requested_backend()
    except ValueError as e:  # a bad FASTPBN_BACKEND: what info is for
        return f"invalid: {e}"


def info() -> int:
    """Print versions, the device, and which backend serves which case."""
    import torch

    from . import __version__
    from ._backend import backend_table, requested_backend

    def version(mod: str) -> str:
        if importlib.util.find_spec(mod) is None:
            return "not installed"
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(mod)
        except PackageNotFoundError:
            return "installed"

    rows = [
        ("fastpbn", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", version("triton")),
        ("ninja", version("ninja")),
        ("CUDA (torch)", torch.version.cuda or "none (CPU build)"),
        ("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only"),
        ("FASTPBN_BACKEND", os.environ.get("FASTPBN_BACKEND", "auto (unset)")),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0 (unset)")),
        ("requested backend", _requested(requested_backend)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{'case':<24}  {'backend':<8}  status")
    for dev in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.empty(2, 3, 4, 4, device=dev, dtype=dtype)
            case = f"{dev} {str(dtype).replace('torch.', '')}"
            served = _auto_choice(x)
            for name, reasons in backend_table(x):
                status = "ok" if not reasons else "; ".join(reasons)
                mark = " <- auto" if name == served else ""
                print(f"{case:<24}  {name:<8}  {status}{mark}")
    return 0


def _auto_choice(x) -> str:
    from ._backend import get_backend

    try:
        return get_backend(x, "auto").name
    except Exception as e:  # pragma: no cover - auto always finds torch
        return f"error: {e}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastpbn",
        description="fastpbn: precise BatchNorm statistics and fast BatchNorm kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and backend table")
    sub.add_parser("demo", help="EMA vs precise BN on real data (report + plots)", add_help=False)
    sub.add_parser("bench", help="benchmarks against stock BN and precise-BN peers",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    from .bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

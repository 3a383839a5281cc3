"""Test set-up. Triton runs through its CPU interpreter when no CUDA device is present; the
variable must be set before anything imports triton or fastpbn.kernels."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # forced: an inherited TRITON_INTERPRET=0 would break the Triton tests
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import pytest  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_numpy_bound():
    """The numpy below which this triton's CPU interpreter works, or None. Measured: triton
    3.0 / 3.1 read and write garbage with numpy 2; triton < 3.8 raises "only 0-dimensional
    arrays can be converted to Python scalars" in every kernel loop with numpy >= 2.4."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton, numpy = (tuple(int(p) for p in version(m).split(".")[:2])
                         for m in ("triton", "numpy"))
    except (PackageNotFoundError, ValueError):
        return None
    bound = (2, 0) if triton < (3, 2) else (2, 4) if triton < (3, 8) else None
    return bound if bound is not None and numpy >= bound else None


def pytest_configure(config):
    bound = _interpreter_numpy_bound() if HAS_TRITON and not HAS_CUDA else None
    if bound is not None:
        need = "numpy<{}.{}".format(*bound)
        pytest.exit(f"the Triton tests run in triton's CPU interpreter, which needs {need} "
                    f"with this triton: pip install '{need}' (or a newer triton)", returncode=4)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# every backend that can run here: torch always, triton through its interpreter on CPU
# "torch-own": the torch backend with its hand-off of small eager training calls to
# torch.batch_norm switched off, so fastpbn's autograd Function and backward serve them too
BACKENDS = ["torch", "torch-own"] + (["triton"] if HAS_TRITON else [])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _clear_backend_override():
    import fastpbn

    yield
    fastpbn.set_backend(None)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per backend, forced with fastpbn.set_backend."""
    import fastpbn
    from fastpbn import _torch_ops

    if request.param == "torch-own":
        monkeypatch.setattr(_torch_ops, "native_train", lambda x, *params: False)
    fastpbn.set_backend(request.param.split("-")[0])
    return request.param


@pytest.fixture(autouse=True)
def _own_kernels_on_cuda(monkeypatch):
    """Eager CUDA calls run fastpbn's kernels in tests, not PyTorch's (which ``auto`` takes
    where they are faster: fastpbn.ops.STOCK_EAGER_ON_CUDA); tests of that hand-off set it."""
    import fastpbn.ops

    monkeypatch.setattr(fastpbn.ops, "STOCK_EAGER_ON_CUDA", False)

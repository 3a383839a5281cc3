"""The reductions' scratch buffers (fastpbn/_scratch.py): who shares them, and CUDA graphs."""

import threading
import weakref

import pytest
import torch

import fastpbn
from fastpbn import _scratch
from fastpbn.reference import batch_norm_reference

from .conftest import DEVICE


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(_scratch, "_local", threading.local())


def _cached_pairs():
    return _scratch._local.__dict__.get("pairs", {})


def _device():
    return torch.empty(0, device=DEVICE).device  # with its index, as the backends pass it


def test_one_pair_per_thread_grown_and_zeroed():
    dev = _device()
    ws, cnt = _scratch.workspace(dev, 10, 3)
    assert ws.dtype == torch.float32 and cnt.dtype == torch.int32
    assert ws.device == cnt.device == dev and not cnt.any()
    assert _scratch.workspace(dev, 100, 3)[0] is ws  # big enough: the same pair
    cnt[0] = 7  # (kernels leave their counters at zero; a grown pair must start at zero)
    big, big_cnt = _scratch.workspace(dev, ws.numel() + 1, cnt.numel() + 1)
    assert big.numel() > ws.numel() and big_cnt.numel() > cnt.numel() and not big_cnt.any()
    assert _scratch.workspace(dev, 10, 3)[0] is big

    assert len(_cached_pairs()) == 1  # the outgrown pair is not kept


def test_a_thread_has_its_own_pair_freed_when_it_exits():
    dev = _device()
    mine = _scratch.workspace(dev, 10, 3)
    seen = {}

    def other_thread():
        ws, cnt = _scratch.workspace(dev, 10, 3)
        seen.update(ws=ws.data_ptr(), cnt=cnt.data_ptr(), zeroed=not cnt.any(),
                    again=_scratch.workspace(dev, 10, 3)[0] is ws, ref=weakref.ref(ws))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen["ws"] != mine[0].data_ptr() and seen["cnt"] != mine[1].data_ptr()
    assert seen["zeroed"] and seen["again"]
    assert seen["ref"]() is None  # the exited thread's pair is gone (it was kept for its life)
    assert _scratch.workspace(dev, 10, 3)[0] is mine[0]


@pytest.mark.gpu
def test_gpu_cached_per_stream_fresh_while_capturing():
    dev = _device()
    ws, _ = _scratch.workspace(dev, 10, 3)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert _scratch.workspace(dev, 10, 3)[0].data_ptr() != ws.data_ptr()
    cached = len(_cached_pairs())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = [_scratch.workspace(dev, 10, 3) for _ in range(2)]
    assert len(_cached_pairs()) == cached  # nothing made during capture is kept
    assert all(w.data_ptr() != ws.data_ptr() for w, _ in got)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_gpu_two_graphs_replayed_concurrently(backend_name):
    """Two graphs captured one after the other (on torch's shared capture stream), then replayed
    at the same time on two streams: each must use its own scratch."""
    try:
        fastpbn.set_backend(backend_name)
        fastpbn.batch_norm(torch.randn(2, 3, 4, 4, device="cuda"), None, None, training=True)
    except fastpbn.BackendUnavailable as e:
        pytest.skip(str(e))
    xs = [torch.randn(32, 64, 28, 28, device="cuda") * (i + 1) + 10 * i for i in range(2)]
    ys, graphs = [None, None], [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for x in xs:
            fastpbn.batch_norm(x, None, None, training=True)
    torch.cuda.current_stream().wait_stream(warm)
    for i, x in enumerate(xs):
        with torch.cuda.graph(graphs[i]):
            ys[i] = fastpbn.batch_norm(x, None, None, training=True)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        for s, g in zip(streams, graphs):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                g.replay()
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        for x, y in zip(xs, ys):
            ref = batch_norm_reference(x.cpu(), None, None, None, None, True, 0.0, 1e-5)[0]
            torch.testing.assert_close(y.cpu().double(), ref, rtol=0, atol=1e-4)


def test_cached_under_other_dispatch_modes_not_under_fake_ones():
    """Profilers and checkpoint policies run dispatch modes over real tensors: the scratch
    stays cached there (it was reallocated per call, 3x slower). A fake mode's tensors must
    never be cached."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    cpu = torch.device("cpu")
    with PassThrough():
        first = _scratch.workspace(cpu, 100, 4)
        assert _scratch.workspace(cpu, 100, 4)[0] is first[0]
    with FakeTensorMode():
        fake = _scratch.workspace(cpu, 100, 4)
    assert fake[0] is not first[0] and _scratch.workspace(cpu, 100, 4)[0] is first[0]

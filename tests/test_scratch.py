"""The reductions' scratch buffers (fastpbn/_scratch.py): one pair per call, and CUDA graphs."""

import copy

import pytest
import torch
from torch import nn

import fastpbn
from fastpbn import _scratch, _torch_ops
from fastpbn.reference import batch_norm_reference

from .conftest import DEVICE


def _device():
    return torch.empty(0, device=DEVICE).device  # with its index, as the backends pass it


def test_each_call_gets_its_own_pair_with_zeroed_counters():
    dev = _device()
    ws, cnt = _scratch.workspace(dev, 10, 3)
    assert ws.dtype == torch.float32 and cnt.dtype == torch.int32
    assert ws.shape == (10,) and cnt.shape == (3,) and ws.device == cnt.device == dev
    assert not cnt.any()
    cnt.fill_(7)  # a counter left set must not reach the next call, whatever memory it gets
    ws2, cnt2 = _scratch.workspace(dev, 10, 3)
    assert ws2.data_ptr() != ws.data_ptr() and cnt2.data_ptr() != cnt.data_ptr()
    del ws, cnt
    for _ in range(3):
        assert not _scratch.workspace(dev, 10, 3)[1].any()
    assert [t.numel() for t in _scratch.workspace(dev, 0, 0)] == [1, 1]


def test_caching_allowed_under_real_dispatch_modes_not_under_fake_ones():
    """The CPU path's per-thread scratch is kept across calls unless a fake, proxy or
    functional mode is active (their tensors would poison every later real call); profilers
    and checkpoint policies run dispatch modes over real tensors and keep it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert _torch_ops.caching_allowed()
    with PassThrough():
        assert _torch_ops.caching_allowed()
    with FakeTensorMode():
        assert not _torch_ops.caching_allowed()


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_gpu_compiled_with_cuda_graph_trees_matches_eager(backend_name):
    """torch.compile's reduce-overhead mode warms each graph up eagerly with the thread's
    allocations routed into the graph trees' pool, then replays: training steps over two
    shapes, back and forth (a new graph, a path switch), match eager stock BN."""
    try:
        fastpbn.set_backend(backend_name)
        fastpbn.batch_norm(torch.randn(2, 3, 4, 4, device="cuda"), None, None, training=True)
    except fastpbn.BackendUnavailable as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)).cuda()
    fast = fastpbn.convert_model(copy.deepcopy(stock))
    compiled = torch.compile(fast, mode="reduce-overhead")
    for step, hw in enumerate([32, 32, 32, 16, 16, 32, 16, 32]):
        # each step's own gradients, as a training loop's zero_grad gives: a compiled backward's
        # .grad lives in the graph trees' pool, which the next step reuses (accumulating into
        # it would read memory the trees have handed on)
        stock.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)
        x = torch.randn(8, 3, hw, hw, device="cuda") * 3 + step
        want = stock(x)
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(x)
        want.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(fast.parameters(), stock.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3)
        for a, b in zip(fast.buffers(), stock.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


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


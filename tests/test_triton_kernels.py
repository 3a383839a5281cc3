"""The Triton kernels (fastpbn.kernels) against the float64 reference and stock PyTorch.

On CPU they run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a
CUDA machine the same tests run compiled, plus the `gpu` tests on the benchmark shapes. A
low-precision (or fp32) result passes when its error against float64 is at most twice PyTorch's
own same-dtype error plus a small floor relative to the values' magnitude.
"""

import math
import threading
import zlib

import pytest
import torch

from fastpbn import _scratch
from fastpbn.reference import batch_norm_reference, batch_stats_reference

from .conftest import DEVICE

pytest.importorskip("triton")
from fastpbn.kernels import gradients, layout, stats  # noqa: E402
from fastpbn.kernels.gradients import k3_k4_backward  # noqa: E402
from fastpbn.kernels.normalize import k2_normalize  # noqa: E402
from fastpbn.kernels.stats import k1_stats  # noqa: E402

from fastpbn import kernels as K  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error floors: outputs in x's dtype, and "stats" (float32 statistics of values exact
# in float32, any x dtype; above float32's 1e-6 because the interpreter sums a tile's rows one
# by one, measured up to 1.1e-6 on long channels_last tiles, where a GPU sums in a tree)
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, "stats": 4e-6}
NAN = float("nan")


def shifted(shape, dtype=torch.float32):
    """Per-channel mean in [1e3, 1e4], std in [1, 3]: far from zero, where wrong formulas
    break. Fresh random values on every call."""
    c = shape[1]
    view = (1, c, *([1] * (len(shape) - 2)))
    mean = torch.empty(c, device=DEVICE).uniform_(1e3, 1e4).view(view)
    std = torch.empty(c, device=DEVICE).uniform_(1.0, 3.0).view(view)
    return (torch.randn(shape, device=DEVICE) * std + mean).to(dtype)


# name -> (full shape, view of it). Each names the edge it covers.
LAYOUTS = {
    "nchw": ((4, 6, 5, 7), lambda t: t),
    "channels_last": ((4, 6, 5, 7), lambda t: t.to(memory_format=torch.channels_last)),
    "1d_nc": ((37, 5), lambda t: t),  # BatchNorm1d on (N, C): channels contiguous
    "1d_ncl": ((5, 3, 11), lambda t: t),
    "3d": ((2, 3, 4, 3, 5), lambda t: t),
    "3d_channels_last": ((2, 3, 4, 3, 5), lambda t: t.to(memory_format=torch.channels_last_3d)),
    "sliced_channels": ((4, 8, 5, 6), lambda t: t[:, 1::2]),  # strided channels, one view
    "transposed": ((3, 4, 5, 6), lambda t: t.transpose(2, 3)),  # permuted spatial dims
    "cropped": ((4, 3, 6, 8), lambda t: t[..., 1:7]),  # no common view: copied first
}


def make_x(name, dtype=torch.float32):
    shape, view = LAYOUTS[name]
    return view(shifted(shape, dtype))


def params(c, dtype=torch.float32):
    w = torch.empty(c, device=DEVICE).uniform_(0.5, 1.5).to(dtype)
    b = torch.empty(c, device=DEVICE).uniform_(-1.0, 1.0).to(dtype)
    rm = torch.empty(c, device=DEVICE).uniform_(1e3, 1e4)
    rv = torch.empty(c, device=DEVICE).uniform_(1.0, 9.0)
    return w, b, rm, rv


def check(what, ours, stock, ref, dtype, scale=None):
    """Error of ours vs float64 at most 2x stock's own error + a floor relative to the size
    of the values (``scale``, by default max |ref|)."""
    assert ours.shape == ref.shape, what
    ref = ref.double()
    e_ours = (ours.double() - ref).abs().max().item()
    e_stock = (stock.double() - ref).abs().max().item()
    scale = ref.abs().max().item() if scale is None else scale
    floor = FLOOR[dtype] * max(scale, 1e-3)
    assert e_ours <= 2 * e_stock + floor, f"{what}: error {e_ours:.3g}, stock {e_stock:.3g}"


def dx_scale(w, invstd, g):
    """Size of the terms of dx = w·invstd·(dy - ...): dx itself can cancel to ~0 (with two
    values per channel it is exactly 0), its rounding noise cannot."""
    w = torch.ones_like(invstd) if w is None else w
    return (w.double().abs() * invstd.double().abs()).max().item() * g.abs().max().item()


def ref_forward(x, w, b, rm, rv, training, momentum, eps):
    y, new_rm, new_rv = batch_norm_reference(x, rm, rv, w, b, training, momentum, eps)
    mean, var, _ = batch_stats_reference(x)
    return y, mean, 1 / torch.sqrt(var + eps), new_rm, new_rv


@pytest.fixture(autouse=True)
def poisoned_workspace(request, monkeypatch):
    """Kernels must never rely on the scratch buffer's contents: every call's is NaN here.
    Also seeds each case by its name: different data per case, the same on every run."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

    def workspace(device, floats, counters):
        ws, cnt = _scratch.workspace(device, floats, counters)
        return ws.fill_(NAN), cnt

    for module in (stats, gradients):
        monkeypatch.setattr(module, "workspace", workspace)


def test_layout_views():
    """Which layouts are read in place, and how."""
    x = torch.empty(4, 6, 5, 7)
    assert layout.split_dims([x]) == (4, 35, [(210, 35, 1)])  # NCHW: (N, C, HW)
    cl = x.to(memory_format=torch.channels_last)
    assert layout.split_dims([cl]) == (1, 140, [(0, 1, 6)])  # channels_last: (1, C, NHW)
    assert layout.split_dims([torch.empty(9, 3)]) == (1, 9, [(0, 1, 3)])
    assert layout.split_dims([x.transpose(2, 3)])[:2] == (4, 35)
    g = torch.ones(()).expand(4, 6, 5, 7)  # stride-0 gradient joins any view
    assert layout.split_dims([cl, g]) == (1, 140, [(0, 1, 6), (0, 0, 0)])
    assert layout.split_dims([x[..., 1:6]]) is None
    assert layout.split_dims([x, cl]) == (4, 35, [(210, 35, 1), (210, 1, 6)])  # both (N, C, HW)
    p = layout.plan([cl])
    assert (p.block_c, p.idx64) == (8, False) and p.block_r * p.block_c <= layout.TILE


@pytest.mark.parametrize("shape, channels_last, align, rows_unit", [
    ((4, 6, 5, 7), False, 1, False),  # S' = 35: nothing to tell
    ((4, 6, 14, 14), False, 4, True),  # S' = 196
    ((2, 3, 2, 4), False, 8, True),
    ((2, 3, 4, 4), False, 16, True),
    ((2, 3, 8, 8), False, 16, True),  # capped at MAX_ALIGN
    ((4, 6, 5, 7), True, 2, False),  # 6 contiguous channels
    ((3, 8, 3, 5), True, 8, False),
    ((2, 16, 2, 3), True, 16, False),
    ((9, 12), False, 4, False),  # BatchNorm1d (N, C): channels contiguous
    ((4, 3, 1, 1), False, 1, False),  # one value per (n, c): no contiguous axis
    ((1, 2, 2**20, 2**10), True, 1, False),  # int64 offsets: none (see layout._alignment)
    ((8, 1, 14, 14), True, 16, True),  # one channel: one run of 1568, its stride does not count
    ((8, 1, 14, 14), False, 16, True),
])
def test_plan_alignment(shape, channels_last, align, rows_unit):
    """ALIGN: the largest power of two (<= 16) dividing the contiguous axis' extent and the
    other strides of every tensor of the call; the kernels' sizes and strides times it are the
    true ones. A stride-0 gradient divides by anything."""
    x = torch.empty(shape, device="meta")  # (layouts only)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for tensors in ([x], [x, torch.ones((), device="meta").expand(shape)]):
        p = layout.plan(tensors)
        assert (p.align, p.rows_unit) == (align, rows_unit)
        (c, s), a = p.kernel_sizes, p.align
        assert (c, s * a) == (p.c, p.s) if rows_unit else (c * a, s) == (p.c, p.s)
        live = [size > 1 for size in (p.n, p.c, p.s)]  # (an axis of one element: stride 0)
        for (sn, sc, ss), true in zip(p.kernel_strides, p.strides):
            scaled = (sn * a, sc * a, ss) if rows_unit else (sn * a, sc, ss * a)
            assert all(v == t or (not k and v == 0) for v, t, k in zip(scaled, true, live))


def test_alignment_of_the_whole_call():
    """Another tensor's strides bound ALIGN too: a gradient whose samples lie 590 values apart
    leaves 2 of a 14x14 map's 4, and the backward reads it right. Where dividing would hide a
    factor of 16 that Triton saw (x's 16s against a gradient 50 apart: ALIGN 2 would leave
    x's loads knowing 2), ALIGN stays 1."""
    w, b, rm, rv = params(3)
    x = shifted((2, 3, 4, 4))
    g = torch.randn(200, device=DEVICE).as_strided((2, 3, 4, 4), (50, 16, 4, 1))
    assert layout.plan([x]).align == 16 and layout.plan([x, g]).align == 1
    crop = torch.empty(8, 64, 50, device="meta")[..., 1:-1]  # y contiguous: 48s against 50s
    assert layout.plan([crop, torch.empty(8, 64, 48, device="meta")]).align == 1
    one = torch.empty_strided((2, 1, 16), (16, 2**31, 1), device="meta")  # C = 1: sc unused
    p = layout.plan([one])
    assert (p.align, p.idx64, p.kernel_strides) == (16, False, ((0, 0, 1),))  # (one run of 32)
    x = shifted((2, 3, 14, 14))
    g = (torch.randn(1180, device=DEVICE) + 1).as_strided((2, 3, 14, 14), (590, 196, 14, 1))
    assert layout.plan([x]).align == 4 and layout.plan([x, g]).align == 2
    _, mean, invstd = K.forward_train(x, w, b, None, None, None, 0.1, 1e-5, None)
    stock = torch.ops.aten.native_batch_norm_backward(
        g.contiguous(), x, w, None, None, mean, invstd, True, 1e-5, [True] * 3)
    ref = grads_reference(x, w, b, None, True, g.contiguous())
    for what, ours, st_, r in zip(("dx", "dw", "db"), K.backward(g, x, w, mean, invstd, True,
                                                                 (True, True, True)), stock, ref):
        check(what, ours, st_, r, torch.float32, dx_scale(w, invstd, g) if what == "dx" else None)


@pytest.mark.parametrize("shape, channels_last", [
    ((2, 3, 2, 4), False), ((2, 3, 4, 4), False), ((3, 8, 3, 5), True),
    ((2, 16, 2, 3), True), ((9, 12), False), ((3, 5, 14, 14), False)])
def test_aligned_layouts(shape, channels_last):
    """Forward and backward against the reference on layouts with ALIGN 4 to 16, both axes."""
    x = shifted(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert layout.plan([x]).align >= 4
    c = shape[1]
    w, b, rm, rv = params(c)
    g = torch.randn_like(x) + 1
    y, mean, invstd = K.forward_train(x, w, b, None, None, None, 0.1, 1e-5, None)
    ys, mean_s, invstd_s = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
    yr, _, invstd_r, _, _ = ref_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    check("y", y, ys, yr, torch.float32)
    check("invstd", invstd, invstd_s, invstd_r, torch.float32)
    stock = torch.ops.aten.native_batch_norm_backward(
        g, x, w, None, None, mean, invstd, True, 1e-5, [True] * 3)
    ref = grads_reference(x, w, b, None, True, g)
    for what, ours, st_, r in zip(("dx", "dw", "db"), K.backward(g, x, w, mean, invstd, True,
                                                                 (True, True, True)), stock, ref):
        check(what, ours, st_, r, torch.float32, dx_scale(w, invstd, g) if what == "dx" else None)
    ye = K.forward_eval(x, w, b, rm, rv, 1e-5)
    check("eval y", ye, torch.ops.aten.native_batch_norm(x, w, b, rm, rv, False, 0.0, 1e-5)[0],
          batch_norm_reference(x, rm, rv, w, b, False, 0.1, 1e-5)[0], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_train(name, dtype):
    x = make_x(name, dtype)
    c = x.shape[1]
    w, b, rm, rv = params(c)
    for momentum, nbt in ((0.3, None), (None, torch.tensor(3, device=DEVICE))):
        rm_o, rv_o, rm_s, rv_s = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        factor = momentum if momentum is not None else 1 / 3
        y, mean, invstd = K.forward_train(x, w, b, rm_o, rv_o, nbt, momentum, 1e-5, None)
        ys, means, invstds = torch.ops.aten.native_batch_norm(
            x, w, b, rm_s, rv_s, True, factor, 1e-5
        )
        yr, meanr, invstdr, rmr, rvr = ref_forward(x, w, b, rm, rv, True, factor, 1e-5)
        assert y.dtype == dtype and y.stride() == _scratch.output_like(x).stride()
        assert mean.dtype == invstd.dtype == torch.float32
        check("y", y, ys, yr, dtype)
        check("save_mean", mean, means, meanr, "stats")
        check("save_invstd", invstd, invstds, invstdr, "stats")
        check("running_mean", rm_o, rm_s, rmr, "stats")
        check("running_var", rv_o, rv_s, rvr, "stats")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_parameters_and_buffers(dtype):
    """A model cast to fp16/bf16 has weight, bias and running stats in that dtype too: they
    are read and written in it (dw, db come back in it)."""
    x = make_x("channels_last", dtype)
    w, b, rm, rv = (t.to(dtype) for t in params(x.shape[1]))
    rm_o, rv_o, rm_s, rv_s = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y, mean, invstd = K.forward_train(x, w, b, rm_o, rv_o, None, 0.1, 1e-5, None)
    ys, means, invstds = torch.ops.aten.native_batch_norm(x, w, b, rm_s, rv_s, True, 0.1, 1e-5)
    yr, _, _, rmr, rvr = ref_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    assert rm_o.dtype == rv_o.dtype == dtype
    check("y", y, ys, yr, dtype)
    check("running_mean", rm_o, rm_s, rmr, dtype)
    check("running_var", rv_o, rv_s, rvr, dtype)
    _, dw, db = check_train_backward(x, w, b, mean, invstd, means, invstds, dtype)
    assert dw.dtype == db.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["nchw", "channels_last", "1d_nc", "3d", "cropped"])
def test_forward_eval(name, dtype):
    x = make_x(name, dtype)
    w, b, _, rv = params(x.shape[1], dtype)  # parameters in the input's dtype
    rm = x.double().mean([0, *range(2, x.dim())]).float() + 0.5  # running stats near the data
    y = K.forward_eval(x, w, b, rm, rv, 1e-3)
    ys = torch.ops.aten.native_batch_norm(x, w.float(), b.float(), rm, rv, False, 0.0, 1e-3)[0]
    yr = batch_norm_reference(x, rm, rv, w, b, False, 0.0, 1e-3)[0]
    assert y.dtype == dtype and y.stride() == _scratch.output_like(x).stride()
    check("eval y", y, ys, yr, dtype)
    y = K.forward_eval(x, None, None, rm, rv, 1e-3)
    yr = batch_norm_reference(x, rm, rv, None, None, False, 0.0, 1e-3)[0]
    ys = torch.ops.aten.native_batch_norm(x, None, None, rm, rv, False, 0.0, 1e-3)[0]
    check("eval y, no affine", y, ys, yr, dtype)


def grads_reference(x, w, b, stats, training, g):
    """float64 (dx, dw, db) of sum(y * g) and the statistics the forward saved."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_()
    rm, rv = stats if stats is not None else (None, None)
    yr = batch_norm_reference(xr, rm, rv, wr, br, training, 0.0, 1e-5)[0]
    (yr * g.double()).sum().backward()
    return xr.grad, wr.grad, br.grad


def check_train_backward(x, w, b, mean, invstd, means, invstds, dtype):
    """Training backward of the kernels against stock and the float64 reference, for a random
    upstream gradient; returns (g, dw, db)."""
    g = torch.randn_like(x)
    dx, dw, db = K.backward(g, x, w, mean, invstd, True, (True, True, True))
    stock = torch.ops.aten.native_batch_norm_backward(
        g, x, w, None, None, means, invstds, True, 1e-5, [True] * 3
    )
    ref = grads_reference(x, w, b, None, True, g)
    for what, ours, st_, r in zip(("dx", "dw", "db"), (dx, dw, db), stock, ref):
        check(what, ours, st_, r, dtype, dx_scale(w, invstd, g) if what == "dx" else None)
    return g, dw, db


# every layout in float32; fp16 / bf16 on the three main ones (CPU time)
BACKWARD_CASES = [(name, torch.float32) for name in LAYOUTS] + [
    (name, dtype) for name in ("nchw", "channels_last", "1d_nc") for dtype in DTYPES[1:]
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name, dtype", BACKWARD_CASES)
def test_backward(name, dtype, training):
    x = make_x(name, dtype)
    c = x.shape[1]
    w, b, rm, rv = params(c)
    if training:
        _, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
    else:
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
    g = torch.randn_like(x) * 2 + 1  # a non-zero mean gradient
    ones = torch.ones((), device=DEVICE, dtype=dtype).expand_as(x)  # d(y.sum()): stride 0
    for grad, mask in ((g, (True, True, True)), (ones, (True, False, True)),
                       (g, (False, True, False)), (g, (True, False, False))):
        dx, dw, db = K.backward(grad, x, w, mean, invstd, training, mask)
        stock = torch.ops.aten.native_batch_norm_backward(
            grad, x, w, rm, rv, mean if training else None, invstd if training else None,
            training, 1e-5, list(mask),
        ) if training else _stock_eval_backward(grad, x, w, rm, rv)
        ref = grads_reference(x, w, b, None if training else (rm, rv), training, grad)
        for name_, ours, st, r, want in zip(("dx", "dw", "db"), (dx, dw, db), stock, ref, mask):
            if not want:
                assert ours is None, name_
                continue
            assert ours.dtype == (dtype if name_ == "dx" else w.dtype), name_
            if name_ == "dx":
                assert ours.stride() == _scratch.output_like(x).stride()
            scale = dx_scale(w, invstd, grad) if name_ == "dx" else None
            check(f"{name_} mask={mask}", ours, st, r, dtype, scale)


def _stock_eval_backward(grad, x, w, rm, rv):
    """Stock PyTorch's eval-mode gradients, in the input's dtype (autograd through F)."""
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    bs = torch.zeros_like(w, requires_grad=True)
    y = torch.nn.functional.batch_norm(xs, rm, rv, ws, bs, False, 0.0, 1e-5)
    y.backward(grad)
    return xs.grad, ws.grad, bs.grad


def test_backward_without_weight():
    x = make_x("nchw")
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    g = torch.randn_like(x)
    dx, dw, db = K.backward(g, x, None, mean, invstd, True, (True, False, True))
    # stock's CUDA backward cannot give dbias without a weight ("tensor does not have a
    # device": it allocates dbias with the weight's options); a unit weight is the same math
    ones = torch.ones(x.shape[1], device=x.device)
    sdx, _, sdb = torch.ops.aten.native_batch_norm_backward(
        g, x, ones, None, None, mean, invstd, True, 1e-5, [True, False, True]
    )
    xr = x.double().requires_grad_()
    (batch_norm_reference(xr, None, None, None, None, True)[0] * g.double()).sum().backward()
    assert dw is None and db.dtype == torch.float32
    check("dx, no weight", dx, sdx, xr.grad, torch.float32, dx_scale(None, invstd, g))
    check("db, no weight", db, sdb, g.double().sum((0, 2, 3)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["nchw", "channels_last", "1d_nc", "1d_ncl", "3d", "cropped"])
def test_batch_stats(name, dtype):
    x = make_x(name, dtype)
    mean, var, n = K.batch_stats(x)
    rmean, rvar, rn = batch_stats_reference(x)
    # stock in float32 (on fp16 / bf16 x it would return, and round to, x's dtype)
    svar, smean = torch.var_mean(x.float(), [0, *range(2, x.dim())], correction=0)
    assert n == rn and mean.dtype == var.dtype == torch.float32
    check("mean", mean, smean, rmean, "stats")
    check("var", var, svar, rvar, "stats")


def test_batch_stats_precision_far_from_zero():
    """|mean|/std = 3e4, where E[x²] - E[x]² goes negative in float32: full precision."""
    x = torch.randn(64, 4, 16, 16, device=DEVICE) + 3e4
    mean, var, _ = K.batch_stats(x)
    rmean, rvar, _ = batch_stats_reference(x)
    ulp = 3e4 * 2.0**-23
    assert (mean.double() - rmean).abs().max() <= 2 * ulp
    torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=0)


def test_welford_update_many_uneven_batches():
    """Accumulating batches of different sizes and layouts equals the float64 statistics of all
    the data at once; forward_train's accumulator merges the same way."""
    c = 5
    count, mean, m2 = (torch.zeros(c, dtype=torch.float64, device=DEVICE) for _ in range(3))
    acc = tuple(torch.zeros(c, dtype=torch.float64, device=DEVICE) for _ in range(3))
    count64 = torch.zeros(c, dtype=torch.int64, device=DEVICE)  # an integer count works too
    mean64, m2_64 = mean.clone(), m2.clone()
    seen = []
    for i, n in enumerate((1, 7, 2, 33, 5, 12, 3, 64, 9)):
        x = shifted((n, c, 3, 4))
        x = x + 0.5 * i  # drifting batch means: the spread of means matters
        if i % 3 == 1:
            x = x.to(memory_format=torch.channels_last)
        seen.append(x)
        K.welford_update(x, count, mean, m2)
        K.forward_train(x, None, None, None, None, None, 0.1, 1e-5, acc)
        K.welford_update(x, count64, mean64, m2_64)
    every = torch.cat([t.double() for t in seen])
    rmean, rvar, rn = batch_stats_reference(every)
    assert torch.equal(count, torch.full_like(count, float(rn)))
    assert torch.equal(acc[0], count) and torch.equal(count64, count.long())
    assert torch.equal(mean64, mean) and torch.equal(m2_64, m2)
    for m, s in ((mean, m2), (acc[1], acc[2])):
        torch.testing.assert_close(m, rmean, rtol=1e-7, atol=0)
        torch.testing.assert_close(s / rn, rvar, rtol=1e-5, atol=0)


def test_determinism_bitwise(monkeypatch):
    """Fixed split order: two runs give identical bits (with many splits and tiles)."""
    monkeypatch.setattr(layout, "TILE", 64)
    monkeypatch.setattr(layout, "CPU_PROGRAMS", 6)
    x = make_x("nchw")
    w, b, rm, rv = params(x.shape[1])
    g = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y, mean, invstd = K.forward_train(x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5, None)
        runs.append((y, mean, invstd, *K.backward(g, x, w, mean, invstd, True, (True,) * 3)))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def test_threads_on_one_stream_keep_their_own_scratch(monkeypatch):
    """K3 leaves the dx coefficients in the scratch buffer for K4. A second thread's backward
    launched between the two (on the same stream, or interleaved in the interpreter) must not
    overwrite them: held here deterministically at the first thread's K4."""
    xs = [make_x("nchw") for _ in range(2)]
    w, b, _, _ = params(xs[0].shape[1])
    stats = [torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)[1:]
             for x in xs]
    gs = [torch.randn_like(x) for x in xs]
    k4, at_k4, other_done = gradients._k4_grad_input_kernel, threading.Event(), threading.Event()

    class HeldOnce:  # the first K4 launch waits until the other thread's backward is done
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if not at_k4.is_set():
                    at_k4.set()
                    other_done.wait(120)
                return k4[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gradients, "_k4_grad_input_kernel", HeldOnce())
    out = {}

    def run(i):
        out[i] = K.backward(gs[i], xs[i], w, *stats[i], True, (True, True, True))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert at_k4.wait(120)
    second = threading.Thread(target=run, args=(1,))
    second.start()
    second.join(120)
    other_done.set()
    first.join(120)
    for i, x in enumerate(xs):
        stock = torch.ops.aten.native_batch_norm_backward(
            gs[i], x, w, None, None, *stats[i], True, 1e-5, [True] * 3)
        ref = grads_reference(x, w, b, None, True, gs[i])
        check(f"dx of thread {i}", out[i][0], stock[0], ref[0], torch.float32,
              dx_scale(w, stats[i][1], gs[i]))


def test_channel_blocks_fit_cuda_grid_axis_1():
    """K2/K4 launch channel blocks on grid axis 1 (at most 65535): a plan trades rows for
    channels until they fit, keeping the tile size (shapes only: meta tensors)."""
    for shape in [(2, 70000, 64, 64), (2, 300000, 8, 8), (4, 70000), (1, 65535 * 2 + 1, 4096)]:
        x = torch.empty(*shape, device="meta")
        p = layout.plan([x, x])
        assert p.num_cblocks <= 65535, shape
        assert p.block_r * p.block_c <= layout.TILE, shape


@pytest.mark.parametrize("name", ["nchw", "channels_last", "1d_ncl", "3d"])
@pytest.mark.parametrize("grid_y", [65535, 1])
@pytest.mark.parametrize("merge", [None, 2])
def test_small_tiles_many_splits(monkeypatch, name, grid_y, merge):
    """Tiny tiles, several channel blocks, many splits with uneven tile counts, int64 offsets:
    every merge path and mask edge, compared with the reference. ``grid_y=1`` forces the plan
    to widen its channel blocks (what a CUDA grid-axis limit does to huge channel counts);
    ``merge=2`` makes the last program merge the partials two at a time in several steps,
    the last one half masked."""
    if merge is not None:
        for kernel_module in (stats, gradients):
            monkeypatch.setattr(kernel_module, "merge_block", lambda splits, block_c: merge)
    monkeypatch.setattr(layout, "TILE", 16)
    monkeypatch.setattr(layout, "MAX_BLOCK_C", 4)
    monkeypatch.setattr(layout, "CPU_PROGRAMS", 7)
    monkeypatch.setattr(layout, "IDX64_AT", 1)
    monkeypatch.setattr(layout, "MAX_GRID_Y", grid_y)
    x = make_x(name)
    p = layout.plan([x])
    assert p.idx64 and layout.num_splits(p, x.device)[0] > 1
    assert p.num_cblocks <= grid_y
    w, b, rm, rv = params(x.shape[1])
    rm_o, rv_o = rm.clone(), rv.clone()
    y, mean, invstd = K.forward_train(x, w, b, rm_o, rv_o, None, 0.1, 1e-5, None)
    rm_s, rv_s = rm.clone(), rv.clone()
    ys, means, invstds = torch.ops.aten.native_batch_norm(x, w, b, rm_s, rv_s, True, 0.1, 1e-5)
    yr, meanr, invstdr, rmr, rvr = ref_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    check("y", y, ys, yr, torch.float32)
    check("mean", mean, means, meanr, torch.float32)
    check("invstd", invstd, invstds, invstdr, torch.float32)
    check("running_mean", rm_o, rm_s, rmr, torch.float32)
    check("running_var", rv_o, rv_s, rvr, torch.float32)
    g = torch.randn_like(x) + 1
    dx, dw, db = K.backward(g, x, w, mean, invstd, True, (True, True, True))
    sdx, sdw, sdb = torch.ops.aten.native_batch_norm_backward(
        g, x, w, None, None, mean, invstd, True, 1e-5, [True] * 3
    )
    rdx, rdw, rdb = grads_reference(x, w, b, None, True, g)
    check("dx", dx, sdx, rdx, torch.float32, dx_scale(w, invstd, g))
    check("dw", dw, sdw, rdw, torch.float32)
    check("db", db, sdb, rdb, torch.float32)


@pytest.mark.parametrize("name", ["nchw", "channels_last", "1d_nc"])
def test_launchers_overwrite_poisoned_outputs(name):
    """Every output element (odd sizes: masked tile edges) is written by the kernels."""
    x = make_x(name)
    c = x.shape[1]
    w, b, _, _ = params(c)
    y = torch.full_like(x, NAN)
    mean, invstd, var = (torch.full((c,), NAN, device=DEVICE) for _ in range(3))
    p = layout.plan([x, y])
    k1_stats(x, p, mean=mean, invstd=invstd, var=var, eps=1e-5)
    k2_normalize(x, y, p, mean, invstd, w, b)
    dx = torch.full_like(x, NAN)
    dw, db = torch.full((c,), NAN, device=DEVICE), torch.full((c,), NAN, device=DEVICE)
    g = torch.randn_like(x)
    k3_k4_backward(g, x, dx, layout.plan([x, g, dx]), w, mean, invstd, True, dw, db)
    for t in (y, mean, invstd, var, dx, dw, db):
        assert torch.isfinite(t).all()
    rmean, rvar, _ = batch_stats_reference(x)
    torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=0)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(rvar + 1e-5), rtol=1e-5, atol=0)


def test_bad_input_errors():
    x = make_x("nchw")
    zeros, ones = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        K.forward_train(x, None, None, zeros, None, None, 0.1, 1e-5, None)
    empty = torch.empty(0, 6, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="batch_stats: x has no values"):
        K.batch_stats(empty)
    with pytest.raises(ValueError, match="forward_train: x has no values"):
        K.forward_train(empty, None, None, None, None, None, 0.1, 1e-5, None)
    assert K.forward_eval(empty, None, None, zeros, ones, 1e-5).shape == (0, 6, 3, 3)
    dx, dw, db = K.backward(empty, empty, ones, zeros, ones, True, (True, True, True))
    assert dx.shape == empty.shape and torch.equal(dw, zeros) and torch.equal(db, zeros)


def test_module_on_triton_backend():
    """The autograd path (custom ops) through the triton backend, momentum=None."""
    import fastpbn

    fastpbn.set_backend("triton")
    ours = fastpbn.FastPreciseBN2d(6, momentum=None).to(DEVICE)
    stock = torch.nn.BatchNorm2d(6, momentum=None).to(DEVICE)
    for _ in range(3):
        x = make_x("channels_last")
        xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(x) + 1
        ys, yo = stock(xs), ours(xo)
        (ys * g).sum().backward()
        (yo * g).sum().backward()
        assert yo.is_contiguous(memory_format=torch.channels_last)
        w = stock.weight.detach()
        rdx, rdw, rdb = grads_reference(x, w, stock.bias.detach(), None, True, g)
        yr = batch_norm_reference(x, None, None, w, stock.bias.detach(), True)[0]
        check("y", yo, ys, yr, torch.float32)
        invstd = torch.rsqrt(x.double().var((0, 2, 3), unbiased=False) + 1e-5)
        check("dx", xo.grad, xs.grad, rdx, torch.float32, dx_scale(w, invstd, g))
        check("dw", ours.weight.grad, stock.weight.grad, rdw, torch.float32)
        check("db", ours.bias.grad, stock.bias.grad, rdb, torch.float32)
        ours.zero_grad(), stock.zero_grad()
    assert torch.equal(ours.num_batches_tracked, stock.num_batches_tracked)
    torch.testing.assert_close(ours.running_mean, stock.running_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.running_var, stock.running_var, rtol=1e-4, atol=1e-5)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    perm_seed=st.integers(0, 1000),
    step=st.integers(1, 2),
    training=st.booleans(),
)
def test_random_shapes_and_strides(shape, perm_seed, step, training):
    """Random small shapes, dense layouts in any dim order, strided slices; train and eval
    forward and backward against the reference."""
    shape = list(shape)
    if training and math.prod(shape) // shape[1] < 2:
        shape[0] += 1  # training needs two values per channel
    torch.manual_seed(perm_seed)  # reproducible examples
    perm = torch.randperm(len(shape)).tolist()
    full = [s * step if i == len(shape) - 1 else s for i, s in enumerate(shape)]
    base = shifted([full[i] for i in perm]).permute([perm.index(i) for i in range(len(perm))])
    x = base[..., ::step]
    assert list(x.shape) == shape
    c = shape[1]
    w, b, rm, rv = params(c)
    g = torch.randn_like(x) + 1
    if training:
        y, mean, invstd = K.forward_train(x, w, b, None, None, None, 0.1, 1e-5, None)
        ys, mean_s, invstd_s = torch.ops.aten.native_batch_norm(
            x, w, b, None, None, True, 0.0, 1e-5
        )
        check("invstd", invstd, invstd_s, ref_forward(x, w, b, rm, rv, True, 0.1, 1e-5)[2],
              torch.float32)
        stock = torch.ops.aten.native_batch_norm_backward(
            g, x, w, None, None, mean, invstd, True, 1e-5, [True] * 3
        )
    else:
        y = K.forward_eval(x, w, b, rm, rv, 1e-5)
        ys = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, False, 0.0, 1e-5)[0]
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
        stock = _stock_eval_backward(g, x, w, rm, rv)
    yr = batch_norm_reference(x, rm, rv, w, b, training, 0.1, 1e-5)[0]
    check("y", y, ys, yr, torch.float32)
    grads = K.backward(g, x, w, mean, invstd, training, (True, True, True))
    ref = grads_reference(x, w, b, None if training else (rm, rv), training, g)
    for what, ours, st_, r in zip(("dx", "dw", "db"), grads, stock, ref):
        scale = dx_scale(w, invstd, g) if what == "dx" else None
        check(what, ours, st_, r, torch.float32, scale)


def _aot(mode: str) -> str:
    """stdout of ``tests/aot_compile.py mode``, in a process without the interpreter; skips
    where this triton has no ahead-of-time compile API."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_compile.py")
    out = subprocess.run([sys.executable, script, mode], env=env, capture_output=True,
                         text=True, timeout=600)
    if ("has no attribute 'ASTSource'" in out.stderr  # (triton < 3.2: another signature)
            or "unexpected keyword argument 'constexprs'" in out.stderr
            or "No module named 'triton." in out.stderr):  # not fastpbn's own modules
        pytest.skip("this triton has no ahead-of-time compile API")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_kernels_compile_for_gpu():
    """The interpreter is lenient (types across branches, scalar atomics): compile every
    kernel variant for sm_80 and sm_90 with Triton's bundled ptxas, no GPU needed."""
    assert "compiled" in _aot("variants")


@pytest.mark.slow
def test_kernels_vectorize_layouts_aligned_below_16():
    """Triton learns an integer argument's alignment only as "divisible by 16": without
    ALIGN (layout.py), an NCHW 14x14 map (row stride 196) or 12 contiguous channels compile
    to scalar loads and stores of every element. With it, the tiles move in vectors as wide as
    the layout allows (4 elements: 16 bytes in float32, 8 in bfloat16), in all four kernels
    (PTX for sm_90)."""
    import json

    rows = [json.loads(line) for line in _aot("vectors").splitlines() if line.startswith("{")]
    assert len(rows) == 12
    for r in rows:
        vector = ".v4.b32" if r["dtype"] == "fp32" else ".v2.b32"  # 4 elements
        assert r["align"] == 4 and r["loads"] == [vector], r
        if r["kernel"] in ("K2", "K4"):  # y, dx
            assert r["stores"] == [vector], r


# --- GPU: compiled kernels on the benchmark shapes (BENCH.md) -------------------------------

BENCH_SHAPES = [
    (32, 64, 112, 112),
    (32, 256, 56, 56),
    (32, 512, 28, 28),
    (32, 1024, 14, 14),
    (32, 2048, 7, 7),
    (20, 6, 256, 256),  # few channels
    (1, 3, 1024, 1024),  # one sample, huge spatial
    (4096, 32, 1, 1),  # BatchNorm1d-like
    (17, 33, 13, 11),  # odd sizes
]


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BENCH_SHAPES)
def test_gpu_bench_shapes(shape, dtype, channels_last):
    x = shifted(shape, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w, b, rm, rv = params(c)
    rm_o, rv_o, rm_s, rv_s = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y, mean, invstd = K.forward_train(x, w, b, rm_o, rv_o, None, 0.1, 1e-5, None)
    ys, means, invstds = torch.ops.aten.native_batch_norm(x, w, b, rm_s, rv_s, True, 0.1, 1e-5)
    yr, meanr, invstdr, rmr, rvr = ref_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    # x's layout (channels_last stays so); the strides of size-1 dims are arbitrary: on
    # (4096, 32, 1, 1) x is contiguous too, and y gets contiguous strides (32, 1, 1, 1)
    assert y.stride() == _scratch.output_like(x).stride()
    assert all(sy == sx for sy, sx, n in zip(y.stride(), x.stride(), x.shape) if n > 1)
    check("y", y, ys, yr, dtype)
    check("mean", mean, means, meanr, "stats")  # float32 statistics, whatever x's dtype
    check("invstd", invstd, invstds, invstdr, "stats")
    check("running_mean", rm_o, rm_s, rmr, "stats")
    check("running_var", rv_o, rv_s, rvr, "stats")
    g, dw, _ = check_train_backward(x, w, b, mean, invstd, means, invstds, dtype)
    again = K.forward_train(x, w, b, None, None, None, 0.1, 1e-5, None)
    assert torch.equal(again[0], y) and torch.equal(again[1], mean)  # deterministic
    assert torch.equal(K.backward(g, x, w, mean, invstd, True, (True,) * 3)[1], dw)


@pytest.mark.gpu
def test_gpu_welford_and_eval_on_bench_shape():
    c = 256
    count, mean, m2 = (torch.zeros(c, dtype=torch.float64, device=DEVICE) for _ in range(3))
    batches = [shifted((n, c, 28, 28)).to(memory_format=torch.channels_last) for n in (3, 32, 7)]
    for x in batches:
        K.welford_update(x, count, mean, m2)
    rmean, rvar, rn = batch_stats_reference(torch.cat([x.double() for x in batches]))
    assert torch.equal(count, torch.full_like(count, float(rn)))
    torch.testing.assert_close(mean, rmean, rtol=1e-7, atol=0)
    torch.testing.assert_close(m2 / rn, rvar, rtol=1e-5, atol=0)
    x = batches[1]
    w, b, _, rv = params(c)
    rm = rmean.float()
    y = K.forward_eval(x, w, b, rm, rv, 1e-5)
    ys = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, False, 0.0, 1e-5)[0]
    check("eval y", y, ys, batch_norm_reference(x, rm, rv, w, b, False, 0.0, 1e-5)[0],
          torch.float32)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """More than 2^31 elements: int64 offsets (fp16, about 4.3 GB)."""
    _skip_unless_free(6e9)  # x and _var_mean_chunked's slices
    x = torch.empty(64, 8, 2048, 2049, device=DEVICE, dtype=torch.float16)
    x.normal_(0, 1).add_(100)
    x[-1, :, -1, -1] = 200.0  # the last elements must be seen
    p = layout.plan([x])
    assert p.idx64
    mean, var, n = K.batch_stats(x)
    var_s, mean_s = _var_mean_chunked(x)
    assert n == x.numel() // 8
    torch.testing.assert_close(mean.double(), mean_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var_s, rtol=1e-4, atol=0)


@pytest.mark.gpu
def test_gpu_int64_positions():
    """channels_last with two channels: S' = N·H·W itself passes 2^31 (fp16, about 8.6 GB)."""
    _skip_unless_free(20e9)  # x, y and _var_mean_chunked's slices
    x = torch.empty(1, 2, 2**16 + 8, 2**15, device=DEVICE, dtype=torch.float16,
                    memory_format=torch.channels_last)
    x.normal_(0, 1).add_(100)
    x[0, :, -1, -1] = 300.0  # the last positions must be seen
    p = layout.plan([x])
    assert p.idx64 and p.s > 2**31
    mean, var, n = K.batch_stats(x)
    var_s, mean_s = _var_mean_chunked(x)
    assert n == p.s
    torch.testing.assert_close(mean.double(), mean_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var_s, rtol=1e-4, atol=0)
    y = K.forward_eval(x, None, None, mean, var, 1e-5)
    torch.testing.assert_close(y[0, :, -1, -1].float(), (300 - mean) * torch.rsqrt(var + 1e-5),
                               rtol=2e-3, atol=0)


def _skip_unless_free(nbytes):
    """Skip unless the GPU has ``nbytes`` free now (other processes, pytest-xdist workers
    among them, may hold part of it)."""
    free = torch.cuda.mem_get_info()[0]
    if free < nbytes:
        pytest.skip(f"needs about {nbytes / 1e9:.0f} GB of free GPU memory, "
                    f"{free / 1e9:.1f} GB free")


def _var_mean_chunked(x):
    """float64 per-channel (var, mean) of a huge 4-d tensor, in two passes over slices of at
    most 2^26 values (0.5 GB in float64) of one channel: a whole channel in float64 takes 4x its
    fp16 size per temporary (17 GB each on test_gpu_int64_positions' x)."""
    n, _, h, w = x.shape
    rows = max(1, 2**26 // w)
    means, vars_ = [], []
    for c in range(x.shape[1]):
        parts = [x[i, c, r:r + rows] for i in range(n) for r in range(0, h, rows)]
        means.append(sum(p.double().sum() for p in parts) / (n * h * w))
        vars_.append(sum(((p.double() - means[-1]) ** 2).sum() for p in parts) / (n * h * w))
    return torch.stack(vars_), torch.stack(means)

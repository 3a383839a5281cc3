"""Compile the Triton kernels for NVIDIA GPUs ahead of time, without a GPU, with Triton's
bundled ptxas. Run in a subprocess by tests/test_triton_kernels.py (the test process runs
Triton's interpreter, set before triton is imported):

    python tests/aot_compile.py variants   # every kernel variant for sm_80 and sm_90
    python tests/aot_compile.py vectors    # the global loads / stores of the four kernels on
                                           # layouts whose alignment only ALIGN tells Triton

``vectors`` prints one JSON line per (layout, kernel): the PTX ``ld.global`` / ``st.global``
forms of the tile's loads and stores.
"""

import itertools
import json
import re
import sys

import torch
import triton
from fastpbn.kernels import gradients, layout, normalize, stats
from triton.backends.compiler import GPUTarget


def compile_(fn, args: dict, consts: dict, cap: int = 90) -> str:
    """PTX of ``fn`` for sm_``cap``, specialized as Triton's launcher specializes these
    argument values: pointers (given as their type, e.g. "*fp32") 16-byte aligned, as
    PyTorch allocates; ints equal to 1 constant and ints divisible by 16 marked so (except
    ``do_not_specialize`` ones); ints of 2^31 or more int64."""
    consts, sig, attrs = dict(consts), {}, {}
    plain = {p.name for p in fn.params if getattr(p, "do_not_specialize", False)}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1 and name not in plain:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
            if v % 16 == 0 and name not in plain:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                            options={"num_warps": layout.NUM_WARPS})
    return kernel.asm["ptx"]


def _args(p: layout.Plan, dtype: str, count: int = 3) -> dict:
    """Every kernel's non-pointer arguments for plan ``p`` (all tensors laid out as x), and
    its pointers: tensors in ``dtype``, statistics float32."""
    c, s = p.kernel_sizes
    sn, sc, ss = p.kernel_strides[0]
    out = dict(C=c, S=s, tiles_s=p.tiles_s, num_tiles=p.num_tiles, tiles_per_split=count,
               n_total=p.count, momentum=0.1, eps=1e-5)
    for t in "xydo":  # x, y, dy, dx (K4's "o")
        out.update({f"s{t}n": sn, f"s{t}c": sc, f"s{t}s": ss})
    for name in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr"):
        out[name] = "*" + dtype
    for name in ("part_ptr", "mean_ptr", "kmean_ptr", "invstd_ptr", "var_ptr", "rm_ptr",
                 "rv_ptr", "stat_ptr", "w_ptr", "b_ptr", "dw_ptr", "db_ptr", "coef_ptr"):
        out[name] = "*fp32"
    out.update(counter_ptr="*i32", nbt_ptr="*i64", acc_n_ptr="*fp64", acc_mean_ptr="*fp64",
               acc_m2_ptr="*fp64")
    return out


def _kernels(p: layout.Plan, flags: tuple[bool, bool], merge: int):
    """(name, kernel, constexprs) of K1-K4 for plan ``p``; ``flags`` pick the optional
    parts."""
    k = dict(BLOCK_R=p.block_r, BLOCK_C=p.block_c, IDX64=p.idx64, ALIGN=p.align,
             ROWS_UNIT=p.rows_unit)
    a, b = flags
    return [
        ("K1", stats._k1_stats_kernel, dict(
            k, MERGE=merge, HAS_MEAN=True, HAS_KMEAN=a, HAS_INVSTD=a, HAS_VAR=not a,
            HAS_RUNNING=b, MOMENTUM_FROM_NBT=a, HAS_ACC=b)),
        ("K2", normalize._k2_normalize_kernel, dict(
            k, STAT_IS_VAR=not a, PIVOT=a, HAS_W=b, HAS_B=b)),
        ("K3", gradients._k3_grad_stats_kernel, dict(
            k, MERGE=merge, HAS_W=b, TRAINING=a, WRITE_DW=b, WRITE_DB=True)),
        ("K4", gradients._k4_grad_input_kernel, dict(k, HAS_W=b, TRAINING=a)),
    ]


def _plan(shape, channels_last: bool = False) -> layout.Plan:
    x = torch.empty(shape, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return layout.plan([x, x, x])


def variants() -> None:
    """Every kernel in every flag combination, 32-bit and 64-bit offsets, aligned or not, for
    sm_80 and sm_90: the interpreter is lenient (types across branches, scalar atomics)."""
    plans = [_plan((2, 8, 5, 7)), _plan((2, 16, 6, 6)), _plan((2, 12, 3, 3), True),
             _plan((4, 3, 64, 64))]
    big = _plan((1, 2, 2**20, 2**10), True)  # int64 offsets
    assert big.idx64 and not any(p.idx64 for p in plans)
    for cap, (p, dtype) in itertools.product(
            (80, 90), [(plans[0], "fp32"), (plans[1], "bf16"), (plans[2], "fp16"),
                       (plans[3], "fp32"), (big, "bf16")]):
        for flags in ((False, False), (True, True), (True, False)):
            for _, fn, consts in _kernels(p, flags, merge=4):
                compile_(fn, _args(p, dtype), consts, cap)
    print("compiled")


def vectors() -> None:
    """The loads and stores of the tiles (x, y, dy, dx) on layouts aligned to 4 elements but not
    16: NCHW 14x14 maps (S' = 196) and channels_last with 12 channels."""
    for shape, channels_last, dtype in [((256, 1024, 14, 14), False, "fp32"),
                                        ((256, 1024, 14, 14), False, "bf16"),
                                        ((64, 12, 28, 28), True, "fp32")]:
        p = _plan(shape, channels_last)
        for name, fn, consts in _kernels(p, (True, True), merge=8):
            ptx = compile_(fn, _args(p, dtype), consts)
            # the tile's accesses carry an eviction hint (K1, K3: keep in L2 for the next
            # pass; K2, K4: stream); stores: those of y and dx
            access = sorted(set(re.findall(r"ld\.global\.L1::evict_\w+\.L2::cache_hint"
                                           r"((?:\.v\d)?\.b\d+)", ptx)))
            stores = sorted(set(re.findall(r"st\.global((?:\.v\d)?\.b\d+)", ptx)))
            print(json.dumps({"shape": shape, "channels_last": channels_last, "dtype": dtype,
                              "align": p.align, "kernel": name, "loads": access,
                              "stores": stores}))


if __name__ == "__main__":
    {"variants": variants, "vectors": vectors}[sys.argv[1]]()

"""Compile mishkit's Triton kernels for sm_90 without a GPU and check their memory accesses.

Run by tests/test_triton.py in a subprocess (the test process interprets Triton). Triton's own
ptxas compiles each kernel as it would for an H100/H200, with the divisibility that Triton's
launcher specialises on for aligned tensors and sizes divisible by 16; the PTX must show 16-byte
accesses (``ld/st.global.v4.b32``, ``.v2.b64`` for float64) on the unmasked paths, and the Mish
derivative must cost one division per element. Exits non-zero naming the first kernel that fails.
"""

from __future__ import annotations

import collections
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mishkit.backends.triton import act, bn_act
from mishkit.backends.triton.math import ACTIVATION_IDS

TARGET = GPUTarget("cuda", 90, 32)
PARAMS = {"p0_hi": "fp32", "p0_lo": "fp32", "p1_hi": "fp32", "p1_lo": "fp32"}
WIDE = {"fp64": "v2.b64"}  # 16 bytes per access; everything else: v4.b32


def ptx_of(kernel, types: dict, constexprs: dict, divisible=(), num_warps=4) -> str:
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def expect_vectors(label: str, ptx: str, dtype: str, loads=True, stores=True) -> None:
    width = WIDE.get(dtype, "v4.b32")
    found = sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))
    missing = [kind for kind, wanted in (("ld", loads), ("st", stores))
               if wanted and f"{kind}.global.{width}" not in found]
    if missing:
        sys.exit(f"{label}: no 16-byte {'/'.join(missing)}.global.{width} accesses; found {found}")
    print(f"ok  {label}: {' '.join(found)}")


def activation_kernels() -> None:
    block = act.FIXED_CONFIG.kwargs["BLOCK"]
    for dtype in ("fp32", "bf16", "fp64"):  # fp16 takes bf16's path (2-byte elements)
        sizes = {"n": "i64", "size_class": "i32", **PARAMS}
        ptx = ptx_of(act._forward_kernel, {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", **sizes},
                     {"ACT": ACTIVATION_IDS["mish"], "BLOCK": block}, ("x_ptr", "y_ptr"))
        expect_vectors(f"triton_act_forward mish {dtype}", ptx, dtype)
        ptx = ptx_of(act._backward_kernel, {"grad_ptr": f"*{dtype}", "x_ptr": f"*{dtype}",
                                            "dx_ptr": f"*{dtype}", **sizes},
                     {"ACT": ACTIVATION_IDS["mish"], "BLOCK": block},
                     ("grad_ptr", "x_ptr", "dx_ptr"))
        expect_vectors(f"triton_act_backward mish {dtype}", ptx, dtype)
        if dtype == "fp32":
            # both branches (full block, masked tail) hold BLOCK / threads elements each
            per_thread = 2 * block // (32 * act.FIXED_CONFIG.num_warps)
            ops = collections.Counter(re.findall(r"\b(?:div|rcp)\.[\w.]+", ptx))
            if sum(ops.values()) != per_thread:
                sys.exit(f"mish derivative: expected one division per element ({per_thread}), "
                         f"found {dict(ops)}")
            print(f"ok  mish derivative: one division per element ({dict(ops)})")


def batch_norm_kernels() -> None:
    vectors = {"mean_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
               "coef_xmu_ptr": "*fp32", "coef_const_ptr": "*fp32"}
    extents = {"outer": "i32", "inner": "i32", "C": "i32", "tiles_i": "i32", **PARAMS}
    rows = {"outer": "i32", "S": "i32", "C": "i32", "tiles": "i32", "tiles_i": "i32",
            "tiles_per_chunk": "i32", "chunks": "i32"}
    mish = ACTIVATION_IDS["mish"]
    for channels_last in (False, True):
        for dtype in ("fp32", "bf16"):
            itemsize = 4 if dtype == "fp32" else 2
            block_o, block_i = (64, 32) if channels_last else (2, 1024)
            layout = "channels_last" if channels_last else "nchw"
            warps = bn_act._warps(block_o * block_i, itemsize)
            tile = {"CHANNELS_LAST": channels_last, "BLOCK_O": block_o, "BLOCK_I": block_i}
            big = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "g_ptr": f"*{dtype}",
                   "grad_x_ptr": f"*{dtype}", "partial_ptr": "*fp64"}
            ptx = ptx_of(bn_act._forward_kernel, {**big, **vectors, **extents},
                         {"ACT": mish, **tile}, ("x_ptr", "y_ptr", "inner"), warps)
            expect_vectors(f"triton_bn_act_forward {layout} {dtype}", ptx, dtype)
            if dtype != "fp32":
                continue  # the rest reads and writes 2-byte elements as forward does
            ptx = ptx_of(bn_act._backward_elemt_kernel, {**big, **vectors, **extents},
                         {"ACT": mish, **tile}, ("g_ptr", "x_ptr", "grad_x_ptr", "inner"), warps)
            expect_vectors(f"triton_bn_act_backward_elemt {layout} {dtype}", ptx, dtype)
            width = {"WIDTH": block_i if channels_last else 1}
            ptx = ptx_of(bn_act._stats_partial_kernel, {**big, **rows},
                         {**tile, **width, "COMPUTE": tl.float32}, ("x_ptr", "S", "C", "outer"),
                         warps)
            expect_vectors(f"triton_bn_act_stats {layout} {dtype}", ptx, dtype, stores=False)
            ptx = ptx_of(bn_act._backward_partial_kernel, {**big, **vectors, **rows, **PARAMS},
                         {"ACT": mish, **tile, **width}, ("g_ptr", "x_ptr", "S", "C", "outer"),
                         warps)
            expect_vectors(f"triton_bn_act_backward_reduce {layout} {dtype}", ptx, dtype,
                           stores=False)
    combine = {"C": "i32", "chunks": "i32", "partial_ptr": "*fp64"}
    ptx_of(bn_act._stats_combine_kernel, {**combine, "mean_ptr": "*fp32", "var_ptr": "*fp32"},
           {"BLOCK_C": bn_act.COMBINE_BLOCK})
    ptx_of(bn_act._sum_combine_kernel, {**combine, "first_ptr": "*fp32", "second_ptr": "*fp32"},
           {"BLOCK_C": bn_act.COMBINE_BLOCK})
    print("ok  combine kernels")


if __name__ == "__main__":
    activation_kernels()
    batch_norm_kernels()
    print(f"all kernels compiled for sm_90 (triton {triton.__version__})")

"""The CPU merge's arithmetic: one fused pass per chunk, compiled by numba (no torch on this path).

Per element and output k: the stored values (bf16, fp16, fp32 or fp64) are widened to fp32, summed
with one fused multiply-add per input in input order, starting from +0 (LLVM's llvm.fma: correctly
rounded on every CPU, vectorised where the CPU has FMA), rounded once to the stored dtype
(round-to-nearest-even) and checked finite, while the chunk is in the core's cache. These are the bytes of
merge_engine.weighted_sum (torch's add_ with alpha, then a cast), which serving and `--device cuda` use;
tests/test_merge_exact.py checks both against an independent float64 reference.

numba has no bf16 and no fp16 arrays: 16-bit floats travel as raw words, uint16 for bf16 and int16 for
fp16 (`STORAGE`), and the conversions are written as LLVM instructions (`_to_f32`, `_from_f32`).
numba compiles `weighted_sums` on its first call for each storage type and number of inputs and keeps
the machine code on disk (`cache=True`, in __pycache__ or numba's user cache): about a second, once.
"""

from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# safetensors dtype -> the numpy type its elements travel as (the floating dtypes the merge averages).
STORAGE = {"BF16": np.uint16, "F16": np.int16, "F32": np.float32, "F64": np.float64}
TILE = 2048  # elements: a tile's fp32 sums and its inputs stay in L1 across the K outputs
_EXPONENT = np.uint32(0x7F800000)  # fp32 exponent bits: all set means inf or NaN

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once to fp32 (llvm.fma; never split into a product and a sum)."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _to_f32(typingctx, x):
    """A stored element as fp32: exact for bf16 and fp16; fp64 is rounded to nearest even."""

    def codegen(context, builder, signature, args):
        (v,) = args
        if x == types.uint16:  # bf16: the upper half of an fp32
            return builder.bitcast(builder.shl(builder.zext(v, _I32), ir.Constant(_I32, 16)), _F32)
        if x == types.int16:  # fp16
            return builder.fpext(builder.bitcast(v, ir.HalfType()), _F32)
        if x == types.float64:
            return builder.fptrunc(v, _F32)
        return v

    return types.float32(x), codegen


@intrinsic
def _from_f32(typingctx, v, like):
    """fp32 -> the element type of the array `like`, rounded to nearest even (inf beyond its range)."""
    out = like.dtype

    def codegen(context, builder, signature, args):
        v = args[0]
        if out == types.uint16:  # bf16: add 0x7FFF plus the kept lowest bit, keep the upper half
            bits = builder.bitcast(v, _I32)
            odd = builder.and_(builder.lshr(bits, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
            bits = builder.add(builder.add(bits, ir.Constant(_I32, 0x7FFF)), odd)
            return builder.trunc(builder.lshr(bits, ir.Constant(_I32, 16)), _I16)
        if out == types.int16:
            return builder.bitcast(builder.fptrunc(v, ir.HalfType()), _I16)
        if out == types.float64:
            return builder.fpext(v, ir.DoubleType())
        return v

    return out(types.float32, like), codegen


@intrinsic
def _bits(typingctx, v):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _I32)

    return types.uint32(types.float32), codegen


@njit(cache=True, nogil=True)
def weighted_sums(xs, weights, out, extra):
    """out[k] = dtype(sum_i weights[k, i] * xs[i] (+ extra[k])); the first k with inf/NaN, or -1.

    xs: a tuple of n 1-d arrays of m elements of one STORAGE type; weights: (K, n) fp32; out: (K, m) of
    that type; extra: (K, m) fp32 terms added after the inputs (densified LoRA deltas), or (0, 0).
    A non-finite sum (NaN/inf in an input, even at weight 0) or a value beyond the dtype's range is
    reported, never hidden: the fp32 sum and the rounded value are both checked.
    """
    m = out.shape[1]
    acc = np.empty(TILE, np.float32)
    first_bad = -1
    for j0 in range(0, m, TILE):
        t = min(TILE, m - j0)
        a = acc[:t]
        for k in range(weights.shape[0]):
            x, w = xs[0][j0 : j0 + t], weights[k, 0]
            for j in range(t):
                a[j] = _fma(_to_f32(x[j]), w, np.float32(0.0))
            for i in range(1, len(xs)):
                x, w = xs[i][j0 : j0 + t], weights[k, i]
                for j in range(t):
                    a[j] = _fma(_to_f32(x[j]), w, a[j])
            if extra.shape[0]:
                e = extra[k, j0 : j0 + t]
                for j in range(t):
                    a[j] += e[j]
            o = out[k, j0 : j0 + t]
            # The largest exponent of the sums and of their rounded values: a max, not an OR (1.99 rounds
            # to 2.0: exponents 0x7F | 0x80 would read as inf). Written so that LLVM vectorises it.
            worst = np.uint32(0)
            for j in range(t):
                v = _from_f32(a[j], o)
                o[j] = v
                b1, b2 = _bits(a[j]) & _EXPONENT, _bits(_to_f32(v)) & _EXPONENT
                b = b1 if b1 > b2 else b2
                worst = b if b > worst else worst
            if worst == _EXPONENT and (first_bad < 0 or k < first_bad):
                first_bad = k
    return first_bad


def _set_up() -> None:
    """Load numba's CPU target now, with scipy.linalg's import refused while it loads.

    numba's first call sets its CPU target up, which imports scipy.linalg (0.2-0.3 s of CPU here, a
    fifth of a 0.9 GB merge's floor) only to decide whether one np.dot fallback may call BLAS; without
    it numba uses its own loop there. This kernel calls no BLAS, and numba's linear algebra still
    imports scipy when a later function needs it. Nothing is refused once scipy.linalg is imported.
    """
    blas = "scipy.linalg.cython_blas"
    refuse = blas not in sys.modules
    if refuse:
        sys.modules[blas] = None  # `import` raises ImportError for a None entry
    try:
        x = np.zeros(1, np.float32)
        weighted_sums((x,), np.ones((1, 1), np.float32), np.empty((1, 1), np.float32), np.empty((0, 0), np.float32))
    finally:
        if refuse:
            del sys.modules[blas]


_set_up()

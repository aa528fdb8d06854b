"""hfreduce kernels: the C SIMD kernels against numpy references, and the numpy fallback."""

from __future__ import annotations

import numpy as np
import pytest

from hfreduce import kernels as K

HAVE_C = K._C is not None
IMPLS = [pytest.param(K._C.reduce if HAVE_C else None, id="c-simd",
                      marks=pytest.mark.skipif(not HAVE_C, reason="C extension not built")),
         pytest.param(K.numpy_reduce, id="numpy")]
NP = {K.DT_F32: np.float32, K.DT_F64: np.float64, K.DT_F16: np.float16, K.DT_I32: np.int32, K.DT_I64: np.int64}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (the reference)."""
    return K._f32_to_bf16(np.ascontiguousarray(x, np.float32))


def bf16_value(b: np.ndarray) -> np.ndarray:
    return K._bf16_to_f32(b)


def reference(arrays, op, avg=0):
    acc = arrays[0].astype(np.float64) if arrays[0].dtype.kind == "f" else arrays[0].astype(np.int64)
    for a in arrays[1:]:
        acc = {K.OP_SUM: np.add, K.OP_MAX: np.maximum, K.OP_MIN: np.minimum}[op](acc, a)
    if avg:
        acc = acc // avg if acc.dtype.kind == "i" else acc / avg
    return acc


@pytest.mark.parametrize("reduce", IMPLS)
@pytest.mark.parametrize("dtype", list(NP))
@pytest.mark.parametrize("op", [K.OP_SUM, K.OP_MAX, K.OP_MIN, "avg"])
@pytest.mark.parametrize("nsrc", [0, 1, 3, 7])
def test_reduce_matches_reference(reduce, dtype, op, nsrc):
    rng = np.random.default_rng(dtype * 100 + nsrc)
    n = 4099  # odd, several kernel blocks, a tail
    t = NP[dtype]
    if np.dtype(t).kind == "f":
        arrays = [(rng.integers(-64, 64, n) * 0.25).astype(t) for _ in range(nsrc + 1)]
    else:
        arrays = [rng.integers(-(1 << 20), 1 << 20, n).astype(t) for _ in range(nsrc + 1)]
    avg = nsrc + 1 if op == "avg" else 0
    kop = K.OP_SUM if op == "avg" else op
    dst = arrays[0].copy()
    reduce(dst.view(np.uint8), [a.view(np.uint8) for a in arrays[1:]], dtype, kop, avg)
    want = reference(arrays, kop, avg)
    if np.dtype(t).kind == "f" and avg:
        np.testing.assert_allclose(dst.astype(np.float64), want, rtol=2e-3 if t == np.float16 else 1e-6)
    else:
        np.testing.assert_array_equal(dst, want.astype(t))


@pytest.mark.parametrize("reduce", IMPLS)
@pytest.mark.parametrize("dtype", [*NP, K.DT_BF16, K.DT_U8])
@pytest.mark.parametrize("avg", [0, 3])
@pytest.mark.parametrize("nsrc", [0, 1, 2])
def test_first_and_second_destination(reduce, dtype, avg, nsrc):
    """dst = op(first, srcs...) out of place, and dst2 gets the same bytes (first may alias dst2)."""
    if dtype == K.DT_U8 and avg:
        pytest.skip("no AVG for bytes")
    rng = np.random.default_rng(nsrc)
    n = 2500
    t = {K.DT_BF16: np.uint16, K.DT_U8: np.uint8}.get(dtype) or NP[dtype]
    op = K.OP_BOR if dtype == K.DT_U8 else K.OP_SUM
    mk = (lambda: bf16_bits(rng.integers(-8, 8, n).astype(np.float32))) if dtype == K.DT_BF16 else \
        (lambda: rng.integers(0, 100, n).astype(t))
    first, srcs = mk(), [mk() for _ in range(nsrc)]
    ref = first.copy()
    K.numpy_reduce(ref.view(np.uint8), [x.view(np.uint8) for x in srcs], dtype, op, avg)
    dst = np.zeros(n, t)
    alias = first.copy()
    reduce(dst.view(np.uint8), [x.view(np.uint8) for x in srcs], dtype, op, avg, first=alias.view(np.uint8),
           dst2=alias.view(np.uint8))
    np.testing.assert_array_equal(dst, ref)
    np.testing.assert_array_equal(alias, ref)


@pytest.mark.parametrize("reduce", IMPLS)
@pytest.mark.parametrize("op", [K.OP_SUM, K.OP_MAX, K.OP_MIN])
def test_bf16_accumulates_in_fp32_and_rounds_once(reduce, op):
    rng = np.random.default_rng(7)
    n = 3000
    vals = [rng.standard_normal(n).astype(np.float32) for _ in range(5)]
    bits = [bf16_bits(v) for v in vals]
    dst = bits[0].copy()
    reduce(dst.view(np.uint8), [b.view(np.uint8) for b in bits[1:]], K.DT_BF16, op, 0)
    exact = [bf16_value(b) for b in bits]
    acc = exact[0].copy()
    for e in exact[1:]:
        acc = {K.OP_SUM: np.add, K.OP_MAX: np.maximum, K.OP_MIN: np.minimum}[op](acc, e)
    np.testing.assert_array_equal(dst, bf16_bits(acc))  # fp32 sum, one rounding


def test_bf16_rounding_edges():
    f = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.finfo(np.float32).max, np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
    b = bf16_bits(f)
    back = bf16_value(b)
    assert back[0] == 1.0 and back[1] == 1.0  # tie to even
    assert back[2] == 1.015625  # tie rounds up to even
    assert back[3] == -2.5 and np.isinf(back[4]) and back[5] == np.inf and back[6] == -np.inf
    assert np.isnan(back[7])
    if HAVE_C:
        dst = b.copy()
        K._C.reduce(dst.view(np.uint8), [], K.DT_BF16, K.OP_SUM, 0)
        np.testing.assert_array_equal(dst[~np.isnan(back)], b[~np.isnan(back)])


@pytest.mark.parametrize("reduce", IMPLS)
def test_fp16_sums_in_fp32(reduce):
    # 2048 + 1 + 1 in fp16 step by step stays 2048; accumulated in fp32 it is 2050
    d = np.array([2048.0] * 33, np.float16)
    ones = [np.ones(33, np.float16) for _ in range(2)]
    reduce(d.view(np.uint8), [o.view(np.uint8) for o in ones], K.DT_F16, K.OP_SUM, 0)
    assert (d == 2050).all()


@pytest.mark.parametrize("reduce", IMPLS)
def test_integer_sum_wraps_and_avg_floors(reduce):
    big = np.array([np.iinfo(np.int32).max, -7, 7, -8], np.int32)
    one = np.array([1, 0, 0, 0], np.int32)
    d = big.copy()
    reduce(d.view(np.uint8), [one.view(np.uint8)], K.DT_I32, K.OP_SUM, 0)
    assert d[0] == np.iinfo(np.int32).min  # wraps like numpy
    d = np.array([-7, 7, -8, 5], np.int64)
    reduce(d.view(np.uint8), [], K.DT_I64, K.OP_SUM, 2)
    np.testing.assert_array_equal(d, np.array([-7, 7, -8, 5]) // 2)


@pytest.mark.parametrize("reduce", IMPLS)
def test_bitwise_or_bytes(reduce):
    a = np.zeros(1001, np.uint8)
    a[:500] = np.arange(500) % 251
    b = np.zeros(1001, np.uint8)
    b[500:] = 7
    reduce(a, [b], K.DT_U8, K.OP_BOR, 0)
    assert (a[:500] == np.arange(500) % 251).all() and (a[500:] == 7).all()


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
def test_c_kernel_rejects_bad_arguments():
    a = np.zeros(8, np.float32)
    with pytest.raises(ValueError):
        K._C.reduce(a.view(np.uint8), [np.zeros(16, np.uint8)], K.DT_F32, K.OP_SUM, 0)
    with pytest.raises(ValueError):
        K._C.reduce(a.view(np.uint8), [], K.DT_F32, K.OP_BOR, 0)
    with pytest.raises(ValueError):
        K._C.reduce(a.view(np.uint8), [], 99, K.OP_SUM, 0)
    with pytest.raises((TypeError, BufferError)):
        K._C.reduce(np.zeros(8, np.uint8).data.toreadonly(), [], K.DT_U8, K.OP_BOR, 0)


@pytest.mark.skipif(not HAVE_C, reason="C extension not built")
def test_simd_is_reported():
    assert K._C.simd() in ("avx512", "avx2", "sse2", "neon", "generic")


@pytest.mark.parametrize("impl", ["c-simd", "numpy"])
def test_sync_primitives(impl):
    if impl == "c-simd" and not HAVE_C:
        pytest.skip("C extension not built")
    old = K.KERNEL
    K.select(impl)
    try:
        buf = bytearray(4096)
        mv = memoryview(buf)
        K.store(mv, 3, 41)
        assert K.load(mv, 3) == 41
        for i, v in enumerate([5, 2, 9]):  # words 16, 24, 32; the epoch is the int32 at byte 64 (word 8)
            K.store(mv, 16 + 8 * i, v)
        assert K.min_of(mv, 16, 8, 3) == 2
        e = K.load32(mv, 64)
        K.publish(mv, 24, 7, 64, 1)
        assert K.load32(mv, 64) == e + 1 and K.min_of(mv, 16, 8, 3) == 5
        assert K.epoch_wait(mv, 64, 1, e, 0.01) is True  # moved already
        assert K.epoch_wait(mv, 64, 1, e + 1, 0.01) is False  # times out
    finally:
        K.select(old)


def test_copy_and_zero():
    a = np.arange(100000, dtype=np.uint8)
    b = np.empty_like(a)
    K.copy(b, a)
    assert (a == b).all()
    K.zero(b)
    assert not b.any()

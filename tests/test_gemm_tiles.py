"""The register-tiled prefill GEMM (kernels_numba/simd_gemm.py) against the NumPy twin and the row
kernels it replaces, on shapes that fit neither the 16-row panel nor the 8-token tile: T not a
multiple of 8, rows not a multiple of 16, inputs of one block (32), 3 blocks (96) and 19 blocks
(608: 9 whole 64-input panel steps and one group left over), int8 per row and per group of 32,
int4 groups of 32 with and without mins, float32 and float16 scales."""
from __future__ import annotations

import numpy as np
import pytest

from edgerun import packed
from edgerun.kernels_numba import linear as L
from edgerun.kernels_numba import simd_gemm as G

pytestmark = pytest.mark.skipif(not G.TILED, reason="the tiled GEMM needs 512-bit VNNI (AVX512-VNNI)")

# The tile sums each block's integer dot in int32 (exact) and adds float32 products per block of
# 32 in a different order than gemm_q8_ref's float64: errors relative to sum |x w| stay ~1e-7.
TOL = 1e-6
# The row kernels take the int8 offset (+128) off in float32 (w * xsum), which cancels: their own
# tolerance against gemm_q8_ref is test_kernels.Q8_TOL.
ROWS_TOL = 1e-5

KINDS = [("int8", {}), ("int8", {"group": 32}), ("int4", {"group": 32}),
         ("int4", {"group": 32, "symmetric": False})]
SHAPES = [(32, 17, 9), (96, 5, 4), (96, 5, 8), (608, 37, 11), (608, 16, 19), (576, 33, 64)]   # (in, rows, T)


def _container(kind, params, n, rows, f16, seed=1):
    w = np.random.default_rng(seed).normal(size=(rows, n)).astype(np.float32)
    w[:, :5] *= 8.0                                  # a few outlier columns
    c = packed.codec(kind).container(*packed.codec(kind).pack(w, **params))
    if f16 and kind == "int8":
        c = c._replace(scales=packed.f16_bits(packed.scales_to_f32(c.scales)))
    if not f16 and kind == "int4":
        c = c._replace(scales=packed.scales_to_f32(c.scales),
                       mins=packed.scales_to_f32(c.mins) if c.mins.size else np.zeros((0, 0), np.float32))
    return c


def _activations(T, n, seed=2):
    x = (np.random.default_rng(seed).normal(size=(T, n)) + 0.5).astype(np.float32)
    x[:, n // 3:n // 3 + 32] *= 20.0                 # a block with a much larger range
    if T > 3:
        x[3, :32] = 0.0                              # an all-zero block: scale 0
    return x


def _run(c, x, fn):
    out = np.full((x.shape[0], c.scales.shape[0]), np.nan, np.float32)
    if isinstance(c, packed.Int8Weight):
        fn["int8"](x, c.q, c.scales, c.group, out)
    else:
        fn["int4"](x, c.qs, c.scales, c.mins, c.group, out)
    return out


TILED = {"int8": L.gemm_int8_q8, "int4": L.gemm_int4_q8}
ROWS = {"int8": L.gemm_int8_q8_rows, "int4": L.gemm_int4_q8_rows}


def _err(got, ref, x, w):
    norm = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    return np.abs(got.astype(np.float64) - ref) / np.maximum(norm, 1e-30)   # a token of zeros: norm 0


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("kind,params", KINDS, ids=["int8_row", "int8_g32", "int4_sym", "int4_mins"])
def test_tiled_gemm_matches_ref(kind, params, f16):
    for n, rows, T in SHAPES:
        c = _container(kind, params, n, rows, f16)
        x = _activations(T, n)
        w = packed.unpack(c)
        got = _run(c, x, TILED)
        assert np.isfinite(got).all(), f"{kind} {n}x{rows} T={T}: unwritten or non-finite outputs"
        ref = L.gemm_q8_ref(x, w)
        err = _err(got, ref, x, w)
        assert err.max() < TOL, (f"{kind}{params} f16={f16} in={n} rows={rows} T={T}: max {err.max():.2e} "
                                 f"mean {err.mean():.2e} at {np.unravel_index(err.argmax(), err.shape)}")
        rows_out = _run(c, x, ROWS)                  # the kernel it replaces, same quantized activations
        err = _err(got, rows_out, x, w)
        assert err.max() < ROWS_TOL, f"{kind} in={n} rows={rows} T={T} vs row kernel: max {err.max():.2e}"


def test_tiled_gemm_direct_calls_small_T():
    """gemm_*_tiled also take T below the dispatch threshold (one padded tile)."""
    for kind, params in KINDS:
        c = _container(kind, params, 96, 20, False)
        x = _activations(3, 96)
        out = np.full((3, 20), np.nan, np.float32)
        if kind == "int8":
            G.gemm_int8_tiled(x, c.q, c.scales, c.group, out)
        else:
            G.gemm_int4_tiled(x, c.qs, c.scales, c.mins, out)
        w = packed.unpack(c)
        err = _err(out, L.gemm_q8_ref(x, w), x, w)
        assert err.max() < TOL, f"{kind}{params}: max {err.max():.2e}"


@pytest.mark.parametrize("n", [32, 64, 96, 128, 608, 640])
def test_panels_match_ref(n):
    """The transposed 16-row panels (SIMD steps of 64 inputs, scalar tail, zero rows past the end)."""
    rng = np.random.default_rng(n)
    rows = 21
    q = rng.integers(-127, 128, size=(rows, n)).astype(np.int8)
    nib = rng.integers(0, 16, size=(rows, n)).astype(np.uint8)
    qs = packed.int4_interleave(nib, 32)
    for r0 in (0, 16):
        dst = np.empty(n // 4 * 16, np.uint32)
        G.pack_panel_int8(q, r0, dst)
        np.testing.assert_array_equal(dst, G.pack_panel_ref(q.view(np.uint8) ^ 128, r0))
        dst4 = np.empty(n // 8 * 16, np.uint32)
        G.pack_panel_int4(qs, r0, dst4)
        np.testing.assert_array_equal(dst4, G.pack_panel_ref(qs, r0))


def test_quantize_tokens_equals_quantize_act():
    """The tiles' activation quantizer (512-bit) gives simd.quantize_act's codes, scales and sums
    bit for bit (decode and prefill see the same int8 activations), ioff = -c * block code sums,
    and zero rows for the padding tokens."""
    from edgerun.kernels_numba import simd
    rng = np.random.default_rng(5)
    T, n = 37, 608
    x = (rng.normal(size=(T, n)) * np.exp(3 * rng.normal(size=(T, 1)))).astype(np.float32)
    x[1, 64:96] = 0.0
    x[2, 7] = 1e6
    xq, xs, ioff, xsum = G.quantize_tokens(x, 128, 40)
    for t in range(T):
        q, s, su = np.empty(n, np.int8), np.empty(n // 32, np.float32), np.empty(n // 32, np.float32)
        simd.quantize_act(x[t], q, s, su)
        np.testing.assert_array_equal(xq[t], q)
        np.testing.assert_array_equal(xs[t], s)
        np.testing.assert_array_equal(xsum[t], su)
        np.testing.assert_array_equal(ioff[t], -128 * q.reshape(-1, 32).astype(np.int32).sum(axis=1))
    assert not xq[T:].any() and not xs[T:].any() and not ioff[T:].any() and not xsum[T:].any()


def test_quantize_tokens_strided_rows():
    """Activations that are a column slice of a wider array (as models pass them) quantize as
    their contiguous copy."""
    wide = _activations(9, 160)
    got = G.quantize_tokens(wide[:, 32:128], 8, 12)
    want = G.quantize_tokens(np.ascontiguousarray(wide[:, 32:128]), 8, 12)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow            # compiles the whole gemm_int8_q8 once more for these layouts (~20 s)
def test_tiled_gemm_strided_arguments():
    """Activations and outputs that are not C-contiguous (a transposed x, an output whose rows are
    strided) take the same values as contiguous ones."""
    for kind, params in KINDS[1:2]:          # int8 groups of 32 (the loops are the same for every kind)
        c = _container(kind, params, 96, 37, False)
        x = _activations(19, 96)
        want = _run(c, x, TILED)
        xf = np.asfortranarray(x)
        out = np.full((37, 19), np.nan, np.float32).T            # (19, 37), column-major
        if kind == "int8":
            L.gemm_int8_q8(xf, c.q, c.scales, c.group, out)
        else:
            L.gemm_int4_q8(xf, c.qs, c.scales, c.mins, c.group, out)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
def test_scale_panels_match_ref(f16):
    """Scales transposed per panel (16 blocks at a time in SIMD, the rest one by one), float16
    bits converted exactly (subnormals, inf)."""
    rng = np.random.default_rng(7)
    for nb in (1, 15, 16, 19, 35):
        s = rng.normal(size=(21, nb)).astype(np.float32)
        s[0, 0], s[1, -1] = 3e-6, np.inf             # a float16 subnormal, an infinity
        s = packed.f16_bits(s) if f16 else s
        f = packed.scales_to_f32(s)
        for r0 in (0, 16):
            dst = np.empty(nb * 16, np.float32)
            G.pack_panel_scales(s, r0, dst)
            want = np.zeros((16, nb), np.float32)
            want[:min(16, 21 - r0)] = f[r0:r0 + 16]
            np.testing.assert_array_equal(dst, want.T.reshape(-1))

"""Every Numba CPU kernel against its NumPy *_ref twin, on awkward sizes.

Sizes are chosen not to fit the kernels' blocking: 37 output rows (ROW_BLOCK is 16),
inputs of 4096 + 32 / 4096 + 64 (one group past a power of two), head_dim 10, odd T.
Float kernels are compared with a normalised error: |got - ref| / (|x| @ |W|.T) for
matrix products (the scale of the accumulated terms), |got - ref| / max|ref| otherwise.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgerun import packed
from edgerun.kernels_numba import attention as A
from edgerun.kernels_numba import linear as L
from edgerun.kernels_numba import ops as O

ROWS = 37                     # not a multiple of linear.ROW_BLOCK
N_G32 = 4096 + 32             # 129 groups of 32
N_G64 = 4096 + 64             # 65 groups of 64
N_ODD = 4096 + 16 + 3         # for per-channel int8 and dense kinds: no group structure at all

Q8_TOL = 1e-5
GEMM_TOL = 2e-6               # float32 accumulation of ~4k terms, relative to sum |x_j w_j|
                              # (observed <= 2.4e-7 on every kind)


def rng(seed=0):
    return np.random.default_rng(seed)


def check(got, ref, tol, norm=None, what=""):
    """Assert max(|got - ref| / norm) < tol, printing max and mean error on failure."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values in the kernel's output"
    if norm is None:
        norm = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref) / norm
    assert err.max() < tol, (f"{what}: max normalised error {err.max():.3e} (tolerance {tol:.1e}), "
                             f"mean {err.mean():.3e}, at {np.unravel_index(err.argmax(), err.shape)}")


def weights(n, rows=ROWS, seed=1):
    w = rng(seed).normal(size=(rows, n)).astype(np.float32)
    w[:, :7] *= 10.0                 # a few outlier columns, as real weights have
    return w


def with_scale_dtype(c, dtype):
    """The same container with its scales (and mins) as float32 or as float16 bits (uint16).
    Converting float32 scales to float16 rounds them; the reference unpacks the result."""
    def conv(s):
        if s.size == 0:
            return np.zeros((0, 0), dtype=np.uint16 if dtype == "f16" else np.float32)
        return packed.f16_bits(packed.scales_to_f32(s)) if dtype == "f16" else packed.scales_to_f32(s)
    if isinstance(c, packed.Int8Weight):
        return c._replace(scales=conv(c.scales))
    return c._replace(scales=conv(c.scales), mins=conv(c.mins))


def run_gemm(c, x):
    out = np.full((x.shape[0], ROWS), np.nan, np.float32)
    if isinstance(c, packed.Int4Weight):
        L.gemm_int4(x, c.qs, c.scales, c.mins, c.group, out)
    elif isinstance(c, packed.Int8Weight):
        L.gemm_int8(x, c.q, c.scales, c.group, out)
    else:
        {"f32": L.gemm_f32, "f16": L.gemm_f16, "bf16": L.gemm_bf16}[c.dtype](x, c.w, out)
    return out


def run_embed(c, ids, dim):
    out = np.full((ids.shape[0], dim), np.nan, np.float32)
    if isinstance(c, packed.Int4Weight):
        L.embed_int4(ids, c.qs, c.scales, c.mins, c.group, out)
    elif isinstance(c, packed.Int8Weight):
        L.embed_int8(ids, c.q, c.scales, c.group, out)
    else:
        {"f32": L.embed_f32, "f16": L.embed_f16, "bf16": L.embed_bf16}[c.dtype](ids, c.w, out)
    return out


def make(kind, n, scale_dtype="f32", **params):
    """A packed container of a random (ROWS, n) weight."""
    parts, p = packed.codec(kind).pack(weights(n), **params)
    c = packed.codec(kind).container(parts, p)
    return c if kind in ("f32", "f16", "bf16") else with_scale_dtype(c, scale_dtype)


# (id, kind, input size, pack params, scale dtype)
PACKINGS = [
    ("f32", "f32", N_ODD, {}, None),
    ("f16", "f16", N_ODD, {}, None),
    ("bf16", "bf16", N_ODD, {}, None),
    ("int8-channel-f32s", "int8", N_ODD, {}, "f32"),
    ("int8-channel-f16s", "int8", N_ODD, {}, "f16"),
    ("int8-g32-f32s", "int8", N_G32, {"group": 32}, "f32"),
    ("int8-g32-f16s", "int8", N_G32, {"group": 32}, "f16"),
    ("int4-sym-g32-f16s", "int4", N_G32, {"group": 32}, "f16"),
    ("int4-sym-g32-f32s", "int4", N_G32, {"group": 32}, "f32"),
    ("int4-sym-g64-f16s", "int4", N_G64, {"group": 64}, "f16"),
    ("int4-min-g32-f16s", "int4", N_G32, {"group": 32, "symmetric": False}, "f16"),
    ("int4-min-g32-f32s", "int4", N_G32, {"group": 32, "symmetric": False}, "f32"),
    ("int4-min-g64-f16s", "int4", N_G64, {"group": 64, "symmetric": False}, "f16"),
    ("int4-sym-g128-f16s", "int4", 4096 + 128, {"group": 128}, "f16"),
    ("int8-channel-n32-f32s", "int8", N_G32, {}, "f32"),
]


@pytest.fixture(scope="module", params=PACKINGS, ids=[p[0] for p in PACKINGS])
def packing(request):
    _, kind, n, params, sdt = request.param
    return make(kind, n, sdt or "f32", **params), n


@pytest.mark.parametrize("T", [1, 7])
def test_gemm_matches_ref(packing, T):
    c, n = packing
    # a non-zero mean makes the int4 T=1 path's folded offset (s - 8 * sum x) cancel hard
    x = (rng(T).normal(size=(T, n)) + 0.5).astype(np.float32)
    w = packed.unpack(c)
    ref = L.gemm_ref(x, w)
    norm = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    check(run_gemm(c, x), ref, GEMM_TOL, norm, f"gemm T={T}")


def run_gemm_q8(c, x):
    out = np.full((x.shape[0], ROWS), np.nan, np.float32)
    if isinstance(c, packed.Int4Weight):
        L.gemm_int4_q8(x, c.qs, c.scales, c.mins, c.group, out)
    else:
        L.gemm_int8_q8(x, c.q, c.scales, c.group, out)
    return out


@pytest.mark.parametrize("T", [1, 3, 9])
def test_gemm_q8_matches_ref(packing, T):
    """Matmuls with int8 activations (kernels_numba/simd.py; T = 9: two four-token passes and a
    single token) equal the NumPy twin that quantizes x the same way; shapes the SIMD rows can't
    take (in % 32, int8 groups of 16) fall back to the float kernel and equal gemm_ref."""
    c, n = packing
    if not isinstance(c, (packed.Int4Weight, packed.Int8Weight)):
        pytest.skip("float kinds have no int8-activation path")
    x = (rng(T).normal(size=(T, n)) + 0.5).astype(np.float32)
    x[:, 40:72] *= 30.0              # one block with a much larger range than the others
    w = packed.unpack(c)
    simd = n % 32 == 0 and (isinstance(c, packed.Int4Weight) or c.group in (32, n))
    ref = L.gemm_q8_ref(x, w) if simd else L.gemm_ref(x, w)
    norm = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    # per-block float32 products (scales x integer dots) accumulate a little more rounding than
    # the float kernels' single sum: observed <= 2.8e-6
    check(run_gemm_q8(c, x), ref, Q8_TOL if simd else GEMM_TOL, norm, f"gemm q8 T={T} simd={simd}")
    if simd:      # and the quantization error itself stays what int8 per block of 32 promises
        check(run_gemm_q8(c, x), L.gemm_ref(x, w), 1e-2, norm, "gemm q8 vs float activations")


def test_quantize_act_matches_ref():
    from edgerun.kernels_numba import simd
    x = rng(3).normal(size=32 * 9).astype(np.float32)
    x[32:64] = 0.0                   # an all-zero block: scale 0, codes 0
    x[64] = 1e6
    xq, xs, xsum = np.empty(x.size, np.int8), np.empty(9, np.float32), np.empty(9, np.float32)
    simd.quantize_act(x, xq, xs, xsum)
    rq, rs, rsum = simd.quantize_act_ref(x)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_allclose(xs, rs, rtol=1e-7)
    np.testing.assert_allclose(xsum, rsum, rtol=1e-6)
    assert xs[1] == 0 and not xq[32:64].any()


def test_quad_order_matches_ref():
    """int4 rows with groups of 32 read the activations in quad order (simd.quad_order): whole
    8-block tiles permuted, the inputs past them as they are."""
    from edgerun.kernels_numba import simd
    for nb in (1, 7, 8, 13, 16, 21):
        xq = rng(nb).integers(-127, 128, 32 * nb).astype(np.int8)
        out = np.empty_like(xq)
        simd.quad_order(xq, out)
        np.testing.assert_array_equal(out, simd.quad_order_ref(xq))
        np.testing.assert_array_equal(np.sort(out), np.sort(xq))


@pytest.mark.parametrize("has_mins", [False, True])
def test_int4_tiles_match_rows(has_mins):
    """Int4 g32 rows repacked 4 to a tile (simd.repack_int4_tiles, the decode layer's layout):
    the repack equals its NumPy twin, and the 4-row tile kernel gives dot_int4_row_quad's totals
    bit for bit, with and without mins, with and without tail blocks (nb not a multiple of 8)."""
    from numba import njit
    from edgerun.kernels_numba import simd
    if not simd.WIDE:
        pytest.skip("the tile kernel needs 512-bit VNNI")

    @njit
    def rows(qs, w, m, hm, xq, xs, xsum, out):
        for r in range(qs.shape[0]):
            out[r] = simd.dot_int4_row_quad(qs[r], w[r], m[r], hm, xq, xs, xsum)

    @njit
    def tiles(t, hm, nb, xq, xs, xsum, out):
        for g in range(t.shape[0]):
            out[4 * g], out[4 * g + 1], out[4 * g + 2], out[4 * g + 3] = simd.dot_int4_tiles4(t, g, hm, nb, xq, xs, xsum)

    for nb in (8, 13, 18, 64, 5):
        r = rng(nb)
        R = 12
        qs = r.integers(0, 256, (R, 16 * nb), dtype=np.uint8)
        w = (r.uniform(0.5, 1.5, (R, nb)) * 0.01).astype(np.float16).view(np.uint16)
        m = (r.normal(size=(R, nb)) * 0.05).astype(np.float16).view(np.uint16) if has_mins else w
        x = r.normal(size=32 * nb).astype(np.float32)
        xq, xs, xsum = np.empty(x.size, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32)
        simd.quantize_act(x, xq, xs, xsum)
        xquad = np.empty_like(xq)
        simd.quad_order(xq, xquad)
        t = np.empty((R // 4, simd.int4_tile_bytes(nb, has_mins)), np.uint8)
        simd.repack_int4_tiles(qs, w, m, has_mins, t)
        np.testing.assert_array_equal(t, simd.repack_int4_tiles_ref(qs, w, m if has_mins else None))
        want, got = np.empty(R, np.float32), np.empty(R, np.float32)
        rows(qs, w, m, has_mins, xquad, xs, xsum, want)
        tiles(t, has_mins, nb, xquad, xs, xsum, got)
        np.testing.assert_array_equal(got, want)
        # and against the float reference of the dequantized rows (the quantity both compute)
        scale = w.view(np.float16).astype(np.float64)
        off = m.view(np.float16).astype(np.float64) if has_mins else -8 * scale
        u = np.stack([qs.reshape(R, nb, 16) & 15, qs.reshape(R, nb, 16) >> 4], axis=2).reshape(R, nb, 32)
        wf = (u * scale[..., None] + off[..., None]).reshape(R, -1)
        xf = (xq.reshape(nb, 32) * xs[:, None].astype(np.float64)).reshape(-1)
        np.testing.assert_allclose(got, wf @ xf, rtol=1e-4, atol=1e-4 * np.abs(wf).sum(1).max() * np.abs(xf).max())


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_simd_fallback_isas(isa, tmp_path):
    """The AVX2 and portable code paths (chosen on CPUs without VNNI) give the same results: run
    in a subprocess with EDGERUN_SIMD forced and its own Numba cache."""
    import os
    import subprocess
    import sys
    code = (
        "import numpy as np\n"
        "from edgerun import packed\n"
        "from edgerun.kernels_numba import linear as L, simd\n"
        f"assert simd.ISA == {isa!r}\n"
        "r = np.random.default_rng(0)\n"
        "w = r.normal(size=(5, 32 * 13)).astype(np.float32)\n"
        "x = r.normal(size=(1, 32 * 13)).astype(np.float32)\n"
        "worst = 0.0\n"
        "for kind, p in (('int8', {}), ('int8', {'group': 32}), ('int4', {'group': 32}),\n"
        "                ('int4', {'group': 32, 'symmetric': False})):\n"
        "    c = packed.codec(kind).container(*packed.codec(kind).pack(w, **p))\n"
        "    out = np.empty((1, 5), np.float32)\n"
        "    if kind == 'int8': L.gemm_int8_q8(x, c.q, c.scales, c.group, out)\n"
        "    else: L.gemm_int4_q8(x, c.qs, c.scales, c.mins, c.group, out)\n"
        "    ref = L.gemm_q8_ref(x, packed.unpack(c))\n"
        "    norm = np.abs(x) @ np.abs(packed.unpack(c)).T\n"
        "    worst = max(worst, float((np.abs(out - ref) / norm).max()))\n"
        "print(worst)\n")
    env = dict(os.environ, EDGERUN_SIMD=isa, NUMBA_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.split()[-1]) < GEMM_TOL, res.stdout


def test_embed_matches_ref(packing):
    c, n = packing
    ids = np.array([36, 0, 5, 5, 17, 16, 31], dtype=np.int64)      # repeats, first and last rows
    w = packed.unpack(c)
    ref = L.embed_ref(ids, w)
    got = run_embed(c, ids, n)
    if isinstance(c, packed.Int4Weight):
        # s * q + (-8 s) in the kernel vs (q - 8) * s in the reference: one rounding apart
        check(got, ref, 1e-6, np.abs(w).max(axis=1)[ids][:, None], "embed int4")
    else:
        np.testing.assert_array_equal(got, ref, err_msg="embed is a gather: bit-exact")


def test_embed_f16_decodes_every_half():
    """half_to_float on all 65536 bit patterns: zeros, subnormals, normals, inf and NaN."""
    w = np.arange(65536, dtype=np.uint32).astype(np.uint16)[None, :]
    out = np.empty((1, 65536), np.float32)
    L.embed_f16(np.zeros(1, np.int64), w, out)
    ref = w.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert (np.isnan(out) == nan).all()
    np.testing.assert_array_equal(out[~nan], ref[~nan])
    assert (np.signbit(out[~nan]) == np.signbit(ref[~nan])).all(), "sign of -0.0"


def test_gemm_int4_zero_scale_group():
    """An all-zero group (scale 0) gives exact zeros, not NaN."""
    w = weights(N_G32)
    w[3] = 0.0
    w[5, 32:64] = 0.0
    for sym in (True, False):
        parts, p = packed.Int4.pack(w, group=32, symmetric=sym)
        c = packed.Int4.container(parts, p)
        x = rng(3).normal(size=(7, N_G32)).astype(np.float32)
        for xs in (x[:1], x):
            got = run_gemm(c, xs)
            assert (got[:, 3] == 0).all()
            check(got, L.gemm_ref(xs, packed.unpack(c)), GEMM_TOL,
                  np.abs(xs) @ np.abs(packed.unpack(c)).T + 1e-30, f"int4 zero group sym={sym}")


# ------------------------------------------------------------------------------ ops

@pytest.mark.parametrize("T,d", [(1, 4096 + 32 + 3), (7, 90)])
def test_rms_norm(T, d):
    r = rng(d)
    x = (r.normal(size=(T, d)) * 3).astype(np.float32)
    weight = r.normal(1.0, 0.2, size=d).astype(np.float32)
    out = np.full_like(x, np.nan)
    O.rms_norm(x, weight, np.float32(1e-5), out)
    check(out, O.rms_norm_ref(x, weight, 1e-5), 1e-5, what="rms_norm")


def test_rms_norm_heads():
    r = rng(5)
    x = r.normal(size=(7, 6, 10)).astype(np.float32)
    weight = r.normal(1.0, 0.2, size=10).astype(np.float32)
    ref = O.rms_norm_ref(x, weight, 1e-6)       # the reference normalises over the last axis
    got = x.copy()
    O.rms_norm_heads(got, weight, np.float32(1e-6))
    check(got, ref, 1e-5, what="rms_norm_heads")


@pytest.mark.parametrize("d,rot,start,attn_scale", [(10, 10, 0, 1.0), (12, 12, 4093, 1.0), (12, 8, 0, 0.8)],
                         ids=["full-d10", "far-positions", "partial-rot8-scaled"])
def test_rope(d, rot, start, attn_scale):
    T, H = 7, 3
    r = rng(rot)
    x = r.normal(size=(T, H, d)).astype(np.float32)
    positions = np.arange(start, start + T, dtype=np.int64)
    inv = (1.0 / 10000.0 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    ref = O.rope_ref(x, positions, inv, attn_scale)
    got = x.copy()
    O.rope(got, positions, inv, attn_scale)
    check(got, ref, 1e-5, what="rope")
    if rot < d:
        # dims past the rotary part are left alone
        np.testing.assert_array_equal(got[..., rot:], x[..., rot:])
    # the fused decode layer's q-and-k form: the same values, bit for bit
    k = r.normal(size=(T, 2, d)).astype(np.float32)
    got_q, got_k, want_k = x.copy(), k.copy(), k.copy()
    O.rope(want_k, positions, inv, attn_scale)
    O.rope_qk(got_q, got_k, positions, inv, attn_scale)
    np.testing.assert_array_equal(got_q, got)
    np.testing.assert_array_equal(got_k, want_k)


def test_silu_mul():
    r = rng(9)
    gate = (r.normal(size=(7, 4096 + 5)) * 4).astype(np.float32)
    gate[0, :6] = [-1000.0, -90.0, 0.0, 90.0, 1000.0, -0.0]       # exp overflow on both sides
    up = r.normal(size=gate.shape).astype(np.float32)
    with np.errstate(over="ignore"):
        ref = O.silu_mul_ref(gate, up)
    out = np.full_like(gate, np.nan)
    O.silu_mul(gate, up, out)
    check(out, ref, 1e-6, what="silu_mul")
    aliased = gate.copy()                      # the backend writes into gate
    O.silu_mul(aliased, up, aliased)
    np.testing.assert_array_equal(aliased, out)


def test_add_inplace():
    r = rng(11)
    x = r.normal(size=(7, 90)).astype(np.float32)
    y = r.normal(size=(7, 90)).astype(np.float32)
    ref = x + y
    O.add_inplace(x, y)
    np.testing.assert_array_equal(x, ref)


# ------------------------------------------------------------------------------ paged attention

def paged_setup(k, v, bs, r, n_blocks=None):
    """Scatter (L, Hk, d) keys/values into a shuffled pool of blocks of bs tokens; unused slots NaN."""
    L_, Hk, d = k.shape
    n_log = -(-L_ // bs)
    n_blocks = n_blocks or n_log + 3
    table = r.permutation(n_blocks)[:n_log].astype(np.int32)
    kp = np.full((n_blocks, Hk, bs, d), np.nan, np.float32)
    vp = np.full((n_blocks, Hk, bs, d), np.nan, np.float32)
    return kp, vp, table


@pytest.mark.parametrize("H,Hk", [(4, 4), (6, 2), (5, 1)], ids=["gqa1", "gqa3", "mqa"])
@pytest.mark.parametrize("window", [0, 3, 21], ids=["full", "win3", "win21"])
@pytest.mark.parametrize("start,T", [(0, 19), (9, 1), (37, 1), (13, 11)])
@pytest.mark.parametrize("bs", [4, 16])
def test_paged_attention(H, Hk, window, start, T, bs):
    """Across block boundaries, windows smaller and larger than a block, prefill lengths that are
    not a multiple of the query tile (8), blocks scattered through the pool; never reads unused slots."""
    from edgerun.kernels_numba import paged_attention as P
    d = 10
    r = rng(H * 1000 + window * 100 + start + T + bs)
    L_ = start + T
    q = r.normal(size=(T, H, d)).astype(np.float32)
    k = (r.normal(size=(L_, Hk, d)) * 2).astype(np.float32)
    v = r.normal(size=(L_, Hk, d)).astype(np.float32)
    kp, vp, table = paged_setup(k, v, bs, r)
    P.store_kv_paged(k, v, kp, vp, table, 0)
    np.testing.assert_array_equal(P.gather_ref(kp, table, L_), k)
    np.testing.assert_array_equal(P.gather_ref(vp, table, L_), v)
    scale = np.float32(d ** -0.5)
    out = np.full_like(q, np.nan)
    ones = np.ones((1, 1, 1), np.float32)
    P.paged_attention(q, kp, vp, ones, ones, False, table, start, scale, window, np.float32(0), out)
    check(out, A.attention_ref(q, k, v, start, float(scale), window), 1e-5, what="paged attention")


@pytest.mark.parametrize("window", [0, 300])
@pytest.mark.parametrize("start", [3, 700])
def test_paged_attention_decode(start, window):
    """One token (decode) at a short and a long position, with and without a window: equal to the
    reference, with int8 blocks and a softcap too."""
    from edgerun.kernels_numba import paged_attention as P
    q, k, v, kp, vp, table = _decode_inputs(8, 2, 64, 16, start, 0.3, rng(start + window))
    ones = np.ones((1, 1, 1), np.float32)
    for softcap in (0.0, 2.0):
        out = np.full_like(q, np.nan)
        P.paged_attention(q, kp, vp, ones, ones, False, table, start, np.float32(0.125), window, np.float32(softcap), out)
        check(out, A.attention_ref(q, k, v, start, 0.125, window, softcap=softcap), 1e-5,
              what=f"decode attention at {start}, window {window}, softcap {softcap}")
    kq, vq, ks, vs, kd, vd = _int8_pools(k, v, kp, table)
    out = np.empty_like(q)
    P.paged_attention(q, kq, vq, ks, vs, True, table, start, np.float32(0.125), window, np.float32(0), out)
    check(out, A.attention_ref(q, kd, vd, start, 0.125, window), 1e-5, what="int8 decode attention")


def _decode_inputs(H, Hk, d, bs, start, kscale, r):
    """One query at position start and a paged f32 cache holding positions 0..start."""
    from edgerun.kernels_numba import paged_attention as P
    q = r.normal(size=(1, H, d)).astype(np.float32)
    k = (r.normal(size=(start + 1, Hk, d)) * kscale).astype(np.float32)
    v = r.normal(size=(start + 1, Hk, d)).astype(np.float32)
    kp, vp, table = paged_setup(k, v, bs, r)
    P.store_kv_paged(k, v, kp, vp, table, 0)
    return q, k, v, kp, vp, table


def _int8_pools(k, v, kp, table):
    """The same keys and values in int8 pools (+ scales), and what those hold, dequantized."""
    from edgerun.kernels_numba import paged_attention as P
    kq, vq = np.zeros(kp.shape, np.int8), np.zeros(kp.shape, np.int8)
    ks, vs = np.zeros(kp.shape[:3], np.float32), np.zeros(kp.shape[:3], np.float32)
    P.store_kv_paged_int8(k, v, kq, vq, ks, vs, table, 0)
    return kq, vq, ks, vs, P.gather_ref(kq, table, len(k), ks), P.gather_ref(vq, table, len(k), vs)


@pytest.mark.parametrize("d", [16, 80, 96, 128])
@pytest.mark.parametrize("H,Hk", [(5, 5), (6, 2), (7, 1), (16, 2)], ids=["mha", "gqa3", "mqa7", "gqa8"])
@pytest.mark.parametrize("start,window,bs", [(0, 0, 4), (6, 0, 4), (22, 0, 16), (45, 0, 4), (45, 19, 4), (45, 3, 16),
                                              (600, 0, 16), (700, 530, 4)])
def test_decode_attention_shapes(d, H, Hk, start, window, bs):
    """The one-query kernel (head_dim a multiple of 16: 1, 5, 6 and 8 chunks of 16, so the value
    sums' 4-chunk steps and their 1-chunk tail) against the reference: query groups of 1 to 8
    heads (4 at a time, a partial last call), a start inside and at the edge of a block, windows
    starting mid-block, long contexts split between jobs (runs of blocks merged at the end);
    float32 and int8 blocks."""
    from edgerun.kernels_numba import paged_attention as P
    q, k, v, kp, vp, table = _decode_inputs(H, Hk, d, bs, start, 0.4, rng(d * 7 + H + start + window + bs))
    ones = np.ones((1, 1, 1), np.float32)
    scale = np.float32(d ** -0.5)
    out = np.full_like(q, np.nan)
    P.decode_attention(q, kp, vp, ones, ones, False, table, start, scale, window, np.float32(0), out)
    check(out, A.attention_ref(q, k, v, start, float(scale), window), 1e-5, what="decode attention")
    kq, vq, ks, vs, kd, vd = _int8_pools(k, v, kp, table)
    out = np.full_like(q, np.nan)
    P.decode_attention(q, kq, vq, ks, vs, True, table, start, scale, window, np.float32(0), out)
    check(out, A.attention_ref(q, kd, vd, start, float(scale), window), 1e-5, what="int8 decode attention")


def test_decode_attention_exp_and_max():
    """The softmax's exp (exp_shifted, through ssm.fast_exp) against np.exp of the same float32
    differences over the whole range a softmax meets, to a few float32 ulps; the integer-ordered max against np.max on negative, positive and mixed
    values."""
    from numba import njit
    from edgerun.kernels_numba import paged_attention as P

    @njit
    def run(x, m):
        y = x.copy()
        P.exp_shifted(y, m)
        return y

    @njit
    def vmax(x):
        return P._max(x)

    x = np.concatenate([np.linspace(-90, 3, 20001), [3.0, -0.0, 0.0, 1e-30]]).astype(np.float32)
    got, ref = run(x, np.float32(3.0)), np.exp((x - np.float32(3.0)).astype(np.float64))   # the float32 difference
    big = ref > 1e-37
    assert np.max(np.abs(got[big] - ref[big]) / ref[big]) < 4e-7
    assert np.all(got[~big] < 1.1e-37)                 # below exp(-87): ~1e-38, not 0
    r = rng(3)
    for vals in (-np.abs(r.normal(size=37)) - 1, np.abs(r.normal(size=5)), r.normal(size=64) * 100,
                 np.array([-0.0, 0.0]), np.array([-3.5])):
        v32 = vals.astype(np.float32)
        assert vmax(v32) == v32.max()


@pytest.mark.parametrize("H,Hk", [(6, 2), (5, 1)], ids=["gqa3", "mqa"])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_int8_kv(H, Hk, window):
    """int8 blocks with a scale per token and head: the kernel equals the reference attention over
    the dequantized keys/values, and those are within 1/254 of the originals per row."""
    from edgerun.kernels_numba import paged_attention as P
    d, bs, start, T = 10, 4, 6, 9
    r = rng(H + window)
    L_ = start + T
    q = r.normal(size=(T, H, d)).astype(np.float32)
    k = (r.normal(size=(L_, Hk, d)) * 2).astype(np.float32)
    v = r.normal(size=(L_, Hk, d)).astype(np.float32)
    n_blocks = -(-L_ // bs) + 2
    table = r.permutation(n_blocks)[:-(-L_ // bs)].astype(np.int32)
    kp = np.zeros((n_blocks, Hk, bs, d), np.int8)
    vp = np.zeros_like(kp)
    ks = np.zeros((n_blocks, Hk, bs), np.float32)
    vs = np.zeros_like(ks)
    P.store_kv_paged_int8(k, v, kp, vp, ks, vs, table, 0)
    kd, vd = P.gather_ref(kp, table, L_, ks), P.gather_ref(vp, table, L_, vs)
    assert np.abs(kd - k).max() <= np.abs(k).max(-1, keepdims=True).max() / 254 + 1e-6
    out = np.empty_like(q)
    P.paged_attention(q, kp, vp, ks, vs, True, table, start, np.float32(0.3), window, np.float32(0), out)
    check(out, A.attention_ref(q, kd, vd, start, 0.3, window), 1e-5, what="int8 paged attention")


def test_paged_attention_softcap():
    from edgerun.kernels_numba import paged_attention as P
    T, H, Hk, d, bs = 5, 6, 2, 10, 4
    r = rng(7)
    q = (r.normal(size=(T, H, d)) * 3).astype(np.float32)
    k = (r.normal(size=(T, Hk, d)) * 3).astype(np.float32)
    v = r.normal(size=(T, Hk, d)).astype(np.float32)
    kp, vp, table = paged_setup(k, v, bs, r)
    P.store_kv_paged(k, v, kp, vp, table, 0)
    out = np.empty_like(q)
    ones = np.ones((1, 1, 1), np.float32)
    P.paged_attention(q, kp, vp, ones, ones, False, table, 0, np.float32(0.5), 0, np.float32(5.0), out)
    check(out, A.attention_ref(q, k, v, 0, 0.5, 0, softcap=5.0), 1e-5, what="softcap")


def test_paged_attention_window_one_is_identity_on_values():
    """window 1: each query sees only its own position, so the output is that position's value."""
    from edgerun.kernels_numba import paged_attention as P
    T, H, Hk, d, bs = 5, 6, 2, 10, 4
    r = rng(4)
    q = r.normal(size=(T, H, d)).astype(np.float32)
    k = r.normal(size=(T + 2, Hk, d)).astype(np.float32)
    v = r.normal(size=(T + 2, Hk, d)).astype(np.float32)
    kp, vp, table = paged_setup(k, v, bs, r)
    P.store_kv_paged(k, v, kp, vp, table, 0)
    out = np.empty_like(q)
    ones = np.ones((1, 1, 1), np.float32)
    P.paged_attention(q, kp, vp, ones, ones, False, table, 2, np.float32(0.3), 1, np.float32(0), out)
    for t in range(T):
        for h in range(H):
            np.testing.assert_allclose(out[t, h], v[2 + t, h // 3], rtol=1e-6)

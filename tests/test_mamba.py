"""Mamba, FalconMamba and Mamba-2: kernels against their NumPy references, logits against
transformers (its pure-torch path) on tiny random checkpoints with awkward sizes, and the
recurrent state's contract (save/restore, rollback, refusal of another model's state).
"""
from __future__ import annotations

import numpy as np
import pytest

from edgerun.kernels_numba import ssm

F32_TOL = 1e-4            # max |edgerun - transformers| / max |logit|
KERNEL_TOL = 2e-6         # kernel vs float64 reference, relative to max |ref|

IDS = [0, 17, 250, 3, 99, 42, 280, 7, 131, 64, 2, 205, 9]        # 13 tokens: no chunk size here divides it

CASES = {
    # d_inner 74, d_state 5, dt rank 3, conv kernel 4, tied head
    "mamba": ("MambaForCausalLM", dict(hidden_size=37, state_size=5, time_step_rank=3)),
    # FalconMamba: B/C/dt norms; conv kernel 3, untied head, d_inner 90
    "falcon_mamba": ("FalconMambaForCausalLM", dict(hidden_size=45, state_size=7, time_step_rank=5,
                                                    conv_kernel=3, tie_word_embeddings=False)),
    # Mamba-2: 6 heads of 11 in 3 groups, d_state 7, chunk 5 (13 = 5 + 5 + 3)
    "mamba2": ("Mamba2ForCausalLM", dict(hidden_size=33, num_heads=6, head_dim=11, state_size=7,
                                         n_groups=3, chunk_size=5)),
    # Mamba-2 with one group, chunk 4, tied head, conv bias off, a dt limit that clips
    "mamba2-g1": ("Mamba2ForCausalLM", dict(hidden_size=20, num_heads=5, head_dim=8, state_size=9,
                                            n_groups=1, chunk_size=4, tie_word_embeddings=True,
                                            use_conv_bias=False, time_step_limit=(0.002, 0.03))),
}


def _err(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------ kernels

def test_fast_exp():
    from numba import njit

    @njit
    def run(a, o):
        for i in range(a.shape[0]):
            o[i] = ssm.fast_exp(a[i])

    x = np.linspace(-87, 88, 200_001).astype(np.float32)
    o = np.empty_like(x)
    run(x, o)
    assert np.max(np.abs(o / np.exp(x.astype(np.float64)) - 1)) < 3e-7


def test_softplus():
    from numba import njit

    @njit
    def run(a, o):
        for i in range(a.shape[0]):
            o[i] = ssm.softplus(a[i])

    x = np.concatenate([np.linspace(-80, 90, 100_001), [-1e-6, 0.0, 1e-6, 20.0, 30.0]]).astype(np.float32)
    o = np.empty_like(x)
    run(x, o)
    x64 = x.astype(np.float64)
    assert np.max(np.abs(o / (np.maximum(x64, 0) + np.log1p(np.exp(-np.abs(x64)))) - 1)) < 5e-7


@pytest.mark.parametrize("T", [1, 2, 7, 40])
@pytest.mark.parametrize("K", [2, 4])
def test_causal_conv1d(T, K):
    rng = np.random.default_rng(T * 10 + K)
    C = 37
    x, st, w, b = _f(rng, T, C), _f(rng, K - 1, C), _f(rng, K, C), _f(rng, C)
    ref, ref_state = ssm.causal_conv1d_ref(x, st, w, b)
    for fn in (ssm.causal_conv1d, ssm.causal_conv1d_parallel):
        s, out = st.copy(), np.empty((T, C), np.float32)
        fn(x, s, w, b, True, out)
        assert _err(out, ref) < KERNEL_TOL
        np.testing.assert_array_equal(s, ref_state)
    # the same conv fed one token at a time through the carried state
    s = st.copy()
    steps = []
    for t in range(T):
        out = np.empty((1, C), np.float32)
        ssm.causal_conv1d(x[t:t + 1], s, w, np.zeros(0, np.float32), False, out)
        steps.append(out)
    ref_nobias, _ = ssm.causal_conv1d_ref(x, st, w, None, apply_silu=False)
    assert _err(np.concatenate(steps), ref_nobias) < KERNEL_TOL
    np.testing.assert_array_equal(s, ref_state)


@pytest.mark.parametrize("T,d,N", [(1, 67, 5), (9, 200, 16), (33, 130, 3)])
def test_selective_scan(T, d, N):
    rng = np.random.default_rng(d)
    x, dt, z, B, C = _f(rng, T, d), _f(rng, T, d), _f(rng, T, d), _f(rng, T, N), _f(rng, T, N)
    A = -np.exp(0.5 * _f(rng, N, d))
    D, bias, h = _f(rng, d), _f(rng, d), _f(rng, N, d)
    ref, ref_h = ssm.selective_scan_ref(x, dt, A, B, C, D, z, bias, h)
    h1, out = h.copy(), np.empty((T, d), np.float32)
    ssm.selective_scan_parallel(x, dt, A, B, C, D, z, bias, h1, out)
    assert _err(out, ref) < KERNEL_TOL, f"prefill scan {_err(out, ref):.3g}"
    assert _err(h1, ref_h) < KERNEL_TOL
    h2, ws, steps = h.copy(), np.empty((2, d), np.float32), []
    for t in range(T):                              # the decode kernel, token by token
        o = np.empty((1, d), np.float32)
        ssm.selective_scan(x[t:t + 1], dt[t:t + 1], A, B[t:t + 1], C[t:t + 1], D, z[t:t + 1], bias, h2, ws, o)
        steps.append(o)
    assert _err(np.concatenate(steps), ref) < KERNEL_TOL
    assert _err(h2, ref_h) < KERNEL_TOL


@pytest.mark.parametrize("m,k,P,alpha", [(1, 1, 1, 1.0), (7, 13, 85, 0.0), (4, 128, 64, 0.7), (9, 3, 16, 1.0),
                                         (6, 0, 21, 0.0), (5, 33, 80, 2.0)])
def test_gemm(m, k, P, alpha):
    """The SSD's register-tiled GEMM (Y = alpha Y + A @ R) against NumPy: rows not a multiple of 4, columns
    covering the 64- and 16-wide tiles and the plain-loop tail, views whose first row is not row 0, and
    alpha = 0 overwriting a Y that holds NaN."""
    rng = np.random.default_rng(m * 100 + k + P)
    Y, A, R = _f(rng, m + 2, P), _f(rng, m + 1, k + 3), _f(rng, k + 1, P)
    if alpha == 0:
        Y[1:m + 1] = np.nan
    ref = Y.astype(np.float64)
    ref[1:m + 1] = (alpha * ref[1:m + 1] if alpha else 0.0) + A[1:m + 1, :k].astype(np.float64) @ R[:k]
    got = Y.copy()
    ssm._gemm(got[1:], A[1:], R, m, k, alpha)
    assert _err(got, ref) < KERNEL_TOL, f"max {np.abs(got - ref).max():.3g} mean {np.abs(got - ref).mean():.3g}"


@pytest.mark.parametrize("T,H,P,N,G,chunk", [(13, 6, 5, 7, 2, 4), (13, 6, 5, 7, 3, 5), (20, 4, 16, 32, 1, 7),
                                             (3, 2, 3, 4, 1, 8), (70, 4, 85, 19, 2, 32)])
def test_ssd_chunked_equals_recurrence(T, H, P, N, G, chunk):
    rng = np.random.default_rng(T + H + chunk)
    xbc, dt = _f(rng, T, H * P + 2 * G * N), _f(rng, T, H)
    A, D, bias, h = -np.exp(_f(rng, H)), _f(rng, H), _f(rng, H), _f(rng, H, P, N)
    lim = (0.0, np.inf)
    ref, ref_h = ssm.ssd_scan_ref(xbc, dt, A, D, bias, h, G, lim)
    cref, cref_h = ssm.ssd_chunked_ref(xbc, dt, A, D, bias, h, G, chunk, lim)
    assert _err(cref, ref) < 1e-6 and _err(cref_h, ref_h) < 1e-6       # the algorithm itself
    h1, out = h.copy(), np.empty((T, H * P), np.float32)
    ssm.ssd_chunked(xbc, dt, A, D, bias, h1, G, chunk, np.float32(0), np.float32(np.inf), out)
    assert _err(out, ref) < KERNEL_TOL, f"chunked {_err(out, ref):.3g}"
    assert _err(h1, ref_h) < KERNEL_TOL
    for step in (ssm.ssd_step, ssm.ssd_step_parallel):
        h2, steps = h.copy(), []
        for t in range(T):
            o = np.empty((1, H * P), np.float32)
            step(xbc[t:t + 1], dt[t:t + 1], A, D, bias, h2, G, np.float32(0), np.float32(np.inf), o)
            steps.append(o)
        assert _err(np.concatenate(steps), ref) < KERNEL_TOL
        assert _err(h2, ref_h) < KERNEL_TOL


def test_ssd_dt_limit():
    rng = np.random.default_rng(3)
    T, H, P, N, G = 6, 2, 3, 4, 1
    xbc, dt = _f(rng, T, H * P + 2 * G * N), _f(rng, T, H)
    A, D, bias, h = -np.exp(_f(rng, H)), _f(rng, H), _f(rng, H), _f(rng, H, P, N)
    ref, _ = ssm.ssd_scan_ref(xbc, dt, A, D, bias, h, G, (0.3, 0.9))
    out = np.empty((T, H * P), np.float32)
    ssm.ssd_chunked(xbc, dt, A, D, bias, h.copy(), G, 4, np.float32(0.3), np.float32(0.9), out)
    assert _err(out, ref) < KERNEL_TOL
    assert _err(ref, ssm.ssd_scan_ref(xbc, dt, A, D, bias, h, G)[0]) > 1e-3      # the limit mattered


@pytest.mark.parametrize("T", [1, 10])
def test_gated_rms_norm(T):
    rng = np.random.default_rng(T)
    y, z, w = _f(rng, T, 33), _f(rng, T, 33), _f(rng, 33)
    ref = ssm.gated_rms_norm_ref(y, z, w, 11, 1e-5)
    for fn in (ssm.gated_rms_norm, ssm.gated_rms_norm_serial):
        out = np.empty_like(y)
        fn(y, z, w, 11, np.float32(1e-5), out)
        assert _err(out, ref) < KERNEL_TOL


# ------------------------------------------------------------------------------ models vs transformers

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import (ACT_Q8_TOL, act_quant_error, convert_and_load, hf_logits, make_hf_model,  # noqa: E402
                      save_hf)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (transformers model, HF dir, edgerun f32 model); built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cls, cfg = CASES[name]
            model = make_hf_model(cls, **cfg)
            d = save_hf(model, tmp_path_factory.mktemp(name) / "hf")
            cache[name] = (model, d, convert_and_load(d, "f32"))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, built):
    model, d, m = built(name)
    ref = hf_logits(model, IDS)
    full = m.forward(IDS)
    assert full.shape == ref.shape and full.dtype == np.float32
    assert _err(full, ref) < F32_TOL, f"forward: {_err(full, ref):.3g}"
    st = m.new_state()
    steps = np.concatenate([m.step(st, [t]) for t in IDS])
    assert _err(steps, ref) < F32_TOL, f"step by step: {_err(steps, ref):.3g}"
    st = m.new_state()
    mixed = np.concatenate([m.step(st, IDS[:6])] + [m.step(st, [t]) for t in IDS[6:]])
    assert _err(mixed, ref) < F32_TOL, f"prefill then steps: {_err(mixed, ref):.3g}"
    # prefill continuing from a non-empty state (the chunked path with a carried state)
    st = m.new_state()
    parts = [m.step(st, IDS[:2]), m.step(st, [IDS[2]]), m.step(st, IDS[3:11]), m.step(st, IDS[11:])]
    assert _err(np.concatenate(parts), ref) < F32_TOL
    assert st.length == len(IDS)


def test_falcon_norms_matter(built):
    """FalconMamba's B/C/dt norms are applied: the same weights as plain Mamba give other logits."""
    model, d, m = built("falcon_mamba")
    import copy

    import transformers
    plain = transformers.MambaForCausalLM(transformers.MambaConfig(**{
        k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "model_type")}))
    plain.load_state_dict(copy.deepcopy(model.state_dict()), strict=False)
    plain.eval()
    assert _err(hf_logits(plain, IDS), hf_logits(model, IDS)) > 100 * F32_TOL


def test_greedy_generate_matches_transformers(built):
    model, d, m = built("mamba2")
    out = model.generate(torch.tensor([IDS]), do_sample=False, max_new_tokens=6)
    ref = out[0, len(IDS):].tolist()
    st = m.new_state()
    logits = m.step(st, IDS)[-1]
    got = []
    for _ in range(6):
        got.append(int(np.argmax(logits)))
        logits = m.step(st, [got[-1]])[-1]
    assert got == ref


def _dequantized_hf(model, m):
    """The transformers model holding edgerun's weights as edgerun unpacks them."""
    import copy

    from edgerun import packed
    dq = copy.deepcopy(model)
    sd = dq.state_dict()
    with torch.no_grad():
        for name in m.file.descriptors:
            w = np.array(packed.unpack(m.file.tensor(name)))
            sd[name].copy_(torch.from_numpy(w.reshape(sd[name].shape)))
    return dq


# hidden 64 and d_inner 128 are multiples of 32: int4 covers every projection but dt_proj (rank 4 -> int8)
QUANT_CASES = {
    "mamba": ("MambaForCausalLM", dict(hidden_size=64, state_size=6, time_step_rank=4)),
    "falcon_mamba": ("FalconMambaForCausalLM", dict(hidden_size=64, state_size=6, time_step_rank=4,
                                                    tie_word_embeddings=False)),
    "mamba2": ("Mamba2ForCausalLM", dict(hidden_size=64, num_heads=8, head_dim=16, state_size=8,
                                         n_groups=2, chunk_size=5)),
}


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_packed_kinds_match_dequantized_transformers(name, tmp_path):
    cls, cfg = QUANT_CASES[name]
    model = make_hf_model(cls, **cfg)
    d = save_hf(model, tmp_path / "hf")
    ref32 = hf_logits(model, IDS)
    for quant in ("f16", "bf16", "int8", "int4"):
        m = convert_and_load(d, quant, group_size=32 if quant == "int4" else None, act_quant=False)
        kinds = {x["kind"] for n, x in m.file.descriptors.items() if len(x["shape"]) == 2 and "A_log" not in n}
        assert quant in kinds, kinds
        if name != "mamba2":
            a_log = [x["kind"] for n, x in m.file.descriptors.items() if n.endswith("A_log")]
            assert set(a_log) == {"f32"}, "A_log must stay float32"
        got = m.forward(IDS)
        ref = hf_logits(_dequantized_hf(model, m), IDS)
        assert _err(got, ref) < F32_TOL, f"{quant}: {_err(got, ref):.3g} vs dequantized transformers"
        st = m.new_state()
        steps = np.concatenate([m.step(st, IDS[:5])] + [m.step(st, [t]) for t in IDS[5:]])
        assert _err(steps, got) < F32_TOL
        if quant in ("int8", "int4"):
            e = act_quant_error(m, IDS)
            print(f"\n{name} {quant}: int8 activations vs float32 activations {e:.3g}")
            assert e < ACT_Q8_TOL
        print(f"\n{name} {quant}: vs float32 transformers {_err(got, ref32):.3g}")


# ------------------------------------------------------------------------------ recurrent state

@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_save_restore_continue(name, built, tmp_path):
    import edgerun
    model, d, m = built(name)
    full = m.forward(IDS)
    st = m.new_state()
    m.step(st, IDS[:7])
    st.save(tmp_path / "s.state")
    m.step(st, [5, 6, 7])                              # the live state moves on; the file does not
    restored = edgerun.load_state(tmp_path / "s.state", m)
    assert restored.length == 7
    assert _err(np.concatenate([m.step(restored, IDS[7:9]), m.step(restored, IDS[9:])]), full[7:]) < 1e-5
    # restore into an existing state object too
    st.restore(tmp_path / "s.state")
    assert _err(np.concatenate([m.step(st, [t]) for t in IDS[7:]]), full[7:]) < 1e-5


@pytest.mark.parametrize("name", ["falcon_mamba", "mamba2-g1"])
def test_rollback_and_refeed(name, built):
    model, d, m = built(name)
    full = m.forward(IDS)
    st = m.new_state()
    st.keep_checkpoints(5)
    m.step(st, IDS[:4])
    for t in IDS[4:9]:
        m.step(st, [t])
    m.step(st, [11, 12, 13])                          # a wrong 3-token draft, checked in one step
    assert st.checkpoints == [6, 7, 8, 9, 12]
    st.rollback(4)                                    # the draft and one more token
    assert st.length == 8
    again = np.concatenate([m.step(st, [t]) for t in IDS[8:]])
    assert _err(again, full[8:]) < 1e-5
    fork = st.fork()
    st.rollback(3)
    assert _err(m.step(st, IDS[-3:]), full[-3:]) < 1e-5
    assert fork.length == len(IDS)


def test_restore_into_other_model_is_refused(built, tmp_path):
    from edgerun.errors import ModelFileError
    _, _, m = built("mamba")
    _, _, other = built("falcon_mamba")
    st = m.new_state()
    m.step(st, IDS[:3])
    st.save(tmp_path / "s.state")
    with pytest.raises(ModelFileError, match="another model"):
        other.new_state().restore(tmp_path / "s.state")
    # the same architecture and shapes, other weights: refused by the content hash all the same
    cls, cfg = CASES["mamba"]
    d2 = save_hf(make_hf_model(cls, seed=1, **cfg), tmp_path / "seed1")
    with pytest.raises(ModelFileError, match="another model"):
        convert_and_load(d2, "f32").new_state().restore(tmp_path / "s.state")


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_decode_state_is_fixed_size(name, built):
    """The state never grows, and one-token steps keep no memory (the long-run RSS check is in benchmarks/)."""
    import tracemalloc
    _, _, m = built(name)
    st = m.new_state()
    size = st.nbytes
    m.step(st, IDS)
    for t in range(5):                                # warm up (compile, scratch)
        m.step(st, [t + 2])
    tracemalloc.start()
    for t in range(40):                               # the first traced steps fill one-time caches
        m.step(st, [t + 2])
    base = tracemalloc.get_traced_memory()[0]
    for t in range(40):
        m.step(st, [(t * 7) % 290 + 2])
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert st.nbytes == size and st.length == len(IDS) + 85
    assert grown < 1024, f"{grown} bytes kept over 40 steps"

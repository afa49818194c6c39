"""CUDA kernels of the recurrent families (kernels_cuda/ssm.py, wkv.py, xlstm.py) against their NumPy
references and the CPU kernels, and the device runner (edgerun/runner_cuda_recurrent.py): GPU logits
equal the CPU backend's for Mamba, Mamba-2, RWKV v4-v7 and both xLSTM layouts.

Without a GPU the kernel tests run under the CUDA simulator (as tests/test_cuda.py sets up) on tiny,
awkward shapes; whole models run only on a GPU (marker ``gpu``):
``pytest tests/test_cuda_recurrent.py -m "gpu or not gpu"``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cuda_setup import SIM, cuda  # noqa: E402,F401  (sets up the simulator, or skips)

from edgerun.kernels_numba import ssm as cpu_ssm, wkv as cpu_wkv, xlstm as cpu_xl  # noqa: E402
from edgerun.kernels_cuda import ssm as g_ssm, wkv as g_wkv, xlstm as g_xl  # noqa: E402

rng = np.random.default_rng(11)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a, np.float32) if np.asarray(a).dtype == np.float64 else
                          np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def check(got, ref, tol, what):
    got = host(got).astype(np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err = np.abs(got - ref)
    scale = max(np.abs(ref).max(), 1e-30)
    assert err.max() <= tol * scale, \
        f"{what}: max err {err.max():.3g} (rel {err.max() / scale:.3g}), mean {err.mean():.3g}"


def f(*shape, s=1.0):
    return (rng.standard_normal(shape) * s).astype(np.float32)


TOL = 2e-5


# ------------------------------------------------------------------ Mamba: conv, selective scan, SSD

@pytest.mark.parametrize("T,C,K,bias", [(1, 37, 4, True), (5, 70, 3, False), (2, 33, 4, True)])
def test_causal_conv1d(T, C, K, bias):
    x, st, w = f(T, C), f(K - 1, C), f(K, C)
    b = f(C) if bias else np.zeros(0, np.float32)
    ref, ref_st = cpu_ssm.causal_conv1d_ref(x, st, w, b, True)
    cpu_out, cpu_st = np.empty_like(x), st.copy()
    cpu_ssm.causal_conv1d(x, cpu_st, w, b, True, cpu_out)
    gst, out = dev(st), cuda.device_array((T, C), np.float32)
    g_ssm.causal_conv1d(dev(x), gst, dev(w), dev(b), True, out)
    check(out, ref, TOL, "conv out")
    check(out, cpu_out, TOL, "conv out vs cpu")
    check(gst, ref_st, 0, "conv state")


def test_causal_conv1d_strided_input():
    """The models pass x as a column slice of a wider projection."""
    T, C = 3, 21
    xz, st, w, b = f(T, 2 * C), f(3, C), f(4, C), f(C)
    ref, ref_st = cpu_ssm.causal_conv1d_ref(xz[:, :C], st, w, b, True)
    gxz, gst, out = dev(xz), dev(st), cuda.device_array((T, C), np.float32)
    g_ssm.causal_conv1d(gxz[:, :C], gst, dev(w), dev(b), True, out)
    check(out, ref, TOL, "conv out")
    check(gst, ref_st, 0, "conv state")


@pytest.mark.parametrize("T,d,N", [(1, 37, 5), (6, 70, 3)])
def test_selective_scan(T, d, N):
    x, dt, z = f(T, d), f(T, d), f(T, d)
    A = -np.exp(f(N, d, s=0.5))
    B, C, D, bias, h = f(T, N), f(T, N), f(d), f(d), f(N, d)
    ref, ref_h = cpu_ssm.selective_scan_ref(x, dt, A, B, C, D, z, bias, h)
    cpu_out, cpu_h = np.empty_like(x), h.copy()
    cpu_ssm.selective_scan(x, dt, A, B, C, D, z, bias, cpu_h, np.empty((2, d), np.float32), cpu_out)
    gh, out = dev(h), cuda.device_array((T, d), np.float32)
    xdbl = dev(np.concatenate([B, C], 1))                    # B, C as column slices, as the model passes them
    g_ssm.selective_scan(dev(x), dev(dt), dev(A), xdbl[:, :N], xdbl[:, N:], dev(D), dev(z), dev(bias), gh, None, out)
    check(out, ref, TOL, "scan out")
    check(out, cpu_out, TOL, "scan out vs cpu")
    check(gh, ref_h, TOL, "scan state")


def test_rms_norm_segments():
    x = f(2, 19)
    bounds = np.array([0, 3, 11, 19], np.int64)
    want = x.copy()
    cpu_ssm.rms_norm_segments(want, bounds, np.float32(1e-6))
    gx = dev(x)
    g_ssm.rms_norm_segments(gx, dev(bounds), 1e-6)
    check(gx, want, TOL, "segments")


@pytest.mark.parametrize("T,H,P,N,G,limit", [(1, 6, 11, 7, 3, (0.0, np.inf)), (7, 5, 8, 9, 1, (0.002, 0.03)),
                                             (3, 4, 17, 35, 2, (0.0, np.inf))])
def test_ssd_scan(T, H, P, N, G, limit):
    xbc, dt = f(T, H * P + 2 * G * N), f(T, H)
    A, D, bias, h = -np.exp(f(H, s=0.5)), f(H), f(H), f(H, P, N)
    ref, ref_h = cpu_ssm.ssd_scan_ref(xbc, dt, A, D, bias, h, G, limit)
    lo, hi = np.float32(limit[0]), np.float32(limit[1])
    cpu_out, cpu_h = np.empty((T, H * P), np.float32), h.copy()
    if T == 1:
        cpu_ssm.ssd_step(xbc, dt, A, D, bias, cpu_h, G, lo, hi, cpu_out)
    else:
        cpu_ssm.ssd_chunked(xbc, dt, A, D, bias, cpu_h, G, 4, lo, hi, cpu_out)
    gh, out = dev(h), cuda.device_array((T, H * P), np.float32)
    g_ssm.ssd_scan(dev(xbc), dev(dt), dev(A), dev(D), dev(bias), gh, G, lo, hi, out)
    check(out, ref, TOL, "ssd out")
    check(out, cpu_out, 1e-4, "ssd out vs cpu")
    check(gh, ref_h, TOL, "ssd state")


def test_gated_rms_norm():
    y, z, w = f(3, 24), f(3, 24), f(24)
    ref = cpu_ssm.gated_rms_norm_ref(y, z, w, 8, 1e-5)
    out = cuda.device_array((3, 24), np.float32)
    g_ssm.gated_rms_norm(dev(y), dev(z), dev(w), 8, 1e-5, out)
    check(out, ref, TOL, "gated norm")


# ------------------------------------------------------------------ RWKV: WKV v4 / v5-6 / v7, v7 tail, norms, shift

@pytest.mark.parametrize("T,C", [(1, 37), (5, 70)])
def test_wkv4(T, C):
    k, v, u, w = f(T, C), f(T, C), f(C, s=0.5), -np.exp(f(C, s=0.5))
    aa, bb, pp = f(C), np.abs(f(C)) + 0.5, f(C)
    bb[:3] = 0                                            # channels with no history yet
    ref = cpu_wkv.wkv4_ref(k, v, u, w, aa, bb, pp)
    cpu = [a.copy() for a in (aa, bb, pp)]
    cpu_out = np.empty_like(k)
    cpu_wkv.wkv4_serial(k, v, u, w, *cpu, cpu_out)
    g = [dev(a) for a in (aa, bb, pp)]
    out = cuda.device_array((T, C), np.float32)
    g_wkv.wkv4(dev(k), dev(v), dev(u), dev(w), *g, out)
    check(out, ref[0], TOL, "wkv4 out")
    check(out, cpu_out, TOL, "wkv4 out vs cpu")
    for name, got, want in zip(("aa", "bb", "pp"), g, ref[1:]):
        check(got, want, TOL, f"wkv4 {name}")


@pytest.mark.parametrize("T,H,N", [(1, 3, 8), (4, 2, 13)])
def test_wkv6(T, H, N):
    C = H * N
    r, k, v = f(T, C), f(T, C), f(T, C)
    w = np.exp(-np.exp(f(T, C, s=0.5))).astype(np.float32)
    u, s = f(C, s=0.5), f(H, N, N)
    ref, ref_s = cpu_wkv.wkv6_ref(r, k, v, w, u, s)
    cpu_out, cpu_s = np.empty_like(r), s.copy()
    cpu_wkv.wkv6_serial(r, k, v, w, u, cpu_s, cpu_out)
    gs, out = dev(s), cuda.device_array((T, C), np.float32)
    g_wkv.wkv6(dev(r), dev(k), dev(v), dev(w), dev(u), gs, out)
    check(out, ref, TOL, "wkv6 out")
    check(out, cpu_out, TOL, "wkv6 out vs cpu")
    check(gs, ref_s, TOL, "wkv6 state")


@pytest.mark.parametrize("T,H,N", [(1, 2, 8), (3, 1, 37)])
def test_wkv7(T, H, N):
    C = H * N
    r, k, v = f(T, C), f(T, C), f(T, C)
    w = np.exp(-0.6 / (1 + np.exp(-f(T, C)))).astype(np.float32)
    kk = f(T, H, N)
    kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).reshape(T, C).astype(np.float32)
    a, b = -kk, (kk * 0.5).astype(np.float32)
    s = f(H, N, N, s=0.3)
    ref, ref_s = cpu_wkv.wkv7_ref(r, w, k, v, a, b, s)
    gs, out = dev(s), cuda.device_array((T, C), np.float32)
    g_wkv.wkv7(dev(r), dev(w), dev(k), dev(v), dev(a), dev(b), gs, out)
    check(out, ref, TOL, "wkv7 out")
    check(gs, ref_s, TOL, "wkv7 state")


@pytest.mark.parametrize("T,H,N,layer0", [(1, 2, 8, True), (3, 2, 37, False)])
def test_v7_tail(T, H, N, layer0):
    C = H * N
    r, wl, k, v, al, g = f(T, C), f(T, C), f(T, C), f(T, C), f(T, C), f(T, C)
    vl, vfirst = (np.zeros((0, 0), np.float32),) * 2 if layer0 else (f(T, C), f(T, C))
    p = [f(C, s=0.5) for _ in range(6)] + [1 + f(C, s=0.2), f(C, s=0.2)]      # w0 a0 v0 k_k k_a r_k lnx_w lnx_b
    s = f(H, N, N, s=0.3)
    ref_out, ref_k, ref_v, ref_s = cpu_wkv.v7_tail_ref(r, wl, k, v, al, vl, vfirst, g, *p, 64e-5, s)
    gk, gv, gs = dev(k), dev(v), dev(s)
    out = cuda.device_array((T, C), np.float32)
    g_wkv.v7_tail(dev(r), dev(wl), gk, gv, dev(al), dev(vl), dev(vfirst), dev(g), *[dev(x) for x in p], 64e-5, gs, out)
    check(out, ref_out, 1e-4, "v7 tail out")
    check(gk, ref_k, TOL, "v7 tail k")
    check(gv, ref_v, TOL, "v7 tail v")
    check(gs, ref_s, 1e-4, "v7 tail state")


def test_norms_shift_and_gates():
    T, C, G = 3, 40, 5
    x, w, b, prev = f(T, C), f(C), f(C), f(C)
    out = cuda.device_array((T, C), np.float32)
    g_wkv.layer_norm(dev(x), dev(w), dev(b), 1e-5, out)
    check(out, cpu_wkv.layer_norm_ref(x, w, b, 1e-5), TOL, "layer norm")
    g_wkv.group_norm(dev(x), G, dev(w), dev(b), 64e-5, out)
    check(out, cpu_wkv.group_norm_ref(x, G, w, b, 64e-5), TOL, "group norm")
    mix, dyn = f(4, C), f(4, T, C)
    mo = cuda.device_array((4, T, C), np.float32)
    g_wkv.shift_mix(dev(x), dev(prev), dev(mix), mo)
    check(mo, cpu_wkv.shift_mix_ref(x, prev, mix), TOL, "shift mix")
    g_wkv.shift_mix_dyn(dev(x), dev(prev), dev(mix), dev(dyn), mo)
    check(mo, cpu_wkv.shift_mix_dyn_ref(x, prev, mix, dyn), TOL, "shift mix dyn")
    y = f(T, C)
    sig = 1 / (1 + np.exp(-y.astype(np.float64)))
    for op, want in ((g_wkv.EW_SIGMOID_MUL, x * sig), (g_wkv.EW_RELU_SQ, np.maximum(x, 0) ** 2),
                     (g_wkv.EW_SILU_MUL, x * y * sig), (g_wkv.EW_TANH, np.tanh(x)),
                     (g_wkv.EW_SIGMOID, 1 / (1 + np.exp(-x.astype(np.float64)))),
                     (g_wkv.EW_DECAY, np.exp(-np.exp(x.astype(np.float64))))):
        gx = dev(x)
        g_wkv.ew(gx, dev(y), op)
        check(gx, want, TOL, f"ew {op}")
    row = cuda.device_array(C, np.float32)
    g_wkv.copy_row(dev(x), T - 1, row)
    check(row, x[-1], 0, "copy row")


# ------------------------------------------------------------------ xLSTM: mLSTM, sLSTM, headwise projections, gates

@pytest.mark.parametrize("T,NH,DK,DV,cap", [(1, 2, 5, 7, 15.0), (6, 3, 8, 4, 0.0)])
def test_mlstm(T, NH, DK, DV, cap):
    q, k, v = f(T, NH * DK), f(T, NH * DK), f(T, NH * DV)
    ig, fg, ib, fb = f(T, NH), f(T, NH), f(NH), f(NH) + 2
    C, n, m = f(NH, DK, DV, s=0.3), f(NH, DK, s=0.3), f(NH, s=0.3)
    nw = 1 + f(NH * DV, s=0.2)
    ref, ref_C, ref_n, ref_m = cpu_xl.mlstm_recurrent_ref(q, k, v, ig, fg, ib, fb, cap, C, n, m, 1e-6, nw, 1e-5)
    cpu = [a.copy() for a in (C, n, m)]
    cpu_out = np.empty((T, NH * DV), np.float32)
    a = (q, k, v, ig, fg, ib, fb, np.float32(cap), *cpu, np.float32(1e-6), nw, np.float32(1e-5))
    if T == 1:
        cpu_xl.mlstm_step(*a, cpu_out)
    else:
        cpu_xl.mlstm_chunkwise(*a, 4, cpu_out)
    gC, gn, gm = dev(C), dev(n), dev(m)
    out = cuda.device_array((T, NH * DV), np.float32)
    g_xl.mlstm_step(dev(q), dev(k), dev(v), dev(ig), dev(fg), dev(ib), dev(fb), cap, gC, gn, gm, 1e-6, dev(nw), 1e-5, out)
    check(out, ref, 1e-4, "mlstm out")
    check(out, cpu_out, 1e-4, "mlstm out vs cpu")
    check(gC, ref_C, TOL, "mlstm C")
    check(gn, ref_n, TOL, "mlstm n")
    check(gm, ref_m, TOL, "mlstm m")


@pytest.mark.parametrize("T,NH,d,fresh", [(1, 2, 5, True), (5, 3, 4, False), (3, 1, 37, True)])
def test_slstm(T, NH, d, fresh):
    D = NH * d
    wx, R, b = f(T, 4 * D), f(NH, 4, d, d, s=0.3), f(4 * D)
    state = np.zeros((4, D), np.float32) if fresh else np.stack([f(D), f(D), np.abs(f(D)) + 0.5, f(D)])
    nw = 1 + f(D, s=0.2)
    ref, ref_state = cpu_xl.slstm_ref(wx, R, b, state, nw, 1e-5)
    cpu_state, cpu_out = state.copy(), np.empty((T, D), np.float32)
    cpu_xl.slstm(wx, R, b, cpu_state, nw, np.float32(1e-5), np.empty((4, d), np.float32), cpu_out)
    gs, out = dev(state), cuda.device_array((T, D), np.float32)
    g_xl.slstm(dev(wx), dev(R), dev(b), gs, dev(nw), 1e-5, None, out)
    check(out, ref, 1e-4, "slstm out")
    check(out, cpu_out, 1e-4, "slstm out vs cpu")
    check(gs, ref_state, 1e-4, "slstm state")


def test_headwise_and_gates():
    T = 2
    x, w = f(T, 3 * 7), f(3, 5, 7)
    out = cuda.device_array((T, 15), np.float32)
    g_xl.headwise_linear(dev(x), dev(w), out)
    check(out, cpu_xl.headwise_linear_ref(x, w), TOL, "headwise")
    w2 = f(4, 21)
    o2 = cuda.device_array((T, 4), np.float32)
    g_xl.small_gemm(dev(x), dev(w2), o2)
    check(o2, x.astype(np.float64) @ w2.T, TOL, "small gemm")
    a, b, z, skip = f(T, 9), f(T, 9), f(T, 9), f(9)
    runs = {"sigmoid_mul": lambda g: g_xl.sigmoid_mul(g, dev(b)),
            "silu_mul": lambda g: g_xl.silu_mul(dev(a), dev(b), g),
            "gelu_mul": lambda g: g_xl.gelu_mul(dev(a), dev(b), g),
            "skip_silu": lambda g: g_xl.skip_silu_gate(g, dev(skip), dev(b), dev(z)),
            "softcap": lambda g: g_xl.softcap_(g, 3.0)}
    for name, run in runs.items():
        cpu = a.copy()
        if name == "sigmoid_mul":
            cpu_xl.sigmoid_mul(cpu, b)
        elif name == "silu_mul":
            cpu_xl.silu_mul(a, b, cpu)
        elif name == "gelu_mul":
            cpu_xl.gelu_mul(a, b, cpu)
        elif name == "skip_silu":
            cpu_xl.skip_silu_gate(cpu, skip, b, z)
        else:
            cpu_xl.softcap_(cpu, np.float32(3.0))
        g = dev(a)
        run(g)
        check(g, cpu, TOL, name)


# ------------------------------------------------------------------ whole models: GPU logits = CPU logits

FIX = Path(os.environ.get("EDGERUN_RWKV_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"
                          / "rwkv-tiny"))
if not FIX.is_dir():
    FIX = Path("/work/shared/fixtures/rwkv-tiny")


def _compare(path, n_ids=9, prompt_len=5, seed=0, vocab=256):
    """forward, prefill then one-token steps (the recorded plan), fork and rollback: GPU == CPU to 1e-3."""
    import edgerun
    from edgerun.backend import get_backend
    ops = get_backend("cuda")
    old, ops.act_quant = ops.act_quant, False          # float32 activations on both sides
    try:
        _compare_float(edgerun.load(path, act_quant=False), edgerun.load(path, device="cuda"), path, n_ids,
                       prompt_len, seed, vocab)
    finally:
        ops.act_quant = old


def _compare_float(cpu, gpu, path, n_ids, prompt_len, seed, vocab):
    ids = [int(i) for i in np.random.default_rng(seed).integers(2, vocab, n_ids)]
    check(gpu.forward(ids), cpu.forward(ids), 1e-3, f"{path.name} forward")
    st_c, st_g = cpu.new_state(), gpu.new_state()
    st_g.keep_checkpoints(2)
    check(gpu.step(st_g, ids[:prompt_len]), cpu.step(st_c, ids[:prompt_len]), 1e-3, f"{path.name} prefill")
    fork_c, fork_g = st_c.fork(), st_g.fork()
    for t in ids[prompt_len:]:
        check(gpu.step(st_g, [t]), cpu.step(st_c, [t]), 1e-3, f"{path.name} step")
    check(gpu.step(fork_g, ids[prompt_len:]), cpu.step(fork_c, ids[prompt_len:]), 1e-3, f"{path.name} fork")
    st_g.rollback(1)
    check(gpu.step(st_g, ids[-1:]), cpu.forward(ids)[-1:], 1e-3, f"{path.name} rollback")
    assert st_g.length == len(ids)


HF_MODELS = {
    "mamba": ("MambaForCausalLM", dict(hidden_size=24, state_size=5, time_step_rank=3)),
    "falcon_mamba": ("FalconMambaForCausalLM", dict(hidden_size=20, state_size=7, time_step_rank=5, conv_kernel=3,
                                                    tie_word_embeddings=False)),
    "mamba2": ("Mamba2ForCausalLM", dict(hidden_size=24, num_heads=6, head_dim=8, state_size=7, n_groups=3,
                                         chunk_size=4)),
    # int8 weights (the CPU side with float activations: both dequantize the same int8 values)
    "mamba2-int8": ("Mamba2ForCausalLM", dict(hidden_size=64, num_heads=8, head_dim=16, state_size=8, n_groups=2,
                                              chunk_size=8)),
}


# under the simulator a whole model takes minutes on 2 cores: slow there (-m slow), the default on a GPU
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if SIM else []) for n in HF_MODELS])
def test_mamba_gpu_equals_cpu(hf_dir_factory, name):
    from conftest import convert_and_load  # noqa: F401  (the tiny-model helpers)
    from edgerun.converters import convert
    arch, cfg = HF_MODELS[name]
    _, d = hf_dir_factory(arch, **cfg)
    out = d.parent / f"{name}.edr"
    convert(d, out, quant="int8" if name.endswith("int8") else "f32", progress=False)
    _compare(out, vocab=300)


RWKV_FIXTURES = ["4v0-660K", "5v1-730K", "5v2-730K", "7v0-834K"]


def _truncated_pth(src: Path, dst: Path, layers: int) -> Path:
    """The first ``layers`` blocks of a BlinkDL checkpoint (the simulator runs a 12-layer model slowly)."""
    torch = pytest.importorskip("torch")
    sd = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < layers}, dst)
    return dst


@pytest.mark.gpu
@pytest.mark.skipif(not FIX.is_dir(), reason="shared/fixtures/rwkv-tiny not found")
@pytest.mark.parametrize("name", RWKV_FIXTURES)
def test_rwkv_gpu_equals_cpu(tmp_path, name):
    """rwkv.cpp's tiny trained v4, v5.1, v5.2 and v7 models (2 of their layers under the simulator)."""
    from edgerun.converters.rwkv import convert_rwkv
    src = FIX / f"tiny-rwkv-{name}.pth"
    if SIM:
        src = _truncated_pth(src, tmp_path / "t.pth", 2)
    convert_rwkv(src, tmp_path / "m.edr", "f32")
    _compare(tmp_path / "m.edr")


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["6", "5.1"])
def test_rwkv_random_gpu_equals_cpu(tmp_path, version):
    """v6 (data-dependent lerps and decay through LoRA) and v5.1 (gate) from random BlinkDL checkpoints."""
    from edgerun.converters.rwkv import convert_rwkv
    from test_rwkv import _random_blinkdl, _torch_save
    _torch_save(_random_blinkdl(version, C=32, N=8, L=2, F=64), tmp_path / "m.pth")
    convert_rwkv(tmp_path / "m.pth", tmp_path / "m.edr", "f32")
    _compare(tmp_path / "m.edr")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(hidden_size=32, num_heads=2, chunk_size=4),
                                 dict(hidden_size=48, num_heads=4, chunk_size=8, ffn_proj_factor=1.3,
                                      gate_soft_cap=5.0, output_logit_soft_cap=10.0)], ids=["2heads", "4heads-caps"])
def test_xlstm_gpu_equals_cpu(tmp_path, cfg):
    """transformers' xLSTMForCausalLM (the xLSTM-7B layout), tiny and random."""
    from conftest import save_hf
    from edgerun.converters import convert
    from test_xlstm import make_xlstm_hf
    d = save_hf(make_xlstm_hf(**cfg), tmp_path / "hf")
    convert(d, tmp_path / "m.edr", quant="f32", progress=False)
    _compare(tmp_path / "m.edr", vocab=300)


@pytest.mark.gpu
def test_xlstm_lm_gpu_equals_cpu(tmp_path):
    """NX-AI's mixed mLSTM / sLSTM stack. Built with the ``xlstm`` package; where it is missing (a GPU
    machine), from a directory that EDGERUN_NXAI_DIR names (one this test saved elsewhere)."""
    from edgerun.converters import convert
    d = os.environ.get("EDGERUN_NXAI_DIR")
    if not d:
        pytest.importorskip("xlstm")
        from test_xlstm import _nxai_model, _save_nxai
        model, cfg = _nxai_model(num_blocks=3, slstm_at=(1,), E=32)
        d = _save_nxai(model, cfg, tmp_path / "nx")
        if os.environ.get("EDGERUN_SAVE_NXAI_DIR"):
            import shutil
            shutil.copytree(d, os.environ["EDGERUN_SAVE_NXAI_DIR"], dirs_exist_ok=True)
    convert(Path(d), tmp_path / "m.edr", quant="f32", progress=False)
    _compare(tmp_path / "m.edr", vocab=300)


# ------------------------------------------------------------------ the device state and the runner choice (fast)

def test_device_state_fork_save_restore_rollback(tmp_path):
    from edgerun.backend import get_backend
    from edgerun.errors import InputError, ModelFileError
    from edgerun.runner_cuda_recurrent import DeviceState
    ops = get_backend("cuda")
    st = DeviceState({"a": (3,), "b": (2, 2)}, 2, ops, model_hash="sha256:x")
    assert not host(st["a"]).any() and st.nbytes == 4 * (6 + 8)
    st.keep_checkpoints(2)
    vals = f(2, 3)
    st["a"].copy_to_device(vals)
    st.length = 5
    st.checkpoint()
    other = st.fork()
    st["a"].copy_to_device(vals + 1)
    st.length = 6
    st.checkpoint()
    check(other["a"], vals, 0, "fork keeps its own copy")
    st.save(tmp_path / "s.safetensors")
    st.rollback(1)
    assert st.length == 5
    check(st["a"], vals, 0, "rollback")
    with pytest.raises(InputError):
        st.rollback(3)
    st.restore(tmp_path / "s.safetensors")
    assert st.length == 6
    check(st["a"], vals + 1, 0, "restore")
    with pytest.raises(ModelFileError, match="another model"):
        DeviceState(st.spec, 2, ops, model_hash="sha256:y").restore(tmp_path / "s.safetensors")
    st.reset()
    assert st.length == 0 and not host(st["a"]).any()


def test_recurrent_models_get_the_device_runner(hf_dir_factory, tmp_path):
    """load(device='cuda') of a recurrent model builds its device runner (weights uploaded, no forward run)."""
    import edgerun
    from edgerun.converters import convert
    from edgerun.runner_cuda_recurrent import DeviceMamba, DeviceState
    _, d = hf_dir_factory("MambaForCausalLM", hidden_size=16, state_size=4, time_step_rank=2)
    convert(d, tmp_path / "m.edr", quant="int8", progress=False)
    m = edgerun.load(tmp_path / "m.edr", device="cuda")
    assert isinstance(m.model, DeviceMamba)
    st = m.new_state()
    assert isinstance(st, DeviceState) and st.model_hash == m.file.content_hash
    assert st.spec == edgerun.load(tmp_path / "m.edr").new_state().spec

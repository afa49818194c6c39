"""xLSTM: mLSTM / sLSTM kernels against plain NumPy references of the paper's equations, the
xLSTM-7B layout against transformers' xLSTMForCausalLM (full forward and its cached decode), NX-AI's
mixed mLSTM/sLSTM xLSTMLMModel against the `xlstm` package itself (vanilla and cuda sLSTM
layouts), chunkwise prefill == recurrence, long-run stability and the recurrent state's contract.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgerun.kernels_numba import xlstm as X

F32_TOL = 1e-4            # max |edgerun - reference| / max |ref| for logits
KERNEL_TOL = 2e-5         # kernel (float32) vs float64 reference, relative to max |ref|


def _err(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _f(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------ kernels

def _mlstm_inputs(T, NH, DK, DV, seed=0, gate_scale=3.0):
    rng = np.random.default_rng(seed)
    q, k, v = _f(rng, T, NH * DK), _f(rng, T, NH * DK), _f(rng, T, NH * DV)
    ig, fg = _f(rng, T, NH, scale=gate_scale), _f(rng, T, NH, scale=gate_scale)
    ib, fb = _f(rng, NH), _f(rng, NH) + 2
    nw = 1 + _f(rng, NH * DV, scale=0.2)
    C0, n0, m0 = _f(rng, NH, DK, DV, scale=0.1), _f(rng, NH, DK, scale=0.1), _f(rng, NH)
    return (q, k, v, ig, fg, ib, fb), nw, (C0, n0, m0)


@pytest.mark.parametrize("cap", [15.0, 0.0])
def test_mlstm_step_matches_reference(cap):
    (q, k, v, ig, fg, ib, fb), nw, (C0, n0, m0) = _mlstm_inputs(11, 3, 5, 7)
    ref, Cr, nr, mr = X.mlstm_recurrent_ref(q, k, v, ig, fg, ib, fb, cap, C0, n0, m0, 1e-6, nw, 1e-6)
    C, n, m = C0.copy(), n0.copy(), m0.copy()
    out = np.empty_like(v)
    for t in range(q.shape[0]):
        s = slice(t, t + 1)
        X.mlstm_step(q[s], k[s], v[s], ig[s], fg[s], ib, fb, np.float32(cap), C, n, m, np.float32(1e-6), nw,
                     np.float32(1e-6), out[s])
    assert _err(out, ref) < KERNEL_TOL, f"h: {_err(out, ref):.3g}"
    assert _err(C, Cr) < KERNEL_TOL and _err(n, nr) < KERNEL_TOL and _err(m, mr) < KERNEL_TOL


def test_parallel_form_equals_recurrence_ref():
    """The two NumPy references (paper eq. recurrent vs parallel) agree: the refs check each other."""
    (q, k, v, ig, fg, ib, fb), nw, (C0, n0, m0) = _mlstm_inputs(17, 2, 4, 6, seed=1)
    rec = X.mlstm_recurrent_ref(q, k, v, ig, fg, ib, fb, 15.0, C0, n0, m0, 1e-6, nw, 1e-6)[0]
    par = X.mlstm_parallel_ref(q, k, v, ig, fg, ib, fb, 15.0, C0, n0, m0, 1e-6, nw, 1e-6)
    assert _err(par, rec) < 1e-5


@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 16, 64])           # 23 tokens: none but 1 divides it
def test_mlstm_chunkwise_equals_recurrence(chunk):
    (q, k, v, ig, fg, ib, fb), nw, (C0, n0, m0) = _mlstm_inputs(23, 3, 5, 7, seed=2)
    ref, Cr, nr, mr = X.mlstm_recurrent_ref(q, k, v, ig, fg, ib, fb, 15.0, C0, n0, m0, 1e-6, nw, 1e-6)
    C, n, m = C0.copy(), n0.copy(), m0.copy()
    out = np.empty_like(v)
    X.mlstm_chunkwise(q, k, v, ig, fg, ib, fb, np.float32(15.0), C, n, m, np.float32(1e-6), nw,
                      np.float32(1e-6), chunk, out)
    assert _err(out, ref) < KERNEL_TOL, f"chunk {chunk}: h {_err(out, ref):.3g}"
    for got, want in ((C, Cr), (n, nr), (m, mr)):
        assert _err(got, want) < KERNEL_TOL, f"chunk {chunk}: state {_err(got, want):.3g}"


def test_mlstm_chunkwise_stable_over_10000_tokens():
    """Strong gates over 10,000 tokens: no inf/nan, the stabilised state stays bounded, and the
    chunkwise form still equals the step recurrence at the end."""
    (q, k, v, ig, fg, ib, fb), nw, _ = _mlstm_inputs(10_000, 2, 8, 8, seed=3, gate_scale=10.0)
    fb[:] = 6.0                                        # forget gates near 1: long memory
    C, n, m = np.zeros((2, 8, 8), np.float32), np.zeros((2, 8), np.float32), np.zeros(2, np.float32)
    out = np.empty_like(v)
    X.mlstm_chunkwise(q, k, v, ig, fg, ib, fb, np.float32(15.0), C, n, m, np.float32(1e-6), nw,
                      np.float32(1e-6), 64, out)
    assert np.isfinite(out).all() and np.isfinite(C).all() and np.isfinite(n).all() and np.isfinite(m).all()
    assert np.abs(C).max() < 1e4 and np.abs(n).max() < 1e4, (np.abs(C).max(), np.abs(n).max())
    C2, n2, m2 = np.zeros_like(C), np.zeros_like(n), np.zeros_like(m)
    out2 = np.empty_like(v)
    X.mlstm_chunkwise(q, k, v, ig, fg, ib, fb, np.float32(15.0), C2, n2, m2, np.float32(1e-6), nw,
                      np.float32(1e-6), 1, out2)        # chunk 1 = the recurrence
    assert _err(out[-50:], out2[-50:]) < 1e-4 and _err(C, C2) < 1e-4


@pytest.mark.parametrize("T,NH,d", [(1, 1, 3), (13, 3, 5), (9, 4, 8)])
def test_slstm_matches_reference(T, NH, d):
    rng = np.random.default_rng(T)
    D = NH * d
    wx, R, b = _f(rng, T, 4 * D), _f(rng, NH, 4, d, d, scale=0.3), _f(rng, 4 * D)
    nw = 1 + _f(rng, D, scale=0.1)
    state = np.zeros((4, D), np.float32)
    ref, sref = X.slstm_ref(wx, R, b, state, nw, 1e-5)
    out, ws = np.empty((T, D), np.float32), np.empty((4, d), np.float32)
    h = max(T // 2, 1)                                  # in two calls: the state carries over
    X.slstm(wx[:h], R, b, state, nw, np.float32(1e-5), ws, out[:h])
    if h < T:
        X.slstm(wx[h:], R, b, state, nw, np.float32(1e-5), ws, out[h:])
    assert _err(out, ref) < KERNEL_TOL and _err(state, sref) < KERNEL_TOL


def test_headwise_linear():
    rng = np.random.default_rng(5)
    x, w = _f(rng, 7, 4 * 5), _f(rng, 4, 3, 5)
    out = np.empty((7, 12), np.float32)
    X.headwise_linear(x, w, out)
    assert _err(out, X.headwise_linear_ref(x, w)) < KERNEL_TOL


# ------------------------------------------------------------------------------ xLSTM-7B layout vs transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import convert_and_load, hf_logits, save_hf, write_tokenizer  # noqa: E402

IDS = [int(t) for t in np.random.default_rng(0).integers(2, 300, 37)]     # 37: no chunk size divides it

# transformers' cached decode needs hidden*qk_dim_factor and hidden*v_dim_factor multiples of 64
HF_CASES = {
    "2heads": dict(hidden_size=128, num_heads=2, chunk_size=16),
    "4heads-ffn1.3": dict(hidden_size=128, num_heads=4, chunk_size=8, ffn_proj_factor=1.3,
                          gate_soft_cap=5.0, output_logit_soft_cap=10.0),
}


def make_xlstm_hf(seed=0, **cfg):
    c = transformers.xLSTMConfig(**{**dict(vocab_size=300, num_hidden_layers=2, autocast_kernel_dtype="float32",
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1), **cfg})
    torch.manual_seed(seed)
    model = transformers.xLSTMForCausalLM(c).float().eval()
    with torch.no_grad():                 # norms and gate biases random, so a wrong one shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            model = make_xlstm_hf(**HF_CASES[name])
            d = save_hf(model, tmp_path_factory.mktemp(name) / "hf")
            cache[name] = (model, d, convert_and_load(d, "f32"))
        return cache[name]
    return get


def _hf_cached(model, ids, prefill):
    """transformers' own prefill + one-token decode with its xLSTMCache."""
    with torch.no_grad():
        out = model(torch.tensor([ids[:prefill]]), use_cache=True)
        logits, cache = [out.logits[0]], out.cache
        for t in ids[prefill:]:
            out = model(torch.tensor([[t]]), cache=cache, use_cache=True)
            logits.append(out.logits[0])
            cache = out.cache
    return torch.cat(logits).numpy()


@pytest.mark.parametrize("name", list(HF_CASES))
def test_logits_match_transformers(name, built):
    model, d, m = built(name)
    ref = hf_logits(model, IDS)
    full = m.forward(IDS)
    assert full.shape == ref.shape and full.dtype == np.float32
    assert _err(full, ref) < F32_TOL, f"forward: {_err(full, ref):.3g}"
    st = m.new_state()
    steps = np.concatenate([m.step(st, [t]) for t in IDS])
    assert _err(steps, ref) < F32_TOL, f"step by step: {_err(steps, ref):.3g}"
    cached = _hf_cached(model, IDS, 20)
    assert _err(steps, cached) < F32_TOL, f"vs transformers' cached decode: {_err(steps, cached):.3g}"
    st = m.new_state()
    parts = [m.step(st, IDS[:2]), m.step(st, [IDS[2]]), m.step(st, IDS[3:30]), m.step(st, IDS[30:])]
    assert _err(np.concatenate(parts), ref) < F32_TOL, "prefill continuing from a carried state"


@pytest.mark.parametrize("chunk", [3, 5, 7, 64])
def test_chunkwise_prefill_equals_recurrence(chunk, built):
    model, d, m = built("2heads")
    st = m.new_state()
    steps = np.concatenate([m.step(st, [t]) for t in IDS])
    old = m.model.args.chunk_size
    m.model.args.chunk_size = chunk
    try:
        st2 = m.new_state()
        full = m.step(st2, IDS)
    finally:
        m.model.args.chunk_size = old
    assert _err(full, steps) < F32_TOL, f"chunk {chunk}: {_err(full, steps):.3g}"
    for name in ("C", "n", "m"):
        assert _err(st2[name], st[name]) < 1e-4, name


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


class _float_activations:
    """With a backend that quantizes activations to int8 against int8/int4 weights (act_quant),
    switch that off: the packed weights are then the only approximation, as in the reference."""

    def __init__(self, ops):
        self.ops, self.old = ops, getattr(ops, "act_quant", None)

    def __enter__(self):
        if self.old is not None:
            self.ops.act_quant = False

    def __exit__(self, *exc):
        if self.old is not None:
            self.ops.act_quant = self.old


@pytest.mark.parametrize("quant", ["f16", "int8", "int4"])
def test_packed_weights_match_dequantized_transformers(quant, built):
    model, d, m32 = built("2heads")
    m = convert_and_load(d, quant, group_size=32 if quant == "int4" else None)
    kinds = {n: x["kind"] for n, x in m.file.descriptors.items()}
    assert {k for n, k in kinds.items() if "igate_preact" in n or "fgate_preact" in n} == {"f32"}
    assert quant in set(kinds.values())
    ref = hf_logits(_dequantized_hf(model, m), IDS)
    with _float_activations(m.ops):
        got = m.forward(IDS)
        st = m.new_state()
        steps = np.concatenate([m.step(st, IDS[:9])] + [m.step(st, [t]) for t in IDS[9:]])
    assert _err(got, ref) < F32_TOL, f"{quant}: {_err(got, ref):.3g} vs dequantized transformers"
    assert _err(steps, got) < F32_TOL
    # the default schedule (int8 activations where the backend uses them) stays near it
    st = m.new_state()
    default = np.concatenate([m.step(st, IDS[:9])] + [m.step(st, [t]) for t in IDS[9:]])
    print(f"\n{quant}: default activations vs float: {_err(default, got):.3g}")
    assert _err(default, got) < 0.25


def test_long_sequence_is_stable(built):
    """10,000 tokens through the model (chunked prefill): finite logits, bounded state, and the
    last tokens decoded step by step equal the prefill's."""
    model, d, m = built("4heads-ffn1.3")
    ids = [int(t) for t in np.random.default_rng(1).integers(2, 300, 10_000)]
    st = m.new_state()
    logits = m.step(st, ids[:-20])
    assert np.isfinite(logits).all()
    fork = st.fork()
    tail = np.concatenate([m.step(st, [t]) for t in ids[-20:]])
    tail_prefill = m.step(fork, ids[-20:])
    assert np.isfinite(tail).all() and _err(tail, tail_prefill) < F32_TOL
    for name in ("C", "n", "m"):
        assert np.isfinite(st[name]).all() and np.abs(st[name]).max() < 1e4, name


# ------------------------------------------------------------------------------ recurrent state

def test_save_restore_rollback_fork(built, tmp_path):
    import edgerun
    from edgerun.errors import ModelFileError
    model, d, m = built("2heads")
    full = m.forward(IDS)
    st = m.new_state()
    m.step(st, IDS[:7])
    st.save(tmp_path / "s.state")
    m.step(st, [5, 6, 7])
    restored = edgerun.load_state(tmp_path / "s.state", m)
    assert restored.length == 7
    assert _err(np.concatenate([m.step(restored, IDS[7:20]), m.step(restored, IDS[20:])]), full[7:]) < 1e-5
    # rollback after a wrong draft
    st = m.new_state()
    st.keep_checkpoints(4)
    m.step(st, IDS[:10])
    for t in IDS[10:13]:
        m.step(st, [t])
    m.step(st, [11, 12, 13])
    st.rollback(3)
    assert st.length == 13
    fork = st.fork()
    assert _err(np.concatenate([m.step(st, [t]) for t in IDS[13:]]), full[13:]) < 1e-5
    assert _err(m.step(fork, IDS[13:]), full[13:]) < 1e-5
    # another model's state is refused
    _, _, other = built("4heads-ffn1.3")
    with pytest.raises(ModelFileError, match="another model"):
        other.new_state().restore(tmp_path / "s.state")


def test_decode_state_is_fixed_size_and_steps_allocate_nothing(built):
    import tracemalloc
    _, _, m = built("2heads")
    st = m.new_state()
    size = st.nbytes
    assert size == 4 * 2 * (2 * 32 * 64 + 2 * 32 + 2)          # float32 C, n, m for 2 blocks of 2 heads
    m.step(st, IDS)
    for t in range(5):
        m.step(st, [t + 2])
    tracemalloc.start()
    for t in range(20):
        m.step(st, [t + 2])
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    for t in range(40):
        m.step(st, [(t * 7) % 290 + 2])
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert st.nbytes == size and st.length == len(IDS) + 65
    assert cur - base < 4096, f"{cur - base} bytes kept over 40 steps"
    # per step only the returned logits (1, 300) and the embedded row (1, 128) are new arrays, plus
    # Python's small objects: the ~16 KB of activations a step computes live in the model's scratch
    assert peak - base < 300 * 4 + 128 * 4 + 4096, f"a step allocated {peak - base} bytes"


# ------------------------------------------------------------------------------ NX-AI xLSTMLMModel

def _nxai_model(seed=0, backend="vanilla", slstm_at=(1,), num_blocks=3, E=64):
    xl = pytest.importorskip("xlstm")
    cfg = xl.xLSTMLMModelConfig(
        mlstm_block=xl.mLSTMBlockConfig(mlstm=xl.mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4,
                                                                  num_heads=4)),
        slstm_block=xl.sLSTMBlockConfig(slstm=xl.sLSTMLayerConfig(backend=backend, num_heads=4, conv1d_kernel_size=4),
                                        feedforward=xl.FeedForwardConfig(proj_factor=1.3, act_fn="gelu")),
        context_length=64, num_blocks=num_blocks, embedding_dim=E, slstm_at=list(slstm_at), vocab_size=300)
    torch.manual_seed(seed)
    model = xl.xLSTMLMModel(cfg).eval()
    with torch.no_grad():                    # everything random (NX-AI initialises gates to zero)
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.normal_(0.0, 0.2)
            elif "_recurrent_kernel_" in name:
                p.normal_(0.0, 0.3)
            elif p.ndim == 1:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.15)
    return model, cfg


def _nxai_step_logits(model, ids):
    """NX-AI's own recurrent step function, token by token (the form edgerun's state follows: m_0 = 0)."""
    with torch.no_grad():
        state, out = None, []
        for t in ids:
            lg, state = model.step(torch.tensor([[t]]), state)
            out.append(lg[0])
    return torch.cat(out).numpy()


def _save_nxai(model, cfg, d, fmt="json", state_dict=None):
    from dataclasses import asdict
    from safetensors.torch import save_file
    d.mkdir(parents=True)
    c = asdict(cfg)
    if fmt == "json":
        (d / "config.json").write_text(json.dumps(c))
    else:
        import yaml
        (d / "config.yaml").write_text(yaml.safe_dump({"model": c, "training": {"lr": 1e-3}}))
    sd = {k: v.contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if fmt == "json":
        save_file(sd, str(d / "model.safetensors"))
    else:
        torch.save(sd, d / "model.pt")
    write_tokenizer(d)
    return d


def test_nxai_mixed_stack_matches_xlstm_package(tmp_path):
    model, cfg = _nxai_model()
    d = _save_nxai(model, cfg, tmp_path / "nx")
    m = convert_and_load(d, "f32")
    assert m.file.arch == "xLSTMLMModel" and m.config["block_map"] == [0, 1, 0]
    assert m.config["slstm_layout"] == "vanilla"
    ids = IDS[:30]
    ref = _nxai_step_logits(model, ids)
    with torch.no_grad():
        ref_parallel = model(torch.tensor([ids]))[0].numpy()
    full = m.forward(ids)
    assert _err(full, ref) < F32_TOL, f"forward vs xlstm step: {_err(full, ref):.3g}"
    st = m.new_state()
    steps = np.concatenate([m.step(st, ids[:11])] + [m.step(st, [t]) for t in ids[11:]])
    assert _err(steps, ref) < F32_TOL, f"steps vs xlstm step: {_err(steps, ref):.3g}"
    # NX-AI's parallel forward stabilises from m_0 = -inf, its step from m_0 = 0: the two differ only
    # where exp(-m) wins the denominator; with these weights they agree
    print(f"\nvs xlstm parallel forward: {_err(full, ref_parallel):.3g}")


def test_nxai_cuda_layout_is_detected_and_reordered(tmp_path):
    """A checkpoint saved from the cuda sLSTM backend (R (heads, d, 4d), bias head-major) gives the same
    logits as the vanilla one: the layout is read from R's shape, the bias reordered with it."""
    model, cfg = _nxai_model(seed=1, slstm_at=(0, 2), num_blocks=3)          # skips without the package
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda
    sd = dict(model.state_dict())
    for i in (0, 2):
        cell = model.xlstm_block_stack.blocks[i].xlstm.slstm_cell
        cuda_cell = sLSTMCell_cuda(cell.config, skip_backend_init=True)
        p = f"xlstm_block_stack.blocks.{i}.xlstm.slstm_cell."
        with torch.no_grad():
            sd[p + "_recurrent_kernel_"] = cuda_cell._recurrent_kernel_ext2int(cell._recurrent_kernel_int2ext(
                cell._recurrent_kernel_))
            sd[p + "_bias_"] = cuda_cell._bias_ext2int(cell._bias_int2ext(cell._bias_))
    ref = _nxai_step_logits(model, IDS[:20])
    m = convert_and_load(_save_nxai(model, cfg, tmp_path / "cuda", fmt="yaml", state_dict=sd), "f32")
    assert m.config["slstm_layout"] == "cuda"
    assert _err(m.forward(IDS[:20]), ref) < F32_TOL


def test_nxai_bad_slstm_kernel_is_refused(tmp_path):
    from edgerun.errors import ConversionError
    model, cfg = _nxai_model()
    sd = dict(model.state_dict())
    sd["xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_"] = torch.zeros(4, 32, 8)
    d = _save_nxai(model, cfg, tmp_path / "bad", state_dict=sd)
    with pytest.raises(ConversionError, match="neither the vanilla"):
        convert_and_load(d, "f32")


def test_nxai_state_fork_and_save(tmp_path):
    import edgerun
    model, cfg = _nxai_model(seed=2)
    m = convert_and_load(_save_nxai(model, cfg, tmp_path / "nx"), "f32")
    ids = IDS[:24]
    full = m.forward(ids)
    st = m.new_state()
    m.step(st, ids[:10])
    st.save(tmp_path / "s.state")
    fork = st.fork()
    a = np.concatenate([m.step(st, [t]) for t in ids[10:]])
    b = m.step(fork, ids[10:])
    c = m.step(edgerun.load_state(tmp_path / "s.state", m), ids[10:])
    for got in (a, b, c):
        assert _err(got, full[10:]) < 1e-5


@pytest.mark.slow
def test_10000_decode_steps_equal_prefill(built, tmp_path):
    """10,000 one-token steps (xLSTM-7B layout and NX-AI's mixed stack) end where one chunked
    prefill of the same tokens ends: same last logits, finite bounded state."""
    ids = [int(t) for t in np.random.default_rng(2).integers(2, 300, 10_000)]
    model, cfg = _nxai_model(seed=3)
    nx = convert_and_load(_save_nxai(model, cfg, tmp_path / "nx"), "f32")
    for m in (built("4heads-ffn1.3")[2], nx):
        st = m.new_state()
        for t in ids[:-1]:
            m.step(st, [t])
        last = m.step(st, [ids[-1]])
        st2 = m.new_state()
        ref = m.step(st2, ids, last_only=True)
        assert np.isfinite(last).all() and _err(last, ref) < F32_TOL, _err(last, ref)
        for name, a in st.arrays.items():
            assert np.isfinite(a).all() and np.abs(a).max() < 1e4, name

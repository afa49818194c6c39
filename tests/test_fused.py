"""The one-call decoder layer (kernels_numba/fused.py) against the op-by-op path and transformers.

Sizes are multiples of 32 (what int8 activations need, so every layer runs fused) but nothing
else: head_dim 16 and 8, GQA 3:1 and 4:1, MQA, 3 layers, vocab 300.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ACT_Q8_TOL, convert_and_load, hf_logits, rel_err  # noqa: E402

import edgerun  # noqa: E402
from edgerun.kernels_numba import fused  # noqa: E402

IDS = [5, 9, 33, 2, 7, 100, 3, 250, 17, 64, 1, 2, 3, 4, 5, 6, 7, 8]     # 18 > one 16-token KV block
F32_TOL = 1e-4
SAME_TOL = 1e-5

CASES = {
    "llama-gqa": ("LlamaForCausalLM", dict(hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                           num_key_value_heads=2, num_hidden_layers=3)),
    "qwen2-bias-tied": ("Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                 num_key_value_heads=1, tie_word_embeddings=True,
                                                 num_hidden_layers=3)),
    "qwen3-qknorm-hd8": ("Qwen3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=8, num_hidden_layers=3)),
    "mistral-window4": ("MistralForCausalLM", dict(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                                                   num_key_value_heads=2, sliding_window=4, num_hidden_layers=3)),
}


def steps(m, ids, **load):
    st = m.new_state()
    return np.concatenate([m.step(st, [t]) for t in ids])


def unfused(m, **load):
    """The same file loaded again with every layer forced op by op."""
    u = edgerun.load(m.file.path, **load)
    for layer in u.model.layers:
        layer.fused = None
    return u


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request, hf_dir_factory):
    cls, cfg = CASES[request.param]
    model, d = hf_dir_factory(cls, name=request.param, **cfg)
    return request.param, model, d


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16"])
def test_fused_float_kinds_equal_op_by_op(case, quant):
    name, model, d = case
    m = convert_and_load(d, quant)
    assert all(layer.fused is not None for layer in m.model.layers), "every layer should run fused"
    got = steps(m, IDS)
    ref = steps(unfused(m), IDS)
    assert rel_err(got, ref) < SAME_TOL, f"{name} {quant}: fused vs op by op {rel_err(got, ref):.3g}"
    if quant == "f32":
        err = rel_err(got, hf_logits(model, IDS))
        assert err < F32_TOL, f"{name}: fused decode vs transformers {err:.3g}"
        # a prompt then single steps: the prefill path writes the KV the fused steps read
        st = m.new_state()
        mixed = np.concatenate([m.step(st, IDS[:7])] + [m.step(st, [t]) for t in IDS[7:]])
        assert rel_err(mixed, got) < SAME_TOL


@pytest.mark.parametrize("quant,group", [("int8", None), ("int4", 32), ("int4_asym", 32), ("int4", 64)])
def test_fused_packed_kinds_within_activation_quantization(case, quant, group):
    """int8/int4 decode quantizes activations to int8 (fused and op by op alike); both stay within
    the stated activation-quantization error of the float-activation path."""
    name, model, d = case
    m = convert_and_load(d, quant, group_size=group)
    assert all(layer.fused is not None for layer in m.model.layers)
    exact = steps(edgerun.load(m.file.path, act_quant=False), IDS)
    if quant.startswith("int4") and group == 32 and fused.WIDE:     # the decode layer's 4-row tiles
        assert all(isinstance(w, fused.Int4Tiles) for w in m.model.layers[0].fused.head[3:10])
    got, opb = steps(m, IDS), steps(unfused(m), IDS)
    err_fused, err_opb = rel_err(got, exact), rel_err(opb, exact)
    print(f"\n{name} {quant}: fused {err_fused:.3g}, op by op {err_opb:.3g} vs float activations")
    assert err_fused < ACT_Q8_TOL and err_opb < ACT_Q8_TOL


def test_fused_ternary_equals_op_by_op(case):
    """Ternary (BitNet b1.58 2-bit) rows in the fused layer quantize activations per token exactly
    as the op-by-op kernels do: the same logits to float tolerance."""
    name, model, d = case
    m = convert_and_load(d, "ternary")
    assert all(layer.fused is not None for layer in m.model.layers)
    got, ref = steps(m, IDS), steps(unfused(m), IDS)
    assert rel_err(got, ref) < SAME_TOL, f"{name}: fused ternary vs op by op {rel_err(got, ref):.3g}"


def test_fused_sparse24_equals_op_by_op(hf_dir_factory):
    """2:4 int8 rows (vpexpandb) in the fused layer quantize activations per token as
    gemm_sparse24 does: the same logits as op by op; inputs that are whole 64-wide chunks fuse."""
    from edgerun.converters import convert
    from edgerun.kernels_numba.lowbit import EXPAND
    model, d = hf_dir_factory("LlamaForCausalLM", name="sparse24", hidden_size=128, intermediate_size=192,
                              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    out = d.parent / "sparse24.edr"
    convert(d, out, quant="int8", sparsity_pattern="2:4", progress=False)
    m = edgerun.load(out)
    if not EXPAND:
        assert all(layer.fused is None for layer in m.model.layers)
        pytest.skip("no AVX-512 VBMI2 here: 2:4 layers go op by op")
    assert all(layer.fused is not None for layer in m.model.layers)
    got, ref = steps(m, IDS), steps(unfused(m), IDS)
    assert rel_err(got, ref) < SAME_TOL, f"fused 2:4 vs op by op {rel_err(got, ref):.3g}"


def test_fused_int8_kv_cache(hf_dir_factory):
    cls, cfg = CASES["llama-gqa"]
    model, d = hf_dir_factory(cls, **cfg)
    m = convert_and_load(d, "f32")
    mq = edgerun.load(m.file.path, kv_dtype="int8")
    got = steps(mq, IDS)
    assert rel_err(got, steps(unfused(mq, kv_dtype="int8"), IDS)) < SAME_TOL
    assert rel_err(got, hf_logits(model, IDS)) < 2e-2          # int8 KV's own error


def test_layers_that_cannot_fuse_fall_back(hf_dir_factory):
    """hidden 72 is no multiple of 32: int8 activations can't be blocked, the layer goes op by op;
    act_quant=False never fuses."""
    model, d = hf_dir_factory("LlamaForCausalLM", hidden_size=72, intermediate_size=96,
                              num_attention_heads=6, num_key_value_heads=2)
    m = convert_and_load(d, "f32")
    assert all(layer.fused is None for layer in m.model.layers)
    assert rel_err(steps(m, IDS), hf_logits(model, IDS)) < F32_TOL
    cls, cfg = CASES["llama-gqa"]
    _, d2 = hf_dir_factory(cls, **cfg)
    assert all(layer.fused is None for layer in convert_and_load(d2, "f32", act_quant=False).model.layers)

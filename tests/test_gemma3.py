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

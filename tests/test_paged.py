"""The paged KV cache: block allocation, copy-on-write forks, prefix caching, memory budget,
sliding windows freeing blocks — at the cache level and through a tiny model."""
from __future__ import annotations

import numpy as np
import pytest

import edgerun
from edgerun.cache.paged import KVCacheFullError, PagedKV
from edgerun.errors import InputError

from conftest import make_hf_model, rel_err, save_hf  # noqa: E402

TOL = 1e-5
CFG = dict(hidden_size=72, intermediate_size=100, num_attention_heads=6, num_key_value_heads=2,
           max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny_edr(tmp_path_factory):
    from edgerun.converters import convert
    d = tmp_path_factory.mktemp("paged")
    save_hf(make_hf_model("LlamaForCausalLM", **CFG), d / "hf")
    convert(d / "hf", d / "m.edr", quant="f32", progress=False)
    return d / "m.edr"


def ids_of(n, seed=0):
    return np.random.default_rng(seed).integers(2, 300, size=n).tolist()


def test_fork_continues_exactly_like_a_fresh_state(tiny_edr):
    m = edgerun.load(tiny_edr, kv_block_size=4)
    prompt, a, b = ids_of(10), ids_of(7, 1), ids_of(5, 2)
    st = m.new_state()
    m.step(st, prompt)                         # 10 tokens: the last block (8..11) is half full, shared
    fork = m.fork(st)
    got_a = m.step(st, a)
    got_b = m.step(fork, b)                    # writes into the shared block: copied first
    ref_a = m.forward(prompt + a)[10:]
    ref_b = m.forward(prompt + b)[10:]
    assert rel_err(got_a, ref_a) < TOL and rel_err(got_b, ref_b) < TOL
    # and the original is untouched by the fork's writes, token after token
    assert rel_err(m.step(st, [7]), m.forward(prompt + a + [7])[-1:]) < TOL


def test_fork_shares_blocks_until_written(tiny_edr):
    m = edgerun.load(tiny_edr, kv_block_size=4)
    st = m.new_state()
    m.step(st, ids_of(16))                     # 4 full blocks
    pool = m.model.kv.pools[0]
    used = pool.used_blocks
    fork = m.fork(st)
    assert pool.used_blocks == used            # shared, not copied
    m.step(fork, [5])                          # a new block for the fork only
    assert pool.used_blocks == used + 1
    del fork
    assert pool.used_blocks == used


def test_prefix_cache_hits_and_skips_prefill(tiny_edr):
    m = edgerun.load(tiny_edr, kv_block_size=4)
    prompt = ids_of(23)
    first = m.new_state()
    ref = m.step(first, prompt, last_only=True)
    kv = m.model.kv
    hits = kv.stats()["prefix_hits"]
    computed = []
    embed = m.ops.embed
    m.ops.embed = lambda ids, w, dim: (computed.append(len(ids)), embed(ids, w, dim))[1]
    try:
        again = m.new_state()
        got = m.step(again, prompt, last_only=True)
    finally:
        m.ops.embed = embed
    assert kv.stats()["prefix_hits"] - hits == 5          # blocks 0..4 (20 tokens) reused
    assert computed == [3]                                # only the last 3 tokens were prefilled
    assert rel_err(got, ref) < TOL
    # continuing from the cached prefix is the same as continuing the original
    assert rel_err(m.step(again, [9]), m.step(first, [9])) < TOL


def test_prefix_cache_survives_release_until_evicted(tiny_edr):
    m = edgerun.load(tiny_edr, kv_block_size=4)
    prompt = ids_of(13)
    st = m.new_state()
    m.step(st, prompt, last_only=True)
    st.release()                                          # blocks are free but still cached
    kv = m.model.kv
    hits = kv.stats()["prefix_hits"]
    m.step(m.new_state(), prompt, last_only=True)
    assert kv.stats()["prefix_hits"] - hits == 3


def test_budget_exhausted_is_a_clear_error(tiny_edr):
    m = edgerun.load(tiny_edr, kv_block_size=4, max_kv_bytes=6 * 2 * 2 * 2 * 4 * 12 * 4)   # 6 blocks
    assert m.model.new_state().kv.pools[0].n_blocks == 6
    st = m.new_state()
    m.step(st, ids_of(24))                                # exactly 6 blocks
    with pytest.raises(KVCacheFullError, match="KV cache is full"):
        m.step(st, [1])
    other = m.new_state()
    with pytest.raises(edgerun.EdgerunError):
        m.step(other, [1, 2])
    st.release()
    m.step(other, ids_of(20))                             # the freed blocks serve another sequence


def test_windowed_layers_free_their_blocks(hf_dir_factory):
    """Mistral, window 6, blocks of 4: the KV memory stays bounded as decoding goes on,
    and the logits still equal transformers'."""
    from conftest import convert_and_load, hf_logits
    model, d = hf_dir_factory("MistralForCausalLM", sliding_window=6, **CFG)
    m = convert_and_load(d, "f32")
    m = edgerun.load(m.file.path, kv_block_size=4)
    ids = ids_of(40, 3)
    st = m.new_state()
    outs, held = [], []
    for t in ids:
        outs.append(m.step(st, [t]))
        held.append(st.nbytes)
    assert rel_err(np.concatenate(outs), hf_logits(model, ids)) < 1e-4
    per_block = m.model.kv.pools[0].bytes_per_block
    assert max(held[10:]) <= 4 * per_block                 # at most ceil(6/4) + 2 blocks, whatever the length
    with pytest.raises(InputError, match="roll back"):
        st.rollback(20)


def test_rollback_then_refeed(tiny_edr):
    m = edgerun.load(tiny_edr, kv_block_size=4)
    ids = ids_of(15)
    st = m.new_state()
    full = m.step(st, ids)
    st.rollback(6)
    assert st.length == 9
    assert rel_err(m.step(st, ids[9:]), full[9:]) < TOL


def test_kv_waste_is_under_a_block_per_sequence():
    """Allocated vs used KV over many sequences: only each sequence's last block is partly empty."""
    kv = PagedKV([0, 0], n_kv_heads=1, head_dim=2, max_context=4096, max_kv_bytes=10**7, block_size=16)
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 2000, size=64)
    states = []
    for n in lengths:
        st = kv.new_state()
        st.reserve(int(n))
        st.advance([1] * int(n))
        states.append(st)
    allocated = kv.pools[0].used_blocks * 16
    waste = 1 - lengths.sum() / allocated
    assert waste < 0.01, waste


def test_int8_kv_close_to_float_kv(tiny_edr):
    """int8 KV blocks (selected at load): logits within 2e-2 of the float32 cache's, same greedy tokens,
    and about 3.6x less KV memory per block (head_dim 12: 12 bytes + a 4-byte scale vs 48 bytes)."""
    ref = edgerun.load(tiny_edr)
    m = edgerun.load(tiny_edr, kv_dtype="int8")
    ids = ids_of(30, 4)
    a, b = ref.forward(ids), m.forward(ids)
    assert rel_err(b, a) < 2e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
    st = m.new_state()
    steps = np.concatenate([m.step(st, ids[:7])] + [m.step(st, [t]) for t in ids[7:]])
    assert rel_err(steps, b) < 1e-5                      # the same quantized cache either way
    assert ref.model.kv.pools[0].bytes_per_block / m.model.kv.pools[0].bytes_per_block == 3.0


def test_chunked_prefill_equals_one_pass(tiny_edr):
    """Inputs longer than the prefill chunk run in chunks: the same logits, all of them or the last."""
    m = edgerun.load(tiny_edr, kv_block_size=4)
    ids = ids_of(40, 5)
    whole = m.forward(ids)
    m.model.PREFILL_CHUNK = 7
    assert rel_err(m.forward(ids), whole) < TOL
    assert rel_err(m.step(m.new_state(), ids, last_only=True), whole[-1:]) < TOL

"""edgerun bench's accounting: bytes read per token (weights once, an embedding table one row when
the head is separate) plus a recurrent state's read and write."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import convert_and_load  # noqa: E402


def test_bench_counts_weights_and_recurrent_state(hf_dir_factory):
    from edgerun.bench import bench, bytes_per_token, format_report
    from edgerun.packed import nbytes
    _, d = hf_dir_factory("MambaForCausalLM", hidden_size=64, state_size=8, num_hidden_layers=2,
                          vocab_size=300, tie_word_embeddings=False)
    m = convert_and_load(d, "int8")
    names = m.file.descriptors
    rows = names["backbone.embeddings.weight"]["shape"][0]
    expect = sum(nbytes(m.file.tensor(n)) for n in names if "embeddings" not in n)
    expect += nbytes(m.file.tensor("backbone.embeddings.weight")) // rows
    assert bytes_per_token(m) == expect
    r = bench(str(m.file.path), threads=1, prompt_tokens=8, gen_tokens=2, repeats=1)
    state = m.new_state().nbytes
    assert state > 0 and r["state_bytes"] == state
    assert r["bytes_per_token"] == expect + 2 * state
    assert r["roofline_tok_s"] == r["bandwidth_gb_s"] * 1e9 / r["bytes_per_token"]
    assert "recurrent state" in format_report(r)

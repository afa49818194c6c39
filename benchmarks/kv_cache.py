"""Paged KV cache measurements for the README.

    python benchmarks/kv_cache.py waste                 # allocated vs used KV, 64 sequences of 10..2000 tokens
    python benchmarks/kv_cache.py decode [--llamacpp]   # SmolLM2 decode tok/s at context 256, 2k, 8k-64 (+ llama.cpp)
    python benchmarks/kv_cache.py gemma-rss             # Gemma 3 270M peak RSS at 8k, window blocks freed vs kept

Each prints JSON lines. Peers run in the same process window, interleaved per context.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def waste(block_size: int = 16, seed: int = 0) -> dict:
    import edgerun
    from edgerun.cache.paged import PagedKV
    m = edgerun.load("smollm2-135m")
    a = m.args
    lengths = np.random.default_rng(seed).integers(10, 2001, size=64)
    kv = PagedKV([0] * a.num_hidden_layers, a.num_key_value_heads, a.head_dim, a.max_position_embeddings,
                 max_kv_bytes=int(lengths.sum() + 64 * block_size) * 2 * a.num_hidden_layers
                 * a.num_key_value_heads * a.head_dim * 4, block_size=block_size)
    states = []
    for n in lengths:                                  # interleaved growth, as concurrent sequences do
        states.append(kv.new_state())
    for step in range(0, int(lengths.max()), 64):
        for st, n in zip(states, lengths):
            k = int(min(64, n - st.length)) if st.length < n else 0
            if k:
                st.reserve(k)
                st.advance([1] * k)
    pool = kv.pools[0]
    allocated = pool.used_blocks * pool.bytes_per_block
    used = int(lengths.sum()) * pool.bytes_per_block // block_size
    return {"bench": "kv_waste", "sequences": 64, "block_size": block_size, "tokens": int(lengths.sum()),
            "allocated_mib": allocated / 2**20, "used_mib": used / 2**20, "waste": 1 - used / allocated}


def _decode_edgerun(m, ctx: int, n: int) -> float:
    ids = (m.tokenizer.encode("The history of the city goes back many centuries. " * (ctx // 8 + 1)))[:ctx]
    st = m.new_state()
    tok = int(m.step(st, ids, last_only=True)[-1].argmax())
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(m.step(st, [tok], last_only=True)[-1].argmax())
    return n / (time.perf_counter() - t0)


def _decode_llamacpp(llm, ctx: int, n: int) -> float:
    ids = llm.tokenize(("The history of the city goes back many centuries. " * (ctx // 8 + 1)).encode(),
                       add_bos=False)[:ctx]
    llm.reset()
    llm.eval(ids)
    vocab = llm.n_vocab()
    last = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))   # noqa: E731  last token's logits
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(last()))
        llm.eval([tok])
    return n / (time.perf_counter() - t0)


def decode(contexts=(256, 2048, 8192 - 64), n: int = 32, threads: int = 2, llamacpp: bool = False) -> list[dict]:
    import edgerun
    from edgerun.registry import model_dir, pull
    pull("smollm2-135m", quiet=True)
    m = edgerun.load("smollm2-135m", threads=threads)
    _decode_edgerun(m, 16, 4)                            # compile / warm
    llm = None
    if llamacpp:
        from llama_cpp import Llama
        gguf = str(model_dir("smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf")
        llm = Llama(gguf, n_ctx=max(contexts) + n + 8, n_threads=threads, n_batch=512, logits_all=False,
                    verbose=False)
    rows = []
    for ctx in contexts:
        ours, peer = [], []
        for _ in range(2):                               # interleaved: edgerun, llama.cpp, edgerun, llama.cpp
            ours.append(_decode_edgerun(m, ctx, n))
            if llm is not None:
                peer.append(_decode_llamacpp(llm, ctx, n))
        row = {"bench": "decode_at_context", "model": "smollm2-135m (Q4_1)", "threads": threads, "context": ctx,
               "edgerun_tok_s": statistics.median(ours)}
        if peer:
            row["llamacpp_tok_s"] = statistics.median(peer)
            row["ratio"] = row["edgerun_tok_s"] / row["llamacpp_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _gemma_child(free: bool, ctx: int) -> None:
    import edgerun
    m = edgerun.load("gemma3-270m", free_out_of_window=free)
    with open("/proc/self/statm") as f:
        rss_load = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    ids = (m.tokenizer.encode("The history of the city goes back many centuries. " * (ctx // 8 + 1)))[:ctx]
    st = m.new_state()
    for i in range(0, len(ids), 512):                     # chunked prefill keeps activations small
        m.step(st, ids[i:i + 512], last_only=True)
    with open("/proc/self/statm") as f:
        rss_now = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    print(json.dumps({"bench": "gemma3_rss", "context": ctx, "free_out_of_window": free,
                      "kv_held_mib": st.nbytes / 2**20, "rss_after_mib": rss_now, "rss_after_load_mib": rss_load,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def gemma_rss(ctx: int = 8192) -> None:
    from edgerun.registry import pull
    pull("gemma3-270m", quiet=True)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {sys.path[0]!r}); import kv_cache; "
                    "kv_cache._gemma_child(True, 600)"], capture_output=True)      # fills the Numba cache
    for free in (True, False):
        code = f"import sys; sys.path.insert(0, {sys.path[0]!r}); import kv_cache; kv_cache._gemma_child({free}, {ctx})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr.strip()[-500:], flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["waste", "decode", "gemma-rss"])
    p.add_argument("--llamacpp", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.what == "waste":
        print(json.dumps(waste()))
    elif a.what == "decode":
        decode(threads=a.threads, llamacpp=a.llamacpp)
    else:
        gemma_rss()

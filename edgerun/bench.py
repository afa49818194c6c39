"""`edgerun bench`: prefill and decode tokens/s (medians), peak RSS, load time, JIT time."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time


_TEXT = ("The quick brown fox jumps over the lazy dog. Edge devices run language models "
         "close to their users, where memory bandwidth decides how fast each token comes. ")


def _prompt(m, n: int, run: int = 0) -> list[int]:
    """n tokens of text; each run's prompt starts differently, so the prefix cache cannot serve it."""
    ids = m.tokenizer.encode(f"Run {run}. " + _TEXT * (1 + n // 8), add_bos=False)
    return ids[:n]


def _first_token_child(model: str, threads) -> None:
    """Run in a child process: load + first token, printed as JSON."""
    t0 = time.perf_counter()
    from . import load
    m = load(model, threads=threads)
    t1 = time.perf_counter()
    m.step(m.new_state(), _prompt(m, 8), last_only=True)
    t2 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "first_token_s": t2 - t1, "total_s": t2 - t0}))


def _jit_times(model: str, threads) -> dict:
    """Time to first token in fresh processes: with an empty Numba cache, then with the cache it left."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgerun-jit-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        code = f"from edgerun.bench import _first_token_child; _first_token_child({model!r}, {threads!r})"
        for label in ("cold", "warm"):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr.strip().splitlines()[-1])
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def memory_bandwidth(threads: int | None = None, mib: int = 512, repeats: int = 7, also=()) -> float:
    """Streaming-read bandwidth in bytes/s: the median over repeats of one parallel pass summing a
    buffer of `mib` MiB (far larger than the caches), with the kernels' thread count. `also`:
    more buffers to stream (a model's own memory-mapped weights: with huge pages under the file
    mapping they read faster than anonymous memory here); the best of all is returned."""
    import numba
    import numpy as np

    from edgerun.kernels_numba.ops import stream_sum
    if threads:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    best = 0.0
    # np.ones: pages committed now; a small model's mapping would stream from the caches, so only
    # mappings larger than the big buffer count
    for b in (np.ones(mib * 2**20 // 8, np.float64), *(a for a in also if np.asarray(a).nbytes >= mib * 2**20)):
        b = np.asarray(b)
        b = b.reshape(-1).view(np.uint8)[:b.nbytes // 4096 * 4096].view(np.float64)
        stream_sum(b[:4096])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            stream_sum(b)
            times.append(time.perf_counter() - t0)
        best = max(best, b.nbytes / statistics.median(times))
    return best


def bytes_per_token(m) -> int:
    """Bytes a decode step reads from the weights: every tensor once, except an embedding table
    that gives only one row per token (when the head is a separate tensor). The KV cache and a
    recurrent state are extra (bench adds a recurrent state's read and write, see state_bytes)."""
    from .packed import nbytes
    names = m.file.descriptors
    separate_head = "lm_head.weight" in names or "head.weight" in names
    total = 0
    for name in names:
        size = nbytes(m.file.tensor(name))
        if separate_head and ("embed" in name or name == "emb.weight"):
            size = size // m.file.descriptors[name]["shape"][0]      # one row
        total += size
    return int(total)


def bench(model: str, threads: int | None = None, prompt_tokens: int = 128, gen_tokens: int = 64,
          repeats: int = 5, cold: bool = False, **load_options) -> dict:
    import numba

    from . import load
    from .api import resolve
    path = str(resolve(model))
    t0 = time.perf_counter()
    m = load(path, threads=threads, **load_options)
    load_s = time.perf_counter() - t0
    ids = _prompt(m, prompt_tokens)

    t0 = time.perf_counter()
    m.step(m.new_state(), ids[:8], last_only=True)       # compiles, or loads the Numba cache
    first_s = time.perf_counter() - t0
    st = m.new_state()                                    # warm every kernel shape once
    m.step(st, ids, last_only=True)
    m.step(st, [ids[0]], last_only=True)

    prefill, decode = [], []
    for r in range(repeats):
        ids = _prompt(m, prompt_tokens, r + 1)
        st = m.new_state()
        t0 = time.perf_counter()
        logits = m.step(st, ids, last_only=True)
        prefill.append(len(ids) / (time.perf_counter() - t0))
        tok = int(logits[-1].argmax())
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            tok = int(m.step(st, [tok], last_only=True)[-1].argmax())
        decode.append(gen_tokens / (time.perf_counter() - t0))
    weight_bytes = int(m.file.data.nbytes)
    # a recurrent model reads and writes its whole state once per token (Mamba-2 130M: 18.5 MB)
    state_bytes = int(st.nbytes) if isinstance(getattr(st, "nbytes", None), int) else 0
    per_token = bytes_per_token(m) + 2 * state_bytes
    bandwidth = memory_bandwidth(threads, also=(m.file.data,))
    decode_med = statistics.median(decode)
    r = {
        "model": path, "arch": m.file.arch, "quant": m.file.extra.get("quant"),
        "weight_bytes": weight_bytes, "threads": numba.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": len(ids), "gen_tokens": gen_tokens, "repeats": repeats,
        "prefill_tok_s": statistics.median(prefill), "decode_tok_s": decode_med,
        "prefill_tok_s_all": prefill, "decode_tok_s_all": decode,
        "load_s": load_s, "first_token_s": first_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_options": load_options,
        # the roofline: decode can't beat (bytes read per token) / (memory bandwidth), both
        # measured here; roofline_ratio = measured decode / that bound
        "bytes_per_token": per_token, "state_bytes": state_bytes, "bandwidth_gb_s": bandwidth / 1e9,
        "roofline_tok_s": bandwidth / per_token, "roofline_ratio": decode_med * per_token / bandwidth,
    }
    if cold:
        r["jit"] = _jit_times(path, threads)
    return r


def format_report(r: dict) -> str:
    lines = [
        f"model        {r['model']}  ({r['arch']}, {r['quant']}, {r['weight_bytes'] / 2**20:.1f} MiB of weights)",
        f"threads      {r['threads']}",
        f"prefill      {r['prefill_tok_s']:.1f} tok/s  (median of {r['repeats']}, {r['prompt_tokens']}-token prompt)",
        f"decode       {r['decode_tok_s']:.1f} tok/s  (median of {r['repeats']}, {r['gen_tokens']} tokens)",
        f"load         {r['load_s'] * 1000:.0f} ms",
        f"first token  {r['first_token_s'] * 1000:.0f} ms (this process)",
        f"peak RSS     {r['peak_rss_mib']:.0f} MiB",
        f"bandwidth    {r['bandwidth_gb_s']:.1f} GB/s (streaming read, {r['threads']} threads, measured now)",
        f"roofline     {r['bytes_per_token'] / 2**20:.1f} MiB read per token"
        + (f" (recurrent state {r['state_bytes'] / 2**20:.1f} MiB read and written)" if r.get("state_bytes") else "")
        + f" -> at most {r['roofline_tok_s']:.1f} tok/s; decode reaches {100 * r['roofline_ratio']:.0f}% of it",
    ]
    if "jit" in r:
        for k in ("cold", "warm"):
            j = r["jit"][k]
            lines.append(f"{k} start   load {j['load_s'] * 1000:.0f} ms + first token {j['first_token_s'] * 1000:.0f} ms "
                         f"= {j['total_s']:.2f} s ({'empty' if k == 'cold' else 'filled'} Numba cache)")
    return "\n".join(lines)

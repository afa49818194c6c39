"""xLSTM on the CPU: transformers' xLSTMForCausalLM block design at hidden 768, 12 blocks (random
weights made here, nothing is downloaded), edgerun against transformers' pure-torch path in the same
run, interleaved; decode and prefill tokens/s; the fraction of the memory-bandwidth roofline the
decode reaches (bytes read per token / bandwidth measured in the same run); and one long generation
with RSS and per-token time at tokens 100, 1,000 and 10,000.

    python3 benchmarks/xlstm_bench.py speed --quant int8 int4 --threads 2 [--mamba]
    python3 benchmarks/xlstm_bench.py long  --quant int8 --tokens 10000 --threads 2

Bytes per token = every packed weight but the embedding table (one row of it) + the recurrent state
(C, n, m: read and written once per token, counted once). Bandwidth = a read-only streaming sum over
a 512 MiB array (parallel over the same threads; the best of 7 runs before and 7 after the timed
rounds is the number the roofline uses) and, for reference, a numpy copy of it (read + write bytes). --mamba also runs edgerun's Mamba-1 at mamba-130m's shape
(benchmarks/mamba_bench.py's checkpoint) so the two roofline fractions come from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mamba_bench  # noqa: E402
from mamba_bench import Edgerun, Transformers, rss_mb  # noqa: E402

# transformers' xLSTMConfig at hidden 768, 12 blocks: 4 heads (d_qk 96, d_v 192), ffn 2112, untied head
SHAPE = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_heads=4, qk_dim_factor=0.5,
             v_dim_factor=1.0, ffn_proj_factor=2.667, chunk_size=64, tie_word_embeddings=False,
             autocast_kernel_dtype="float32", inference_state_dtype="float32",
             chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
             step_kernel="native", mode="inference")


def rss_anon_mb() -> float:
    """Anonymous (heap) resident memory: RSS without the file-backed pages of the mmapped weights."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hf_dir(work: Path) -> Path:
    d = work / "xlstm-768x12-random"
    if (d / "model.safetensors").is_file():
        return d
    import torch
    import transformers
    config = transformers.xLSTMConfig(**SHAPE, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.xLSTMForCausalLM(config).float().eval()
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import write_tokenizer
    write_tokenizer(d)
    print(f"made {d} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)", flush=True)
    return d


def edr_file(quant: str, work: Path) -> Path:
    out = work / f"xlstm-768x12-{quant}.edr"
    if not out.is_file():
        from edgerun.converters import convert
        convert(hf_dir(work), out, quant=quant, group_size=32 if quant == "int4" else None, progress=False)
    return out


def bytes_per_token(llm) -> int:
    """Packed bytes every decode step reads: all weights but the embedding table, plus the state."""
    total = 0
    for name in llm.file.descriptors:
        if "embed" in name and "lm_head" not in name:
            continue
        total += sum(a.nbytes for a in llm.file.tensor(name) if isinstance(a, np.ndarray))
    return total + llm.new_state().nbytes


def _read_sum(a):
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=False)
    def psum(x):
        n = x.shape[0] // 4096
        acc = np.zeros(n, np.float32)
        for b in prange(n):
            s = np.float32(0.0)
            blk = x[b * 4096:(b + 1) * 4096]
            for j in range(4096):
                s += blk[j]
            acc[b] = s
        return acc.sum()
    return psum


def bandwidth_gbs(mib: int = 512, repeats: int = 7) -> tuple[float, float]:
    """(streaming read GB/s with the numba threads, numpy copy GB/s counting read + write)."""
    x = np.ones(mib << 18, np.float32)
    y = np.empty_like(x)
    psum = _read_sum(x)
    psum(x[:1 << 16])
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        psum(x)
        reads.append(x.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        np.copyto(y, x)
        copies.append(2 * x.nbytes / (time.perf_counter() - t0) / 1e9)
    return max(reads), max(copies)             # the best the machine gave: a conservative roofline


class _CpuClock:
    """time.perf_counter's stand-in for --cpu-time: CPU seconds of this process (all its threads), so
    that time spent descheduled on a shared machine is not counted; meaningful with --threads 1."""
    perf_counter = staticmethod(time.process_time)


def speed(a):
    import numba
    import torch
    if a.cpu_time:                               # the runners (mamba_bench's) and the probe read this clock
        mamba_bench.time = sys.modules[__name__].time = _CpuClock
    numba.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    ids = np.random.default_rng(0).integers(2, SHAPE["vocab_size"], size=a.prompt).tolist()
    runners, bpt = {}, {}
    for q in a.quant:
        r = Edgerun(edr_file(q, work))
        runners[f"edgerun-{q}"], bpt[f"edgerun-{q}"] = r, bytes_per_token(r.m)
    if a.mamba:
        for q in a.quant:
            r = Edgerun(mamba_bench.edr_file("mamba", q, work))
            runners[f"mamba-edgerun-{q}"], bpt[f"mamba-edgerun-{q}"] = r, bytes_per_token(r.m)
    if not a.no_torch:
        runners["transformers-f32"] = Transformers(hf_dir(work))
    for r in runners.values():                   # warm up: JIT compile, first touches
        r.prefill(ids[:8]); r.prefill(ids); r.decode(ids[:8], 2)
    bw_read, bw_copy = bandwidth_gbs()
    pre = {k: [] for k in runners}
    dec = {k: [] for k in runners}
    for _ in range(a.repeats):                   # interleaved: every runner once per round
        for k, r in runners.items():
            pre[k].append(len(ids) / r.prefill(ids))
            dec[k].append(a.gen / r.decode(ids, a.gen))
    bw_read2, bw_copy2 = bandwidth_gbs()
    bw = max(bw_read, bw_read2)
    print(f"bandwidth: streaming read {bw_read:.1f} / {bw_read2:.1f} GB/s (before / after), numpy copy "
          f"{bw_copy:.1f} / {bw_copy2:.1f} GB/s (read + write); {a.threads} threads", flush=True)
    results = []
    for k in runners:
        row = dict(runner=k, threads=a.threads, prompt=len(ids), gen=a.gen, repeats=a.repeats,
                   prefill_tok_s=statistics.median(pre[k]), decode_tok_s=statistics.median(dec[k]),
                   read_gb_s=round(bw, 2))
        if k in bpt:
            row["bytes_per_token"] = bpt[k]
            row["roofline_tok_s"] = bw * 1e9 / bpt[k]
            row["roofline_fraction"] = row["decode_tok_s"] / row["roofline_tok_s"]
        results.append(row)
        roof = (f"   {row['bytes_per_token'] / 2**20:6.1f} MiB/token, roofline {row['roofline_tok_s']:6.1f} tok/s, "
                f"reached {100 * row['roofline_fraction']:4.1f}%") if k in bpt else ""
        print(f"{k:22s} prefill {row['prefill_tok_s']:8.1f} tok/s   decode {row['decode_tok_s']:7.1f} tok/s"
              f"{roof}   (median of {a.repeats}; {len(ids)}-token prompt, {a.gen} new tokens)", flush=True)
    ref = [r for r in results if r["runner"] == "transformers-f32"]
    if ref:
        for r in results:
            if r is not ref[0] and not r["runner"].startswith("mamba"):
                print(f"{r['runner']:22s} vs transformers: prefill x{r['prefill_tok_s'] / ref[0]['prefill_tok_s']:.1f}"
                      f"  decode x{r['decode_tok_s'] / ref[0]['decode_tok_s']:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def long(a):
    """One greedy generation of --tokens tokens: per-token time (median of a 50-token window) and RSS
    at tokens 100, 1,000, 10,000, and the mean of the first and the last thousand."""
    import numba
    numba.set_num_threads(a.threads)
    work = Path(a.work)
    for q in a.quant:
        m = Edgerun(edr_file(q, work)).m
        warm = m.new_state()
        m.step(warm, [0, 1, 2, 3])
        for t in range(5):
            m.step(warm, [t + 4])
        del warm
        st = m.new_state()
        logits = m.step(st, [0, 17, 250, 3], last_only=True)
        times = np.empty(a.tokens)
        rss, anon = {}, {}
        marks = {100, 1000, 10000, a.tokens}
        for i in range(1, a.tokens + 1):
            t0 = time.perf_counter()
            logits = m.step(st, [int(np.argmax(logits[-1]))], last_only=True)
            times[i - 1] = time.perf_counter() - t0
            if i in marks:
                rss[i], anon[i] = rss_mb(), rss_anon_mb()
        assert np.isfinite(logits).all()
        report = dict(model="xlstm-768x12", quant=q, threads=a.threads, tokens=a.tokens,
                      state_mb=round(st.nbytes / 2**20, 3), rss_mb={k: round(v, 2) for k, v in sorted(rss.items())})
        for k in sorted(marks):
            if k <= a.tokens:
                report[f"ms_at_{k}"] = round(float(np.median(times[max(0, k - 50):k])) * 1e3, 3)
        first, last = times[:1000].mean(), times[-1000:].mean()
        report["first_1000_ms"], report["last_1000_ms"] = round(first * 1e3, 3), round(last * 1e3, 3)
        report["last_vs_first"] = round(last / first, 4)
        ks = sorted(rss)
        report["rss_growth_mb_100_to_end"] = round(rss[ks[-1]] - rss[100], 3) if 100 in rss else None
        # RSS also counts the mmapped embedding table's pages as new token ids first touch them (bounded
        # by the table's size); the anonymous part is the process's own memory
        report["rss_anon_mb"] = {k: round(v, 2) for k, v in sorted(anon.items())}
        report["anon_growth_mb_100_to_end"] = round(anon[ks[-1]] - anon[100], 3) if 100 in anon else None
        print(json.dumps(report), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "long", "make"])
    p.add_argument("--quant", nargs="+", default=["int8", "int4"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    p.add_argument("--gen", type=int, default=32, help="decode tokens per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=10000, help="long: tokens to generate")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="time by process CPU time (a loaded machine; use --threads 1)")
    p.add_argument("--mamba", action="store_true", help="also edgerun Mamba-1 (mamba-130m shape) at the same quants")
    p.add_argument("--work", default=os.environ.get("EDGERUN_BENCH_DIR", "/tmp/edgerun-bench"))
    p.add_argument("--json")
    a = p.parse_args()
    if a.what == "make":
        hf_dir(Path(a.work))
    else:
        speed(a) if a.what == "speed" else long(a)


if __name__ == "__main__":
    main()

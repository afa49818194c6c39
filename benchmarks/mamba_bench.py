"""Mamba-1 (mamba-130m's shape) and Mamba-2 (~130M) on the CPU: edgerun against transformers' pure-torch
path, decode and prefill tokens/s measured in the same run, interleaved; and one long generation
with RSS and per-token time at tokens 100, 1,000 and 10,000.

Random weights made here (nothing is downloaded); the HF checkpoints are cached under --work.

    python3 benchmarks/mamba_bench.py speed --arch mamba --quant int8 int4 f16 --threads 2
    python3 benchmarks/mamba_bench.py speed --arch mamba --quant int8 int4 --llama-cpp DIR   # + DIR/mamba-q8_0.gguf ...
    python3 benchmarks/mamba_bench.py long  --arch mamba2 --quant int8 --tokens 10000
    python3 benchmarks/mamba_bench.py profile --arch mamba2 --quant int8 int4 --threads 1     # prefill by op

llama.cpp GGUFs are made from the same HF checkpoint by llama.cpp's own convert_hf_to_gguf.py
(shipped in the llama-cpp-python sdist; --outtype q8_0, and f32 then llama_model_quantize for Q4_0).
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
SHAPES = {
    # state-spaces/mamba-130m-hf
    "mamba": ("MambaForCausalLM", dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16,
                                       expand=2, conv_kernel=4, time_step_rank=48, tie_word_embeddings=True)),
    # state-spaces/mamba2-130m's shape
    "mamba2": ("Mamba2ForCausalLM", dict(vocab_size=50288, hidden_size=768, num_hidden_layers=24, num_heads=24,
                                         head_dim=64, state_size=128, n_groups=1, expand=2, conv_kernel=4,
                                         chunk_size=256, tie_word_embeddings=True)),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hf_dir(arch: str, work: Path) -> Path:
    """The random-weight HF checkpoint of an arch (made once, seed 0)."""
    d = work / f"{arch}-130m-random"
    if (d / "model.safetensors").is_file():
        return d
    import torch
    import transformers
    cls, cfg = SHAPES[arch]
    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**cfg, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).float().eval()
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import write_tokenizer
    write_tokenizer(d)
    n = sum(p.numel() for p in model.parameters())
    print(f"made {d} ({n / 1e6:.1f}M parameters)", flush=True)
    return d


def edr_file(arch: str, quant: str, work: Path) -> Path:
    out = work / f"{arch}-130m-{quant}.edr"
    if not (work / f"{arch}-130m-random" / "model.safetensors").is_file():
        import subprocess
        subprocess.run([sys.executable, __file__, "make", "--arch", arch, "--work", str(work)], check=True)
    if not out.is_file():
        from edgerun.converters import convert
        convert(hf_dir(arch, work), out, quant=quant, group_size=32 if quant == "int4" else None, progress=False)
    return out


# ------------------------------------------------------------------ runners: prefill(ids) -> s, decode(ids, n) -> s

class Edgerun:
    def __init__(self, path):
        import edgerun
        self.m = edgerun.load(path)

    def prefill(self, ids):
        st = self.m.new_state()
        t0 = time.perf_counter()
        self.m.step(st, ids, last_only=True)
        return time.perf_counter() - t0

    def decode(self, ids, n):
        """Seconds for n greedy one-token steps after a prefill of ids."""
        st = self.m.new_state()
        logits = self.m.step(st, ids, last_only=True)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = self.m.step(st, [int(np.argmax(logits[-1]))], last_only=True)
        return time.perf_counter() - t0


class Transformers:
    def __init__(self, d):
        import torch
        import transformers
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    def prefill(self, ids):
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.model(self.torch.tensor([ids]))
            return time.perf_counter() - t0

    def decode(self, ids, n):
        """generate(n + 1) minus generate(1): n decode steps with transformers' own cache."""
        x = self.torch.tensor([ids])
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            self.model.generate(x, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
            t2 = time.perf_counter()
        return (t2 - t1) - (t1 - t0)


class LlamaCpp:
    """llama-cpp-python on a GGUF: prefill with one eval of the prompt, decode one token per eval."""

    def __init__(self, path, threads):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(path), n_ctx=4096, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def prefill(self, ids):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def decode(self, ids, n):
        self.llm.reset()
        self.llm.eval(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([tok])
        return time.perf_counter() - t0


GGUF_KIND = {"int8": "q8_0", "int4": "q4_0", "f32": "f32"}


def speed(a):
    import numba
    import torch
    numba.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    rng = np.random.default_rng(0)
    results = []
    for arch in a.arch:
        ids = rng.integers(2, SHAPES[arch][1]["vocab_size"], size=a.prompt).tolist()
        runners = {}
        for q in a.quant:
            runners[f"edgerun-{q}"] = Edgerun(edr_file(arch, q, work))
            g = Path(a.llama_cpp or "/nonexistent") / f"{arch}-{GGUF_KIND.get(q, q)}.gguf"
            if a.llama_cpp and g.is_file():
                runners[f"llama.cpp-{GGUF_KIND[q]}"] = LlamaCpp(g, a.threads)
        if not a.no_torch:
            runners["transformers-f32"] = Transformers(hf_dir(arch, work))
        for r in runners.values():              # warm up: JIT compile, first touches
            r.prefill(ids[:8]); r.prefill(ids); r.decode(ids[:8], 2)
        pre = {k: [] for k in runners}
        dec = {k: [] for k in runners}
        for _ in range(a.repeats):               # interleaved: every runner once per round
            for k, r in runners.items():
                pre[k].append(len(ids) / r.prefill(ids))
                dec[k].append(a.gen / r.decode(ids, a.gen))
        for k in runners:
            row = dict(arch=arch, runner=k, threads=a.threads, prompt=len(ids), gen=a.gen, repeats=a.repeats,
                       prefill_tok_s=statistics.median(pre[k]), decode_tok_s=statistics.median(dec[k]))
            results.append(row)
            print(f"{arch:7s} {k:18s} prefill {row['prefill_tok_s']:8.1f} tok/s   "
                  f"decode {row['decode_tok_s']:7.1f} tok/s   (median of {a.repeats}; {len(ids)}-token prompt, "
                  f"{a.gen} new tokens, {a.threads} threads)", flush=True)
        ref = [r for r in results if r["arch"] == arch and r["runner"] == "transformers-f32"]
        if ref:
            for r in results:
                if r["arch"] == arch and r is not ref[0]:
                    pre_x = r["prefill_tok_s"] / ref[0]["prefill_tok_s"]
                    dec_x = r["decode_tok_s"] / ref[0]["decode_tok_s"]
                    print(f"{arch:7s} {r['runner']:18s} vs transformers: prefill x{pre_x:.1f}  decode x{dec_x:.1f}")
        del runners
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def long(a):
    """One greedy generation of --tokens tokens; per-token time (median of a 50-token window) and RSS
    at tokens 100, 1,000, 10,000, and the mean of the first and the last thousand."""
    import numba
    numba.set_num_threads(a.threads)
    work = Path(a.work)
    for arch in a.arch:
        for q in a.quant:
            path = edr_file(arch, q, work)
            m = Edgerun(path).m
            warm = m.new_state()                      # compile the one-token path before timing
            m.step(warm, [0, 1, 2, 3])
            for t in range(5):
                m.step(warm, [t + 4])
            del warm
            st = m.new_state()
            logits = m.step(st, [0, 17, 250, 3], last_only=True)
            times = np.empty(a.tokens)
            rss = {}
            marks = {100, 1000, 10000, a.tokens}
            for i in range(1, a.tokens + 1):
                t0 = time.perf_counter()
                logits = m.step(st, [int(np.argmax(logits[-1]))], last_only=True)
                times[i - 1] = time.perf_counter() - t0
                if i in marks:
                    rss[i] = rss_mb()
            report = dict(arch=arch, quant=q, threads=a.threads, tokens=a.tokens, state_mb=st.nbytes / 2**20,
                          rss_mb={k: round(v, 2) for k, v in sorted(rss.items())})
            for k in sorted(marks):
                if k <= a.tokens:
                    report[f"ms_at_{k}"] = round(float(np.median(times[max(0, k - 50):k])) * 1e3, 3)
            first, last = times[:1000].mean(), times[-1000:].mean()
            report["first_1000_ms"], report["last_1000_ms"] = round(first * 1e3, 3), round(last * 1e3, 3)
            report["last_vs_first"] = round(last / first, 4)
            ks = sorted(rss)
            report["rss_growth_mb_100_to_end"] = round(rss[ks[-1]] - rss[100], 3) if 100 in rss else None
            print(json.dumps(report), flush=True)


PROFILED_OPS = ("linear", "causal_conv1d", "ssd", "gated_rms_norm", "selective_scan", "rms_norm_segments_",
                "rms_norm", "embed", "add_")


def profile(a):
    """Where prefill time goes: CPU time (time.process_time, so other work on a shared machine counts
    less than in wall time) per backend op, summed over layers, median of --repeats prefills."""
    import numba
    numba.set_num_threads(a.threads)
    work = Path(a.work)
    rng = np.random.default_rng(0)
    for arch in a.arch:
        ids = rng.integers(2, SHAPES[arch][1]["vocab_size"], size=a.prompt).tolist()
        for q in a.quant:
            m = Edgerun(edr_file(arch, q, work)).m
            ops, spent = m.ops, {}
            for name in PROFILED_OPS:
                fn = getattr(ops, name, None)
                if fn is None:
                    continue

                def timed(*args, _fn=fn, _name=name, **kw):
                    t0 = time.process_time()
                    r = _fn(*args, **kw)
                    spent[_name] = spent.get(_name, 0.0) + time.process_time() - t0
                    return r
                setattr(ops, name, timed)
            m.step(m.new_state(), ids, last_only=True)             # compile, first touches
            runs = []
            for _ in range(a.repeats):
                spent.clear()
                t0 = time.process_time()
                m.step(m.new_state(), ids, last_only=True)
                runs.append((time.process_time() - t0, dict(spent)))
            total, by_op = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            by_op["(rest: copies, Python)"] = total - sum(by_op.values())
            print(f"{arch} {q}: prefill {len(ids)} tokens, {a.threads} thread(s): {total * 1e3:.1f} ms CPU "
                  f"({len(ids) / total:.1f} tok/s)")
            for name, t in sorted(by_op.items(), key=lambda kv: -kv[1]):
                print(f"  {name:24s} {t * 1e3:8.1f} ms  {100 * t / total:5.1f}%")
            for name in PROFILED_OPS:                                 # undo the wrappers
                ops.__dict__.pop(name, None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "long", "make", "profile"])
    p.add_argument("--arch", nargs="+", default=["mamba", "mamba2"], choices=list(SHAPES))
    p.add_argument("--quant", nargs="+", default=["int8", "int4"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    p.add_argument("--gen", type=int, default=32, help="decode tokens per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=10000, help="long: tokens to generate")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--llama-cpp", metavar="DIR", help="also run llama-cpp-python on DIR/<arch>-q8_0.gguf / -q4_0.gguf")
    p.add_argument("--work", default=os.environ.get("EDGERUN_BENCH_DIR", "/tmp/edgerun-bench"))
    p.add_argument("--json")
    a = p.parse_args()
    if a.what == "make":
        for arch in a.arch:
            hf_dir(arch, Path(a.work))
    else:
        {"speed": speed, "long": long, "profile": profile}[a.what](a)


if __name__ == "__main__":
    main()

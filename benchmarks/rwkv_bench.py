"""RWKV v6 / v7 at the published 0.1B shapes (random weights made here), side by side:
edgerun int8 vs llama.cpp Q8_0 and edgerun int4 vs llama.cpp Q4_0 (same checkpoint; llama.cpp's
own converter makes the Q8_0 GGUF and a bf16 one, which llama.cpp's own quantizer turns into Q4_0),
and BlinkDL's `rwkv` package (torch fp32). Benchmark-only dependencies: torch, rwkv,
llama-cpp-python and the llama-cpp-python sdist (for vendor/llama.cpp/convert_hf_to_gguf.py).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python benchmarks/rwkv_bench.py --versions 7 6 --threads 1 --llama-cpp-src llama_cpp_python-0.3.36
    python benchmarks/rwkv_bench.py --long --versions 7 6 --quants int8 --tokens 10000

Speed: one JSON line per version, prefill and decode tokens/s per runtime (medians of --repeats
rounds, every runtime once per round), and edgerun / llama.cpp ratios.
--long: one greedy generation of --tokens tokens one at a time; the process's resident memory
(all of it, and its anonymous part: memory-mapped weights excluded) at tokens 100, 1,000 and the
end, and the mean time per token of the first and the last thousand.
--dispatch: calls from Python into compiled code per decode token, and decode ms per token (wall
and CPU), with the one-call-per-layer decode (CPUBackend.rwkv_layer_step) and op by op,
interleaved (medians of --repeats rounds of the decode tokens).

    python benchmarks/rwkv_bench.py --dispatch --versions 7 6 --threads 1 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

C, L, V, N = 768, 12, 65536, 64          # the 0.1B shapes: hidden, layers, vocab, head size


def make_pth(version: str, path: Path, seed: int = 0) -> None:
    """A random BlinkDL-layout checkpoint (bf16 .pth) with the 0.1B shapes."""
    import torch
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=0.02: torch.randn(*s, generator=g) * sc          # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g)                        # noqa: E731
    H = C // N
    sd = {"emb.weight": r(V, C, sc=0.1), "blocks.0.ln0.weight": 1 + r(C), "blocks.0.ln0.bias": r(C),
          "ln_out.weight": 1 + r(C), "ln_out.bias": r(C), "head.weight": r(V, C, sc=0.05)}
    for i in range(L):
        p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for n in ("ln1", "ln2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(C), r(C)
        for n in ("receptance", "key", "value", "output"):
            sd[a + n + ".weight"] = r(C, C, sc=0.03)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + r(C), r(C)
        if version == "7":
            for n in "rwkvag":
                sd[a + "x_" + n] = u(1, 1, C)
            for n, D in (("w", 64), ("a", 64), ("v", 32), ("g", 128)):
                if n == "v" and i == 0:
                    continue
                sd[a + n + "1"], sd[a + n + "2"] = r(C, D, sc=0.05), r(D, C, sc=0.05)
                if n != "g":
                    sd[a + n + "0"] = r(1, 1, C, sc=0.5)
            sd[a + "k_k"], sd[a + "k_a"], sd[a + "r_k"] = u(1, 1, C), u(1, 1, C), r(H, N, sc=0.1)
            sd[f + "x_k"] = u(1, 1, C)
            sd[f + "key.weight"], sd[f + "value.weight"] = r(4 * C, C), r(C, 4 * C)
        else:
            F = int(3.5 * C) // 32 * 32
            sd[a + "gate.weight"] = r(C, C, sc=0.03)
            for n in "xwkvrg":
                sd[a + "time_maa_" + n] = u(1, 1, C)
            sd[a + "time_maa_w1"], sd[a + "time_maa_w2"] = r(C, 5 * 32, sc=0.05), r(5, 32, C, sc=0.05)
            sd[a + "time_decay"] = r(1, 1, C, sc=1.0) - 2
            sd[a + "time_decay_w1"], sd[a + "time_decay_w2"] = r(C, 64, sc=0.05), r(64, C, sc=0.05)
            sd[a + "time_faaaa"] = r(H, N, sc=0.3)
            sd[f + "time_maa_k"], sd[f + "time_maa_r"] = u(1, 1, C), u(1, 1, C)
            sd[f + "key.weight"], sd[f + "value.weight"] = r(F, C), r(C, F)
            sd[f + "receptance.weight"] = r(C, C)
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)


def to_hf_layout(version: str, pth: Path, out: Path) -> None:
    """The HF layout llama.cpp's convert_hf_to_gguf.py reads for RWKV-6/7 (tensors renamed only)."""
    import rwkv
    import torch
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = torch.load(pth, map_location="cpu")
    root = "model" if version == "7" else "rwkv"
    m = {}
    for k, v in sd.items():
        if k == "emb.weight":
            n = f"{root}.embeddings.weight"
        elif k.startswith("blocks.0.ln0."):
            n = (f"{root}.pre_ln." if version == "7" else f"{root}.blocks.0.pre_ln.") + k.split(".")[-1]
        elif k.startswith("ln_out.") or k == "head.weight":
            n = k if k == "head.weight" else f"{root}.ln_out." + k.split(".")[-1]
        elif version == "7":
            p = k.split(".")
            n = f"model.layers.{p[1]}." + ".".join(p[2:]).replace("att.", "attention.", 1).replace("ffn.", "feed_forward.", 1)
        else:
            n = "rwkv." + k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
        m[n] = v.contiguous()
    save_file(m, str(out / "model.safetensors"))
    cfg = {"hidden_size": C, "num_hidden_layers": L, "head_size": N, "layer_norm_epsilon": 1e-5, "vocab_size": V}
    if version == "7":
        cfg.update(architectures=["RWKV7ForCausalLM"], model_type="rwkv7", intermediate_size=4 * C,
                   lora_rank_decay=64, lora_rank_iclr=64, lora_rank_value_residual_mix=32, lora_rank_gate=128)
    else:
        cfg.update(architectures=["Rwkv6ForCausalLM"], model_type="rwkv6", rescale_every=0,
                   intermediate_size=sd["blocks.0.ffn.key.weight"].shape[0])
    (out / "config.json").write_text(json.dumps(cfg))
    shutil.copy(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt", out / "rwkv_vocab_v20230424.txt")


def _time_runs(prefill, step, ids, dec):
    """(prefill, decode) tokens/s by the wall clock, then the same by this process's CPU time (all
    its threads: on a shared machine a runtime's own work, less the waits for a busy core)."""
    t, c = time.perf_counter(), time.process_time()
    prefill(ids)
    pf, pf_cpu = len(ids) / (time.perf_counter() - t), len(ids) / (time.process_time() - c)
    d, dc = [], []
    for x in dec:
        t, c = time.perf_counter(), time.process_time()
        step(x)
        d.append(time.perf_counter() - t)
        dc.append(time.process_time() - c)
    return pf, 1 / float(np.median(d)), pf_cpu, 1 / float(np.median(dc))


def blinkdl(version: str, pth: Path, threads: int, ids, dec) -> tuple[float, float]:
    """BlinkDL's package in a child process (it reads its mode from environment variables)."""
    code = f"""
import os, sys, json, time, numpy as np
os.environ.update(RWKV_V7_ON={'"1"' if version == '7' else '"0"'}, RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
import torch; torch.set_num_threads({threads})
from rwkv.model import RWKV
m = RWKV({str(pth.with_suffix(''))!r}, "cpu fp32")
ids, dec = {list(ids)!r}, {list(dec)!r}
with torch.no_grad():
    m.forward(ids[:16], None)
    t = time.perf_counter(); out, st = m.forward(ids, None); pf = len(ids) / (time.perf_counter() - t)
    d = []
    for x in dec:
        t = time.perf_counter(); out, st = m.forward([x], st); d.append(time.perf_counter() - t)
print(json.dumps([pf, 1 / float(np.median(d))]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return tuple(json.loads(r.stdout.strip().splitlines()[-1])) if r.returncode == 0 else (float("nan"),) * 2


PEER_TYPE = {"int8": "q8_0", "int4": "q4_0"}          # edgerun kind -> llama.cpp type at matching bits


def llamacpp_gguf(version: str, pth: Path, a, gtype: str) -> Path:
    """The GGUF of the same weights: q8_0 straight from llama.cpp's converter; q4_0 by llama.cpp's
    quantizer (llama_model_quantize, default parameters as llama-quantize) from the converter's bf16."""
    import llama_cpp
    gguf = a.work / f"rwkv{version}-{gtype}.gguf"
    if gguf.exists():
        return gguf
    hf = a.work / f"rwkv{version}-hf"
    if not (hf / "model.safetensors").exists():
        to_hf_layout(version, pth, hf)
    conv = a.work / f"rwkv{version}-{'q8_0' if gtype == 'q8_0' else 'bf16'}.gguf"
    if not conv.exists():
        subprocess.run([sys.executable, str(a.llama_cpp_src / "vendor/llama.cpp/convert_hf_to_gguf.py"),
                        str(hf), "--outtype", "q8_0" if gtype == "q8_0" else "bf16", "--outfile", str(conv)],
                       check=True, capture_output=True)
    if gtype != "q8_0":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gtype.upper()}")
        params.nthread = 2
        tmp = gguf.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(conv).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {conv} to {gtype}")
        tmp.rename(gguf)
    return gguf


def gguf_types(gguf: Path) -> dict:
    """{ggml type name: tensor count} of a GGUF (what llama.cpp's quantizer chose per tensor)."""
    from gguf import GGUFReader
    out: dict = {}
    for t in GGUFReader(str(gguf)).tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out


def llamacpp_runner(gguf: Path, a, ids, dec):
    """A callable timing llama.cpp on a GGUF."""
    import llama_cpp
    ll = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=a.threads,
                         n_threads_batch=a.threads, verbose=False)

    def run():
        ll.reset()
        return _time_runs(ll.eval, lambda t: ll.eval([t]), ids, dec)
    return run


def rss_mb() -> tuple[float, float]:
    """(resident, resident anonymous) MB of this process: RssAnon leaves out mapped file pages."""
    info = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
    kb = lambda k: int(info[k].split()[0]) / 1024                                  # noqa: E731
    return kb("RssAnon") + kb("RssFile") + kb("RssShmem"), kb("RssAnon")


def edgerun_file(v: str, quant: str, pth: Path, a) -> Path:
    from edgerun.converters import convert
    edr = a.work / f"rwkv{v}-{quant}.edr"
    if not edr.exists():
        convert(pth, edr, quant=quant, progress=False)
    return edr


def checkpoint(v: str, a) -> Path:
    pth = a.work / f"rwkv{v}-0.1b.pth"
    if not pth.exists():
        make_pth(v, pth)
    import rwkv                                   # its World vocabulary goes beside the checkpoint
    shutil.copy(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt", a.work)
    return pth


def speed(a, ids, dec):
    import edgerun
    for v in a.versions:
        pth = checkpoint(v, a)
        runners, row = {}, {"bench": "rwkv", "version": v, "threads": a.threads, "prompt": len(ids),
                            "decode_tokens": len(dec), "repeats": a.repeats}
        for q in a.quants:
            m = edgerun.load(edgerun_file(v, q, pth, a), threads=a.threads)

            def ours(m=m):
                st = m.new_state()
                return _time_runs(lambda x: m.step(st, x, last_only=True),
                                  lambda t: m.step(st, [t], last_only=True), ids, dec)
            runners[f"edgerun_{q}"] = ours
            if a.llama_cpp_src:
                gguf = llamacpp_gguf(v, pth, a, PEER_TYPE[q])
                row[f"llamacpp_{PEER_TYPE[q]}_tensor_types"] = gguf_types(gguf)
                runners[f"llamacpp_{PEER_TYPE[q]}"] = llamacpp_runner(gguf, a, ids, dec)
        for run in runners.values():                                   # warm-up: compile, page in
            run()
        runs = {k: [] for k in runners}
        for _ in range(a.repeats):                                     # interleaved rounds
            for k, run in runners.items():
                runs[k].append(run())
        metrics = ("prefill_tok_s", "decode_tok_s", "prefill_cpu_tok_s", "decode_cpu_tok_s")
        for k, rs in runs.items():
            rs = np.array(rs)
            row[k] = {m: round(float(np.median(rs[:, i])), 1) for i, m in enumerate(metrics)}
            row[k]["prefill_runs"] = [round(x, 1) for x in rs[:, 0]]
            row[k]["decode_runs"] = [round(x, 1) for x in rs[:, 1]]
        for q in a.quants:
            peer = f"llamacpp_{PEER_TYPE[q]}"
            if peer in row:                       # ratios of the medians, and the median of per-round ratios
                ours, theirs = np.array(runs[f"edgerun_{q}"]), np.array(runs[peer])
                row[f"ratio_{q}_vs_{PEER_TYPE[q]}"] = {
                    m: round(float(np.median(ours[:, i]) / np.median(theirs[:, i])), 3) for i, m in enumerate(metrics)}
                row[f"ratio_{q}_vs_{PEER_TYPE[q]}"]["per_round_prefill"] = round(
                    float(np.median(ours[:, 0] / theirs[:, 0])), 3)
        if not a.no_blinkdl:
            pf, dc = blinkdl(v, pth, a.threads, ids, dec)
            row["blinkdl_fp32"] = {"prefill_tok_s": pf, "decode_tok_s": dc}
        print(json.dumps(row), flush=True)


def long(a):
    """Constant memory: --tokens greedy tokens one at a time from a 4-token prompt."""
    import edgerun
    for v in a.versions:
        pth = checkpoint(v, a)
        for q in a.quants:
            m = edgerun.load(edgerun_file(v, q, pth, a), threads=a.threads)
            warm = m.new_state()                              # compile the one-token path first
            logits = m.step(warm, [0, 1, 2, 3], last_only=True)
            for t in range(5):
                m.step(warm, [int(np.argmax(logits[-1]))], last_only=True)
            del warm
            st = m.new_state()
            logits = m.step(st, [0, 17, 250, 3], last_only=True)
            times, cpu, rss, seen = np.empty(a.tokens), np.empty(a.tokens), {}, set()
            marks = {100, 1000, a.tokens}
            for i in range(1, a.tokens + 1):
                tok = int(np.argmax(logits[-1]))
                seen.add(tok)
                t0, c0 = time.perf_counter(), time.process_time()
                logits = m.step(st, [tok], last_only=True)
                times[i - 1], cpu[i - 1] = time.perf_counter() - t0, time.process_time() - c0
                if i in marks:
                    rss[i] = rss_mb()
            first, last = times[:1000].mean(), times[-1000:].mean()
            row = {"bench": "rwkv_long", "version": v, "quant": q, "threads": a.threads, "tokens": a.tokens,
                   "distinct_tokens": len(seen), "state_mb": round(st.nbytes / 2**20, 3),
                   "rss_mb": {k: round(r[0], 2) for k, r in sorted(rss.items())},
                   "rss_anon_mb": {k: round(r[1], 2) for k, r in sorted(rss.items())},
                   "rss_growth_mb_100_to_end": round(rss[a.tokens][0] - rss[100][0], 3),
                   "rss_anon_growth_mb_100_to_end": round(rss[a.tokens][1] - rss[100][1], 3),
                   "first_1000_ms": round(first * 1e3, 3), "last_1000_ms": round(last * 1e3, 3),
                   "last_vs_first": round(last / first, 4),
                   "first_1000_cpu_ms": round(cpu[:1000].mean() * 1e3, 3),
                   "last_1000_cpu_ms": round(cpu[-1000:].mean() * 1e3, 3),
                   "last_vs_first_cpu": round(cpu[-1000:].mean() / cpu[:1000].mean(), 4),
                   "finite": bool(np.isfinite(logits).all())}
            print(json.dumps(row), flush=True)


class _Counting:
    """A kernel module seen through a proxy that counts the calls made through it."""

    def __init__(self, module, count):
        self._module, self._count = module, count

    def __getattr__(self, name):
        f = getattr(self._module, name)

        def counted(*args, **kw):
            self._count[0] += 1
            return f(*args, **kw)
        return counted


def count_calls(m) -> int:
    """Calls from Python into compiled code in one decode step: every kernel the backend calls
    through its modules, one per fused layer."""
    from edgerun.kernels_numba import wkv
    ops, count = m.ops, [0]
    cls = type(ops)
    saved = {name: getattr(ops, name) for name in ("_lin", "_ops")}
    saved_wkv, saved_step = cls._wkv, cls.rwkv_layer_step

    def step(self, *args, **kw):
        count[0] += 1
        return saved_step(self, *args, **kw)
    try:
        for name, mod in saved.items():
            setattr(ops, name, _Counting(mod, count))
        cls._wkv = property(lambda self: _Counting(wkv, count))
        cls.rwkv_layer_step = step
        st = m.new_state()
        m.step(st, [5, 6])
        count[0] = 0
        m.step(st, [7], last_only=True)
    finally:
        for name, mod in saved.items():
            setattr(ops, name, mod)
        cls._wkv, cls.rwkv_layer_step = saved_wkv, saved_step
    return count[0]


def dispatch(a):
    import edgerun
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(1, V - 1, 16)]
    dec = [int(i) for i in rng.integers(1, V - 1, 48)]
    for v in a.versions:
        pth = checkpoint(v, a)
        for q in a.quants:
            fused = edgerun.load(edgerun_file(v, q, pth, a), threads=a.threads)
            plain = edgerun.load(edgerun_file(v, q, pth, a), threads=a.threads)
            plain.model.decode_plans = None
            row = {"bench": "rwkv_dispatch", "version": v, "quant": q, "threads": a.threads,
                   "fused_layers": fused.model.decode_plans is not None,
                   "calls_per_token": {"fused": count_calls(fused), "op_by_op": count_calls(plain)}}

            def run(m):
                st = m.new_state()
                m.step(st, prompt, last_only=True)
                wall, cpu = [], []
                for t in dec:
                    t0, c0 = time.perf_counter(), time.process_time()
                    m.step(st, [t], last_only=True)
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                return float(np.median(wall)) * 1e3, float(np.median(cpu)) * 1e3
            runs = {"fused": [], "op_by_op": []}
            run(fused), run(plain)                                        # warm-up: compile
            for _ in range(a.repeats):
                runs["fused"].append(run(fused))
                runs["op_by_op"].append(run(plain))
            for k, rs in runs.items():
                rs = np.array(rs)
                row[k] = {"decode_ms": round(float(np.median(rs[:, 0])), 3),
                          "decode_cpu_ms": round(float(np.median(rs[:, 1])), 3),
                          "decode_ms_runs": [round(x, 3) for x in rs[:, 0]]}
            row["op_by_op_over_fused_cpu"] = round(row["op_by_op"]["decode_cpu_ms"] / row["fused"]["decode_cpu_ms"], 3)
            print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", nargs="+", default=["7", "6"])
    ap.add_argument("--quants", nargs="+", default=["int8", "int4"], choices=list(PEER_TYPE))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-cpp-src", type=Path, default=None, help="unpacked llama-cpp-python sdist")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/rwkv"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-blinkdl", action="store_true", help="leave BlinkDL's package out")
    ap.add_argument("--long", action="store_true", help="constant-memory run instead of the speed table")
    ap.add_argument("--tokens", type=int, default=10000, help="--long: tokens to generate")
    ap.add_argument("--dispatch", action="store_true", help="calls into compiled code per token, fused vs op by op")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.long:
        long(a)
        return
    if a.dispatch:
        dispatch(a)
        return
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(1, V - 1, 256)]
    dec = [int(i) for i in rng.integers(1, V - 1, 48)]
    speed(a, ids, dec)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

"""edgerun vs llama.cpp (and transformers on torch) on the same GGUF, same threads, interleaved.

    pip install llama-cpp-python matplotlib        # this benchmark's own setup; not edgerun deps
    python benchmarks/peer_bench.py [--quants Q8_0 Q4_0] [--threads 2] [--rounds 5]

Model: SmolLM2-135M-Instruct (`edgerun pull smollm2-135m`, a Q4_1 GGUF). llama.cpp's own quantizer
(llama_cpp.llama_model_quantize) re-quantizes it to each --quants type, and edgerun converts that
same file natively (Q8_0 -> int8 groups of 32, Q4_0 -> int4 groups of 32, bit for bit).
transformers loads the same GGUF (dequantized to float32: its CPU path has no quantized kernels).

Each runtime lives in its own worker process, loaded and warmed once, idle (blocked on a pipe)
while the others run, so no thread pool spins against another. A round asks every worker in turn
for one prefill of --prompt tokens and --gen greedy decode steps (a fresh random prompt per round,
so no prefix cache can serve it); medians over rounds are reported, with ratios to llama.cpp.

Writes benchmarks/results/peer_bench.json and the chart benchmarks/peer_bench.png (--chart).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------ workers (one per runtime)

def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    import numpy as np
    return np.random.default_rng(seed).integers(100, min(vocab, 30000), n).tolist()


class _Edgerun:
    def __init__(self, path, threads):
        import edgerun
        self.m = edgerun.load(path, threads=threads)
        self.vocab = self.m.vocab_size

    def run(self, ids, gen):
        import numpy as np
        m = self.m
        st = m.new_state()
        t0 = time.perf_counter()
        tok = int(np.argmax(m.step(st, ids, last_only=True)[-1]))
        t1 = time.perf_counter()
        for _ in range(gen):
            tok = int(np.argmax(m.step(st, [tok], last_only=True)[-1]))
        return t1 - t0, time.perf_counter() - t1


class _LlamaCpp:
    def __init__(self, path, threads):
        from llama_cpp import Llama
        self.llm = Llama(path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def run(self, ids, gen):
        import numpy as np
        llm = self.llm
        llm.reset()
        last = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(self.vocab,))   # noqa: E731
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(last()))
        t1 = time.perf_counter()
        for _ in range(gen):
            llm.eval([tok])
            tok = int(np.argmax(last()))
        return t1 - t0, time.perf_counter() - t1


class _Transformers:
    def __init__(self, path, threads):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        p = Path(path)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                          dtype=torch.float32).eval()
        self.vocab = self.model.config.vocab_size

    def run(self, ids, gen):
        torch = self.torch
        with torch.no_grad():
            t0 = time.perf_counter()
            out = self.model(torch.tensor([ids]), use_cache=True)
            tok = out.logits[0, -1].argmax().view(1, 1)
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(gen):
                out = self.model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        return t1 - t0, time.perf_counter() - t1


RUNTIMES = {"edgerun": _Edgerun, "llama.cpp": _LlamaCpp, "transformers": _Transformers}


def worker(runtime: str, path: str, threads: int) -> None:
    """Serve 'run PROMPT GEN SEED' lines on stdin with one JSON line each on stdout."""
    rt = RUNTIMES[runtime](path, threads)
    rt.run(_prompt(rt.vocab, 16, 0), 4)                   # compile / warm every shape once
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        _, n, gen, seed = line.split()
        ids = _prompt(rt.vocab, int(n), int(seed))
        pre, dec = rt.run(ids, int(gen))
        print(json.dumps({"prefill_tok_s": len(ids) / pre, "decode_tok_s": int(gen) / dec}), flush=True)


class Worker:
    def __init__(self, runtime, path, threads):
        self.name = runtime
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", runtime, str(path), str(threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (see its stderr above)")
        return json.loads(line)

    def run(self, n, gen, seed):
        self.p.stdin.write(f"run {n} {gen} {seed}\n")
        self.p.stdin.flush()
        return self._read()

    def close(self):
        self.p.stdin.close()
        self.p.wait()


# ------------------------------------------------------------------ files

def gguf_for(quant: str, results: Path) -> Path:
    """SmolLM2's GGUF re-quantized by llama.cpp to `quant` (Q8_0, Q4_0, ...), made once."""
    from edgerun.registry import model_dir, pull
    pull("smollm2-135m", quiet=True)
    src = model_dir("smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if quant.upper() == "Q4_1":
        return src
    out = results / f"smollm2-135m.{quant.upper()}.gguf"
    if not out.exists():
        import llama_cpp
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {quant}")
        tmp.rename(out)
    return out


def edr_for(gguf: Path) -> Path:
    from edgerun.converters import convert
    out = gguf.with_suffix(".edr")
    if not out.exists():
        convert(gguf, out, progress=False)
    return out


# ------------------------------------------------------------------ main

def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def chart(report: dict, path: Path) -> None:
    """Grouped bars per quant type (edgerun, llama.cpp); transformers (float32, one run) as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["results"]
    peers = [r for r in rows if r["runtime"] != "transformers"]
    torch_row = next((r for r in rows if r["runtime"] == "transformers"), None)
    quants = list(dict.fromkeys(r["quant"] for r in peers))
    runtimes = list(dict.fromkeys(r["runtime"] for r in peers))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(runtimes)
    for ax, metric, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        for i, rt in enumerate(runtimes):
            vals = [next((r[metric] for r in peers if r["quant"] == q and r["runtime"] == rt), 0) for q in quants]
            bars = ax.bar([k + i * width for k in range(len(quants))], vals, width, label=rt)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        if torch_row:
            ax.axhline(torch_row[metric], color="gray", linestyle="--", linewidth=1,
                       label=f"transformers f32 ({torch_row[metric]:.0f})")
        ax.set_xticks([k + width * (len(runtimes) - 1) / 2 for k in range(len(quants))], quants)
        ax.set_title(f"SmolLM2-135M {title}, tokens/s ({report['threads']} threads)")
        ax.legend(fontsize=8, loc="lower right")
    fig.text(0.5, 0.01, f"{report['cpu']}; medians of {report['rounds']} interleaved rounds; "
             f"python benchmarks/peer_bench.py", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "peer_bench.json")
    ap.add_argument("--chart", type=Path, default=HERE / "peer_bench.png")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker[0], a.worker[1], int(a.worker[2]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for quant in a.quants:
        gguf = gguf_for(quant, a.out.parent)
        paths = {"edgerun": edr_for(gguf), "llama.cpp": gguf, "transformers": gguf}
        # transformers dequantizes every type to float32: one run of it (on the first quant) is enough
        rts = [rt for rt in a.runtimes if rt != "transformers" or quant == a.quants[0]]
        workers = [Worker(rt, paths[rt], a.threads) for rt in rts]
        got = {w.name: [] for w in workers}
        for r in range(a.rounds):
            for w in workers:
                got[w.name].append(w.run(a.prompt, a.gen, 1000 + r))
        for w in workers:
            w.close()
        for rt, runs in got.items():
            rows.append({"quant": quant if rt != "transformers" else "f32 (transformers)", "runtime": rt,
                         "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
                         "prefill_tok_s": statistics.median(x["prefill_tok_s"] for x in runs),
                         "decode_all": [x["decode_tok_s"] for x in runs],
                         "prefill_all": [x["prefill_tok_s"] for x in runs], "file": str(paths[rt])})
        ours = next(x for x in rows if x["quant"] == quant and x["runtime"] == "edgerun")
        peer = next((x for x in rows if x["quant"] == quant and x["runtime"] == "llama.cpp"), None)
        line = f"{quant}: edgerun decode {ours['decode_tok_s']:.1f} prefill {ours['prefill_tok_s']:.1f} tok/s"
        if peer:
            ours["decode_ratio"] = ours["decode_tok_s"] / peer["decode_tok_s"]
            ours["prefill_ratio"] = ours["prefill_tok_s"] / peer["prefill_tok_s"]
            line += (f" | llama.cpp {peer['decode_tok_s']:.1f} / {peer['prefill_tok_s']:.1f} | ratios decode "
                     f"{ours['decode_ratio']:.2f} prefill {ours['prefill_ratio']:.2f}")
        print(line, flush=True)
    for x in rows:
        if x["runtime"] == "transformers":
            print(f"transformers (torch {x['quant']}): decode {x['decode_tok_s']:.1f} prefill {x['prefill_tok_s']:.1f} tok/s")
    report = {"bench": "peer", "model": "SmolLM2-135M-Instruct", "threads": a.threads, "rounds": a.rounds,
              "prompt_tokens": a.prompt, "gen_tokens": a.gen, "cpu": cpu_name(),
              "cores": os.cpu_count(), "command": "python benchmarks/peer_bench.py " + " ".join(argv or sys.argv[1:]),
              "results": rows}
    a.out.write_text(json.dumps(report, indent=1))
    if a.chart:
        chart(report, a.chart)
        print(f"wrote {a.out} and {a.chart}")


if __name__ == "__main__":
    main()

"""RWKV v6 / v7 at the published 0.1B shapes (random weights made here), side by side:
edgerun int8 vs llama.cpp Q8_0 (same checkpoint, GGUF made by llama.cpp's own converter), and
BlinkDL's `rwkv` package (torch fp32). Benchmark-only dependencies: torch, rwkv, llama-cpp-python
and the llama-cpp-python sdist (for vendor/llama.cpp/convert_hf_to_gguf.py).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python benchmarks/rwkv_bench.py --versions 7 6 --threads 1 --llama-cpp-src llama_cpp_python-0.3.36

Prints one JSON line per version: prefill and decode tokens/s (medians, runs interleaved).
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
    t = time.perf_counter()
    prefill(ids)
    pf = len(ids) / (time.perf_counter() - t)
    d = []
    for x in dec:
        t = time.perf_counter()
        step(x)
        d.append(time.perf_counter() - t)
    return pf, 1 / float(np.median(d))


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


def llamacpp_runner(version: str, pth: Path, a, ids, dec):
    """A callable timing llama.cpp on the Q8_0 GGUF its own converter makes from the same weights."""
    import llama_cpp
    gguf = a.work / f"rwkv{version}-q8_0.gguf"
    if not gguf.exists():
        hf = a.work / f"rwkv{version}-hf"
        to_hf_layout(version, pth, hf)
        subprocess.run([sys.executable, str(a.llama_cpp_src / "vendor/llama.cpp/convert_hf_to_gguf.py"),
                        str(hf), "--outtype", "q8_0", "--outfile", str(gguf)], check=True, capture_output=True)
    ll = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=a.threads,
                         n_threads_batch=a.threads, verbose=False)

    def run():
        ll.reset()
        return _time_runs(ll.eval, lambda t: ll.eval([t]), ids, dec)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", nargs="+", default=["7", "6"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-cpp-src", type=Path, default=None, help="unpacked llama-cpp-python sdist")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/rwkv"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import edgerun
    from edgerun.converters import convert
    a.work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(1, V - 1, 256)]
    dec = [int(i) for i in rng.integers(1, V - 1, 48)]
    for v in a.versions:
        pth = a.work / f"rwkv{v}-0.1b.pth"
        if not pth.exists():
            make_pth(v, pth)
        import rwkv                                   # its World vocabulary goes beside the checkpoint
        shutil.copy(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt", a.work)
        edr = a.work / f"rwkv{v}-int8.edr"
        if not edr.exists():
            convert(pth, edr, quant="int8", progress=False)
        m = edgerun.load(edr, threads=a.threads)

        def ours():
            st = m.new_state()
            return _time_runs(lambda x: m.step(st, x, last_only=True), lambda t: m.step(st, [t], last_only=True),
                              ids, dec)
        peer = llamacpp_runner(v, pth, a, ids, dec) if a.llama_cpp_src else None
        if peer:
            peer()
        ours()
        runs = {"edgerun_int8": [], "llamacpp_q8_0": []}
        for _ in range(a.repeats):                                     # interleaved
            runs["edgerun_int8"].append(ours())
            if peer:
                runs["llamacpp_q8_0"].append(peer())
        row = {"bench": "rwkv", "version": v, "threads": a.threads, "prompt": len(ids), "decode_tokens": len(dec)}
        for k, rs in runs.items():
            if rs:
                rs = np.array(rs)
                row[k] = {"prefill_tok_s": float(np.median(rs[:, 0])), "decode_tok_s": float(np.median(rs[:, 1]))}
        pf, dc = blinkdl(v, pth, a.threads, ids, dec)
        row["blinkdl_fp32"] = {"prefill_tok_s": pf, "decode_tok_s": dc}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

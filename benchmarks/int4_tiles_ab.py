"""Int4 decode with the 4-row tiles against the file's rows, interleaved step by step.

    python benchmarks/int4_tiles_ab.py [--pairs 30] [--tokens 8] [--threads 2]

The 1B int4 model of roofline_1b.py (run that first: it writes benchmarks/results/llama1b-int4.edr)
is loaded twice, once with the tiles (the default) and once with EDGERUN_INT4_TILES=0. Each pair
times --tokens greedy decode steps of one, then of the other; the ratio of each pair cancels most
of this machine's drift (its memory bandwidth changes within seconds). Prints the median ms a
token of each and the median of the per-pair ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=HERE / "results" / "llama1b-int4.edr")
    a = ap.parse_args(argv)
    import edgerun
    models = {}
    for name, flag in (("tiles", "1"), ("rows", "0")):
        os.environ["EDGERUN_INT4_TILES"] = flag
        t0 = time.perf_counter()
        models[name] = edgerun.load(a.model, threads=a.threads)
        print(f"{name}: loaded in {time.perf_counter() - t0:.2f} s", flush=True)
    os.environ.pop("EDGERUN_INT4_TILES")
    prompt = list(range(100, 132))
    states = {}
    ms = {name: [] for name in models}
    for _ in range(a.pairs):
        for name, m in models.items():
            st = states.get(name)
            if st is None or st.length > 400:
                st = states[name] = m.new_state()
                m.step(st, prompt, last_only=True)
            tok = 5
            t0 = time.perf_counter()
            for _ in range(a.tokens):
                tok = int(np.argmax(m.step(st, [tok], last_only=True)[-1]))
            ms[name].append((time.perf_counter() - t0) / a.tokens * 1e3)
    ratio = statistics.median(r / t for t, r in zip(ms["tiles"], ms["rows"]))
    print(f"ms a token (median of {a.pairs}): tiles {statistics.median(ms['tiles']):.2f}, "
          f"rows {statistics.median(ms['rows']):.2f}; rows / tiles per pair (median) {ratio:.3f}")


if __name__ == "__main__":
    main()

"""Prefill GEMM: the register-tiled kernel (kernels_numba/simd_gemm.py) vs the row kernels it
replaces (linear.gemm_*_q8_rows: one weight row x 4 tokens per call), interleaved.

    python benchmarks/gemm_bench.py [--threads 1] [--rounds 7] [--T 64 128 256 512] [--clock wall|cpu] [--json OUT]

Shapes (in -> out) of SmolLM2-135M (576 -> 1536, 1536 -> 576, 576 -> 576) and RWKV v7 0.1B
(768 -> 768, 768 -> 3072, 3072 -> 768); kinds int8 per row, int8 groups of 32 (Q8_0), int4 groups
of 32 symmetric (Q4_0) and with mins (Q4_1). Each round times both kernels back to back (A B, then
B A in the next round), each the best of a few calls; the medians over rounds give GMAC/s per
thread (multiply-adds / s / threads) and the ratio tiled / rows. Random weights, float16 scales
for int4 (as GGUF ships them), float32 for int8.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SHAPES = [("smollm2 q/o", 576, 576), ("smollm2 gate/up", 576, 1536), ("smollm2 down", 1536, 576),
          ("rwkv7 r/k/v/o", 768, 768), ("rwkv7 ffn key", 768, 3072), ("rwkv7 ffn value", 3072, 768)]
KINDS = [("int8_row", "int8", {}), ("int8_g32", "int8", {"group": 32}),
         ("int4_sym", "int4", {"group": 32}), ("int4_mins", "int4", {"group": 32, "symmetric": False})]


def _best(fn, calls, clock):
    best = float("inf")
    for _ in range(calls):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3, help="calls per timing (the best one counts)")
    ap.add_argument("--T", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--kinds", nargs="+", default=[k[0] for k in KINDS])
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (time.process_time), steadier while other work "
                         "shares the cores; meaningful with --threads 1")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numba
    from edgerun import packed
    from edgerun.kernels_numba import linear as L
    from edgerun.kernels_numba import simd_gemm as G
    numba.set_num_threads(args.threads)
    if not G.TILED:
        raise SystemExit("this CPU has no 512-bit VNNI: the tiled kernel is not used here")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rng = np.random.default_rng(0)
    results = []
    print(f"threads {args.threads}, rounds {args.rounds}, {args.clock} clock; GMAC/s per thread, medians; ratio = tiled / rows")
    print(f"{'shape':<17} {'in->out':>10} {'kind':<10} {'T':>4} {'rows':>7} {'tiled':>7} {'ratio':>6}")
    for name, n, rows in SHAPES:
        w = rng.normal(size=(rows, n)).astype(np.float32)
        for label, kind, params in KINDS:
            if label not in args.kinds:
                continue
            c = packed.codec(kind).container(*packed.codec(kind).pack(w, **params))
            for T in args.T:
                x = rng.normal(size=(T, n)).astype(np.float32)
                out = np.empty((T, rows), np.float32)
                if kind == "int8":
                    a = lambda: L.gemm_int8_q8_rows(x, c.q, c.scales, c.group, out)        # noqa: E731
                    b = lambda: L.gemm_int8_q8(x, c.q, c.scales, c.group, out)             # noqa: E731
                else:
                    a = lambda: L.gemm_int4_q8_rows(x, c.qs, c.scales, c.mins, c.group, out)  # noqa: E731
                    b = lambda: L.gemm_int4_q8(x, c.qs, c.scales, c.mins, c.group, out)       # noqa: E731
                a(), b()
                ta, tb = [], []
                for r in range(args.rounds):
                    for fn, ts in (((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))):
                        ts.append(_best(fn, args.calls, clock))
                macs = n * rows * T / args.threads / 1e9
                ga, gb = macs / statistics.median(ta), macs / statistics.median(tb)
                results.append(dict(shape=name, n_in=n, n_out=rows, kind=label, T=T, rows_gmacs=ga,
                                    tiled_gmacs=gb, ratio=gb / ga))
                print(f"{name:<17} {f'{n}->{rows}':>10} {label:<10} {T:>4} {ga:>7.1f} {gb:>7.1f} {gb / ga:>5.2f}x",
                      flush=True)
    ratios = [r["ratio"] for r in results]
    print(f"ratio tiled/rows: median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, rounds=args.rounds, clock=args.clock, results=results), f, indent=1)


if __name__ == "__main__":
    main()

"""Decode attention (one query) over the paged KV cache: decode_attention against tiled_attention,
the general kernel that served decode before (and still serves prefill), in the same run.

    python benchmarks/decode_attention.py [--threads 2] [--rounds 5] [--contexts 64 512 2048 8128]

Shapes: the 1B Llama of roofline_1b.py (32 query / 8 KV heads of 64) and SmolLM2-135M (9 / 3);
float32 and int8 KV; "warm": one layer's pool read again and again (it stays in the caches),
"cold": enough layers' pools in turn to fill 64 MB (twice the L3 here), as a decode step meets
them (each one last read a whole token ago). Each round times both kernels back to back; medians of the rounds, ratio = tiled / decode.
Prints JSON lines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SHAPES = {"llama-1b": (32, 8, 64), "smollm2-135m": (9, 3, 64)}
BLOCK = 16


def _pools(n_layers, L, n_kv, d, int8, rng):
    from edgerun.kernels_numba.paged_attention import store_kv_paged, store_kv_paged_int8
    nb = -(-L // BLOCK)
    out = []
    for _ in range(n_layers):
        table = rng.permutation(nb + 2)[:nb].astype(np.int32)
        k = (rng.standard_normal((L, n_kv, d)) * 0.3).astype(np.float32)
        v = rng.standard_normal((L, n_kv, d)).astype(np.float32)
        if int8:
            kp = np.zeros((nb + 2, n_kv, BLOCK, d), np.int8)
            vp = np.zeros_like(kp)
            ks, vs = np.zeros(kp.shape[:3], np.float32), np.zeros(kp.shape[:3], np.float32)
            store_kv_paged_int8(k, v, kp, vp, ks, vs, table, 0)
        else:
            kp = np.zeros((nb + 2, n_kv, BLOCK, d), np.float32)
            vp = np.zeros_like(kp)
            ks = vs = np.ones((1, 1, 1), np.float32)
            store_kv_paged(k, v, kp, vp, table, 0)
        out.append((kp, vp, ks, vs, table))
    return out


_DRIVE = []


def _time(fn, q, pools, L, reps, out):
    """Microseconds a call, the calls made from compiled code (as the decode layer makes them: a
    Python call through Numba's dispatcher would add ~10 us to each)."""
    from numba import njit, typed
    if not _DRIVE:
        @njit
        def drive(fn, q, kps, vps, kss, vss, tables, quantized, L, reps, out):
            for _ in range(reps):
                for i in range(len(kps)):
                    fn(q, kps[i], vps[i], kss[i], vss[i], quantized, tables[i], L - 1,
                       np.float32(0.125), 0, np.float32(0.0), out)
        _DRIVE.append(drive)
    lists = [typed.List([p[i] for p in pools]) for i in range(5)]
    t = time.perf_counter()
    _DRIVE[0](fn, q, *lists, pools[0][0].dtype == np.int8, L, reps, out)
    return (time.perf_counter() - t) / (reps * len(pools)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048, 8128])
    args = ap.parse_args()
    import numba
    numba.set_num_threads(args.threads)
    from edgerun.kernels_numba.paged_attention import decode_attention, tiled_attention
    rng = np.random.default_rng(0)
    for name, (H, n_kv, d) in SHAPES.items():
        q = rng.standard_normal((1, H, d)).astype(np.float32)
        out = np.empty_like(q)
        for kv in ("f32", "int8"):
            for L in args.contexts:
                per_layer = 2 * L * n_kv * d * (1 if kv == "int8" else 4)
                for cache, n_layers in (("warm", 1), ("cold", min(512, max(2, -(-(64 << 20) // per_layer))))):
                    pools = _pools(n_layers, L, n_kv, d, kv == "int8", rng)
                    _time(decode_attention, q, pools, L, 1, out)                 # compile, warm up
                    once = _time(tiled_attention, q, pools, L, 1, out) * len(pools) * 1e-6
                    reps = max(3, int(0.1 / once))                              # ~0.1 s a sample
                    ours, tiled = [], []
                    for _ in range(args.rounds):
                        ours.append(_time(decode_attention, q, pools, L, reps, out))
                        tiled.append(_time(tiled_attention, q, pools, L, reps, out))
                    row = {"bench": "decode_attention", "shape": name, "kv": kv, "context": L, "cache": cache,
                           "threads": args.threads, "decode_us": round(statistics.median(ours), 1),
                           "tiled_us": round(statistics.median(tiled), 1),
                           "ratio": round(statistics.median(t / o for t, o in zip(tiled, ours)), 2)}
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

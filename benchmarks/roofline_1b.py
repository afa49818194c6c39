"""Decode of a ~1B-parameter Llama shape against the memory-bandwidth roofline, per packed kind.

    python benchmarks/roofline_1b.py [--kinds int8 int4 ternary sparse24 int4-rows] [--threads 2] [--rounds 5]

The model is Llama-3.2-1B-like (hidden 2048, 16 layers, MLP 8192, 32 query / 8 KV heads) with
SmolLM2's 49152-token vocabulary and tokenizer: 1.17B parameters, random weights made here (the
packed codes directly, not quantized floats), written once to benchmarks/results/llama1b-KIND.edr.
The embedding table and the head are int8 in every variant (as BitNet keeps them), the 112
layer matrices are KIND.

In one process, interleaved by round (int8, int4, ternary, int8, ...): decode --gen tokens after
a 32-token prompt, with the streaming-read bandwidth (edgerun.bench.memory_bandwidth: the best of
anonymous memory and the models' own mapped weights) measured between every two decode samples.
This machine's bandwidth drifts by tens of percent within seconds, so each sample is held against
the bandwidth measured just before and just after it: roofline ratio = decode tok/s x bytes read
per token / the mean of those two (median over rounds). The machine's memory runs in two regimes
(a streaming read of ~33 and ~50-60 GB/s here); samples whose two probes agree within 10% are
also reported by regime (above / below the middle of the probes' range).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=49152, max_position_embeddings=4096,
             rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)


def _f16_scales(rng, shape, scale):
    return (rng.uniform(0.5, 1.5, shape) * scale).astype(np.float16).view(np.uint16)


def random_packed(kind: str, rows: int, cols: int, rng):
    """A PackedTensor of random codes whose dequantized weights have std ~ 0.7 / sqrt(cols)."""
    from edgerun.format import PackedTensor
    std = 0.7 / np.sqrt(cols)
    if kind == "int8":
        q = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
        return PackedTensor("int8", (rows, cols), {"group": cols},
                            {"q": q, "scales": _f16_scales(rng, (rows, 1), std / 73)})
    if kind == "int4":
        qs = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
        return PackedTensor("int4", (rows, cols), {"group": 32},
                            {"qs": qs, "scales": _f16_scales(rng, (rows, cols // 32), std / 4.6)})
    if kind == "ternary":      # 2-bit codes t + 1 in {0, 1, 2}, four to a byte (packed.TernaryWeight)
        t = rng.integers(0, 3, (4, rows, cols // 4), dtype=np.uint8)
        codes = t[0] | (t[1] << 2) | (t[2] << 4) | (t[3] << 6)
        return PackedTensor("ternary", (rows, cols), {"n": cols, "per_row": False},
                            {"codes": codes, "scales": np.array([std / 0.82], np.float32)})
    if kind == "sparse24":     # 2:4 int8 values: two kept of every four inputs, 4-bit masks (packed.Sparse24Weight)
        masks = np.array([3, 5, 6, 9, 10, 12], np.uint8)
        nib = masks[rng.integers(0, 6, (rows, cols // 4))]
        return PackedTensor("sparse24", (rows, cols), {"values": "int8"},
                            {"vals": rng.integers(-127, 128, (rows, cols // 2), dtype=np.int8),
                             "meta": nib[:, 0::2] | (nib[:, 1::2] << 4),
                             "scales": (rng.uniform(0.5, 1.5, rows) * std / 73 * np.sqrt(2)).astype(np.float32)})
    raise ValueError(kind)


def build(kind: str, out: Path) -> Path:
    """Write llama1b-KIND.edr (once)."""
    if out.exists():
        return out
    import edgerun
    from edgerun import format as edr
    from edgerun.format import PackedTensor
    from edgerun.registry import model_dir, pull
    pull("smollm2-135m", quiet=True)
    tok = edgerun.load(model_dir("smollm2-135m") / "smollm2-135m.edr").file.tokenizer
    rng = np.random.default_rng(0)
    s = SHAPE
    h, i, d = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    nq, nkv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d

    def tensors():
        ones = PackedTensor.from_array(np.ones(h, np.float32), "f32")
        yield "model.embed_tokens.weight", random_packed("int8", s["vocab_size"], h, rng)
        for layer in range(s["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            yield f"{p}.input_layernorm.weight", ones
            yield f"{p}.post_attention_layernorm.weight", ones
            for name, rows, cols in (("self_attn.q_proj", nq, h), ("self_attn.k_proj", nkv, h),
                                     ("self_attn.v_proj", nkv, h), ("self_attn.o_proj", h, nq),
                                     ("mlp.gate_proj", i, h), ("mlp.up_proj", i, h), ("mlp.down_proj", h, i)):
                yield f"{p}.{name}.weight", random_packed(kind, rows, cols, rng)
        yield "model.norm.weight", ones
        yield "lm_head.weight", random_packed("int8", s["vocab_size"], h, rng)

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPE}
    edr.write(out, arch="LlamaForCausalLM", config=config, tokenizer=tok, tensors=tensors(),
              extra={"quant": f"{kind} (random weights; embeddings and head int8)", "source": "roofline_1b.py"})
    return out


def decode_tok_s(m, gen: int, seed: int) -> float:
    ids = np.random.default_rng(seed).integers(100, 30000, 32).tolist()
    st = m.new_state()
    tok = int(np.argmax(m.step(st, ids, last_only=True)[-1]))
    t0 = time.perf_counter()
    for _ in range(gen):
        tok = int(np.argmax(m.step(st, [tok], last_only=True)[-1]))
    return gen / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=["int8", "int4", "ternary", "sparse24"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "roofline_1b.json")
    a = ap.parse_args(argv)
    import edgerun
    from edgerun.bench import bytes_per_token, memory_bandwidth
    a.out.parent.mkdir(parents=True, exist_ok=True)
    models = {}
    for kind in a.kinds:
        t0 = time.perf_counter()
        path = build(kind.removesuffix("-rows"), a.out.parent / f"llama1b-{kind.removesuffix('-rows')}.edr")
        # int4-rows: the int4 file decoded by the row kernels, without the 4-row tiles made at load
        os.environ["EDGERUN_INT4_TILES"] = "0" if kind.endswith("-rows") else "1"
        models[kind] = edgerun.load(path, threads=a.threads)
        os.environ.pop("EDGERUN_INT4_TILES")
        decode_tok_s(models[kind], 2, 0)                 # compile / warm, pages in
        print(f"{kind}: {path} ({path.stat().st_size / 2**30:.2f} GiB) ready in {time.perf_counter() - t0:.0f} s",
              flush=True)
    def bandwidth():
        return memory_bandwidth(a.threads, repeats=3, also=[m.file.data for m in models.values()])

    bw, dec, around = [bandwidth()], {k: [] for k in models}, {k: [] for k in models}
    for r in range(a.rounds):
        for kind, m in models.items():
            dec[kind].append(decode_tok_s(m, a.gen, r + 1))
            bw.append(bandwidth())
            around[kind].append((bw[-2], bw[-1]))     # just before and just after this sample
    band = statistics.median(bw)
    band_mid = (min(bw) + max(bw)) / 2      # this machine's two memory regimes: above / below
    rows = []
    for kind, m in models.items():
        per_token = bytes_per_token(m)
        tok_s = statistics.median(dec[kind])
        ratios = [d * per_token / ((b0 + b1) / 2) for d, (b0, b1) in zip(dec[kind], around[kind])]
        ratio = statistics.median(ratios)
        # steady samples: the probes before and after agree within 10% (no regime switch in between)
        steady = [(r, (b0 + b1) / 2) for r, (b0, b1) in zip(ratios, around[kind]) if abs(b0 - b1) < 0.1 * (b0 + b1) / 2]
        fast = [r for r, b in steady if b > band_mid]
        slow = [r for r, b in steady if b <= band_mid]
        rows.append({"kind": kind, "decode_tok_s": tok_s, "decode_all": dec[kind], "bytes_per_token": per_token,
                     "bandwidth_around": around[kind], "roofline_tok_s": band / per_token, "roofline_ratio": ratio,
                     "ratios": ratios, "steady_fast_ratio": statistics.median(fast) if fast else None,
                     "steady_slow_ratio": statistics.median(slow) if slow else None})
        regimes = " ".join(f"{name} {100 * statistics.median(v):.0f}% ({len(v)})" for name, v in (("fast", fast), ("slow", slow)) if v)
        print(f"{kind:9s} decode {tok_s:6.2f} tok/s  {per_token / 2**20:7.1f} MiB/token  roofline {band / per_token:6.2f} "
              f"tok/s  -> {100 * ratio:4.0f}% of it (median of per-sample ratios; steady samples by regime: {regimes})",
              flush=True)
    speed = {r["kind"]: r["decode_tok_s"] for r in rows}
    if "ternary" in speed and "int4" in speed:
        print(f"ternary / int4 decode: {speed['ternary'] / speed['int4']:.2f}x")
    if "sparse24" in speed and "int8" in speed:
        print(f"2:4 int8 / dense int8 decode: {speed['sparse24'] / speed['int8']:.2f}x")
    print(f"bandwidth {band / 1e9:.1f} GB/s (median of {len(bw)} samples, {min(bw) / 1e9:.1f}-{max(bw) / 1e9:.1f}; "
          f"{a.threads} threads, streaming read)")
    a.out.write_text(json.dumps({"bench": "roofline_1b", "shape": SHAPE, "threads": a.threads, "rounds": a.rounds,
                                 "gen_tokens": a.gen, "bandwidth_gb_s": band / 1e9, "bandwidth_all": bw,
                                 "results": rows}, indent=1))


if __name__ == "__main__":
    main()

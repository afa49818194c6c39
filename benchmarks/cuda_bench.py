"""GPU benchmark: device-to-device copy bandwidth, int8/int4 GEMV at 8192x8192 against it, and
batch-1 decode of a ~1B Llama shape (random weights made on the device) against transformers
(bf16, eager attention) on the same GPU in the same run.

    python benchmarks/cuda_bench.py [--json OUT.json] [--tokens 128] [--skip-torch] [--sweep] [--skip-decode]
                                    [--kinds int8,int4,int8+f32,int4+f32]

Prints a table and writes the numbers as JSON. Needs an NVIDIA GPU and numba-cuda (and torch +
transformers for the baseline).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _events(cuda):
    return cuda.event(timing=True), cuda.event(timing=True)


_SPIN = []


def _spin(cuda, ms: float):
    """Keep the GPU busy for about ms so that the launches queued behind it run back to back."""
    if not _SPIN:
        @cuda.jit
        def spin(n):
            for _ in range(n):
                cuda.nanosleep(1000000)
        _SPIN.append(spin)
    _SPIN[0][1, 1](max(1, int(ms)))


def copy_bandwidth(cuda, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    dst.copy_to_device(src)
    e0, e1 = _events(cuda)
    e0.record()
    for _ in range(reps):
        dst.copy_to_device(src)
    e1.record()
    e1.synchronize()
    return 2 * nbytes * reps / (cuda.event_elapsed_time(e0, e1) / 1e3)


def gemv_q8_bandwidth(cuda, ops, kind: str, n: int = 8192, group: int = 32, reps: int = 60) -> dict:
    """The int8-activation GEMV (act_quant): the dp4a kernel alone on activations quantized once, and
    quantize + GEMV as the backend launches them; checked against the CPU's gemm_<kind>_q8."""
    from edgerun.kernels_cuda._launch import recording
    from edgerun.runner_cuda import random_weight
    from edgerun.kernels_numba import linear as cpu
    lin = ops._lin
    copies = 3 if kind == "int8" else 5
    ws = [random_weight(ops, kind, n, n, seed=17 + i, group=group) for i in range(copies)]
    xh = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    x = ops.to_device(xh)
    out = ops.empty((1, n))
    q = ops._act_q8(n)
    lin.launch_quantize_act(x.reshape(n), q)
    w = ws[0]
    ref = np.empty((1, n), np.float32)
    if kind == "int8":
        f = lambda w_: (w_.words, w_.b)                                  # noqa: E731
        cpu.gemm_int8_q8(xh, w.a.copy_to_host(), w.b.copy_to_host().view(np.uint16), w.group, ref)
    else:
        f = lambda w_: (w_.words, w_.b, w_.c)                            # noqa: E731
        cpu.gemm_int4_q8(xh, w.a.copy_to_host(), w.b.copy_to_host().view(np.uint16), np.zeros((0, 0), np.uint16),
                         w.group, ref)
    lin.launch_gemv_q8(kind, q, f(w), w.group, out.reshape(n))
    err = float(np.abs(out.copy_to_host() - ref).max() / np.abs(ref).max())
    with recording() as plan:
        for w_ in ws:
            lin.launch_gemv_q8(kind, q, f(w_), w_.group, out.reshape(n))
    with recording() as plan2:
        for w_ in ws:
            lin.launch_quantize_act(x.reshape(n), q)
            lin.launch_gemv_q8(kind, q, f(w_), w_.group, out.reshape(n))
    res = {}
    for name, pl, per in (("gemv", plan, 1), ("quantize+gemv", plan2, 2)):
        best = []
        for _ in range(3):
            _spin(cuda, 30)
            e0, e1 = _events(cuda)
            e0.record()
            for i in range(reps):
                for j in range(per):
                    pl[(i % copies) * per + j]()
            e1.record()
            e1.synchronize()
            best.append(cuda.event_elapsed_time(e0, e1) / 1e3 / reps)
        res[name] = float(np.median(best))
    nbytes = w.a.nbytes + w.b.nbytes
    return {"kind": kind, "n": n, "group": w.group, "bytes": nbytes, "us": res["gemv"] * 1e6,
            "GBps": nbytes / res["gemv"] / 1e9, "us_with_quantize": res["quantize+gemv"] * 1e6,
            "GBps_with_quantize": nbytes / res["quantize+gemv"] / 1e9, "rel_err_vs_cpu_q8": err}


def gemv_bandwidth(cuda, ops, kind: str, n: int = 8192, group: int = 32, reps: int = 60, act_quant: bool = True,
                   norm: bool = False) -> dict:
    """GEMV n x n through ops.matmul (act_quant: int8 activations, the one-launch dp4a kernel; else float
    activations; norm: the RMS norm fused, as for QKV and gate/up): weight bytes (values + scales) per
    second, copies rotated so L2 can't serve them."""
    from edgerun.runner_cuda import random_weight
    ops.act_quant = act_quant
    copies = 3 if kind == "int8" else 5
    ws = [random_weight(ops, kind, n, n, seed=17 + i, group=group) for i in range(copies)]
    x = ops.to_device(np.random.default_rng(0).standard_normal((1, n)).astype(np.float32))
    out = ops.empty((1, n))
    nwh = (1 + 0.2 * np.random.default_rng(1).standard_normal(n)).astype(np.float32)
    kw = dict(norm_w=ops.to_device(nwh), eps=1e-5) if norm else {}
    for w in ws:
        ops.matmul(x, w, out, **kw)
    cuda.synchronize()
    # correctness of one copy against the CPU kernel (gemm_<kind>_q8 with int8 activations)
    from edgerun.kernels_numba import linear as cpu
    w = ws[0]
    ref = np.empty((1, n), np.float32)
    sfx = "_q8" if act_quant else ""
    xin = x.copy_to_host()
    if norm:
        from edgerun.kernels_numba import ops as cpu_ops
        xin = cpu_ops.rms_norm_ref(xin, nwh, 1e-5).astype(np.float32)
    if kind == "int8":
        getattr(cpu, "gemm_int8" + sfx)(xin, w.a.copy_to_host(), w.b.copy_to_host().view(np.uint16),
                                        w.group, ref)
    else:
        getattr(cpu, "gemm_int4" + sfx)(xin, w.a.copy_to_host(), w.b.copy_to_host().view(np.uint16),
                                        np.zeros((0, 0), np.uint16), w.group, ref)
    ops.matmul(x, w, out, **kw)
    err = float(np.abs(out.copy_to_host() - ref).max() / np.abs(ref).max())
    nbytes = w.a.nbytes + w.b.nbytes
    # the launches as the decode plan makes them (raw cuLaunchKernel, a few us), so that the host
    # keeps ahead of the GPU; numba's own dispatch (~100 us a launch) would be timed instead
    from edgerun.kernels_cuda._launch import recording
    with recording() as plan:
        for w_ in ws:
            ops.matmul(x, w_, out, **kw)
    per = len(plan) // copies
    t = _time_plan(cuda, plan, per, copies, reps)
    ops.act_quant = True
    return {"kind": kind, "n": n, "group": w.group, "bytes": nbytes, "us": t * 1e6, "GBps": nbytes / t / 1e9,
            "rel_err_vs_cpu": err, "act_quant": act_quant, "launches": per, "norm": norm}


def _time_plan(cuda, plan, per, copies, reps):
    best = []
    for _ in range(3):
        _spin(cuda, 30)
        e0, e1 = _events(cuda)
        e0.record()
        for i in range(reps):
            for j in range(per):
                plan[(i % copies) * per + j]()
        e1.record()
        e1.synchronize()
        best.append(cuda.event_elapsed_time(e0, e1) / 1e3 / reps)
    return float(np.median(best))


_READ = {}


def read_bandwidth(cuda, ops, kind: str, n: int = 8192, group: int = 32, reps: int = 60, unroll: int = 1) -> dict:
    """The GEMV's bytes (weights + scales of the same rotated copies) merely read and xor-ed, 16 bytes a
    load, 256 blocks of 256 threads as the GEMV launches them, `unroll` independent loads in flight a
    thread: what a kernel of this size can stream."""
    from edgerun.kernels_cuda._launch import go, recording
    from edgerun.kernels_cuda.linear import LD_W, make_ld4
    from edgerun.runner_cuda import random_weight
    if unroll not in _READ:
        ld4 = make_ld4(LD_W)
        U = unroll

        @cuda.jit
        def read(a, b, out):
            t = cuda.grid(1)
            nt = cuda.gridsize(1) * 4
            s = np.uint32(0)
            for arr in (a, b):
                m = arr.shape[0]
                for i in range(t * 4, m, nt * U):
                    for u in range(U):
                        j = i + u * nt
                        if j < m:
                            v0, v1, v2, v3 = ld4(arr, j)
                            s ^= v0 ^ v1 ^ v2 ^ v3
            if s == np.uint32(12345):
                out[0] = s
        _READ[unroll] = read
    copies = 3 if kind == "int8" else 5
    ws = [random_weight(ops, kind, n, n, seed=17 + i, group=group) for i in range(copies)]
    out = cuda.device_array(1, np.uint32)
    with recording() as plan:
        for w in ws:
            go(_READ[unroll], 256, 256, 0, 0, (w.words.reshape(w.words.size), w.b.reshape(w.b.size).view(np.uint32),
                                               out))
    t = _time_plan(cuda, plan, 1, copies, reps)
    nbytes = ws[0].a.nbytes + ws[0].b.nbytes
    return {"kind": kind, "group": group, "unroll": unroll, "us": t * 1e6, "GBps": nbytes / t / 1e9}


def sample_timing(cuda, vocab: int = 32000, reps: int = 20) -> dict:
    """The device sampler's time per token on one logits row (vocab,), per mode (recorded launches)."""
    from edgerun.kernels_cuda._launch import recording
    from edgerun.kernels_cuda.sampling import launch_sample
    logits = cuda.to_device((3 * np.random.default_rng(1).standard_normal(vocab)).astype(np.float32))
    out = cuda.device_array(1, np.int32)
    res = {}
    for name, (t, k, p) in {"greedy": (0.0, 0, 1.0), "temperature": (0.8, 0, 1.0), "top_k=40": (0.8, 40, 1.0),
                            "top_p=0.9": (0.8, 0, 0.9), "top_k=40,top_p=0.9": (0.8, 40, 0.9)}.items():
        with recording() as plan:
            launch_sample(logits, t, k, p, 0.37, out)
        plan[0]()
        cuda.synchronize()
        e0, e1 = _events(cuda)
        e0.record()
        for _ in range(reps):
            plan[0]()
        e1.record()
        e1.synchronize()
        res[name] = cuda.event_elapsed_time(e0, e1) / reps * 1e3
    return res


LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0)


def edgerun_decode(cuda, ops, kind: str, prompt: int, tokens: int) -> dict:
    from edgerun.models import llama
    from edgerun.runner_cuda import random_llama
    args = llama.ModelArgs.from_dict(LLAMA_1B)
    m = random_llama(args, ops, kind=kind)
    st = m.new_state()
    ids = np.arange(1, prompt + 1, dtype=np.int64)
    t0 = time.perf_counter()
    logits = m(ids, st, last_only=True)
    prefill_s = time.perf_counter() - t0
    for _ in range(4):                                   # warm (compiles the decode kernels)
        logits = m(np.array([int(logits[-1].argmax())]), st)
    cuda.synchronize()
    l0 = m.launches
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = m(np.array([int(logits[-1].argmax())]), st)
    dt = time.perf_counter() - t0
    launches = (m.launches - l0) / tokens
    # the same again with each launch call timed on the host: its share of the step
    m.timing, m.launch_seconds = True, 0.0
    t0 = time.perf_counter()
    for _ in range(tokens // 2):
        logits = m(np.array([int(logits[-1].argmax())]), st)
    dt2 = time.perf_counter() - t0
    # GPU time of one step's kernels: the recorded plan replayed behind a spin, so launch gaps don't count
    m.timing = False
    _spin(cuda, 60)
    e0, e1 = _events(cuda)
    e0.record()
    for _ in range(8):
        for p in m._plan:
            p()
    e1.record()
    e1.synchronize()
    gpu_ms = cuda.event_elapsed_time(e0, e1) / 8
    weight_bytes = sum(p.a.nbytes + p.b.nbytes for L in m.layers for p in (L.qkv_parts[0][0], L.wo, L.gu, L.wdown)) \
        + m.head.a.nbytes + m.head.b.nbytes
    return {"kind": kind, "tok_s": tokens / dt, "ms_per_token": dt / tokens * 1e3, "launches_per_token": launches,
            "launch_host_share": m.launch_seconds / dt2, "launch_host_us_per_token": m.launch_seconds / (tokens // 2) * 1e6,
            "gpu_ms_per_token": gpu_ms, "plan_launches": len(m._plan), "prefill_tokens": prompt, "prefill_s_first": prefill_s,
            "weight_MB": weight_bytes / 1e6, "context_end": st.length}


def torch_decode(prompt: int, tokens: int) -> dict:
    import torch
    import transformers
    cfg = transformers.LlamaConfig(**LLAMA_1B, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.arange(1, prompt + 1, device="cuda")[None]
    with torch.no_grad():
        def run(n):
            out = model(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        run(8)
        dt = run(tokens)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return {"tok_s": tokens / dt, "ms_per_token": dt / tokens * 1e3, "params": n_params,
            "torch": torch.__version__, "transformers": transformers.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--kinds", default="int8,int4")
    ap.add_argument("--sweep", action="store_true",
                    help="also time GEMV variants (threads a block, cp.async stages, the norm fused, the older kernel)")
    ap.add_argument("--skip-decode", action="store_true")
    a = ap.parse_args()
    from numba import cuda
    import numba
    from edgerun.backend import get_backend
    ops = get_backend("cuda")
    dev = cuda.get_current_device()
    res = {"device": dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name),
           "numba": numba.__version__, "numpy": np.__version__}
    try:
        import numba_cuda
        res["numba_cuda"] = numba_cuda.__version__
    except Exception:
        pass
    print(res, flush=True)
    res["copy_GBps"] = copy_bandwidth(cuda) / 1e9
    print(f"device-to-device copy: {res['copy_GBps']:.0f} GB/s (read + write)", flush=True)
    res["gemv"] = []
    lin = ops._lin
    shapes = (("int8", 8192), ("int8", 32), ("int4", 32))
    variants = [({}, shapes)]
    if a.sweep:
        # the staged kernel's knobs (threads a block, cp.async stages per kind, quantization), the norm fused,
        # and the register-pipelined kernel (stages 0)
        i4 = shapes[2:]
        variants += [({"threads": 256}, shapes), ({"stages4": 6}, i4), ({"stages4": 3, "stages8": 3}, shapes),
                     ({"quant": "thread", "threads": 256}, i4), ({"norm": True}, shapes),
                     ({"norm": True, "threads": 256}, shapes), ({"stages4": 0, "stages8": 0}, shapes),
                     ({"stages4": 0, "stages8": 0, "norm": True}, shapes), ({"pdl": False}, shapes)]
    from edgerun.kernels_cuda import _launch
    pdl0, st0, q0, tb0 = _launch.PDL, dict(lin.FQ8_STAGES), lin.FQ8_QUANT, lin.FQ8_THREADS
    for v, kinds in variants:
        lin.FQ8_MAXREG, lin.FQ8_THREADS = v.get("maxreg", 128), v.get("threads", tb0)
        lin.FQ8_STAGES = {"int8": v.get("stages8", st0["int8"]), "int4": v.get("stages4", st0["int4"])}
        lin.FQ8_QUANT = v.get("quant", q0)
        _launch.PDL = v.get("pdl", pdl0)
        for kind, group in kinds:
            g = gemv_bandwidth(cuda, ops, kind, group=group, norm=v.get("norm", False))
            g["of_copy"] = g["GBps"] / res["copy_GBps"]
            g["variant"] = str(v or "default")
            S = lin.FQ8_STAGES[kind]
            tb = lin.fq8s_threads() if S else lin.BLOCK
            g["split"] = lin.gemv_split(kind, 8192, 8192, tb // 32)
            g["stages"], g["threads"] = S, tb
            if S:
                k = lin._gemv_fq8s_kernel(kind, g["split"], lin._fq8_nmax(8192), S)
            else:
                per_row = kind == "int8" and group == 8192 and lin.FQ8_L2AHEAD == 0
                k = lin._gemv_fq8_kernel(kind, g["split"], lin._fq8_nmax(8192),
                                         ahead=lin.FQ8_L2AHEAD_PER_ROW if per_row else None)
            try:
                g["regs"] = max(k.get_regs_per_thread().values())
                g["local_bytes"] = max(k.get_local_mem_per_thread().values())
                g["smem"] = max(k.get_shared_mem_per_block().values()) + (lin.fq8s_smem(S) if S else 0)
                g["blocks_per_sm"] = _launch.occupancy(k, tb, lin.fq8s_smem(S) if S else 0)
            except Exception as e:          # noqa: BLE001 (a report, not a check)
                g["regs"] = str(e)[:60]
            res["gemv"].append(g)
            print(f"GEMV {kind} 8192x8192 group {g['group']}, int8 activations, one launch ({g['variant']}, split "
                  f"{g['split']}, stages {S}, {tb} threads, regs {g.get('regs')}, local {g.get('local_bytes')}, smem {g.get('smem')}, "
                  f"{g.get('blocks_per_sm')} blocks/SM, "
                  f"{g['launches']} launch): {g['us']:.1f} us, {g['GBps']:.0f} GB/s = {100 * g['of_copy']:.0f}% of copy; "
                  f"rel err vs CPU q8 {g['rel_err_vs_cpu']:.1e}", flush=True)
    lin.FQ8_MAXREG, lin.FQ8_STAGES, lin.FQ8_QUANT, _launch.PDL, lin.FQ8_THREADS = 128, st0, q0, pdl0, tb0
    res["pdl"] = pdl0
    res["gemv_read_only"] = []
    for kind, group in (("int8", 8192), ("int4", 32)):
        for unroll in (1, 4):
            r = read_bandwidth(cuda, ops, kind, group=group, unroll=unroll)
            r["of_copy"] = r["GBps"] / res["copy_GBps"]
            res["gemv_read_only"].append(r)
            print(f"read only, the {kind} GEMV's bytes, {unroll} 16-byte load(s) in flight a thread: {r['us']:.1f} us, "
                  f"{r['GBps']:.0f} GB/s = {100 * r['of_copy']:.0f}% of copy", flush=True)
    res["gemv_float_acts"] = []
    for kind, group in (("int8", 8192), ("int8", 32), ("int4", 32)):
        g = gemv_bandwidth(cuda, ops, kind, group=group, act_quant=False)
        g["of_copy"] = g["GBps"] / res["copy_GBps"]
        res["gemv_float_acts"].append(g)
        print(f"GEMV {kind} 8192x8192 group {g['group']}, float activations (act_quant off): {g['us']:.1f} us, "
              f"{g['GBps']:.0f} GB/s = {100 * g['of_copy']:.0f}% of copy; rel err vs CPU {g['rel_err_vs_cpu']:.1e}",
              flush=True)
    res["gemv_q8"] = []
    for kind, group in (("int8", 8192), ("int8", 32), ("int4", 32)):
        g = gemv_q8_bandwidth(cuda, ops, kind, group=group)
        g["of_copy"] = g["GBps"] / res["copy_GBps"]
        g["of_copy_with_quantize"] = g["GBps_with_quantize"] / res["copy_GBps"]
        res["gemv_q8"].append(g)
        print(f"GEMV {kind} 8192x8192 group {g['group']}, int8 activations, two launches (inputs wider than "
              f"{lin.FQ8_MAX_N}): dp4a kernel {g['us']:.1f} us = {100 * g['of_copy']:.0f}% of copy; with the quantize "
              f"launch {g['us_with_quantize']:.1f} us = {100 * g['of_copy_with_quantize']:.0f}%; rel err vs CPU q8 "
              f"{g['rel_err_vs_cpu_q8']:.1e}", flush=True)
    res["sample_us"] = sample_timing(cuda)
    print("device sampler, 32000 logits: " + ", ".join(f"{k} {v:.0f} us" for k, v in res["sample_us"].items()),
          flush=True)
    if a.skip_decode:
        a.kinds, a.skip_torch = "", True
    res["decode"] = []
    for kind in filter(None, a.kinds.split(",")):
        aq = not kind.endswith("+f32")                 # int8 activations unless +f32 (+q8: the default, kept)
        kind = kind.replace("+q8", "").replace("+f32", "")
        ops.act_quant = aq
        d = edgerun_decode(cuda, ops, kind, a.prompt, a.tokens)
        ops.act_quant = True
        d["act_quant"] = aq
        kind = d["kind"] = kind + ("" if aq else "+f32")
        res["decode"].append(d)
        print(f"edgerun {kind} 1B decode{'' if aq else ' (float activations)'}: {d['tok_s']:.0f} tok/s "
              f"({d['ms_per_token']:.2f} ms/token), "
              f"{d['launches_per_token']:.0f} launches/token, launch calls {d['launch_host_us_per_token']:.0f} us/token "
              f"= {100 * d['launch_host_share']:.0f}% of the step; GPU time {d['gpu_ms_per_token']:.3f} ms/token", flush=True)
    if not a.skip_torch:
        t = torch_decode(a.prompt, a.tokens)
        res["torch_bf16_eager"] = t
        print(f"transformers {t['transformers']} bf16 eager: {t['tok_s']:.1f} tok/s ({t['params'] / 1e9:.2f}B params)")
        for d in res["decode"]:
            d["speedup_vs_torch"] = d["tok_s"] / t["tok_s"]
            print(f"  edgerun {d['kind']}: {d['speedup_vs_torch']:.1f}x transformers")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

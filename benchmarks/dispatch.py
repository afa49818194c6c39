"""What crossing from Python into compiled code costs in a decode step, measured.

    python benchmarks/dispatch.py [--model smollm2-135m] [--threads 1] [--rounds 5]

Three numbers:
1. the cost of one call into a trivial @njit function with 8 array arguments (Numba's dispatcher
   typing the arguments), and with the 7 weight containers a fused layer takes;
2. calls into compiled code per token: counted through the CPU backend's kernel modules, op by
   op vs the fused layer path;
3. one decoder layer for one token, fused (kernels_numba/fused.py) vs op by op, and a whole
   decode step both ways, interleaved; CPU time of this process (one thread), so that other
   work on the machine inflates neither.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from numba import njit


@njit(cache=True)
def _trivial(a, b, c, d, e, f, g, h):
    return a[0]


@njit(cache=True)
def _trivial_weights(ws, x):
    return x[0]


def _per_call_us(fn, *args, n=20000):
    fn(*args)
    t0 = time.process_time()
    for _ in range(n):
        fn(*args)
    return (time.process_time() - t0) / n * 1e6


class _Counting:
    """A kernel module seen through a proxy that counts the calls made through it."""

    def __init__(self, module, count):
        self._module, self._count = module, count

    def __getattr__(self, name):
        f = getattr(self._module, name)

        def counted(*a, **k):
            self._count[0] += 1
            return f(*a, **k)
        return counted


def _count_calls(m, token: int) -> int:
    """Calls from Python into compiled kernels during one decode step: every call the backend
    makes through its kernel modules, and one per fused layer."""
    ops = m.ops
    count = [0]
    saved = {name: getattr(ops, name) for name in ("_lin", "_ops", "_attn")}
    step = ops.decoder_layer_step

    def counted_step(*a, **k):
        count[0] += 1
        return step(*a, **k)
    try:
        for name, mod in saved.items():
            setattr(ops, name, _Counting(mod, count))
        ops.decoder_layer_step = counted_step
        st = m.new_state()
        m.step(st, [token, token + 1])
        count[0] = 0
        m.step(st, [token + 2], last_only=True)
    finally:
        for name, mod in saved.items():
            setattr(ops, name, mod)
        del ops.decoder_layer_step
    return count[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    import edgerun
    from edgerun.packed import Int4Weight
    fused = edgerun.load(a.model, threads=a.threads)
    op_by_op = edgerun.load(a.model, threads=a.threads)
    for layer in op_by_op.model.layers:
        layer.fused = None
    arrays = [np.ones(16, np.float32) for _ in range(8)]
    w = Int4Weight(np.ones((4, 16), np.uint8), np.ones((4, 1), np.uint16), np.zeros((0, 0), np.uint16), 32)
    print(f"one call, 8 arrays:            {_per_call_us(_trivial, *arrays):6.2f} us")
    print(f"one call, 7 weight containers: {_per_call_us(_trivial_weights, (w,) * 7, arrays[0]):6.2f} us")
    n_layers = len(fused.model.layers)
    print(f"calls into compiled code per decode token ({n_layers} layers): "
          f"op by op {_count_calls(op_by_op, 100)}, fused {_count_calls(fused, 100)}")

    def layer_us(m, n=200):
        st = m.new_state()
        m.step(st, list(range(50, 70)))
        st.reserve(1)
        x = np.random.default_rng(0).standard_normal((1, m.args.hidden_size)).astype(np.float32) * 0.1
        pos = np.array([st.length], np.int64)
        layer = m.model.layers[n_layers // 2]
        layer(x.copy(), pos, st)
        t0 = time.process_time()
        for _ in range(n):
            layer(x.copy(), pos, st)
        return (time.process_time() - t0) / n * 1e6

    def step_ms(m, n=32):
        st = m.new_state()
        m.step(st, list(range(50, 70)), last_only=True)
        t0 = time.process_time()
        for i in range(n):
            m.step(st, [200 + i], last_only=True)
        return (time.process_time() - t0) / n * 1e3

    res = {"layer fused": [], "layer op by op": [], "step fused": [], "step op by op": []}
    for _ in range(a.rounds):
        res["layer fused"].append(layer_us(fused))
        res["layer op by op"].append(layer_us(op_by_op))
        res["step fused"].append(step_ms(fused))
        res["step op by op"].append(step_ms(op_by_op))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"one layer, one token: fused {med['layer fused']:.0f} us, op by op {med['layer op by op']:.0f} us "
          f"(CPU time, medians of {a.rounds})")
    print(f"decode step: fused {med['step fused']:.2f} ms, op by op {med['step op by op']:.2f} ms "
          f"-> {med['step op by op'] / med['step fused']:.2f}x")


if __name__ == "__main__":
    main()

"""Ternary, binary and sparse kinds: codecs round-trip bit-exactly, kernels equal their NumPy
references on awkward shapes, quantizers and the convert CLI (--quant ternary, --sparsity, --rules).

Sizes do not fit the blocking: 37 rows (ROW_BLOCK 16), inputs 1000 + 3 (not a multiple of the
ternary blocks 128 / 160, of the binary group, of 8), 2:4 on 4 * 251 (an odd number of groups).
"""
from __future__ import annotations

import numpy as np
import pytest

from edgerun import packed
from edgerun.errors import ConversionError
from edgerun.kernels_numba import linear as L
from edgerun.kernels_numba import lowbit as LB

ROWS = 37
N = 1003
N24 = 4 * 251


def rng(seed=0):
    return np.random.default_rng(seed)


def sample_weight(seed=0, rows=ROWS, n=N):
    w = (rng(seed).normal(size=(rows, n)) * 0.05).astype(np.float32)
    w[0, :64] = 1e-3                  # a small constant run
    w[1, :160] = 0.25                 # a constant block
    w[2, 5] = 3.0                     # an outlier
    w[3] = 0.0                        # an all-zero row
    w[4, 100] = -1e-8                 # tiny values
    return w


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


CODEC_CASES = [
    ("ternary", {}), ("ternary", {"per_row": True}),
    ("ternary_b3", {}), ("ternary_b3", {"per_row": True}),
    ("binary", {}), ("binary", {"group": 64}), ("binary", {"group": 8}),
    ("sparse24", {"values": "int8"}), ("sparse24", {"values": "f16"}),
    ("csr", {"values": "int8"}), ("csr", {"values": "f16"}),
]
CODEC_IDS = [k + "".join(f"-{v}" for v in p.values()) for k, p in CODEC_CASES]


def weight_for(kind, seed=0):
    if kind == "sparse24":
        return sample_weight(seed, n=N24)
    w = sample_weight(seed)
    if kind == "csr":
        w[np.abs(w) < 0.07] = 0.0                     # ~85 % zeros
    return w


@pytest.mark.parametrize("kind,params", CODEC_CASES, ids=CODEC_IDS)
def test_codec_round_trip_is_bit_exact(kind, params):
    c = packed.codec(kind)
    for seed in range(3):
        w = weight_for(kind, seed)
        parts, p = c.pack(w, **params)
        assert set(c.required()) <= set(parts) <= set(c.parts)
        w1 = c.unpack(c.container(parts, p))
        assert w1.dtype == np.float32 and w1.shape == w.shape
        parts2, p2 = c.pack(w1, **params)
        assert p2 == p and set(parts2) == set(parts)
        for name in parts:
            assert parts2[name].dtype == parts[name].dtype and parts2[name].shape == parts[name].shape
            np.testing.assert_array_equal(_bits(parts2[name]), _bits(parts[name]), err_msg=f"part {name}")
        np.testing.assert_array_equal(c.unpack(c.container(parts2, p2)), w1)


def test_base3_digits_decode_every_byte_value():
    """All 243 five-trit values: the multiply-and-shift digit extraction the kernels use gives them back."""
    t = np.array([[(v // 3 ** (4 - i)) % 3 - 1 for i in range(5) for _ in range(32)] for v in range(243)], np.int8)
    codes = packed.pack_trits3(t)
    np.testing.assert_array_equal(packed.unpack_trits3(codes, 160), t)
    assert len(np.unique(codes[:, 0])) == 243


def test_ternary_layouts_are_as_documented():
    t = rng(1).integers(-1, 2, size=(3, 300)).astype(np.int8)
    c2 = packed.pack_trits2(t)
    assert c2.shape == (3, 3 * 32)                    # 300 -> 384 inputs, padded with zeros
    # block 1, byte 5: inputs 128 + 5 + 32 i in bits 2i
    b = int(c2[2, 32 + 5])
    assert [((b >> 2 * i) & 3) - 1 for i in range(4)] == [int(t[2, 128 + 5 + 32 * i]) for i in range(4)]
    assert ((c2[:, 64:] >> 6) == 1).all() or True     # padding is code 1 (t = 0) where past 300
    assert (packed.unpack_trits2(c2, 384)[:, 300:] == 0).all()
    c3 = packed.pack_trits3(t)
    assert c3.shape == (3, 2 * 32)                    # 300 -> 320 inputs, 1.6 bits a weight
    q = int(c3[1, 32 + 7])
    assert [((((q * 3 ** i) & 255) * 3) >> 8) - 1 for i in range(5)] == \
        [int(t[1, 160 + 7 + 32 * i]) if 160 + 7 + 32 * i < 300 else 0 for i in range(5)]


def test_ternarize_is_bitnet_absmean():
    """transformers' WeightQuant: scale 1 / mean|w| (clamped at 1e-5), round, clip to [-1, 1]."""
    w = sample_weight(4)
    t, s = packed.ternarize(w)
    gamma = np.float32(np.abs(w).mean(dtype=np.float64))
    np.testing.assert_array_equal(t, np.clip(np.rint(w * (np.float32(1) / gamma)), -1, 1))
    assert s.shape == (1,) and s[0] == gamma
    t, s = packed.ternarize(w, per_row=True)
    assert s.shape == (ROWS,) and s[3] == np.float32(1e-5) and (t[3] == 0).all()


def test_sparse24_keeps_the_two_largest_of_four():
    w = np.array([[0.1, -0.5, 0.3, 0.0, 1, 2, 3, 4, 0, 0, 0, 0]], np.float32)
    c = packed.codec("sparse24")
    got = c.unpack(c.container(*c.pack(w, values="f16")))
    np.testing.assert_array_equal(got, np.array([[0, -0.5, 0.3, 0, 0, 0, 3, 4, 0, 0, 0, 0]], np.float16).astype(np.float32))


# ------------------------------------------------------------------ kernels

GEMM_KINDS = [("ternary", {}, N), ("ternary", {"per_row": True}, 130), ("ternary", {}, 3 * 128 - 5),
              ("ternary_b3", {}, N),
              ("ternary_b3", {"per_row": True}, 161), ("binary", {}, N), ("binary", {}, 128 * 5 - 3), ("binary", {"group": 64}, 64 * 3 + 8),
              ("sparse24", {"values": "int8"}, N24), ("sparse24", {"values": "f16"}, N24 + 4),
              ("sparse24", {"values": "int8"}, 64 * 9 + 8),
              ("csr", {"values": "int8"}, N), ("csr", {"values": "f16"}, N)]


def make(kind, params, n, seed=1):
    w = sample_weight(seed, n=n) if n >= 200 else (rng(seed).normal(size=(ROWS, n)) * 0.05).astype(np.float32)
    if kind == "csr":
        w[np.abs(w) < 0.05] = 0.0
    c = packed.codec(kind)
    return c.container(*c.pack(w, **params))


def reference(kind, c, x):
    """The kernel's meaning: int8 activations for ternary, binary and 2:4 int8; float otherwise."""
    if kind in ("ternary", "ternary_b3"):
        return LB.gemm_int8act_ref(x, packed.codec(kind).trits(c), c.scales)
    if kind == "binary":
        return LB.gemm_int8act_ref(x, packed.Binary.signs(c), packed.scales_to_f32(c.scales), c.group)
    if kind == "sparse24" and c.vals.dtype == np.int8:
        ints = np.zeros((c.vals.shape[0], c.vals.shape[1] // 2, 4), np.int8)
        np.put_along_axis(ints, packed.Sparse24.positions(c), c.vals.reshape(ints.shape[0], -1, 2), axis=2)
        return LB.gemm_int8act_ref(x, ints.reshape(ints.shape[0], -1), c.scales)
    return L.gemm_ref(x, packed.unpack(c))


def run_gemm(c, x):
    from edgerun.backend import CPUBackend
    return CPUBackend().linear(x, c)


def check(got, ref, tol, norm, what):
    err = np.abs(got.astype(np.float64) - ref) / norm
    assert np.isfinite(got).all(), what
    assert err.max() < tol, f"{what}: max normalised error {err.max():.3e} (tol {tol:.0e}), mean {err.mean():.3e}"


@pytest.mark.parametrize("kind,params,n", GEMM_KINDS, ids=[f"{k}-{n}" + "".join(f"-{v}" for v in p.values())
                                                           for k, p, n in GEMM_KINDS])
@pytest.mark.parametrize("T", [1, 5, 19])
def test_gemm_matches_ref(kind, params, n, T):
    c = make(kind, params, n)
    x = (rng(T).normal(size=(T, n)) + 0.3).astype(np.float32)
    x[0, 3] = 4.0                                     # one large activation sets a token's int8 scale
    ref = reference(kind, c, x)
    got = run_gemm(c, x)
    assert got.shape == (T, ROWS)
    # int32 sums are exact; only the final float scaling (and float sums for sparse) round
    norm = np.abs(x).astype(np.float64) @ np.abs(packed.unpack(c)).astype(np.float64).T + 1e-30
    check(got, ref, 2e-6, norm, f"gemm_{kind} T={T}")


def test_quantize_rows_int8_matches_ref_and_bitlinear():
    import torch
    x = (rng(3).normal(size=(6, 333)) * 3).astype(np.float32)
    x[1] = 0.0                                        # clamp of the max at 1e-5
    x[2, 7] = 127.5 / 127 * np.abs(x[2]).max()        # ties and the clip at -128 / 127
    x[3, :] = np.linspace(-1, 1, 333)
    x[4, :] = 0.0                                     # max 127, so scale 1: every k + 0.5 is an exact tie
    x[4, :255] = np.append(np.arange(-127, 127) + 0.5, 127.0)
    xq = np.empty((6, 384), np.int8)
    xs = np.empty(6, np.float32)
    xsum = np.empty(6, np.int32)
    LB.quantize_rows_int8(x, xq, xs, xsum)
    rq, rs = LB.quantize_rows_int8_ref(x)
    np.testing.assert_array_equal(xq[:, :333], rq)
    assert (xq[:, 333:] == 0).all()
    np.testing.assert_array_equal(xs, rs)
    np.testing.assert_array_equal(xsum, rq.astype(np.int64).sum(axis=1))
    # transformers' BitLinear.activation_quant, same formula in torch
    t = torch.from_numpy(x)
    scale = 127 / t.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    np.testing.assert_array_equal((t * scale).round().clamp(-128, 127).to(torch.int8).numpy(), rq)


@pytest.mark.parametrize("kind,params,n", GEMM_KINDS[::2] + [GEMM_KINDS[7]], ids=lambda v: str(v))
def test_embed_matches_unpack(kind, params, n):
    c = make(kind, params, n)
    ids = np.array([36, 0, 5, 5, 3, 16], np.int64)
    from edgerun.backend import CPUBackend
    got = CPUBackend().embed(ids, c, n)
    np.testing.assert_allclose(got, packed.unpack(c)[ids], rtol=1e-6, atol=0)


def test_ternary_decode_uses_byte_dot_products():
    """The 2-bit ternary decode compiles to byte dot products (vpdpbusd with VNNI, pmaddubsw with
    AVX2). Compiled afresh: Numba does not keep the assembly of cached code."""
    from numba import njit
    c = make("ternary", {}, N)
    f = njit(parallel=True, fastmath=LB.FASTMATH)(LB.gemm_ternary.py_func)
    out = np.empty((1, ROWS), np.float32)
    f(np.ones((1, N), np.float32), c.codes, c.scales, c.n, out)
    asm = "\n".join(f.inspect_asm(sig) for sig in f.signatures)
    want = {"vnni": "vpdpbusd", "avx2": "vpmaddubsw"}.get(LB.ISA)
    if want is None:
        pytest.skip(f"generic SIMD ({LB.ISA}): no x86 byte dot product to look for")
    assert want in asm, f"no {want} in gemm_ternary ({LB.ISA})"


@pytest.mark.parametrize("nbytes", [32, 96, 128, 544])
def test_ternary_four_row_dot_equals_numpy(nbytes):
    """lowbit.dot_t2_rows4 (4 rows, activation planes loaded once, planes masked in place and
    scaled back at the end) gives the exact integer dots of the codes against the planes, with
    and without a 32-byte tail step."""
    if not LB.WIDE:
        pytest.skip("dot_t2_rows4 is the 512-bit VNNI kernel")
    from numba import njit
    rng = np.random.default_rng(nbytes)
    t = rng.integers(0, 3, (12, nbytes, 4))             # codes t + 1 in {0, 1, 2}, 4 to a byte
    codes = (t * np.array([1, 4, 16, 64])).sum(-1).astype(np.uint8)
    planes = rng.integers(-128, 128, (4, nbytes), dtype=np.int8)

    @njit
    def run(codes, p):
        out = np.empty(codes.shape[0], np.int32)
        for b in range(codes.shape[0] // 4):
            out[4 * b], out[4 * b + 1], out[4 * b + 2], out[4 * b + 3] = LB.dot_t2_rows4(codes, 4 * b, p[0], p[1], p[2], p[3])
        return out
    want = np.einsum("rjk,kj->r", t.astype(np.int64), planes.astype(np.int64))
    np.testing.assert_array_equal(run(codes, planes), want)


# ------------------------------------------------------------------ quantizer and convert CLI

LLAMA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
IDS = [0, 5, 17, 42, 7, 99, 3, 250]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from conftest import make_hf_model, save_hf
    model = make_hf_model("LlamaForCausalLM", **LLAMA)
    return model, save_hf(model, tmp_path_factory.mktemp("lowbit") / "hf")


def cli(capsys, *argv):
    from edgerun.cli import main
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def dequantized_reference(model, mf, ids):
    """transformers' logits with every matrix replaced by the file's unpacked weight."""
    import copy

    import torch

    from conftest import hf_logits
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2 and name in mf.descriptors:
                p.copy_(torch.from_numpy(packed.unpack(mf.tensor(name))))
    return hf_logits(ref, ids)


def test_convert_ternary_llama_matches_transformers_online_bitlinear(capsys, tiny_llama, tmp_path):
    """--quant ternary on a Llama = transformers' AutoBitLinear (online) on every linear but lm_head."""
    import copy

    import edgerun
    from conftest import hf_logits, rel_err
    from transformers import BitNetQuantConfig
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    model, hf = tiny_llama
    out = tmp_path / "t.edr"
    rc, _, err = cli(capsys, "convert", hf, "-o", out, "--quant", "ternary", "--rules", "embed_tokens|lm_head=f32", "-q")
    assert rc == 0, err
    m = edgerun.load(out)
    assert m.file.extra["quant"] == "ternary" and m.file.extra["rules"] == "embed_tokens|lm_head=f32"
    assert m.file.descriptors["model.layers.1.mlp.up_proj.weight"]["kind"] == "ternary"
    ref_model = copy.deepcopy(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    replace_with_bitnet_linear(ref_model, modules_to_not_convert=["lm_head"],
                               quantization_config=BitNetQuantConfig(linear_class="autobitlinear",
                                                                     quantization_mode="online"))
    ref_model.load_state_dict(sd, assign=True)
    err = rel_err(m.forward(IDS), hf_logits(ref_model.eval(), IDS))
    assert err < 1e-4, f"ternary Llama vs transformers online BitLinear: rel err {err:.2e}"
    rc, text, _ = cli(capsys, "run", out, "-p", "hello", "-n", "3")
    assert rc == 0


# int8 embeddings/head would run int8/int4 kernels that quantize activations: kept float here, so
# that the logits compare with the pruned weights in transformers to float tolerance
F32_ENDS = ["--rules", "embed_tokens|lm_head=f32"]


@pytest.mark.parametrize("args, kind, values, sparsity", [
    (["--quant", "int8", "--sparsity-pattern", "2:4", *F32_ENDS], "sparse24", "int8", 0.5),
    (["--sparsity", "0.5", "--sparsity-pattern", "2:4"], "sparse24", "f16", 0.5),
    (["--sparsity", "0.9"], "csr", "f16", 0.9),
    (["--quant", "int8", "--sparsity", "0.75", "--sparsity-pattern", "unstructured", *F32_ENDS], "csr", "int8", 0.75),
])
def test_convert_sparse_end_to_end(capsys, tiny_llama, tmp_path, args, kind, values, sparsity):
    import edgerun
    from conftest import rel_err
    model, hf = tiny_llama
    out = tmp_path / "s.edr"
    rc, _, err = cli(capsys, "convert", hf, "-o", out, *args, "-q")
    assert rc == 0, err
    m = edgerun.load(out)
    assert m.file.extra["sparsity"] == sparsity
    for name, d in m.file.descriptors.items():
        if name.startswith("model.layers.") and len(d["shape"]) == 2:
            assert d["kind"] == kind and d["params"]["values"] == values, name
            w = packed.unpack(m.file.tensor(name))
            assert abs(float((w == 0).mean()) - sparsity) < 0.02, f"{name}: {(w == 0).mean():.3f} zeros"
        elif "embed" in name or "lm_head" in name:
            assert d["kind"] not in ("csr", "sparse24"), name
    got = m.forward(IDS)
    err = rel_err(got, dequantized_reference(model, m.file, IDS))
    # 2:4 int8 multiplies int8-quantized activations: close to the float model, not equal
    tol = 2e-2 if kind == "sparse24" and values == "int8" else 1e-5
    assert err < tol, f"{kind}/{values}: rel err {err:.2e} against the pruned weights in transformers"
    st = m.new_state()                                      # decode (T = 1 kernels) = prefill
    assert rel_err(np.concatenate([m.step(st, [i]) for i in IDS]), got) < 1e-5


def test_convert_mixed_precision_rules(capsys, tiny_llama, tmp_path):
    import edgerun
    _, hf = tiny_llama
    out = tmp_path / "r.edr"
    rc, _, err = cli(capsys, "convert", hf, "-o", out, "--rules", "embed_tokens|lm_head=int8, *=int4", "-q")
    assert rc == 0, err
    mf = edgerun.load(out).file
    kinds = {n: d["kind"] for n, d in mf.descriptors.items()}
    assert kinds["model.embed_tokens.weight"] == "int8" and kinds["lm_head.weight"] == "int8"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "int4"
    assert kinds["model.norm.weight"] == "f32"                     # vectors stay float32 whatever the rules
    assert mf.extra["rules"] == "embed_tokens|lm_head=int8,*=int4"
    rc, text, _ = cli(capsys, "inspect", out)
    assert rc == 0 and "int4" in text


@pytest.mark.parametrize("args, needles", [
    (["--sparsity", "1.5"], ["--sparsity", "1.5"]),
    (["--sparsity", "0.3", "--sparsity-pattern", "2:4"], ["2:4", "0.3"]),
    (["--quant", "int4", "--sparsity", "0.5"], ["--sparsity", "int4"]),
    (["--rules", "embed_tokens"], ["--rules", "PATTERN=KIND"]),
    (["--rules", "*=int3"], ["--rules", "int3"]),
    (["--quant", "binary", "--group-size", "12"], ["--group-size", "binary"]),
    (["--sparsity-pattern", "unstructured"], ["--sparsity-pattern unstructured", "--sparsity S"]),
])
def test_convert_bad_options(capsys, tiny_llama, tmp_path, args, needles):
    _, hf = tiny_llama
    rc, _, err = cli(capsys, "convert", hf, "-o", tmp_path / "x.edr", *args, "-q")
    assert rc == 2 and all(n in err for n in needles), err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_convert_2_4_needs_inputs_in_fours(capsys, tmp_path):
    from conftest import make_hf_model, save_hf
    hf = save_hf(make_hf_model("LlamaForCausalLM", hidden_size=66, intermediate_size=90, num_attention_heads=3,
                               num_key_value_heads=3), tmp_path / "odd")
    out = tmp_path / "out" / "x.edr"
    rc, _, err = cli(capsys, "convert", hf, "-o", out, "--sparsity-pattern", "2:4", "-q")
    assert rc == 2 and "2:4" in err and "multiple of 4" in err and "model.layers.0." in err, err
    assert not out.exists()


def test_prune_unstructured_is_per_matrix_magnitude():
    from edgerun.converters.sparsify import prune_2_4, prune_unstructured
    w = rng(5).normal(size=(16, 40)).astype(np.float32)
    p = prune_unstructured(w, 0.75)
    assert (p == 0).sum() == 480 and np.abs(p[p != 0]).min() >= np.abs(w[p == 0]).max()
    q = prune_2_4(w)
    assert ((q.reshape(16, 10, 4) != 0).sum(axis=2) == 2).all()
    with pytest.raises(ConversionError, match="q_proj.*multiple of 4"):
        prune_2_4(w[:, :39], "q_proj")


@pytest.mark.slow
def test_convert_gguf_with_sparsity_and_rules(capsys, smollm2_gguf, tmp_path):
    """A GGUF source is dequantized, then takes the plan's kinds (SmolLM2: tied embeddings)."""
    import edgerun
    out = tmp_path / "s.edr"
    rc, _, err = cli(capsys, "convert", smollm2_gguf, "-o", out, "--quant", "int8", "--sparsity-pattern", "2:4",
                     "--rules", "embed_tokens=int8", "-q")
    assert rc == 0, err
    m = edgerun.load(out)
    assert m.file.descriptors["model.layers.3.mlp.up_proj.weight"]["kind"] == "sparse24"
    assert m.file.descriptors["model.embed_tokens.weight"]["kind"] == "int8"
    assert m.file.extra["sparsity_pattern"] == "2:4" and m.file.extra["rules"] == "embed_tokens=int8"
    assert np.isfinite(m.forward(m.tokenizer.encode("The cat sat on the mat."))).all()

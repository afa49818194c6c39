"""The model file (.edr) and the packed codecs: round trips, memory mapping, safetensors
compatibility, refusal of damaged files, and conversions that fail cleanly."""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from edgerun import format as edr
from edgerun import packed
from edgerun.errors import ConversionError, ModelFileError
from edgerun.format import PackedTensor

# ------------------------------------------------------------------------------ codecs

CODEC_CASES = [
    ("f32", {}), ("f16", {}), ("bf16", {}),
    ("int8", {}), ("int8", {"group": 32}),
    ("int4", {"group": 32}), ("int4", {"group": 64}),
    ("int4", {"group": 32, "symmetric": False}), ("int4", {"group": 128, "symmetric": False}),
]
CODEC_IDS = [k + "".join(f"-{a}{b}" for a, b in p.items()) for k, p in CODEC_CASES]


def sample_weight(seed=0, rows=37, n=4096 + 128):
    """Normal weights with the awkward cases codecs must survive (all-zero groups: see below)."""
    w = (np.random.default_rng(seed).normal(size=(rows, n)) * 0.05).astype(np.float32)
    if rows >= 5 and n >= 128:
        w[0, :64] = 1e-3                  # small constant groups
        w[1, :128] = 0.25                 # constant groups: hi == lo
        w[2, 5] = 3.0                     # an outlier
        w[3, 64:96] = -w[3, 64:96]        # sign flips in one group
        w[4, 100] = -1e-8                 # tiny values
    return w


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("kind,params", CODEC_CASES, ids=CODEC_IDS)
def test_codec_round_trip_is_bit_exact(kind, params):
    """pack -> container -> unpack -> pack again gives the same bytes (the grid is a fixed point)."""
    c = packed.codec(kind)
    for seed in range(3):
        w = sample_weight(seed)
        parts, p = c.pack(w, **params)
        assert set(parts) <= set(c.parts)
        w1 = c.unpack(c.container(parts, p))
        assert w1.dtype == np.float32 and w1.shape == w.shape
        parts2, p2 = c.pack(w1, **params)
        assert p2 == p and set(parts2) == set(parts)
        for name in parts:
            assert parts2[name].dtype == parts[name].dtype and parts2[name].shape == parts[name].shape
            np.testing.assert_array_equal(_bits(parts2[name]), _bits(parts[name]), err_msg=f"part {name}")
        # unpack(pack(unpack)) is unpack: the dequantized values themselves are stable
        np.testing.assert_array_equal(c.unpack(c.container(parts2, p2)), w1)


@pytest.mark.parametrize("kind,params", CODEC_CASES, ids=CODEC_IDS)
def test_codec_round_trip_of_zero_groups_is_bit_exact(kind, params):
    """All-zero rows and groups (zero scales). Regression: int4 symmetric stored peak / -8, which is
    -0.0 for a +0.0 peak; unpacking gave -0.0 weights, whose peak / -8 is +0.0, so the scale bits
    flipped between 0x8000 and 0x0000 on every round trip."""
    c = packed.codec(kind)
    w = sample_weight(1, rows=4, n=256)
    w[0] = 0.0
    w[2, 128:] = 0.0
    parts, p = c.pack(w, **params)
    w1 = c.unpack(c.container(parts, p))
    assert (w1[0] == 0).all() and (w1[2, 128:] == 0).all()
    parts2, _ = c.pack(w1, **params)
    for name in parts:
        np.testing.assert_array_equal(_bits(parts2[name]), _bits(parts[name]), err_msg=f"part {name}")


def ref_dequant(kind, parts, params, shape):
    """The layouts as the packed docstrings state them, written out independently of packed.py."""
    out, n = shape
    if kind == "f32":
        return parts["w"].astype(np.float32)
    if kind == "f16":
        return parts["w"].view(np.float16).astype(np.float32)
    if kind == "bf16":
        return (parts["w"].astype(np.uint32) << 16).view(np.float32)
    g = params["group"]
    s = parts["scales"].astype(np.float32) if parts["scales"].dtype == np.float32 else \
        parts["scales"].view(np.float16).astype(np.float32)
    w = np.empty(shape, np.float32)
    if kind == "int8":
        for j in range(n):
            w[:, j] = parts["q"][:, j].astype(np.float32) * s[:, j // g]
        return w
    mins = parts.get("mins")
    m = None if mins is None else mins.view(np.float16).astype(np.float32)
    qs = parts["qs"]
    for j in range(n):
        grp, k = divmod(j, g)
        byte = qs[:, grp * (g // 2) + k % (g // 2)]
        q = (byte & 15) if k < g // 2 else (byte >> 4)
        q = q.astype(np.float32)
        w[:, j] = q * s[:, grp] + m[:, grp] if m is not None else (q - 8) * s[:, grp]
    return w


@pytest.mark.parametrize("kind,params", CODEC_CASES, ids=CODEC_IDS)
def test_unpack_equals_reference_dequantisation(kind, params):
    w = sample_weight(7, rows=5, n=384)
    c = packed.codec(kind)
    parts, p = c.pack(w, **params)
    got = c.unpack(c.container(parts, p))
    ref = ref_dequant(kind, parts, p, w.shape)
    if kind == "int4" and params.get("symmetric", True):
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7 * np.abs(ref).max())
    # and the quantization error is what the kind promises
    err = np.abs(got - w).max(axis=1)
    amax = np.abs(w).max(axis=1) + 1e-30
    bound = {"f32": 0, "f16": 1e-3, "bf16": 4e-3, "int8": 1 / 254 + 1e-6, "int4": 1 / 7.5}[kind]
    assert (err <= bound * amax).all(), f"{kind}: error {err.max():.3g}"


def test_pack_rejects_bad_groups():
    w = sample_weight(0, rows=3, n=96)
    with pytest.raises(ConversionError, match="multiple of the group"):
        packed.Int4.pack(w, group=64)
    with pytest.raises(ConversionError, match="multiple of the group"):
        packed.Int8.pack(w, group=64)
    with pytest.raises(ConversionError, match="2-D"):
        packed.Int4.pack(w[0], group=32)
    with pytest.raises(ConversionError, match="2-D"):
        packed.Int8.pack(w[0], group=32)
    with pytest.raises(ModelFileError, match="unknown packed kind"):
        packed.codec("int3")


def test_int8_pack_rejects_a_vector_per_channel():
    """Regression: per channel (group None) read w.shape[1] before the 2-D check (IndexError)."""
    with pytest.raises(ConversionError, match="2-D"):
        packed.Int8.pack(np.ones(96, np.float32))


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -2.5, np.inf], np.float32)
    got = packed.dense_to_f32(packed.bf16_bits(x), "bf16")
    np.testing.assert_array_equal(got, [1.0, 1.0, 1.0 + 2 ** -6, 1.0 + 2 ** -7, -2.5, np.inf])


# ------------------------------------------------------------------------------ write / open

CONFIG = {"architecture": "LlamaForCausalLM", "hidden_size": 160, "vocab_size": 7}
TOKENIZER = {"tokenizer_json": "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"abc\": 0}}}", "bos_id": 0,
             "eos_ids": [1], "add_bos": True, "chat_template": None}


def sample_tensors():
    w = sample_weight(3, rows=37, n=160)
    return [
        ("model.embed_tokens.weight", PackedTensor.from_array(w, "f16")),
        ("model.layers.0.self_attn.q_proj.weight", PackedTensor.from_array(w, "int4", group=32)),
        ("model.layers.0.self_attn.k_proj.weight", PackedTensor.from_array(w, "int4", group=32, symmetric=False)),
        ("model.layers.0.mlp.down_proj.weight", PackedTensor.from_array(w, "int8")),
        ("model.layers.0.mlp.up_proj.weight", PackedTensor.from_array(w, "int8", group=32)),
        ("model.layers.0.mlp.gate_proj.weight", PackedTensor.from_array(w, "bf16")),
        ("lm_head.weight", PackedTensor.from_array(w[:7], "f32")),
        ("model.norm.weight", PackedTensor.from_array(np.linspace(0.5, 1.5, 160, dtype=np.float32), "f32")),
        ("model.layers.0.self_attn.q_proj.bias", PackedTensor.from_array(np.arange(3, dtype=np.float32), "f32")),
    ]


@pytest.fixture
def edr_file(tmp_path):
    path = tmp_path / "m.edr"
    digest = edr.write(path, arch="LlamaForCausalLM", config=CONFIG, tokenizer=TOKENIZER,
                       tensors=sample_tensors(), extra={"quant": "mixed", "source": "test"})
    assert digest.startswith("sha256:")
    return path


def test_write_then_open_gives_identical_parts(edr_file):
    mf = edr.open_model(edr_file, verify=True)
    assert mf.arch == "LlamaForCausalLM" and mf.config == CONFIG and mf.tokenizer == TOKENIZER
    assert mf.extra == {"quant": "mixed", "source": "test"}
    for name, t in sample_tensors():
        d = mf.descriptors[name]
        assert d["kind"] == t.kind and tuple(d["shape"]) == tuple(t.shape) and d["params"] == t.params
        c = mf.tensor(name)
        for part, a in t.parts.items():
            got = mf.part(f"{name}.{part}")
            assert got.dtype == a.dtype and got.shape == a.shape, f"{name}.{part}"
            np.testing.assert_array_equal(_bits(got), _bits(a), err_msg=f"{name}.{part}")
        np.testing.assert_array_equal(packed.unpack(c), packed.codec(t.kind).unpack(
            packed.codec(t.kind).container(t.parts, t.params)))
    with pytest.raises(ModelFileError, match="no tensor named"):
        mf.tensor("missing.weight")


def _is_file_map(a: np.ndarray) -> bool:
    """True if a view's base chain ends in an np.memmap or an mmap.mmap."""
    b = a
    while b is not None:
        if isinstance(b, (np.memmap, mmap.mmap)):
            return True
        b = b.base if isinstance(b, np.ndarray) else getattr(b, "obj", None)
    return False


def test_open_memory_maps_never_copies(edr_file):
    mf = edr.open_model(edr_file)
    assert isinstance(mf.data, np.memmap)
    for name in mf.descriptors:
        c = mf.tensor(name)
        for a in c:
            if isinstance(a, np.ndarray) and a.size:
                assert _is_file_map(a), f"{name}: a copy, not a view of the file map"
                assert np.shares_memory(a, mf.data), name
                assert not a.flags.writeable, f"{name}: a read-only file must give read-only arrays"
    # the part buffers start on 64-byte boundaries of the file
    hdr_len = struct.unpack("<Q", edr_file.read_bytes()[:8])[0]
    for k, e in mf.entries.items():
        if not k.startswith("__pad__"):
            assert (8 + hdr_len + e["data_offsets"][0]) % edr.ALIGN == 0, k


def test_safetensors_can_list_an_edr(edr_file):
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(edr_file), "np") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert "lm_head.weight.w" in keys and "model.layers.0.self_attn.q_proj.weight.qs" in keys
        assert meta["format"] == "edgerun" and meta["format_version"] == str(edr.FORMAT_VERSION)
        np.testing.assert_array_equal(f.get_tensor("lm_head.weight.w"), sample_weight(3, 37, 160)[:7])
        np.testing.assert_array_equal(f.get_tensor("model.layers.0.mlp.down_proj.weight.q"),
                                      dict(sample_tensors())["model.layers.0.mlp.down_proj.weight"].parts["q"])


def test_written_atomically_no_temp_left(edr_file):
    assert sorted(p.name for p in edr_file.parent.iterdir()) == ["m.edr"]


# ------------------------------------------------------------------------------ damaged files

def _header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw


def _expect_refused(path, match=None, verify=False):
    with pytest.raises(ModelFileError) as ei:
        edr.open_model(path, verify=verify)
    msg = str(ei.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    if match:
        assert match in msg.lower(), msg
    return msg


@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_truncated_file_is_refused(edr_file, cut):
    n, raw = _header(edr_file)
    keep = {"data": len(raw) - 100, "header": 8 + n // 2, "length": 5}[cut]
    edr_file.write_bytes(raw[:keep])
    _expect_refused(edr_file, "truncated" if cut != "length" else "too short")


def test_trailing_junk_is_refused(edr_file):
    with open(edr_file, "ab") as f:
        f.write(b"\0" * 64)
    _expect_refused(edr_file, "longer than")


def test_corrupted_header_byte_is_refused(edr_file):
    n, raw = _header(edr_file)
    bad = bytearray(raw)
    bad[8] = ord("X")                    # the header's opening brace
    edr_file.write_bytes(bytes(bad))
    _expect_refused(edr_file, "header is corrupted")


# single-token edits of the header that keep it valid JSON
VALID_JSON_CORRUPTIONS = [
    ("format-name", b'"format":"edgerun"', b'"format":"edgerum"'),
    ("model-key", b'"model":', b'"modeX":'),
    ("offsets-key", b'"data_offsets"', b'"data_offsetX"'),
    ("part-dtype", b'"dtype":"F32"', b'"dtype":"F3X"'),
    ("arch-key", b'\\"arch\\":', b'\\"arcX\\":'),
]


@pytest.mark.parametrize("old,new", [c[1:] for c in VALID_JSON_CORRUPTIONS],
                         ids=[c[0] for c in VALID_JSON_CORRUPTIONS])
def test_corrupted_header_that_still_parses_is_refused(edr_file, old, new):
    """Any damage to the header is a ModelFileError naming the file, never a bare KeyError."""
    _, raw = _header(edr_file)
    assert len(old) == len(new) and old in raw
    i = raw.index(old)
    edr_file.write_bytes(raw[:i] + new + raw[i + len(old):])
    _expect_refused(edr_file)


def test_unknown_packed_kind_names_the_file(tmp_path):
    """A file from a newer edgerun with a kind this one lacks (here "int3"): refused, naming the file."""
    path = tmp_path / "new.edr"
    edr.write(path, arch="LlamaForCausalLM", config=CONFIG, tokenizer=TOKENIZER,
              tensors=[("x.weight", PackedTensor("int3", (2, 16), {}, {"w": np.zeros((2, 4), np.uint8)}))])
    _expect_refused(path, "int3")


def test_corrupted_metadata_that_still_parses_fails_the_hash(edr_file):
    n, raw = _header(edr_file)
    i = raw.index(b'\\"hidden_size\\":160', 8, 8 + n)      # inside the model JSON string
    bad = raw[:i] + b'\\"hidden_size\\":161' + raw[i + len(b'\\"hidden_size\\":160'):]
    edr_file.write_bytes(bad)
    edr.open_model(edr_file)                                # structurally fine
    _expect_refused(edr_file, "hash", verify=True)


def test_corrupted_data_byte_fails_the_hash(edr_file):
    n, raw = _header(edr_file)
    mf = edr.open_model(edr_file)
    a, _ = mf.entries["model.layers.0.mlp.down_proj.weight.q"]["data_offsets"]
    del mf
    bad = bytearray(raw)
    bad[8 + n + a + 3] ^= 0x10
    edr_file.write_bytes(bytes(bad))
    edr.open_model(edr_file)                                # without verify the file opens
    _expect_refused(edr_file, "hash", verify=True)
    import edgerun
    with pytest.raises(ModelFileError, match="hash"):
        edgerun.load(edr_file, verify=True)


def test_newer_format_version_is_refused(edr_file):
    n, raw = _header(edr_file)
    old = b'"format_version":"%d"' % edr.FORMAT_VERSION
    assert raw.count(old) == 1
    edr_file.write_bytes(raw.replace(old, b'"format_version":"%d"' % (edr.FORMAT_VERSION + 1)))
    msg = _expect_refused(edr_file, "newer")
    assert "upgrade" in msg


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None], ids=["hf-metadata", "no-metadata"])
def test_plain_safetensors_file_is_refused(tmp_path, metadata):
    """A valid safetensors file that is not ours: named as such, not called corrupted.
    (transformers writes {"format": "pt"}; safetensors.numpy.save_file alone writes no metadata.)"""
    from safetensors.numpy import save_file
    path = tmp_path / "model.edr"
    save_file({"w": np.ones((2, 3), np.float32)}, str(path), metadata=metadata)
    _expect_refused(path, "not an edgerun model")


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00" + b"\0" * 64, os.urandom(4096)],
                         ids=["empty", "gguf-magic", "random"])
def test_not_a_model_file_is_refused(tmp_path, content):
    path = tmp_path / "x.edr"
    path.write_bytes(content)
    _expect_refused(path)


def test_missing_file_is_refused(tmp_path):
    _expect_refused(tmp_path / "nope.edr", "no such file")


def test_tensor_size_mismatch_is_refused(edr_file):
    """A header whose shape disagrees with its byte range (same header length)."""
    n, raw = _header(edr_file)
    hdr = json.loads(raw[8:8 + n])
    e = hdr["lm_head.weight.w"]
    old = json.dumps({"dtype": e["dtype"], "shape": e["shape"], "data_offsets": e["data_offsets"]},
                     separators=(",", ":")).encode()
    assert old in raw
    new = old.replace(b"[7,160]", b"[6,160]")
    assert len(new) == len(old)
    edr_file.write_bytes(raw.replace(old, new))
    _expect_refused(edr_file, "shape needs")


# ------------------------------------------------------------------------------ failed conversions

@pytest.fixture
def hf_tiny(hf_dir_factory):
    pytest.importorskip("torch")
    _, d = hf_dir_factory("LlamaForCausalLM", hidden_size=64, intermediate_size=96,
                          num_attention_heads=4, num_key_value_heads=2)
    return d


def _convert(src, out, **kw):
    from edgerun.converters import convert
    return convert(src, out, progress=False, **kw)


def test_failed_conversion_leaves_nothing(hf_tiny, tmp_path):
    from edgerun.errors import EdgerunError
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.edr"

    # a directory with only a pickle checkpoint
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((hf_tiny / name).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConversionError, match="pickle"):
        _convert(pickled, out)
    assert list(out_dir.iterdir()) == []

    # an unknown quant kind
    with pytest.raises(ConversionError, match="unknown --quant"):
        _convert(hf_tiny, out, quant="int3")
    assert list(out_dir.iterdir()) == []

    # an unsupported int4 group size
    with pytest.raises(ConversionError, match="group"):
        _convert(hf_tiny, out, quant="int4", group_size=48)
    assert list(out_dir.iterdir()) == []

    # a truncated safetensors file
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in hf_tiny.iterdir():
        data = p.read_bytes()
        (broken / p.name).write_bytes(data[: len(data) // 2] if p.suffix == ".safetensors" else data)
    with pytest.raises(EdgerunError):
        _convert(broken, out)
    assert list(out_dir.iterdir()) == []


def test_failed_conversion_keeps_an_existing_file(hf_tiny, tmp_path, monkeypatch):
    out = tmp_path / "out" / "m.edr"
    digest = _convert(hf_tiny, out, quant="int8")
    before = out.read_bytes()
    with pytest.raises(ConversionError):
        _convert(hf_tiny, out, quant="nope")
    assert out.read_bytes() == before

    # a failure while the file is being written (after the temp file exists): temp removed
    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(edr.os, "replace", fail)
    with pytest.raises(OSError):
        _convert(hf_tiny, out, quant="int4")
    monkeypatch.undo()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.edr"]
    assert out.read_bytes() == before
    assert edr.open_model(out, verify=True).content_hash == digest

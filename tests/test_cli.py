"""The CLI contract: bad input gives one line and exit code 2; conversions leave nothing behind;
the examples run as the README shows."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgerun
from edgerun.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama converted to f32: (hf dir, .edr path)."""
    from conftest import make_hf_model, save_hf
    d = tmp_path_factory.mktemp("cli")
    hf = save_hf(make_hf_model("LlamaForCausalLM", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256), d / "hf")
    out = d / "tiny.edr"
    assert main(["convert", str(hf), "-o", str(out), "--quant", "f32", "-q"]) == 0
    return hf, out


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv, needle", [
    (["run", "/no/such/model.edr", "-p", "hi"], "no such file"),
    (["inspect", "/no/such/model.edr"], "no such file"),
    (["convert", "/no/such/dir", "-o", "x.edr"], "no such file"),
    (["pull", "no-such-model"], "unknown model"),
])
def test_missing_inputs_exit_2(capsys, tmp_path, argv, needle):
    os.chdir(tmp_path)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_directory_without_config(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "convert", tmp_path, "-o", tmp_path / "x.edr")
    assert rc == 2 and "config.json" in err
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_is_named(capsys, tiny, tmp_path):
    hf, _ = tiny
    d = tmp_path / "gpt"
    d.mkdir()
    for f in hf.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    rc, _, err = run_cli(capsys, "convert", d, "-o", tmp_path / "x.edr")
    assert rc == 2 and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "x.edr").exists()


def test_pickle_checkpoint_refused(capsys, tiny, tmp_path):
    hf, _ = tiny
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((hf / "config.json").read_text())
    (d / "tokenizer.json").write_text((hf / "tokenizer.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    rc, _, err = run_cli(capsys, "convert", d, "-o", tmp_path / "out" / "x.edr")
    assert rc == 2 and "pickle" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unknown_quant(capsys, tiny, tmp_path):
    hf, _ = tiny
    rc, _, err = run_cli(capsys, "convert", hf, "-o", tmp_path / "x.edr", "--quant", "int3")
    assert rc == 2 and "int3" in err
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_corrupted_files(capsys, tiny, tmp_path):
    _, edr = tiny
    data = edr.read_bytes()
    bad = tmp_path / "truncated.edr"
    bad.write_bytes(data[: len(data) - 100])
    rc, _, err = run_cli(capsys, "inspect", bad)
    assert rc == 2 and "truncated" in err and str(bad) in err
    bad = tmp_path / "header.edr"
    bad.write_bytes(data[:20] + b"\x00\xff" + data[22:])
    rc, _, err = run_cli(capsys, "inspect", bad)
    assert rc == 2 and str(bad) in err
    bad = tmp_path / "payload.edr"
    bad.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    rc, _, err = run_cli(capsys, "inspect", bad, "--verify")
    assert rc == 2 and "hash" in err
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 10)
    rc, _, err = run_cli(capsys, "run", bad, "-p", "hi")
    assert rc == 2 and str(bad) in err


def test_prompt_errors(capsys, tiny):
    _, edr = tiny
    rc, _, err = run_cli(capsys, "run", edr, "-p", "")
    assert rc == 2 and "empty prompt" in err
    rc, _, err = run_cli(capsys, "run", edr, "-p", "the cat sat on the mat " * 100, "-n", "4")
    assert rc == 2 and "context" in err


def test_python_api_raises_typed_errors(tiny):
    _, edr = tiny
    m = edgerun.load(edr)
    with pytest.raises(edgerun.InputError, match="out of range"):
        m.forward([1, m.vocab_size])
    with pytest.raises(edgerun.InputError, match="empty"):
        m.forward([])
    with pytest.raises(edgerun.InputError, match="context"):
        m.forward(np.ones(m.max_context + 1, dtype=np.int64))
    with pytest.raises(edgerun.InputError):
        m.generate("")
    with pytest.raises(edgerun.ModelFileError):
        edgerun.load("/no/such/file.edr")
    with pytest.raises(edgerun.InputError, match="temperature"):
        m.generate("hi", temperature=-1)


def test_run_inspect_perplexity(capsys, tiny, tmp_path):
    _, edr = tiny
    rc, out, _ = run_cli(capsys, "run", edr, "-p", "the cat", "-n", "5", "--seed", "1", "--temperature", "0.8")
    assert rc == 0 and out.endswith("\n")
    rc, out, _ = run_cli(capsys, "inspect", edr, "--verify")
    assert rc == 0 and "verified" in out and "model.layers.1.mlp.down_proj.weight" in out
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran in the park. " * 20)
    rc, out, _ = run_cli(capsys, "perplexity", edr, "--file", text, "--ctx", "32", "--json")
    assert rc == 0 and '"perplexity"' in out


def test_perplexity_equals_windowed_nll(tiny, tmp_path):
    """perplexity() = exp(mean NLL) over non-overlapping windows, each from an empty state."""
    from edgerun.perplexity import perplexity
    _, edr = tiny
    m = edgerun.load(edr)
    text = "the cat sat on the mat and the dog ran in the park. " * 8
    ids = np.array(m.tokenizer.encode(text, add_bos=False))
    r = perplexity(m, text, ctx=16)
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, 16):
        w = ids[s:s + 16]
        lg = m.forward(w).astype(np.float64)
        lp = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) - lg.max(1, keepdims=True)
        nll -= lp[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    assert r["tokens"] == n
    assert np.isclose(r["perplexity"], np.exp(nll / n), rtol=1e-6)


def test_examples_run(tiny):
    """examples/chat.py and examples/embed_app.py, as the README runs them, on the tiny model."""
    _, edr = tiny
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "chat.py"), str(edr)], input="hello\nthe cat\n\n",
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 2
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "embed_app.py"), "--model", str(edr),
                        "what is a cat?", "and a dog?"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Q: ") == 2 and r.stdout.count("A: ") == 2

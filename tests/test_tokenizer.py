"""Tokenizer: GGUF rebuild vs transformers, HF directories, chat templates, streaming decode."""

import json
import os
from pathlib import Path

import pytest

from edgerun.errors import ConversionError, InputError
from edgerun.tokenizer import Tokenizer, gguf_metadata

AWKWARD = ["hello world", "  leading spaces", " ", "", "12345 and 3.14159", "naïve café 🙂",
           "line1\nline2\n\n  x\t\ty", "<|im_start|>user\nhi<|im_end|>\n", "中文 日本語", "it's I'M"]
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "naïve 🙂?"}]


def hf_gguf_tokenizer(path: Path):
    """transformers' tokenizer for a GGUF file, offline; skips when transformers is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def stream(tok: Tokenizer, ids: list[int], skip_special=True) -> list[str]:
    dec = tok.stream_decoder(skip_special)
    return [dec.step(i) for i in ids] + [dec.flush()]


# --- a real GGUF: SmolLM2-135M-Instruct (byte-level BPE) ------------------------------------------

@pytest.fixture(scope="module")
def smollm2_path(smollm2_gguf):
    """The real GGUF (conftest finds or pulls it, or skips)."""
    return smollm2_gguf


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    import gguf

    return Tokenizer.from_gguf(gguf_metadata(gguf.GGUFReader(smollm2_path)))


def test_smollm2_matches_transformers(smollm2, smollm2_path):
    hf = hf_gguf_tokenizer(smollm2_path)
    for text in AWKWARD:
        ids = smollm2.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert smollm2.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert smollm2.decode(ids, skip_special=False) == hf.decode(ids), text
    assert smollm2.apply_chat_template(MESSAGES) == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    assert smollm2.apply_chat_template(MESSAGES, add_generation_prompt=False) == hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=False)


def test_smollm2_specials_and_round_trips(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_ids, smollm2.add_bos) == (1, [2], False)
    assert smollm2.encode("<|im_start|>user") == [1, 4093]  # control token matched whole
    for text in AWKWARD:
        ids = smollm2.encode(text)
        assert smollm2.decode(ids, skip_special=False) == text
        assert "".join(stream(smollm2, ids, skip_special=False)) == text
    assert smollm2.encode("hi", add_bos=True) == [1, *smollm2.encode("hi")]
    assert smollm2.encode("<|im_start|>hi", add_bos=True) == smollm2.encode("<|im_start|>hi")  # no double BOS

    d = json.loads(json.dumps(smollm2.to_dict()))
    again = Tokenizer.from_dict(d)
    assert again.to_dict() == smollm2.to_dict()
    assert [again.encode(t) for t in AWKWARD] == [smollm2.encode(t) for t in AWKWARD]
    assert again.apply_chat_template(MESSAGES) == smollm2.apply_chat_template(MESSAGES)


# --- synthetic SentencePiece GGUFs (Llama, Gemma variants) vs transformers -------------------------

def write_sentencepiece_gguf(path: Path, arch: str, add_space_prefix: bool | None = None) -> Path:
    """A tiny GGUF holding only metadata: a BPE trained on a few sentences, spelled like a
    SentencePiece vocab (<unk>, <s>, </s>, <0xNN> byte tokens, ▁ words, scores = -merge rank)."""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
              "Numbers 12345 and 678.", "  indented   text with  spaces", "naïve café résumé"] * 10
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types, scores = [2, 3, 3] + [6] * 256, [0.0] * len(tokens)
    for rank, token in enumerate(sorted(bpe.get_vocab(), key=bpe.get_vocab().get)):
        if token not in tokens:
            tokens.append(token), types.append(1), scores.append(-float(rank))
    tokens += ["<|im_end|>", "<think>", "  "]
    types += [3, 4, 1]
    scores += [0.0, 0.0, -1000.0]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8)
    w.add_feed_forward_length(16), w.add_head_count(2), w.add_head_count_kv(1), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama"), w.add_token_list(tokens), w.add_token_scores(scores), w.add_token_types(types)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def load_gguf(path: Path) -> Tokenizer:
    import gguf

    return Tokenizer.from_gguf(gguf_metadata(gguf.GGUFReader(path)))


SP_TEXTS = ["The quick brown fox", " leading", "  two  spaces ", "12345", "naïve café 🙂", "a\nb",
            "x<|im_end|>y <think>z", "Hello world<|im_end|> the fox", "", "Hello"]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_sentencepiece_gguf_matches_transformers(tmp_path, arch):
    path = write_sentencepiece_gguf(tmp_path / f"{arch}.gguf", arch)
    ours, hf = load_gguf(path), hf_gguf_tokenizer(path)
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_ids == [2]
    for text in SP_TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert "".join(stream(ours, ids)) == ours.decode(ids), text
    # transformers doubles a BOS the text already has; we do not
    assert ours.encode("<s>hi") == hf("<s>hi")["input_ids"][1:]


def test_sentencepiece_gguf_honours_add_space_prefix(tmp_path):
    """llama.cpp honours add_space_prefix = false (transformers ignores it); so do we."""
    with_prefix = load_gguf(write_sentencepiece_gguf(tmp_path / "a.gguf", "llama"))
    without = load_gguf(write_sentencepiece_gguf(tmp_path / "b.gguf", "llama", add_space_prefix=False))
    assert with_prefix.encode("Hello", add_bos=False) == with_prefix.encode(" Hello", add_bos=False)
    assert without.encode("Hello", add_bos=False) != without.encode(" Hello", add_bos=False)
    for text in SP_TEXTS:
        assert without.decode(without.encode(text)) == text.replace("<|im_end|>", "")


def test_gguf_unknown_tokenizer_model():
    with pytest.raises(ConversionError, match="bert"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# --- a tiny HF directory --------------------------------------------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
            "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture
def hf_dir(tmp_path):
    """Byte-level BPE trained on a few sentences with multi-byte characters, saved like an HF repo."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    corpus = ["héllo wörld, naïve café", "日本語のテキスト", "emoji 🙂🙃 and ünïcödé", "plain ascii text"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
        "add_bos_token": True, "chat_template": TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    return tmp_path


def test_hf_dir_specials_and_bos(hf_dir):
    tok = Tokenizer.from_file(hf_dir)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (0, [1, 3], True)
    assert Tokenizer.from_file(hf_dir / "tokenizer.json").to_dict() == tok.to_dict()
    ids = tok.encode("héllo")
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tok.encode("<s>héllo") == ids  # BOS written in the text is not doubled
    assert tok.encode("héllo", add_bos=False) == ids[1:]
    assert tok.decode(ids) == "héllo" and tok.decode(ids, skip_special=False) == "<s>héllo"
    assert tok.id_to_token(3) == "<|im_end|>" and tok.token_to_id("<|im_end|>") == 3
    with pytest.raises(InputError):
        tok.decode([tok.vocab_size])


def test_hf_dir_chat_template(hf_dir):
    tok = Tokenizer.from_file(hf_dir)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(msgs) == "<s>[user] hi</s>\n[assistant] yo</s>\n[assistant]"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("yo</s>\n")
    with pytest.raises(InputError, match="bad role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])

    (hf_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] | tojson }}")  # transformers 5 layout
    assert Tokenizer.from_file(hf_dir).apply_chat_template(msgs) == '"hi"'

    (hf_dir / "chat_template.jinja").unlink()
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    plain = Tokenizer.from_file(hf_dir)  # no template: ChatML
    assert plain.chat_template is None
    assert plain.apply_chat_template(msgs[:1]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_stream_decoder_equals_decode(hf_dir):
    tok = Tokenizer.from_file(hf_dir)
    text = "emoji 🙂🙃 and ünïcödé<|im_end|> 日本語のテキスト"
    ids = tok.encode(text)
    assert len(ids) > 10
    for skip in (True, False):
        pieces = stream(tok, ids, skip)
        assert "".join(pieces) == tok.decode(ids, skip)
        assert not any(p.endswith("\ufffd") for p in pieces)
        assert sum(bool(p) for p in pieces) > 3  # text comes out as it completes, not all at the end
    dec = tok.stream_decoder()
    held = [dec.step(i) for i in tok.encode("🙂", add_bos=False)]  # 4 UTF-8 bytes, 2+ tokens
    assert len(held) > 1 and held[-1] == "🙂" and not any(held[:-1])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ConversionError, match=str(tmp_path)):
        Tokenizer.from_file(tmp_path)

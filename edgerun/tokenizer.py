"""Tokenizers: a Hugging Face `tokenizers.Tokenizer` plus what a runtime needs around it.

Sources: an HF directory (`tokenizer.json` + configs), GGUF metadata (rebuilt so that ids equal
what `transformers` gives for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`), or the dict
stored in our model file (`to_dict` / `from_dict`).

BOS is handled here, not by the `tokenizers` post-processor: `encode` never appends EOS and never
doubles a BOS the text already starts with.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from edgerun.errors import ConversionError, InputError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """Text <-> token ids for one model.

    bos_id: the BOS id, or None when the model has none.
    eos_ids: ids that end generation, the primary EOS first (it is the template's `eos_token`).
    add_bos: whether `encode` prepends BOS by default.
    chat_template: the model's Jinja chat template, or None (then ChatML is used).
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: list[int],
                 add_bos: bool, chat_template: str | None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        self._template = None  # compiled lazily

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """From an HF directory, or a `tokenizer.json` path (its folder's configs are read too).

        Reads tokenizer_config.json (bos/eos tokens, add_bos_token, chat_template),
        chat_template.jinja / chat_template.json, and eos_token_id from generation_config.json and
        config.json. When add_bos_token is not stated, it is whatever the post-processor does.
        Raises ConversionError if tokenizer.json is missing or unreadable.
        """
        path = Path(path)
        json_path = path if path.is_file() else path / "tokenizer.json"
        folder = json_path.parent
        if not json_path.is_file():
            raise ConversionError(f"{folder}: no tokenizer.json (edgerun reads only fast tokenizers)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(json_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ConversionError(f"{json_path}: cannot read tokenizer: {e}") from e
        cfg, gen, model_cfg = (_read_json(folder / n) for n in
                               ("tokenizer_config.json", "generation_config.json", "config.json"))

        bos_id = _token_id(tok, cfg.get("bos_token"))
        if bos_id is None:
            bos_id = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos_ids = _unique([_token_id(tok, cfg.get("eos_token")), *_as_list(gen.get("eos_token_id")),
                           *_as_list(model_cfg.get("eos_token_id"))])
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            with_special = tok.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and with_special[:1] == [bos_id]
        return cls(tok, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                   chat_template=_find_chat_template(folder, cfg))

    @classmethod
    def from_gguf(cls, meta: dict[str, object]) -> Tokenizer:
        """From decoded GGUF metadata (see `gguf_metadata`).

        Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE) and "llama" (SentencePiece BPE with
        byte fallback; Gemma and Phi-3 variants by `general.architecture`). Control (3) and named
        special tokens become special added tokens, user-defined (4) ones plain added tokens.
        EOS ids are eos, then eot and eom when the file has them. Raises ConversionError.
        """
        tok = _gguf_backend(meta)
        eos_ids = _unique([meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")])
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp and transformers add BOS to SentencePiece vocabs by default
            add_bos = meta.get("tokenizer.ggml.model") == "llama"
        return cls(tok, bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_ids=eos_ids,
                   add_bos=add_bos, chat_template=meta.get("tokenizer.chat_template"))

    def to_dict(self) -> dict:
        """JSON-able form for the model file; `from_dict` inverts it exactly."""
        return {"tokenizer_json": self.tok.to_str(), "bos_id": self.bos_id, "eos_ids": self.eos_ids,
                "add_bos": self.add_bos, "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        if d.get("kind"):                       # byte-level / RWKV World vocabularies (tokenizer_rwkv)
            from edgerun.tokenizer_rwkv import from_dict
            return from_dict(d)
        return cls(tokenizers.Tokenizer.from_str(d["tokenizer_json"]), bos_id=d["bos_id"],
                   eos_ids=d["eos_ids"], add_bos=d["add_bos"], chat_template=d.get("chat_template"))

    # --- text <-> ids ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched whole.

        add_bos None means the model's default. BOS is not prepended when the ids already start
        with it (e.g. a rendered chat template that writes it).
        """
        if not isinstance(text, str):
            raise InputError(f"encode takes a str, got {type(text).__name__}")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped when skip_special. Raises InputError on bad ids."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InputError(f"token ids out of range [0, {n}): {bad[:5]}")
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # --- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...]), as transformers renders it.

        Renders the model's own template in a Jinja sandbox with `bos_token`, `eos_token`,
        `raise_exception` and `strftime_now`; `extra` (e.g. tools=...) is passed to the template.
        A model without a template gets plain ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`).
        A template that rejects the conversation raises InputError.
        """
        import jinja2

        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template or CHATML_TEMPLATE)
        names = {"bos_token": self.bos_id, "eos_token": self.eos_ids[0] if self.eos_ids else None}
        tokens = {k: self.id_to_token(i) if i is not None else None for k, i in names.items()}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **tokens, **extra)
        except jinja2.TemplateError as e:
            raise InputError(f"chat template: {e}") from e


class StreamDecoder:
    """Incremental detokenisation: `step(id)` returns only text that is new and complete.

    Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD). The pieces of all
    `step` calls plus `flush()` concatenate to `tokenizer.decode(all ids)`.

    Each step decodes a short window ids[start:] and subtracts the already released ids[start:done]
    (vLLM's offsets). `start` only moves to a token that on its own added text (not a skipped
    special token, not part of a held-back character), so decoders that strip the first space
    (SentencePiece) strip the same one in both decodes and the difference stays exact.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._start = 0  # window start: ids before it are released and no longer decoded
        self._done = 0   # ids before it are released

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """What is still held at the end (an incomplete character comes out as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        decode = self._tokenizer.decode
        released = decode(self._ids[self._start:self._done], self._skip)
        text = decode(self._ids[self._start:], self._skip)
        if text.endswith("\ufffd") and not final:
            return ""
        piece = text[len(released):]
        if piece and len(self._ids) - self._done == 1:  # one token that showed text: a safe start
            self._start = self._done
        self._done = len(self._ids)
        return piece


def gguf_metadata(reader) -> dict[str, object]:
    """Every key/value field of a `gguf.GGUFReader` as Python values (str, int, float, bool, lists).

    Strings that are not valid UTF-8 are decoded with replacement characters.
    """
    meta = {}
    for name, field in reader.fields.items():
        try:
            meta[name] = field.contents()
        except UnicodeDecodeError:
            parts = [field.parts[i] for i in field.data]
            texts = [bytes(p).decode("utf-8", errors="replace") for p in parts]
            meta[name] = texts if len(field.types) > 1 else texts[0]
    return meta


# --- GGUF -> tokenizers ---------------------------------------------------------------------------

# Split regexes by `tokenizer.ggml.pre`, the ones transformers applies (other names keep GPT-2's).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the rest map to 256+."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


_BYTE_CHARS = _byte_alphabet()
_BYTE_ALPHABET = set(_BYTE_CHARS.values())


def _gguf_backend(meta: dict) -> tokenizers.Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ConversionError("GGUF has no tokenizer.ggml.tokens")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens)
    else:
        raise ConversionError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama are)")

    # Whole-match control and named special tokens, as special; user-defined ones as plain added
    # tokens. Only tokens already in the vocabulary: the embedding table has a fixed size, and a
    # byte-level "control" token spelled outside the byte alphabet is a llama.cpp mislabel.
    vocab = tok.get_vocab()
    named = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")]
    special = [t for t, ty in zip(tokens, types) if ty == CONTROL]
    special += [tokens[i] for i in named if i is not None and 0 <= i < len(tokens)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in dict.fromkeys(special) if t in vocab])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])
    return tok


def _byte_level_bpe(meta: dict, tokens: list[str]) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style); tokens stored as raw text are respelled in the byte alphabet."""
    vocab = {t if set(t) <= _BYTE_ALPHABET else "".join(_BYTE_CHARS[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                                          end_of_word_suffix="", fuse_unk=False))
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict, tokens: list[str]) -> tokenizers.Tokenizer:
    """SentencePiece BPE: ▁ for spaces, <0xNN> byte fallback, merges from the file or the scores.

    Gemma: runs of spaces are stored as spaces (respelled as ▁), merges follow token order, no
    prefix space. Phi-3: the prefix ▁ comes from a normalizer. Llama (default): Metaspace with a
    prefix ▁ on the first piece, unless the file says add_space_prefix = false (llama.cpp honours
    that flag; transformers ignores it).
    """
    arch = meta.get("general.architecture")
    gemma = arch in ("gemma", "gemma2", "gemma3")
    if gemma:
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                          byte_fallback=True, dropout=None))
    prefix = not gemma and meta.get("tokenizer.ggml.add_space_prefix", True)
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    elif arch == "phi3":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * bool(prefix))
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best token score first (ties: longer left, then longer right piece; then by ids), the order
    transformers uses, so the same text gives the same ids."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(left, right, score) for left, right in pairs]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


# --- HF directory helpers -------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from e


def _token_id(tok: tokenizers.Tokenizer, token) -> int | None:
    """Id of a token given as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _unique(ids) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _find_chat_template(folder: Path, cfg: dict) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json (transformers 5
    saves the first; a list of named templates picks "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _jinja_env():
    """The sandbox transformers renders chat templates in (trim/lstrip blocks, loop controls,
    a tojson that keeps non-ASCII, raise_exception, strftime_now)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env

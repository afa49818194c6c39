"""RWKV tokenizers: byte-level (token id = byte, the tiny test models) and the RWKV World vocabulary.

The World tokenizer is BlinkDL's: a vocabulary of byte strings (rwkv_vocab_v20230424.txt, one
``<id> <python literal> <length>`` a line), and encoding is greedy longest match over the
UTF-8 bytes, walked in a trie. Both subclass Tokenizer, so the decode loop, the stream
decoder and chat templates work unchanged; ``to_dict`` carries a "kind" for the model file.
"""
from __future__ import annotations

import ast
import base64
from pathlib import Path

from .errors import ConversionError, InputError
from .tokenizer import Tokenizer

# BlinkDL's chat format: "User: ...\n\nAssistant: ..."
RWKV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class _BytesVocabTokenizer(Tokenizer):
    """A tokenizer whose tokens are byte strings; subclasses fill self.tokens (id -> bytes)."""
    kind = ""

    def __init__(self, tokens: list[bytes], eos_ids=(), chat_template: str | None = None):
        self.tok = None
        self.tokens = tokens
        self.bos_id = None
        self.eos_ids = list(eos_ids)
        self.add_bos = False
        self.chat_template = chat_template
        self._template = None
        self._ids = {t: i for i, t in enumerate(tokens) if t}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.tokens)]
        if bad:
            raise InputError(f"token ids out of range [0, {len(self.tokens)}): {bad[:5]}")
        return b"".join(self.tokens[i] for i in ids).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id].decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token.encode("utf-8"))


class ByteTokenizer(_BytesVocabTokenizer):
    """Token id = byte value (vocab 256), as the rwkv.cpp tiny test models use."""
    kind = "bytes"

    def __init__(self, eos_ids=(), chat_template: str | None = None):
        super().__init__([bytes([b]) for b in range(256)], eos_ids, chat_template)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"encode takes a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "eos_ids": self.eos_ids, "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, d: dict) -> "ByteTokenizer":
        return cls(d.get("eos_ids", []), d.get("chat_template"))


class WorldTokenizer(_BytesVocabTokenizer):
    """RWKV World: greedy longest byte match over the vocabulary. Id 0 is end of text."""
    kind = "rwkv_world"

    def __init__(self, tokens: list[bytes], eos_ids=(0,), chat_template: str | None = RWKV_CHAT_TEMPLATE):
        super().__init__(tokens, eos_ids, chat_template)
        self._trie: dict = {}
        for i, t in enumerate(tokens):
            if not t:
                continue
            node = self._trie
            for b in t:
                node = node.setdefault(b, {})
            node[-1] = i

    @classmethod
    def from_vocab_file(cls, path: str | Path) -> "WorldTokenizer":
        """BlinkDL's rwkv_vocab_*.txt: '<id> <repr of str or bytes> <byte length>' per line."""
        path = Path(path)
        table: dict[int, bytes] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                idx = int(line[:line.index(" ")])
                tok = ast.literal_eval(line[line.index(" "):line.rindex(" ")].strip())
                tok = tok.encode("utf-8") if isinstance(tok, str) else bytes(tok)
                length = int(line[line.rindex(" "):])
            except (ValueError, SyntaxError) as e:
                raise ConversionError(f"{path}:{n}: not a vocabulary line ({e})") from None
            if len(tok) != length:
                raise ConversionError(f"{path}:{n}: token length {len(tok)} != stated {length}")
            table[idx] = tok
        tokens = [b""] * (max(table) + 1)
        for i, t in table.items():
            tokens[i] = t
        return cls(tokens)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"encode takes a str, got {type(text).__name__}")
        data = text.encode("utf-8")
        ids, i, n, root = [], 0, len(data), self._trie
        while i < n:
            node, j, best, best_end = root, i, None, i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                if -1 in node:
                    best, best_end = node[-1], j
            if best is None:
                raise InputError(f"byte {data[i]:#x} at offset {i} is not in the vocabulary")
            ids.append(best)
            i = best_end
        return ids

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokens": [base64.b64encode(t).decode() for t in self.tokens],
                "eos_ids": self.eos_ids, "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, d: dict) -> "WorldTokenizer":
        return cls([base64.b64decode(t) for t in d["tokens"]], d.get("eos_ids", [0]), d.get("chat_template"))


KINDS = {ByteTokenizer.kind: ByteTokenizer, WorldTokenizer.kind: WorldTokenizer}


def from_dict(d: dict) -> Tokenizer:
    try:
        return KINDS[d["kind"]].from_dict(d)
    except KeyError:
        raise ConversionError(f"unknown tokenizer kind {d.get('kind')!r} (known: {', '.join(KINDS)})") from None

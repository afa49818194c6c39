"""Streaming text: token ids -> text pieces that are final.

Two stages, each fed one step at a time:
  Detokenizer       ids -> text, holding back an incomplete UTF-8 character;
  StopStringFilter  text -> text, cut before the first stop string and holding back a tail
                    that could still grow into one, so nothing past a stop string is streamed.
"""

from __future__ import annotations

from typing import Sequence

from edgerun.errors import InputError


class Detokenizer:
    """Incremental decoding with `tokenizer.stream_decoder()` when the tokenizer has one, else by
    decoding all ids so far and releasing the new suffix (held back while it ends in U+FFFD).

    Stream decoder contract: `stream_decoder()` returns an object whose `step(token_id)` returns the
    newly complete text (str, or None/"" when nothing is complete yet) and, optionally, whose
    `flush()` returns what it still holds at the end.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        make = getattr(tokenizer, "stream_decoder", None)
        self._stream = make() if callable(make) else None
        self._ids: list[int] = []
        self._released = 0  # characters of decode(self._ids) already returned (fallback path)

    def step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(token_id) or ""
        # decodes the whole output each token: O(len) per step, small next to a model step,
        # and exactly tokenizer.decode(ids) in the end (no window artefacts such as lost spaces)
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still being spelled out
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Whatever is still held at the end of generation (an incomplete character decodes as U+FFFD)."""
        if self._stream is not None:
            flush = getattr(self._stream, "flush", None)
            return (flush() or "") if callable(flush) else ""
        return self._release(self._tokenizer.decode(self._ids)) if self._ids else ""

    def _release(self, text: str) -> str:
        piece = text[self._released:]
        self._released = max(self._released, len(text))
        return piece


class StopStringFilter:
    """Cuts the generated text before the first stop string and never releases text past it."""

    def __init__(self, stop_strings: Sequence[str]):
        if isinstance(stop_strings, str):
            raise InputError("stop_strings must be a list of strings, not one string")
        stops = tuple(stop_strings)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InputError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self.text = ""          # all text accepted so far (cut at the stop string once one is found)
        self._released = 0      # characters of self.text already released
        self.matched = None     # the stop string that ended the text, if any

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, piece: str) -> str:
        """Add newly decoded text; return the part of it that is now safe to stream."""
        if self.stopped or not piece:
            return ""
        # a new match must end inside `piece`, so it starts at most longest-1 chars earlier
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hit, matched = -1, None
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (hit < 0 or i < hit):
                hit, matched = i, s
        if matched is not None:
            self.text, self.matched = self.text[:hit], matched
            return self._release_to(hit)
        return self._release_to(len(self.text) - self._partial_tail())

    def flush(self) -> str:
        """End of generation without a stop string: the held-back tail was not one, release it."""
        return self._release_to(len(self.text))

    def _partial_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        text = self.text
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release_to(self, end: int) -> str:
        piece = self.text[self._released:end]
        self._released = max(self._released, end)
        return piece

"""The decode loop: prefill the prompt in one step, then sample and step one token at a time.

Model interface it needs (any model or engine adapter that has these works):
    state = model.new_state()
    logits = model.step(state, ids)   # np.ndarray (len(ids), vocab) float32; appends ids to state
    model.max_context                 # int, tokens the state can hold
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral
from typing import Generator, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from edgerun.errors import EdgerunError, InputError
from edgerun.generate.sampling import Sampler, SamplingParams
from edgerun.generate.stream import Detokenizer, StopStringFilter


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0   # tokens in token_ids (a stop id that ended generation is not counted)
    prefill_s: float = 0.0      # the one prefill step call
    decode_s: float = 0.0       # everything after prefill (steps, sampling, detokenizing), not time spent by the consumer

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    text: str                   # generated text only, cut before a stop string ("" without a tokenizer)
    token_ids: list[int]        # every sampled token except a stop id (tokens spelling a stop string stay)
    finish_reason: str          # "stop" (stop id or stop string) | "length" (max_new_tokens or context full)
    stats: GenerationStats
    stopped_by: Union[int, str, None] = None  # the stop id or stop string that ended it, if any


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token and the text it made final (often "", e.g. half a character or a held-back
    possible stop string). A last event with token_id None carries text released at the end."""

    token_id: Optional[int]
    text: str


class Generation:
    """A running generation. Iterate it for text pieces (str), or `events()` for TokenEvents.

    Live while running: `.token_ids`, `.text` (streamed so far). After it is exhausted: `.result`,
    `.finish_reason`, `.stats`. `finish()` runs it to the end and returns the GenerationResult.
    """

    def __init__(self, events: Generator[TokenEvent, None, GenerationResult], token_ids: list[int], pieces: list[str]):
        self._events = events
        self._token_ids = token_ids     # appended to by the loop as tokens are sampled
        self._pieces = pieces           # appended to by the loop as text is released
        self.result: Optional[GenerationResult] = None

    def events(self) -> Iterator[TokenEvent]:
        # next() rather than `yield from`: abandoning this iterator (a `break`) must not close the
        # generation, so it can be resumed or finished later
        while True:
            try:
                event = next(self._events)
            except StopIteration as end:
                if end.value is not None:
                    self.result = end.value
                return
            yield event

    def __iter__(self) -> Iterator[str]:
        for event in self.events():
            if event.text:
                yield event.text

    def finish(self) -> GenerationResult:
        for _ in self.events():
            pass
        if self.result is None:
            raise EdgerunError("generation was closed before it finished")
        return self.result

    def close(self) -> None:
        """Stop early (a client went away); the model state is dropped."""
        self._events.close()

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def token_ids(self) -> list[int]:
        return list(self._token_ids)

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else "".join(self._pieces)

    @property
    def finish_reason(self) -> Optional[str]:
        return self.result.finish_reason if self.result is not None else None

    @property
    def stats(self) -> Optional[GenerationStats]:
        return self.result.stats if self.result is not None else None


def generate(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: Optional[int] = 256,
    sampling: Union[SamplingParams, Sampler, None] = None,
    stop_ids: Iterable[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
) -> Generation:
    """Generate from token ids. Arguments are checked now; the model runs as the result is iterated.

    max_new_tokens None means until a stop or the context is full. `sampling` defaults to greedy;
    a Sampler may be passed to continue its random stream. Stop strings need a tokenizer.
    """
    prompt = _check_prompt(prompt_ids, model.max_context)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral)
                                       or max_new_tokens < 0):
        raise InputError(f"max_new_tokens must be an integer >= 0 or None, got {max_new_tokens!r}")
    sampler = sampling if isinstance(sampling, Sampler) else Sampler(sampling)
    if isinstance(stop_ids, Integral):
        stop_ids = (stop_ids,)
    stops = frozenset(int(t) for t in stop_ids)
    stop_filter = StopStringFilter(stop_strings)
    if stop_filter.stops and tokenizer is None:
        raise InputError("stop_strings need a tokenizer")
    token_ids: list[int] = []
    pieces: list[str] = []
    events = _decode(model, prompt, max_new_tokens, sampler, stops, stop_filter,
                     Detokenizer(tokenizer) if tokenizer is not None else None, token_ids, pieces)
    return Generation(events, token_ids, pieces)


def generate_text(model, prompt_ids: Sequence[int], **kwargs) -> GenerationResult:
    """`generate` run to the end; same keyword arguments."""
    return generate(model, prompt_ids, **kwargs).finish()


def _check_prompt(prompt_ids: Sequence[int], max_context: int) -> list[int]:
    if isinstance(prompt_ids, (str, bytes)):
        raise InputError("prompt_ids must be token ids; encode the text with the tokenizer first")
    ids = np.asarray(prompt_ids)
    if ids.size == 0:
        raise InputError("empty prompt")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"prompt_ids must be a flat sequence of integer token ids, got {ids.dtype} of shape {ids.shape}")
    if ids.min() < 0:
        raise InputError(f"prompt has a negative token id ({int(ids.min())})")
    if ids.size > max_context:
        raise InputError(f"prompt has {ids.size} tokens, more than the model's context of {max_context}")
    return ids.tolist()


def _decode(model, prompt: list[int], max_new_tokens: Optional[int], sampler: Sampler, stop_ids: frozenset,
            stop_filter: StopStringFilter, detok: Optional[Detokenizer],
            token_ids: list[int], pieces: list[str]) -> Generator[TokenEvent, None, GenerationResult]:
    stats = GenerationStats(prompt_tokens=len(prompt))
    # the room left in the context caps output so that prompt + output always fits in the state
    budget = model.max_context - len(prompt)
    if max_new_tokens is not None:
        budget = min(budget, max_new_tokens)

    def result(reason: str, stopped_by=None) -> GenerationResult:
        stats.generated_tokens = len(token_ids)
        return GenerationResult("".join(pieces), list(token_ids), reason, stats, stopped_by)

    if budget <= 0:
        return result("length")

    clock = time.perf_counter
    t = clock()
    state = model.new_state()
    logits = _last_row(model.step(state, prompt), len(prompt))  # prefill: the whole prompt, one call
    stats.prefill_s = clock() - t
    t = clock()
    history = list(prompt)  # what the repetition penalty sees
    # a model that can sample where its logits are (the GPU runner) returns the next id instead
    step_sample = getattr(model, "step_sample", None)
    next_token = None

    while True:
        token = next_token if logits is None else sampler.sample(logits, history)
        if token in stop_ids:
            # the stop id is not output, but text held back for a possible stop string is
            text = stop_filter.feed(detok.flush()) + stop_filter.flush() if detok else ""
            stats.decode_s += clock() - t
            if text:
                pieces.append(text)
                yield TokenEvent(None, text)
            return result("stop", token)
        token_ids.append(token)
        history.append(token)
        text = stop_filter.feed(detok.step(token)) if detok else ""
        ended = stop_filter.stopped or len(token_ids) >= budget
        if ended and not stop_filter.stopped and detok:  # out of room: release what is held back
            text += stop_filter.feed(detok.flush())
            text += stop_filter.flush()
        stats.decode_s += clock() - t
        if text:
            pieces.append(text)
        yield TokenEvent(token, text)
        if ended:
            if stop_filter.stopped:
                return result("stop", stop_filter.matched)
            return result("length")
        t = clock()
        next_token = step_sample(state, [token], sampler) if step_sample is not None else None
        logits = _last_row(model.step(state, [token]), 1) if next_token is None else None


def _last_row(logits: np.ndarray, n_ids: int) -> np.ndarray:
    logits = np.asarray(logits)
    # a model may return only the last position's row (it skips the head for the rest)
    if logits.ndim != 2 or logits.shape[0] not in (n_ids, 1):
        raise EdgerunError(f"model.step returned logits of shape {logits.shape}, expected ({n_ids}, vocab)")
    return logits[-1]  # (vocab,)

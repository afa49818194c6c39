"""Token sampling: logits in, one token id out. Kept apart from the model (DESIGN.md).

Order of operations (Hugging Face's order of logits processors):
repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 is greedy: argmax after the repetition penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Optional, Sequence

import numpy as np

from edgerun.errors import InputError

# top-p first looks at this many of the most likely tokens, and only widens (x4) when they
# don't reach p: nucleus sets are small, so a full sort of a 150k vocab is rarely needed.
_TOP_P_FIRST_LOOK = 64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults are greedy decoding. Validated on construction."""

    temperature: float = 0.0        # 0 = greedy; otherwise logits / temperature
    top_k: int = 0                  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0              # nucleus: smallest set whose probability reaches p; 1 = off
    min_p: float = 0.0              # drop tokens with prob < min_p * max prob; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen (prompt + output)
    seed: Optional[int] = None      # None = fresh entropy each Sampler

    def __post_init__(self) -> None:
        _check_real("temperature", self.temperature, lambda x: x >= 0.0, ">= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        _check_real("top_p", self.top_p, lambda x: 0.0 < x <= 1.0, "in (0, 1]")
        _check_real("min_p", self.min_p, lambda x: 0.0 <= x <= 1.0, "in [0, 1]")
        _check_real("repetition_penalty", self.repetition_penalty, lambda x: x > 0.0, "> 0")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise InputError(f"seed must be None or an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _check_real(name: str, value, ok: Callable[[float], bool], rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
        raise InputError(f"{name} must be a number {rule}, got {value!r}")


class Sampler:
    """Draws token ids under SamplingParams with its own np.random.Generator(seed).

    One Sampler per sequence: the same seed and the same logits give the same tokens.
    """

    def __init__(self, params: Optional[SamplingParams] = None):
        self.params = params if params is not None else SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """logits: (vocab,) float for the next position; history: token ids so far (prompt + output)."""
        logits = _as_vocab_vector(logits)
        p = self.params
        if p.repetition_penalty != 1.0 and len(history) > 0:
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.greedy:
            best = int(np.argmax(logits))
            if np.isnan(logits[best]):  # argmax lands on the first NaN if there is one
                raise InputError("logits contain NaN")
            return best
        ids, probs = candidate_probs(logits, p)
        # inverse-CDF draw: one uniform per token, so a seed's stream does not depend on the vocab
        cdf = np.cumsum(probs)
        j = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(j, ids.size - 1)])


def _as_vocab_vector(logits) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise InputError(f"logits must be a non-empty 1-D array (vocab,), got shape {logits.shape}")
    return logits


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """HF / llama.cpp (CTRL paper) penalty over the set of seen tokens: positive logits are divided
    by `penalty`, negative ones multiplied. Returns a new array; `logits` is left alone."""
    seen = np.unique(np.asarray(history, dtype=np.int64))
    if seen.size and (seen[0] < 0 or seen[-1] >= logits.size):
        bad = int(seen[0] if seen[0] < 0 else seen[-1])
        raise InputError(f"token id {bad} in the history is outside the vocabulary of {logits.size}")
    out = logits.copy()
    v = out[seen]
    out[seen] = np.where(v > 0, v / penalty, v * penalty)
    return out


def candidate_probs(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution a non-greedy Sampler draws from, after temperature, top-k, top-p, min-p.

    Returns (ids, probs): int64 token ids (at least one) and float64 probabilities summing to 1.
    Repetition penalty is not applied here (it needs the history); apply it first.
    """
    logits = _as_vocab_vector(logits)
    if params.temperature <= 0.0:
        raise InputError("candidate_probs needs temperature > 0 (temperature 0 is greedy argmax)")
    vocab = logits.size
    k = params.top_k
    if 0 < k < vocab:
        # top-k on raw logits equals top-k after temperature (a monotone map); no full sort
        ids = np.sort(np.argpartition(logits, vocab - k)[vocab - k:])  # ascending ids: ties resolve low-first
        scaled = logits[ids].astype(np.float64)
    else:
        ids = np.arange(vocab)
        scaled = logits.astype(np.float64)
    top = scaled.max()
    if not np.isfinite(top):
        raise InputError(f"logits have no finite maximum ({top}); the model produced NaN or inf")
    # softmax in float64: a small temperature would overflow float32
    scaled -= top
    scaled /= params.temperature
    probs = np.exp(scaled, out=scaled)
    probs /= probs.sum()

    if params.top_p < 1.0:
        keep = _nucleus(probs, params.top_p)
        ids, probs = ids[keep], probs[keep]
    if params.min_p > 0.0:
        keep = probs >= params.min_p * probs.max()  # the max always survives
        ids, probs = ids[keep], probs[keep]
    return ids, probs / probs.sum()


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Positions of the smallest set of most likely tokens whose total reaches top_p (at least one)."""
    n = probs.size
    m = min(_TOP_P_FIRST_LOOK, n)
    while True:
        head = np.arange(n) if m == n else np.sort(np.argpartition(probs, n - m)[n - m:])
        head = head[np.argsort(-probs[head], kind="stable")]  # most likely first
        cum = np.cumsum(probs[head])
        if cum[-1] >= top_p or m == n:
            count = min(int(np.searchsorted(cum, top_p, side="left")) + 1, m)
            return head[:count]
        m = min(4 * m, n)

"""Perplexity over non-overlapping windows."""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of -log p(ids[i+1] | ids[:i+1]) over a window, and how many tokens it scored."""
    lg = logits[:-1].astype(np.float64)                      # (n-1, vocab)
    m = lg.max(axis=1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(lg - m).sum(axis=1)))
    tgt = lg[np.arange(len(ids) - 1), ids[1:]]
    return float((logz - tgt).sum()), len(ids) - 1


def perplexity(model, text: str, ctx: int = 512, max_windows: int | None = None,
               progress: bool = False) -> dict:
    """exp(mean NLL) of the text's tokens, in windows of ctx tokens each scored from an empty state.
    The first token of each window is given, not predicted; a short last window is scored too."""
    ids = np.asarray(model.tokenizer.encode(text, add_bos=False), dtype=np.int64)
    if ctx < 2:
        raise InputError(f"--ctx must be at least 2, got {ctx}")
    ctx = min(ctx, model.max_context)
    if ids.size < 2:
        raise InputError("the text has fewer than 2 tokens")
    starts = list(range(0, ids.size - 1, ctx))[:max_windows]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(starts), desc="perplexity", unit="window", leave=False)
    total, count = 0.0, 0
    for s in starts:
        w = ids[s:s + ctx]
        if w.size < 2:
            break
        nll, n = window_nll(model.forward(w), w)
        total, count = total + nll, count + n
        if bar:
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    if bar:
        bar.close()
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count,
            "windows": len(starts), "ctx": ctx}

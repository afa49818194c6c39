"""Plain NumPy reference attention, the twin of paged_attention's kernel."""
import numpy as np


def attention_ref(q, k, v, start, scale, window=0, softcap=0.0):
    """Causal attention. q (T, H, d) at positions start..; k, v (L, Hk, d) holding positions
    0..L-1, L = start + T; GQA by repeating kv heads; window w > 0: keys (p - w, p]."""
    T, H, d = q.shape
    L, Hk, _ = k.shape
    kk = np.repeat(k.astype(np.float64), H // Hk, axis=1)        # (L, H, d)
    vv = np.repeat(v.astype(np.float64), H // Hk, axis=1)
    s = np.einsum("thd,lhd->htl", q.astype(np.float64), kk) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    pos_q = start + np.arange(T)[:, None]
    pos_k = np.arange(L)[None, :]
    mask = pos_k <= pos_q
    if window > 0:
        mask &= pos_k > pos_q - window
    s = np.where(mask[None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("htl,lhd->thd", s, vv).astype(np.float32)

"""Rotary embedding frequencies for the rope_scaling variants HF configs name."""
from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedArchitectureError

ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq(head_dim: int, theta: float, scaling: dict | None, partial: float = 1.0):
    """-> (inv_freq float32 (rot/2,), attention scale). Computed in float64, rounded once."""
    rot = int(head_dim * partial)
    f = 1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind == "default":
        pass
    elif kind == "linear":
        f = f / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / f
        scaled = np.where(wavelen > old / lo, f / factor, f)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        f = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    else:
        raise UnsupportedArchitectureError(
            f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return f.astype(np.float32), 1.0

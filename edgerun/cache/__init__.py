"""Model state: a paged KV cache for attention models, fixed-size recurrent states for SSM/RNN models."""
from .paged import KVCacheFullError, PagedKV, PagedState
from .recurrent import RecurrentState, load_state

__all__ = ["PagedKV", "PagedState", "KVCacheFullError", "RecurrentState", "load_state"]

"""Model state: KV caches for attention models, fixed-size recurrent states for SSM/RNN models."""
from .kv import KVState
from .recurrent import RecurrentState, load_state

__all__ = ["KVState", "RecurrentState", "load_state"]

"""Model state: KV caches for attention models (recurrent states join later)."""
from .kv import KVState

__all__ = ["KVState"]

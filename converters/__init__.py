"""Checkpoint readers and quantizers: Hugging Face directories and GGUF files -> .edr."""
from .convert import QUANT_KINDS, convert, convert_in_memory

__all__ = ["convert", "convert_in_memory", "QUANT_KINDS"]

"""HF architecture names -> edgerun model families."""
from __future__ import annotations

import importlib

from ..errors import UnsupportedArchitectureError

# HF `architectures[0]` -> module in edgerun.models
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
}
# HF / GGUF model_type aliases -> module
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama"}


def family(arch: str):
    """The model module for an HF architecture name; a clear error listing what is supported."""
    mod = ARCHITECTURES.get(arch) or MODEL_TYPES.get(arch)
    if mod is None:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return importlib.import_module(f"edgerun.models.{mod}")

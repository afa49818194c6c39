"""Sampling, the decode loop and streaming. Separate from the models: it needs only
`model.new_state()`, `model.step(state, ids)` and `model.max_context`."""

from edgerun.generate.loop import (
    Generation,
    GenerationResult,
    GenerationStats,
    TokenEvent,
    generate,
    generate_text,
)
from edgerun.generate.sampling import Sampler, SamplingParams, apply_repetition_penalty, candidate_probs

__all__ = [
    "SamplingParams",
    "Sampler",
    "generate",
    "generate_text",
    "GenerationResult",
    "GenerationStats",
    "Generation",
    "TokenEvent",
    "apply_repetition_penalty",
    "candidate_probs",
]

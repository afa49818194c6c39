"""The Python API: ``edgerun.load`` and the loaded model's forward / step / generate."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import format as edr
from .backend import get_backend
from .errors import InputError, ModelFileError
from .models.registry import family
from .packed import DenseWeight
from .tokenizer import Tokenizer


def resolve(model: str | os.PathLike) -> Path:
    """A model argument -> a path: a file, an HF directory, or a registry name (pulled on first use)."""
    p = Path(model)
    if p.exists():
        return p
    from .registry import MODELS, pull
    if str(model) in MODELS:
        return pull(str(model))
    raise ModelFileError(f"{model}: no such file or directory, and not a known model name "
                         f"(known: {', '.join(MODELS)})")


def open_any(model, quant: str | None = None, verify: bool = False) -> edr.ModelFile:
    """Open a .edr, or convert an HF directory / .gguf / RWKV .pth / rwkv.cpp .bin file in memory."""
    p = resolve(model)
    if p.is_dir() or p.suffix.lower() in (".gguf", ".pth", ".pt") or _is_rwkv_cpp(p):
        from edgerun.converters import convert_in_memory
        return convert_in_memory(p, quant=quant)
    return edr.open_model(p, verify=verify)


def _is_rwkv_cpp(p: Path) -> bool:
    from edgerun.converters.rwkv import source_kind
    return p.suffix.lower() == ".bin" and source_kind(p) == "rwkv_cpp"


def _weights(mf: edr.ModelFile) -> dict:
    """name -> packed container; float32 tensors that are not matrices (norms, biases, convs) as arrays."""
    out = {}
    for name in mf.descriptors:
        c = mf.tensor(name)
        out[name] = c.w if isinstance(c, DenseWeight) and c.dtype == "f32" and c.w.ndim != 2 else c
    return out


class LLM:
    """A loaded model: tokenizer, weights (memory-mapped) and the architecture's forward."""

    def __init__(self, mf: edr.ModelFile, device: str = "cpu", kv_options: dict | None = None,
                 act_quant: bool = True):
        self.file = mf
        self.config = mf.config
        self.device = device
        self.ops = get_backend(device, act_quant)
        fam = family(mf.arch)
        self.args = fam.ModelArgs.from_dict(fam.Model.sanitize(mf.config))
        self.model = fam.Model(self.args, _weights(mf), self.ops)
        if kv_options and hasattr(self.model, "kv_options"):
            self.model.kv_options.update(kv_options)
        if device == "cuda":                    # weights, KV blocks and activations move to the GPU
            self.model = self.ops.prepare(self.model)
        self.tokenizer = Tokenizer.from_dict(mf.tokenizer)

    # -- contract of DESIGN.md
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def new_state(self):
        """An empty state: a KV cache for attention models, a fixed-size recurrent state otherwise."""
        st = self.model.new_state()
        if hasattr(st, "model_hash"):
            st.model_hash = self.file.content_hash
        return st

    def fork(self, state):
        """An independent copy of a state; both continue exactly as the original would."""
        return state.fork()

    def _ids(self, ids, state) -> np.ndarray:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        if a.size == 0:
            raise InputError("empty input: no token ids")
        bad = a[(a < 0) | (a >= self.vocab_size)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is out of range (vocab size {self.vocab_size})")
        if state.length + a.size > self.max_context:
            raise InputError(f"{state.length + a.size} tokens exceed the context of {self.max_context}")
        return a

    def step(self, state, ids, last_only: bool = False) -> np.ndarray:
        """Append ids to state; logits for them, (T, vocab) float32 ((1, vocab) if last_only)."""
        return self.model(self._ids(ids, state), state, last_only=last_only)

    def forward(self, ids) -> np.ndarray:
        """Logits (T, vocab) for ids from an empty state."""
        return self.step(self.new_state(), ids)

    def generate(self, prompt, max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, stream: bool = False, chat: bool = False):
        """Text (or, with stream=True, an iterator of text pieces) continuing ``prompt``.

        prompt: a string, a list of token ids, or (chat=True / a list of message dicts)
        a conversation rendered with the model's chat template.
        """
        from .generate import SamplingParams, generate
        ids = self.prompt_ids(prompt, chat)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        gen = generate(_LastLogits(self), ids, max_new_tokens=max_new_tokens, sampling=params,
                       stop_ids=set(self.tokenizer.eos_ids), stop_strings=list(stop or []),
                       tokenizer=self.tokenizer)
        if stream:
            return iter(gen)
        return gen.finish().text

    def prompt_ids(self, prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            prompt, chat = self.tokenizer.apply_chat_template(list(prompt)), None
        elif chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("empty prompt")
            # a rendered chat template already carries its BOS
            return self.tokenizer.encode(prompt, add_bos=False if chat is None else None)
        return [int(i) for i in prompt]


class _LastLogits:
    """The decode loop's view of a model: logits of the last position only (saves the head on prefill)."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.max_context = llm.max_context

    def new_state(self):
        return self.llm.new_state()

    def step(self, state, ids):
        return self.llm.step(state, ids, last_only=True)

    def step_sample(self, state, ids, sampler):
        """The next token sampled on the device (GPU runner), or None: then call step."""
        fn = getattr(self.llm.model, "step_sample", None)
        return None if fn is None else fn(self.llm._ids(ids, state), state, sampler)


def load(model, device: str = "cpu", *, quant: str | None = None, threads: int | None = None,
         verify: bool = False, max_kv_bytes: int | None = None, kv_block_size: int | None = None,
         free_out_of_window: bool | None = None, kv_dtype: str | None = None, act_quant: bool = True) -> LLM:
    """Load a .edr file, an HF directory, a .gguf file or a registry name (pulled on first use).

    max_kv_bytes: the KV pool's size (default: one sequence of the full context);
    kv_block_size: tokens per KV block (default 16); free_out_of_window=False keeps the blocks
    that sliding-window layers have moved past (only to measure what freeing them saves);
    kv_dtype="int8" stores keys and values as int8 with a scale per token and head (about 3.8x
    less KV memory for head_dim 64); act_quant=False keeps decode activations in float32 against
    int8/int4 weights instead of quantizing them to int8 per block of 32 as llama.cpp does (about
    3x slower int4 decode; logits then equal a float reference to float tolerance)."""
    if threads:
        import numba
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    kv = {k: v for k, v in (("max_kv_bytes", max_kv_bytes), ("block_size", kv_block_size),
                            ("free_out_of_window", free_out_of_window), ("dtype", kv_dtype)) if v is not None}
    return LLM(open_any(model, quant=quant, verify=verify), device=device, kv_options=kv, act_quant=act_quant)

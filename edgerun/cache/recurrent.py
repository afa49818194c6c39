"""Fixed-size recurrent state for Mamba, RWKV and xLSTM sequences.

A state is a set of named float32 arrays, each (n_layers, *shape), allocated once when the
sequence starts and updated in place by the model's kernels: decoding never allocates or
keeps history, so memory is constant however long the sequence runs.

Around it: ``fork`` (an independent copy), ``save`` / ``load_state`` (a safetensors file
that records the model's content hash and refuses another model), and checkpoints for
rolling back: with ``keep_checkpoints(k)`` the state snapshots itself after each model step
(the last k kept, in a preallocated ring), and ``rollback(n)`` returns to the snapshot taken
n tokens ago.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, ModelFileError


class RecurrentState:
    def __init__(self, spec: dict[str, tuple], n_layers: int, model_hash: str = ""):
        """spec: name -> per-layer shape, e.g. {"conv": (d_inner, k - 1), "ssm": (d_inner, d_state)}."""
        self.spec = {k: tuple(v) for k, v in spec.items()}
        self.n_layers = n_layers
        self.model_hash = model_hash
        self.length = 0
        self.arrays = {k: self._zeros((n_layers, *v)) for k, v in self.spec.items()}
        self._ring: list[dict[str, np.ndarray]] = []
        self._ring_pos: list[int] = []           # the length each ring slot was taken at, -1 if empty
        self._next = 0

    # ---- where the arrays live: host memory here; a device state overrides these four
    def _zeros(self, shape):
        return np.zeros(shape, np.float32)

    def _blank(self) -> "RecurrentState":
        """A zeroed state of the same kind and shapes."""
        return RecurrentState(self.spec, self.n_layers, self.model_hash)

    @staticmethod
    def _copy(dst, src) -> None:
        dst[...] = src

    @staticmethod
    def _fill0(a) -> None:
        a.fill(0)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def reset(self) -> None:
        for a in self.arrays.values():
            self._fill0(a)
        self.length = 0
        self._ring_pos = [-1] * len(self._ring)

    # ---- fork, save, restore
    def fork(self) -> "RecurrentState":
        other = self._blank()
        other.length = self.length
        for k, a in self.arrays.items():
            self._copy(other.arrays[k], a)
        return other

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a safetensors file (atomically), with the model hash and length."""
        from safetensors.numpy import save_file
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"edgerun_state": "1", "model_hash": self.model_hash, "length": str(self.length),
                "n_layers": str(self.n_layers), "spec": json.dumps(self.spec)}
        try:
            save_file({k: np.ascontiguousarray(a) for k, a in self.arrays.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def restore(self, path: str | os.PathLike) -> None:
        """Load a saved state into this one; refused if it was saved by another model."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such state file")
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                if meta.get("edgerun_state") != "1":
                    raise ModelFileError(f"{path}: not an edgerun state file")
                if meta.get("model_hash") != self.model_hash:
                    raise ModelFileError(f"{path}: this state belongs to another model "
                                         f"(its hash {meta.get('model_hash', '?')[:19]}…, this model's "
                                         f"{self.model_hash[:19]}…)")
                for k, a in self.arrays.items():
                    t = f.get_tensor(k)
                    if t.shape != a.shape:
                        raise ModelFileError(f"{path}: state {k} has shape {t.shape}, the model needs {a.shape}")
                    a[...] = t
                self.length = int(meta["length"])
        except ModelFileError:
            raise
        except Exception as e:           # a damaged file: safetensors raises its own error types
            raise ModelFileError(f"{path}: cannot read state ({type(e).__name__}: {e})") from None
        self._ring_pos = [-1] * len(self._ring)

    # ---- checkpoints and rollback
    def keep_checkpoints(self, k: int) -> None:
        """Snapshot after every model step, keeping the last k (memory: k copies of the state)."""
        self._ring = [{n: self._zeros(a.shape) for n, a in self.arrays.items()} for _ in range(k)]
        self._ring_pos = [-1] * k
        self._next = 0
        if k:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Snapshot the state at the current length (called by models after each step)."""
        if not self._ring:
            return
        slot = self._ring[self._next]
        for n, a in self.arrays.items():
            self._copy(slot[n], a)
        self._ring_pos[self._next] = self.length
        self._next = (self._next + 1) % len(self._ring)

    @property
    def checkpoints(self) -> list[int]:
        return sorted(p for p in self._ring_pos if p >= 0)

    def rollback(self, n: int) -> None:
        """Return to the state n tokens ago; that position must have a checkpoint."""
        target = self.length - n
        if n < 0 or target < 0 or target not in self._ring_pos:
            raise InputError(f"cannot roll back {n} tokens from position {self.length}: "
                             f"checkpoints are at {self.checkpoints or 'none (call keep_checkpoints(k))'}")
        slot = self._ring[self._ring_pos.index(target)]
        for name, a in self.arrays.items():
            self._copy(a, slot[name])
        self.length = target
        # snapshots taken after the target describe a future that no longer exists
        self._ring_pos = [p if p <= target else -1 for p in self._ring_pos]


def run_in_chunks(run, ids: np.ndarray, state: RecurrentState, last_only: bool, chunk: int) -> np.ndarray:
    """A recurrent model's step: ids through run(ids, state, last_only) in pieces of at most chunk
    tokens (exact for a recurrence; activations stay (chunk, width)), then one state checkpoint.
    -> logits (T, vocab), or the last token's (1, vocab) if last_only."""
    if ids.shape[0] > chunk:
        outs = [run(ids[i:i + chunk], state, last_only) for i in range(0, ids.shape[0], chunk)]
        out = outs[-1] if last_only else np.concatenate(outs)
    else:
        out = run(ids, state, last_only)
    state.checkpoint()
    return out


def load_state(path: str | os.PathLike, model) -> RecurrentState:
    """A new state of ``model`` restored from ``path`` (edgerun.load_state)."""
    st = model.new_state()
    st.restore(path)
    return st

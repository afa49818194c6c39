"""NX-AI xLSTMLMModel checkpoints (the `xlstm` package's mixed mLSTM/sLSTM stacks) -> model file.

A source is a directory holding the model's config and its state dict:

    config.yaml | config.yml | config.json   xLSTMLMModelConfig (its fields at the top level, or
                                             under ``model:`` as NX-AI's experiment files write it)
    model.safetensors | *.pt | *.pth         the state dict (.pt read by converters/pth.py's
                                             restricted reader: tensors only, no code is unpickled)

Sizes are read from the weights' shapes; the config supplies the block map (slstm_at), the
feed-forward activation and the flags. The sLSTM cell stores its recurrent kernel and bias in
a layout that depends on the backend it was built with: ``vanilla`` keeps R (heads, 4*d, d) and
the bias gate-major (4, heads, d); ``cuda`` keeps R (heads, d, 4*d) and the bias head-major
(heads, 4, d) -- same bias shape, so a wrong guess would load silently. The layout is read from
R's shape (never from the config's ``backend``, which the checkpoint may not match), the bias is
reordered with it, and both are written canonical:

    ...slstm_cell.R   (heads, 4, d_out, d_in)   gates i, f, z, o
    ...slstm_cell.b   (4 * heads * d,)          gate-major
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from edgerun import format as edr
from edgerun.errors import ConversionError, ModelFileError

from .quant import pack

ARCH = "xLSTMLMModel"
CONFIG_NAMES = ("config.yaml", "config.yml", "config.json")
PREFIX = "xlstm_block_stack.blocks."


def source_kind(src: Path) -> str | None:
    """'xlstm_lm' for a directory holding an xLSTMLMModelConfig, else None."""
    if not src.is_dir():
        return None
    for name in CONFIG_NAMES:
        if (src / name).is_file():
            try:
                cfg = _read_config_file(src / name)
            except ConversionError:
                return None
            return "xlstm_lm" if _is_lm_config(cfg) else None
    return None


def _is_lm_config(cfg) -> bool:
    return isinstance(cfg, dict) and "architectures" not in cfg and (
        "mlstm_block" in cfg or "slstm_block" in cfg) and "num_blocks" in cfg


def _read_config_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".json":
        try:
            cfg = json.loads(text)
        except ValueError as e:
            raise ConversionError(f"{path}: not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConversionError(f"{path}: reading a YAML config needs PyYAML (pip install pyyaml), "
                                  f"or save the config as config.json") from None
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConversionError(f"{path}: not valid YAML ({e})") from None
    if isinstance(cfg, dict) and "model" in cfg and isinstance(cfg["model"], dict) and not _is_lm_config(cfg):
        cfg = cfg["model"]
    return cfg


def read_config(src: Path) -> dict:
    for name in CONFIG_NAMES:
        if (src / name).is_file():
            cfg = _read_config_file(src / name)
            if not _is_lm_config(cfg):
                raise ConversionError(f"{src / name}: not an xLSTMLMModelConfig (no mlstm_block/slstm_block "
                                      f"and num_blocks)")
            return cfg
    raise ConversionError(f"{src}: no config.yaml / config.json")


def read_state_dict(src: Path) -> dict:
    """name -> array or PthTensor (anything with .shape, turned to float32 by _f32)."""
    st = src / "model.safetensors"
    if st.is_file():
        from .safetensors_io import SafetensorsFile
        f = SafetensorsFile(st)
        return {k: f.float32(k) for k in f.keys()}
    pts = sorted(p for p in src.iterdir() if p.suffix in (".pt", ".pth"))
    if len(pts) == 1:
        from .pth import load_pth
        return load_pth(pts[0])
    if pts:
        raise ConversionError(f"{src}: several checkpoints ({', '.join(p.name for p in pts)}); keep one")
    raise ConversionError(f"{src}: no model.safetensors or .pt/.pth state dict")


def _f32(a) -> np.ndarray:
    return a.float32() if hasattr(a, "float32") else np.asarray(a, np.float32)


def block_map(cfg: dict) -> list[int]:
    """0 = mLSTM, 1 = sLSTM per block, as xLSTMBlockStackConfig builds it."""
    n = int(cfg["num_blocks"])
    if cfg.get("_block_map"):
        return [int(c) for c in str(cfg["_block_map"]).split(",")]
    at = cfg.get("slstm_at", [])
    if cfg.get("mlstm_block") is None or at == "all":
        at = list(range(n))
    bm = [0] * n
    for i in at:
        if not 0 <= int(i) < n:
            raise ConversionError(f"slstm_at {i} is outside the {n} blocks")
        bm[int(i)] = 1
    return bm


def slstm_layout(name: str, shape: tuple, heads: int, d: int) -> str:
    """'vanilla' or 'cuda' from the shape of an sLSTM _recurrent_kernel_; anything else is refused."""
    if tuple(shape) == (heads, 4 * d, d):
        return "vanilla"
    if tuple(shape) == (heads, d, 4 * d):
        return "cuda"
    raise ConversionError(f"tensor {name}: shape {tuple(shape)} is neither the vanilla ({heads}, {4 * d}, {d}) "
                          f"nor the cuda ({heads}, {d}, {4 * d}) sLSTM recurrent-kernel layout")


def canonical(sd: dict, cfg: dict) -> tuple[dict, dict]:
    """State dict -> (canonical tensors, model config for models/xlstm_lm.py)."""
    bm = block_map(cfg)
    for i in range(len(bm)):
        if f"{PREFIX}{i}.xlstm_norm.weight" not in sd:
            raise ConversionError(f"the state dict has no block {i} ({PREFIX}{i}.xlstm_norm.weight missing)")
    vocab, E = sd["token_embedding.weight"].shape
    out: dict[str, np.ndarray] = {}
    layouts = []
    sl_cfg = (cfg.get("slstm_block") or {})
    ff_cfg = sl_cfg.get("feedforward") or {}
    for name, a in sd.items():
        if name.endswith(("._recurrent_kernel_", "._bias_")) or name == "lm_head.weight" and cfg.get("tie_weights"):
            continue
        out[name] = _f32(a)
    for i, kind in enumerate(bm):
        if kind != 1:
            continue
        p = f"{PREFIX}{i}.xlstm.slstm_cell."
        rname = p + "_recurrent_kernel_"
        if rname not in sd:
            raise ConversionError(f"block {i} is an sLSTM block but {rname} is missing")
        heads = int(sd[rname].shape[0])
        d = E // heads
        layout = slstm_layout(rname, sd[rname].shape, heads, d)
        layouts.append(layout)
        R, b = _f32(sd[rname]), _f32(sd[p + "_bias_"]).reshape(-1)
        if b.size != 4 * E:
            raise ConversionError(f"tensor {p}_bias_: {b.size} values, the sLSTM needs {4 * E}")
        if layout == "vanilla":
            R4, b4 = R.reshape(heads, 4, d, d), b
        else:
            R4 = R.reshape(heads, d, 4, d).transpose(0, 2, 3, 1)
            b4 = b.reshape(heads, 4, d).transpose(1, 0, 2).reshape(-1)
        out[p + "R"] = np.ascontiguousarray(R4)
        out[p + "b"] = np.ascontiguousarray(b4)
    act = ff_cfg.get("act_fn", "gelu")
    model_cfg = {
        "architecture": ARCH, "model_type": "xlstm_lm", "vocab_size": int(vocab), "embedding_dim": int(E),
        "num_blocks": len(bm), "num_hidden_layers": len(bm), "hidden_size": int(E), "block_map": bm, "add_post_blocks_norm": bool(cfg.get("add_post_blocks_norm", True)),
        "tie_weights": bool(cfg.get("tie_weights", False)), "ffn_act_fn": act,
        "mlstm_num_heads": int((cfg.get("mlstm_block") or {}).get("mlstm", {}).get("num_heads", 4)),
        "slstm_layout": layouts[0] if layouts else None,
    }
    return out, model_cfg


def convert_xlstm_lm(src, out, quant: str | None = None, group_size: int = 32, progress=None) -> str:
    """Convert an NX-AI xLSTMLMModel directory into the model file ``out``; returns the content hash."""
    from edgerun.models.xlstm_lm import KEEP_FLOAT

    from .rwkv import tokenizer_for
    src = Path(src)
    if not src.is_dir():
        raise ModelFileError(f"{src}: no such directory")
    cfg = read_config(src)
    tensors, model_cfg = canonical(read_state_dict(src), cfg)
    model_cfg["source_format"] = "xlstm_lm"
    tok = tokenizer_for(src, model_cfg["vocab_size"])
    quant = quant or "f16"

    def packed() -> Iterator:
        for name in sorted(tensors):
            yield name, pack(name, tensors[name], quant, group_size, KEEP_FLOAT)

    return edr.write(out, arch=ARCH, config=model_cfg, tokenizer=tok, tensors=packed(),
                     extra={"quant": quant, "source": src.name}, progress=progress)

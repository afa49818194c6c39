"""Hugging Face directories: config.json + model.safetensors (or a sharded index)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from edgerun.errors import ConversionError, UnsupportedArchitectureError
from edgerun.models.registry import supported

from .safetensors_io import SafetensorsFile


def read_config(src: Path) -> dict:
    cfg_path = src / "config.json"
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if not cfg_path.is_file():
        raise ConversionError(f"{src}: no config.json (is this a Hugging Face model directory?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
    return normalize_config(cfg, cfg_path)


def normalize_config(cfg: dict, where) -> dict:
    """One spelling for transformers 4.x and 5.x configs: rope_theta / rope_scaling, dtype."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in supported():
        raise UnsupportedArchitectureError(
            f"{where}: architecture {arch!r} is not supported (supported: {', '.join(supported())})")
    cfg = dict(cfg)
    rp = cfg.pop("rope_parameters", None)
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        # per layer type (Gemma 3): global rope for full attention, local base for sliding layers
        full, local = rp["full_attention"], rp.get("sliding_attention") or {}
        cfg["rope_theta"] = full.get("rope_theta", cfg.get("rope_theta"))
        if "rope_theta" in local:
            cfg["rope_local_base_freq"] = local["rope_theta"]
        if full.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    elif isinstance(rp, dict):
        if "rope_theta" in rp:
            cfg["rope_theta"] = rp["rope_theta"]
        if "partial_rotary_factor" in rp:
            cfg["partial_rotary_factor"] = rp["partial_rotary_factor"]
        scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = scaling
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default":
        cfg["rope_scaling"] = None
    if "dtype" not in cfg and "torch_dtype" in cfg:
        cfg["dtype"] = cfg.pop("torch_dtype")
    cfg["architecture"] = arch
    return cfg


def open_weights(src: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file that holds it."""
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        f = SafetensorsFile(single)
        return {k: f for k in f.keys()}
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for shard in sorted(set(wmap.values())):
            if not (src / shard).is_file():
                raise ConversionError(f"{src / shard}: shard listed in the index is missing")
            files[shard] = SafetensorsFile(src / shard)
        return {k: files[v] for k, v in wmap.items()}
    pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt*"))
    if pickles:
        raise ConversionError(
            f"{src}: only pickle checkpoints ({', '.join(pickles[:3])}) found; edgerun refuses them because "
            f"unpickling can run arbitrary code. Re-save with safetensors "
            f"(model.save_pretrained(dir, safe_serialization=True))")
    raise ConversionError(f"{src}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(src: Path, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every weight the model uses, in a stable order."""
    files = open_weights(src)
    names = [n for n in files if not n.endswith("rotary_emb.inv_freq")]
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in names:
        names.remove("lm_head.weight")
    for n in sorted(names, key=_order):
        yield n, files[n].float32(n)


def _order(name: str):
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]), name)
    return (0 if "embed" in name else 2, 0, name)

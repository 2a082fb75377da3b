"""dsrun: run large Mixture-of-Experts LLMs from GGUF on one workstation."""

from .errors import (
    ContextLengthError,
    DsrunError,
    InvalidRequestError,
    MemoryBudgetError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "ContextLengthError",
    "DsrunError",
    "InvalidRequestError",
    "MemoryBudgetError",
    "ModelFormatError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "load",
]


def load(model="default", **kwargs):
    """Load a model (GGUF path or short name) and return an Engine; see CONTRACT.md for the keywords."""
    from .engine import load as _load

    return _load(model, **kwargs)

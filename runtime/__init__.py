"""dsrun: run large Mixture-of-Experts LLMs from GGUF on one workstation."""

import os

# torch's OpenMP threads spin after each op by default, and ggml's threads (dense and expert matmuls) then
# fight them for the cores: 2-6x slower decode. Read once, when torch first loads, so set it before.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import (  # noqa: E402
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

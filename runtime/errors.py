"""Error types: each carries a message a user can act on; the CLI prints it without a traceback."""


class DsrunError(Exception):
    """Base of every error dsrun raises on purpose."""


class ModelNotFoundError(DsrunError):
    """The model path or short name does not exist."""


class ModelFormatError(DsrunError):
    """The file is not a readable GGUF (wrong magic, truncated, inconsistent)."""


class UnsupportedModelError(DsrunError):
    """The architecture or a tensor's quant type is one dsrun does not run."""


class InvalidRequestError(DsrunError):
    """A prompt, message list or sampling setting that cannot be served."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus what is asked to generate) does not fit the context."""


class MemoryBudgetError(DsrunError):
    """The memory budgets cannot hold what must be resident."""

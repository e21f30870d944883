"""The refusals and faults a caller or operator sees, in one module that imports nothing heavy.

Transports and tools catch these without importing the engine (torch, moshi); each message is fit
to show the person on the other end.
"""


class AudioFormatError(ValueError):
    """Input audio that cannot be interpreted; the message says why."""


class CatalogueError(ValueError):
    """A malformed catalogue file or an unknown voice/emotion id."""


class SamplingError(ValueError):
    """Sampling settings out of range; the message is fit to show a caller."""


class PromptError(ValueError):
    """A voice or text prompt that cannot be used; the message is fit to show a caller."""


class ConditionError(ValueError):
    """A conditioner value the loaded model was not trained with."""


class SeatsFullError(RuntimeError):
    """Every seat is taken; the message is fit to show a caller."""


class EngineStoppedError(RuntimeError):
    """The seat or engine was closed; the message says why."""


class CallRefused(RuntimeError):
    """A call could not start; the message is fit to show the caller."""


class ResumeFailed(CallRefused):
    """The call a resume token names is gone; a new call may start instead."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do instead."""

"""User-facing errors.

Every mistake a user can make (a bad path, config key, tensor shape, CSV
column, sampling value) raises a subclass of `MoekitError` with one sentence
naming what is wrong and what is accepted. The CLI prints that sentence and
exits with status 2 instead of showing a traceback. Programming errors stay
ordinary exceptions.
"""


class MoekitError(Exception):
    """A mistake in the user's input, reported as one clear message."""


class ConfigError(MoekitError, ValueError):
    """An invalid configuration value (also a ValueError, for library callers)."""


class CheckpointError(MoekitError):
    """A checkpoint that is missing, truncated, unsafe or from another config."""


class DataError(MoekitError, ValueError):
    """Input data (text, CSV) that cannot be used."""


class EndpointError(MoekitError):
    """A remote endpoint (an OpenAI-compatible server) that cannot be reached or answers badly."""

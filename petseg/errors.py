"""The project's exception family.

Every message names the bad value (file, field, run) and says what was
expected or how to fix it. The command line prints these as one line; the
serving edge turns them into HTTP 4xx answers.

They derive from Metaflow's exception so that a flow step failing on bad
input prints the message alone, without a Python traceback.
"""

from metaflow.exception import MetaflowException


class PetsegError(MetaflowException):
    """Base class: a problem the user can act on (never a bug in petseg)."""

    headline = "petseg"

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.args = (message,)  # as a plain Exception: pickles and prints the same


class DataError(PetsegError):
    """A source, archive, image or trimap is missing or malformed."""


class ConfigError(PetsegError):
    """A setting, parameter or configuration value is invalid."""


class ModelError(PetsegError):
    """A model or calibration file is missing, unreadable or does not match."""


class RunError(PetsegError):
    """A Metaflow run is unknown, of another flow, or not finished."""


class ServingError(PetsegError):
    """A deployment could not be started, reached or stopped."""


class LineageError(PetsegError):
    """The lineage mirror could not record a stage."""

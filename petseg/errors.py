"""The project's exception family.

Every message names the bad value (file, field, run) and says what was
expected or how to fix it. The command line prints these as one line; the
serving edge turns them into HTTP 4xx answers; the flow's step glue
(`petseg.flow.stages`) hands them to Metaflow as messages without a traceback.
Nothing here depends on Metaflow, so the model server does not import it.
"""


class PetsegError(Exception):
    """Base class: a problem the user can act on (never a bug in petseg)."""

    headline = "petseg"


class DataError(PetsegError):
    """A source, archive, image or trimap is missing or malformed."""


class StorageError(DataError):
    """A file or object could not be read or written where it lives (a directory or S3)."""


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

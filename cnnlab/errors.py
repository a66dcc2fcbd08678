"""Typed errors. Every subclass of CnnlabError is a *user* mistake or an environment
fault: the CLI prints it as one line and exits with code 2, without a traceback.
Anything else escaping the CLI is a bug in cnnlab and keeps its traceback."""


class CnnlabError(Exception):
    """A user-facing error: what was wrong, where, and how to fix it."""


class DataError(CnnlabError):
    """A dataset could not be found, fetched or verified."""


class IdxError(DataError):
    """An IDX file is malformed (bad magic, truncated, trailing bytes, count mismatch...)."""


class SpecError(CnnlabError):
    """A model spec is invalid or cannot work with the input shape."""


class ConfigError(CnnlabError):
    """A configuration or study file is invalid (unknown key, wrong type, bad value)."""


class CheckpointError(CnnlabError):
    """A checkpoint is missing, corrupt, unsafe or from another architecture."""


class ImageError(CnnlabError):
    """An input image cannot be used (not an image, empty, decompression bomb...)."""


class RunError(CnnlabError):
    """A run failed (for example a NaN loss) or its directory cannot be used."""

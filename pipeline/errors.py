"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class PipelineError(Exception):
    """A mistake the user can fix (bad flag, missing path, mismatched cache)."""


class FingerprintMismatch(PipelineError):
    """An existing output was made from different parameters or inputs."""


class StoreLocked(PipelineError):
    """Another process is writing the same output."""


class DamagedStore(PipelineError):
    """An output's bytes are missing or altered (a deleted chunk, a failed checksum)."""

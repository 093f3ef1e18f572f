"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class PipelineError(Exception):
    """A mistake the user can fix (bad flag, missing path, mismatched cache)."""


class FingerprintMismatch(PipelineError):
    """An existing output was made from different parameters or inputs."""


class StoreLocked(PipelineError):
    """Another process is writing the same output."""


class DamagedStore(PipelineError):
    """An output's bytes are missing or altered (a deleted chunk, a failed checksum)."""


def read_error(e: BaseException) -> str:
    """Why a chunk could not be read, in words (not the raw checksum bytes zarr puts in its message)."""
    text = " ".join(str(e).split())
    if "checksum" in text.lower():
        return "a chunk fails its CRC-32C checksum: its bytes were altered"
    return text[:120] or type(e).__name__

"""Typed errors.  Every problem a user can cause maps to one of these, with a message naming it.

They all derive from :class:`Step37Error` (and from ``ValueError`` where the problem is a bad
value) so that callers can catch one type and the CLI can turn them into a one-line message and a
non-zero exit status instead of a traceback from deep inside a library.
"""

from __future__ import annotations


class Step37Error(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ConfigError(Step37Error, ValueError):
    """A config is unreadable, inconsistent, or asks for an unsupported combination."""


class CheckpointError(Step37Error):
    """A checkpoint is missing files, has corrupt shards, or its tensors do not match the config."""


class InputError(Step37Error, ValueError):
    """Bad input tensors or images: wrong rank, channels, dtype or spatial size."""


class ExportError(Step37Error):
    """ONNX export failed or was asked for something unsupported."""


class EngineError(Step37Error):
    """A TensorRT engine could not be built, or does not match this runtime/GPU."""


class BackendUnavailable(Step37Error):
    """A backend's library (TensorRT, a CUDA provider...) is not installed or cannot run here."""


class PlaceholderError(Step37Error, ValueError):
    """Feature insertion: flag/placeholder counts, positions or sizes do not match the features."""


class ThresholdError(Step37Error):
    """An accuracy report missed a threshold."""


class ServerError(Step37Error):
    """The embedding service answered a request with an error (or not at all); carries its message,
    the protocol's status (``StatusCode.UNAVAILABLE``, ``"503"``...) when there was one, and whether
    sending the request again may succeed (an overloaded or unreachable server, never a bad request)."""

    def __init__(self, message: str, status: str | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class OutputError(Step37Error):
    """An output cannot be written: a directory where a file goes, an unwritable folder, a full
    disk, or a path that is one of the command's own inputs or a file this tool did not write."""


class UsageError(Step37Error, ValueError):
    """Command-line arguments that cannot work together (e.g. ``compare`` with nothing to compare)."""


class ServerCrashed(Step37Error):
    """A served process died or stalled (a Python-backend stub killed or frozen, tritonserver
    aborted): ``serve`` took everything down and exits with its own code (4, not 2), for the
    supervisor that restarts it.  Nothing the user can fix in the command line."""

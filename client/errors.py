"""Typed client errors, and the one place that turns gRPC/Triton failures into them.

Callers handle failures by kind (retry later, fix the input, give up), so every error the client
raises or puts on a future is one of these classes, never a bare tritonclient exception.
"""

from __future__ import annotations

from aigis.errors import ClientError  # the root: every error below derives from it


class InvalidInputError(ClientError, ValueError):
    """The input cannot be sent (wrong dtype/shape/size, unreadable image); the message names it."""


class ServerUnavailableError(ClientError, ConnectionError):
    """The server could not be reached, or went away mid-request (until the request's deadline)."""


class DeadlineExceededError(ClientError, TimeoutError):
    """The request did not complete within its deadline."""


class ModelNotReadyError(ClientError):
    """The server is up but the requested model (or version) is not loaded and ready."""


class ModelNotFoundError(ModelNotReadyError):
    """The server has no model of that name (or not that version): a typo or a missing export."""


class ServerError(ClientError):
    """The server answered with an error that is none of the above (a bug or failure server-side)."""


class ClientClosedError(ClientError):
    """The client was closed before this submission could be sent."""


class ManifestError(ClientError):
    """The served model's configuration does not carry a usable aigis manifest."""


# gRPC status names as tritonclient spells them in InferenceServerException.status().
_UNAVAILABLE = "StatusCode.UNAVAILABLE"
_DEADLINE = "StatusCode.DEADLINE_EXCEEDED"
_NOT_FOUND = "StatusCode.NOT_FOUND"
_INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"
_CANCELLED = "StatusCode.CANCELLED"

# Triton reports an unloaded model with several status codes across releases; the text is stable.
_NOT_READY_HINTS = ("unknown model", "is not ready", "is not found", "no version is available",
                    "is not loaded", "not_found")


def is_retryable(error: BaseException) -> bool:
    """An unreachable server, or a model that exists but is not ready yet (a server restarting or loading):
    both pass by themselves. Anything else would fail the same way again."""
    if isinstance(error, ModelNotFoundError):
        return False
    return isinstance(error, (ServerUnavailableError, ModelNotReadyError))


def from_triton(exc: Exception, what: str) -> ClientError:
    """Map a tritonclient InferenceServerException (or a raw grpc.RpcError) to a typed error.

    `what` says which call failed (model name, operation) so that the message is useful on its own.
    """
    status, message = _status_and_message(exc)
    text = f"{what}: {message}" if message else what
    lowered = message.lower()
    if status == _DEADLINE:
        return DeadlineExceededError(text)
    if any(hint in lowered for hint in _NOT_READY_HINTS) or status == _NOT_FOUND:
        return ModelNotReadyError(text)
    if status == _UNAVAILABLE:
        return ServerUnavailableError(text)
    if status == _CANCELLED and ("socket" in lowered or "connection" in lowered):
        return ServerUnavailableError(text)
    if status == _INVALID_ARGUMENT:
        return InvalidInputError(text)
    return ServerError(f"{text} ({status or 'no status'})")


def _status_and_message(exc: Exception) -> tuple[str, str]:
    status = getattr(exc, "status", None)
    if callable(status):  # tritonclient InferenceServerException
        message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
        return str(status() or ""), str(message or "")
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError / grpc.aio.AioRpcError
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        return str(code()), str(details or "")
    return "", str(exc)

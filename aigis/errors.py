"""The roots of the errors aigis raises on purpose: one per layer, all under AigisError.

Callers catch a layer's root to handle everything that layer reports (a bad file, a refused repository, a server
that went away) and let real bugs through; each concrete error keeps the built-in base that fits it (ValueError
for bad input, RuntimeError for a state that refuses the operation), so older `except ValueError` still work.
"""

from __future__ import annotations


class AigisError(Exception):
    """Root of every error aigis raises on purpose."""


class DataError(AigisError, ValueError):
    """Input data that cannot be used: an image, a dataset layout, a weights file."""


class TrainingError(AigisError):
    """A training run that cannot go on: a bad config, a checkpoint that does not fit."""


class ExportError(AigisError, RuntimeError):
    """An export or a repository operation that is refused."""


class ServingError(AigisError, RuntimeError):
    """The embedded server could not start or died, or refused a control request."""


class ProtectionError(AigisError, ValueError):
    """A protection job, its data or its evaluation that cannot go on."""


class ClientError(AigisError):
    """Root of every error the client library raises."""

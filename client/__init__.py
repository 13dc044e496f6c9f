"""gRPC client library: batching, deadlines, retries, failing over between replicas, typed errors.

Thin by design: numpy, PIL (via aigis.preprocess) and tritonclient only -- never torch -- so it can run
next to an upload service. Names of models and tensors come from aigis.contract.
"""

from .aio import AsyncAttributionClient
from .attribution import AttributionClient
from .batcher import AsyncMicroBatcher, BatchStats, MicroBatcher
from .endpoints import EndpointHealth, parse_urls
from .errors import (
    ClientClosedError,
    ClientError,
    DeadlineExceededError,
    InvalidInputError,
    ManifestError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerError,
    ServerUnavailableError,
)
from .manifest import Manifest, ServedModel
from .protection import Protected, ProtectionClient
from .results import Attribution
from .retry import RetryPolicy

__all__ = [
    "AsyncAttributionClient",
    "AsyncMicroBatcher",
    "Attribution",
    "AttributionClient",
    "BatchStats",
    "ClientClosedError",
    "ClientError",
    "DeadlineExceededError",
    "EndpointHealth",
    "InvalidInputError",
    "Manifest",
    "ManifestError",
    "ModelNotFoundError",
    "MicroBatcher",
    "ModelNotReadyError",
    "parse_urls",
    "Protected",
    "ProtectionClient",
    "RetryPolicy",
    "ServedModel",
    "ServerError",
    "ServerUnavailableError",
]

"""The embedded Triton server: launcher and the Python-based onnxruntime backend stand-in.

`TritonServer` (aigis.serving.server) needs only the standard library; `ModelControl` and
`wait_ready` (aigis.serving.control) import tritonclient, so they load on first use; S3 repositories
(aigis.objectstore) import boto3 when opened.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TritonServer", "LaunchError", "ModelControl", "ModelControlError", "ModelStatus", "wait_ready",
           "triton_flags", "ObjectStoreError", "S3Repository", "open_repository", "upload_repository"]

_WHERE = {
    "TritonServer": "aigis.serving.server",
    "LaunchError": "aigis.serving.server",
    "triton_flags": "aigis.serving.server",
    "ObjectStoreError": "aigis.objectstore",
    "S3Repository": "aigis.objectstore",
    "open_repository": "aigis.objectstore",
    "upload_repository": "aigis.objectstore",
    "ModelControl": "aigis.serving.control",
    "ModelControlError": "aigis.serving.control",
    "ModelStatus": "aigis.serving.control",
    "wait_ready": "aigis.serving.control",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'aigis.serving' has no attribute {name!r}")

"""One root per layer, all under AigisError, and each class name used once."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from aigis.errors import AigisError, ClientError, DataError, ExportError, ProtectionError, ServingError, TrainingError

LAYERS = {
    "aigis.preprocess": DataError, "aigis.data.cddb": DataError, "aigis.models.base": DataError,
    "aigis.training.config": TrainingError, "aigis.training.checkpoint": TrainingError,
    "aigis.export.repository": ExportError, "aigis.export.onnx_export": ExportError, "aigis.export.code_pin": ExportError,
    "aigis.serving.server": ServingError, "aigis.serving.control": ServingError, "aigis.client.errors": ClientError,
    "aigis.protection.captions": ProtectionError, "aigis.protection.fashion": ProtectionError,
    "aigis.protection.training_sets": ProtectionError,
}

PACKAGES = ("aigis", "aigis.data", "aigis.models", "aigis.training", "aigis.export", "aigis.serving", "aigis.client",
            "aigis.protection")


def errors_of(module_name: str) -> list[type]:
    module = importlib.import_module(module_name)
    return [cls for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Exception) and cls.__module__ == module_name and not cls.__name__.startswith("_")]


def test_every_layer_s_errors_derive_from_its_root():
    for module_name, root in LAYERS.items():
        found = errors_of(module_name)
        assert found, module_name
        for cls in found:
            assert issubclass(cls, root) and issubclass(cls, AigisError), f"{module_name}.{cls.__name__}"


def test_no_two_error_classes_share_a_name():
    seen: dict[str, str] = {}
    for package in PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
            if info.ispkg or info.name.endswith("__main__"):
                continue
            for cls in errors_of(info.name):
                assert seen.setdefault(cls.__name__, info.name) == info.name, \
                    f"{cls.__name__} in both {seen[cls.__name__]} and {info.name}"
    assert len(seen) > 15

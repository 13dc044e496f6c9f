"""Export: merged extractors and the unified classifier as ONNX, in a versioned Triton model repository.

    from aigis.export import export_run, load_version
    report = export_run("runs/demo/run", "model_repository")      # ensemble version = number of tasks
    load_version(control, "model_repository", report.version)      # serve it, no restart
"""

from __future__ import annotations

__all__ = ["ExportReport", "RepositoryError", "TargetOptions", "export", "export_run", "list_models", "load_version",
           "pointed_version", "retire_steps", "served_version", "validate", "versions"]


def __getattr__(name: str):
    if name == "TargetOptions":
        from aigis.export.configs import TargetOptions

        return TargetOptions
    if name in ("ExportReport", "export", "export_run"):
        from aigis.export import attribution

        return getattr(attribution, "export_run" if name == "export" else name)
    if name in ("load_version", "retire_steps", "served_version"):
        from aigis.export import rollout

        return getattr(rollout, name)
    if name in __all__:
        from aigis.export import repository

        return getattr(repository, name)
    raise AttributeError(f"module 'aigis.export' has no attribute {name!r}")

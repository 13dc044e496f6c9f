"""Serving a version on a running server: load the new version's steps beside the served ones, switch the
ensembles, and unload the old steps once the old version has drained (repository.py says why this order)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from aigis import contract

from .repository import (ENSEMBLES, RepositoryError, _policy_versions, ensemble_dependencies, point_to,
                         pointed_version, rollout_lock, version_config, versions)

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """What one rollout did on one server."""

    loaded: list[str] = field(default_factory=list)     # models (re)loaded, in order
    unloaded: list[str] = field(default_factory=list)   # steps retired once no served version used them
    lingering: list[str] = field(default_factory=list)  # old ensemble versions still answering at the drain timeout


def load_version(control: Any, repo: str | Path, version: int, bytes_ensemble: bool = True, *,
                 prune: bool = False, drain_timeout_s: float = 120.0) -> Rollout:
    """Serve ensemble version `version` on a running server (ModelControl), with no restart and no gap.

    The steps the version pins are loaded first, beside the ones being served (they are models of their own,
    so this disturbs nothing); then the ensembles are pointed at `version` and reloaded (Triton answers with
    the old version until the new one is ready); once the old ensemble versions have drained, the classifier
    and decode steps no served version uses are unloaded, and with `prune` the unused extractors too.
    Models already serving the right version are left alone.
    """
    repo = Path(repo)
    if version not in versions(repo, contract.ENSEMBLE_MODEL):
        raise RepositoryError(f"{repo}: no ensemble version {version}; versions: "
                              f"{versions(repo, contract.ENSEMBLE_MODEL) or 'none'}")
    ensembles = [contract.ENSEMBLE_MODEL] + ([contract.BYTES_ENSEMBLE_MODEL] if bytes_ensemble else [])
    order: list[tuple[str, int]] = []
    for ensemble in ensembles:
        for step in ensemble_dependencies(version_config(repo, ensemble, version)):
            if step not in order:
                order.append(step)
    # The version as one graph (export --fused), when it has one, moves with the ensembles.
    switched = ensembles + ([contract.FUSED_MODEL] if version in versions(repo, contract.FUSED_MODEL) else [])
    order += [(model, version) for model in switched]
    done = Rollout()
    with rollout_lock(repo):
        for model, model_version in order:
            with _pointer_restored_on_failure(repo, model):
                moved = point_to(repo, model, model_version)
                if moved or not control.is_ready(model, str(model_version)):
                    control.load(model)
                    done.loaded.append(model)
        if contract.FUSED_MODEL not in switched and contract.FUSED_MODEL in control.loaded():
            # Another version's fused graph would answer for a version it is not: the version has none, so none.
            log.warning(f"version {version} has no {contract.FUSED_MODEL} (exported without --fused): unloading the "
                        f"one served, {contract.FUSED_MODEL} answers no more until a version with one is rolled out")
            control.unload(contract.FUSED_MODEL)
            done.unloaded.append(contract.FUSED_MODEL)
        done.lingering = _wait_drained(control, {model: version for model in switched}, drain_timeout_s)
        if done.lingering:  # the switch is done; only the old steps' retirement waits for a later rollout
            log.warning(f"old ensemble versions {', '.join(done.lingering)} still loaded {drain_timeout_s:.0f} s after "
                        f"the switch (long requests in flight?); their steps stay loaded")
        else:
            done.unloaded = retire_steps(control, repo, prune=prune)
    return done


def _wait_drained(control: Any, serving: dict[str, int], timeout_s: float) -> list[str]:
    """Wait until each ensemble has no version but `serving[ensemble]` loaded (Triton unloads an old version
    only once its requests are answered); returns the old versions still loaded at the timeout (none: drained)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lingering = [f"{row.name}/{row.version}" for row in control.index()
                     if row.name in serving and row.version != str(serving[row.name])
                     and row.state in ("READY", "UNLOADING", "LOADING")]
        if not lingering or time.monotonic() >= deadline:
            return lingering
        time.sleep(0.05)


def retire_steps(control: Any, repo: str | Path, prune: bool = False) -> list[str]:
    """Unload the per-version steps (classifiers, decode steps) that no served ensemble version pins, and with
    `prune` the unused extractors (e.g. after a rollback). Call only when no old ensemble version is loaded."""
    loaded = control.loaded()
    needed = {model for ensemble in ENSEMBLES for v in loaded.get(ensemble, [])
              for model, _ in ensemble_dependencies(version_config(repo, ensemble, int(v)))}
    prefixes = (contract.classifier_model(""), contract.decode_model(""))
    if prune:
        prefixes += (contract.extractor_model(""), contract.TRUNK_MODEL)
    retired = [model for model in sorted(loaded) if model.startswith(prefixes) and model not in needed]
    for model in retired:
        control.unload(model, wait=False)
    control.wait_unloaded(retired)
    return retired


def load_model_version(control: Any, repo: str | Path, model: str, version: int) -> bool:
    """Serve version `version` of one stand-alone model (e.g. mem_protect) on a running server, no restart;
    returns whether it was (re)loaded. Ensemble versions go through load_version, which moves their steps."""
    if model in (contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL):
        raise RepositoryError(f"{model} is an ensemble: roll it out with load_version (it moves its steps too)")
    if model == contract.FUSED_MODEL:
        raise RepositoryError(f"{model} moves with the ensemble's version: roll out the ensemble instead")
    for ensemble in (contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL):
        for pinned in versions(Path(repo), ensemble):
            if any(step == model for step, _ in ensemble_dependencies(version_config(repo, ensemble, pinned))):
                raise RepositoryError(f"{model} is a step of {ensemble} version {pinned}, which pins its version: "
                                      f"roll out the ensemble instead")
    if version not in versions(Path(repo), model):
        raise RepositoryError(f"{repo}: no {model} version {version}; versions: {versions(Path(repo), model) or 'none'}")
    with rollout_lock(repo), _pointer_restored_on_failure(repo, model):
        moved = point_to(repo, model, version)
        if moved or not control.is_ready(model, str(version)):
            control.load(model)
            return True
    return False


@contextmanager
def _pointer_restored_on_failure(repo: str | Path, model: str) -> Iterator[None]:
    """A load that fails leaves the server on the version it served (Triton keeps it): point the repository
    back at that version too, so that a restart comes back on what is served."""
    before = pointed_version(repo, model)
    try:
        yield
    except Exception:
        if before is not None:
            point_to(repo, model, before)
        raise


def model_served_version(control: Any, model: str) -> int | None:
    """The version of `model` the server answers with now, or None."""
    if not control.is_ready(model):
        return None
    found = _policy_versions(control.config(model))
    return found[0] if found else None


def served_version(control: Any) -> int | None:
    """The ensemble version the server answers with now, or None."""
    return model_served_version(control, contract.ENSEMBLE_MODEL)



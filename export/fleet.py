"""Rolling a version out over a fleet: several Triton replicas reading one repository.

    results = fleet_rollout([(url, control), ...], repo, version)

Replica by replica, each with the single-server rollout (rollout.load_version: the new steps beside the served
ones, the ensembles switched, the old steps retired once drained), so no replica ever has a gap. Every replica
must answer before anything moves. If one fails on the way, every replica already moved (and the failed one)
goes back to the version it served, in reverse order, and the repository's pointers go back with the first
replica's: the fleet is never left split, and a replica that restarts later comes back on the version the
repository points at, which is the fleet's version (the pointer is the fleet's record of its target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from aigis import contract

from .repository import RepositoryError
from .rollout import Rollout, load_model_version, load_version, model_served_version

log = logging.getLogger(__name__)


class FleetRolloutError(RepositoryError):
    """A fleet rollout stopped; `results` says what happened on each replica (the moved ones were rolled back)."""

    def __init__(self, message: str, results: list["ReplicaRollout"]):
        super().__init__(message)
        self.results = results


@dataclass
class ReplicaRollout:
    """One replica's part in a fleet rollout."""

    url: str
    before: int | None  # the version it served before
    after: int | None = None  # the version it served after (after a rollback: before, when that succeeded)
    rollout: Rollout | None = None
    error: str | None = None
    rolled_back: bool = False

    def summary(self) -> str:
        text = f"{self.url}: {self.before} -> {self.after}"
        if self.error:
            text += f" (failed: {self.error})"
        if self.rolled_back:
            text += " (rolled back)"
        return text


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """"a:8001,b:8001" or a list -> the endpoints, each once, in order."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found: list[str] = []
    for url in (u.strip() for u in items):
        if url and url not in found:
            found.append(url)
    if not found:
        raise ValueError("no endpoint given (a comma-separated list of HOST:PORT)")
    return found


def fleet_rollout(
    replicas: Sequence[tuple[str, Any]],
    repo: str | Path,
    version: int,
    *,
    model: str | None = None,
    bytes_ensemble: bool = True,
    prune: bool = False,
    after_each: Callable[[ReplicaRollout], None] | None = None,
) -> list[ReplicaRollout]:
    """Serve `version` of the ensemble (or of stand-alone `model`) on every replica, one after another.

    replicas: (url, ModelControl) pairs. Returns each replica's ReplicaRollout; raises FleetRolloutError (with
    them) if a replica is unreachable before the start (nothing moved) or fails on the way (the moved ones
    rolled back). after_each(result) runs once a replica has moved (progress reports, fault tests).
    """
    def served(control: Any) -> int | None:
        return model_served_version(control, model or contract.ENSEMBLE_MODEL)

    def serve(control: Any, target: int) -> Rollout:
        if model is None:
            return load_version(control, repo, target, bytes_ensemble=bytes_ensemble, prune=prune)
        return Rollout(loaded=[model] if load_model_version(control, repo, model, target) else [])

    results = []
    for url, control in replicas:
        try:
            control.index()  # answers, and takes the control key
            results.append(ReplicaRollout(url, served(control)))
        except Exception as exc:  # noqa: BLE001 - any failure to answer: nothing has moved yet
            raise FleetRolloutError(f"{url} does not answer ({exc}); nothing was moved",
                                    [ReplicaRollout(url, None, error=str(exc))]) from exc
    for k, (result, (url, control)) in enumerate(zip(results, replicas)):
        try:
            result.rollout = serve(control, version)
            result.after = served(control)
        except Exception as exc:  # noqa: BLE001 - the replica failed: the fleet goes back
            result.error = str(exc)
            _roll_back(results[: k + 1], [c for _, c in replicas[: k + 1]], serve, served)
            raise FleetRolloutError(f"{url} failed ({exc}); rolled back {', '.join(r.url for r in results[:k + 1])}",
                                    results) from exc
        log.info(f"{url}: version {result.before} -> {result.after}")
        if after_each is not None:
            after_each(result)
    return results


def _roll_back(results: list[ReplicaRollout], controls: list[Any], serve: Callable[[Any, int], Rollout],
               served: Callable[[Any], int | None]) -> None:
    """Each replica back to the version it served, the last moved first, so the repository's pointers end at the
    first replica's version. A replica that cannot be reached is reported, not waited for: it comes back on the
    pointed version when it restarts."""
    for result, control in reversed(list(zip(results, controls))):
        if result.before is None:
            continue
        try:
            serve(control, result.before)
            result.after = served(control)
            result.rolled_back = True
        except Exception as exc:  # noqa: BLE001 - keep rolling the others back
            note = f"rollback to {result.before} failed: {exc}"
            result.error = f"{result.error}; {note}" if result.error else note
            log.warning(f"{result.url}: {note}")


def replica_status(control: Any) -> dict[str, list[str]]:
    """Each model the replica has ready, with its ready versions (raises if the replica does not answer)."""
    return control.loaded()

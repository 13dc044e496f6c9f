"""A model repository in S3-compatible object storage, written with the guarantees of a local one.

    with repository_at("s3://bucket/models", write=True) as local:
        export_run(run, local)        # any repository operation, on a local mirror of the bucket
    # on leaving, what the mirror gained is in the bucket

The repository functions work on folders; here an `s3://BUCKET/PREFIX` repository is mirrored into a temporary
folder (its complete versions), the operation runs there with every local check, and what it added goes up.
S3 has no rename and no flock, so the guarantees come from the order of writes and from conditional writes:

- One writer at a time: the lock object `.aigis-writer.lock` under the prefix, created with `If-None-Match: *`
  (S3 lets one of two creators win) and renewed by its holder every LEASE_S / 4 s with `If-Match`. A holder that
  died stops renewing; the next writer takes the lock over once it is LEASE_S old by the store's clock.
- A version is visible only when complete: its files go up first and its own `<model>/<v>/config.pbtxt` last,
  so a version without one is incomplete: it is neither mirrored nor served, and the next writer deletes it under
  the lock. A model is visible only with its served-version pointer `<model>/config.pbtxt`, written after every
  version it may name; a model without one (a first publish cut short) is deleted the same way.
- Nothing published is rewritten: every object goes up with `If-None-Match: *`; only pointers are overwritten.
- The steps' versions go up before the ensembles that pin them, and a pointer a rollout moves is written through
  to the bucket at once (point_to), since the servers read it there.

What a mirror downloads is kept by ETag in a local cache for the next one (export/mirror_cache.py).

Needs boto3 (the serve extra) and the standard AWS configuration (credentials, AWS_ENDPOINT_URL for a store
other than AWS).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Iterator

from aigis import contract
from aigis.export.mirror_cache import MirrorCache, file_md5
from aigis.objectstore import CONFIG_FILE, LocalRepository, ObjectStoreError, S3Url, is_hidden, is_s3_url
from aigis.scratch import owned_tempdir

log = logging.getLogger(__name__)

LOCK_OBJECT = ".aigis-writer.lock"
# How long a writer's lock outlives its last renewal (its holder renews it every LEASE_S / 4 s).
LEASE_S = float(os.environ.get("AIGIS_S3_LEASE_S", "60"))
# Test hook: the writer SIGKILLs itself after writing this many objects of a push.
KILL_ENV = "AIGIS_S3_KILL_AFTER"
# Mirrors open in this process: local root -> the bucket it mirrors (point_to writes pointers through).
_MIRRORS: dict[Path, "S3Mirror"] = {}


@contextmanager
def repository_at(repo: str | Path, *, write: bool = False, lock_timeout_s: float = 600.0) -> Iterator[Path]:
    """A folder holding the repository: `repo` itself, or for an s3:// URL a local mirror of its complete versions
    (with `write`, under the bucket's writer lock, and what the mirror gained pushed on a clean exit)."""
    if not is_s3_url(repo):
        yield Path(repo)
        return
    mirror = S3Mirror(str(repo))
    with mirror.opened(write=write, lock_timeout_s=lock_timeout_s) as local:
        yield local


def remote_notes(local: str | Path) -> list[str]:
    """What interrupted writers left in the bucket `local` mirrors (none for a plain folder)."""
    mirror = _MIRRORS.get(Path(local).resolve())
    return list(mirror.notes) if mirror is not None else []


def pointer_moved(repo: str | Path, model: str) -> None:
    """Called by point_to after it moved a pointer in `repo`: written through when `repo` mirrors a bucket."""
    mirror = _MIRRORS.get(Path(repo).resolve())
    if mirror is not None:
        mirror.put_pointer(model)


def _version_of(key: str) -> tuple[str, int] | None:
    """("model", v) for a key inside a version folder <model>/<v>/..., else None."""
    parts = key.split("/")
    if len(parts) >= 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def _publish_rank(model: str) -> tuple[int, str]:
    """Steps before the ensembles that pin them."""
    return (1 if model in (contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL) else 0, model)


class S3Mirror:
    """One s3:// repository and its local mirror."""

    def __init__(self, url: str) -> None:
        self.url = S3Url.parse(url)
        self.root: Path | None = None
        self._client: Any = None
        self._remote: dict[str, str] = {}  # key (relative) -> ETag, of what the mirror holds
        self.notes: list[str] = []  # what interrupted writers left, for `aigis models validate`
        self.writing = False
        self._lock_etag: str | None = None
        self._lock_lost = threading.Event()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        self.cache: MirrorCache | None = None

    # -- S3 calls ----------------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ObjectStoreError(f"{self.url}: S3 repositories need boto3: pip install 'aigis[serve]'") from None
        self._client = boto3.Session().client("s3", config=Config(s3={"addressing_style": "path"},
                                                                  retries={"max_attempts": 3, "mode": "standard"}))
        self._call("HeadBucket", "head_bucket", Bucket=self.url.bucket)

    def _call(self, doing: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(**kwargs)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412"):
                raise
            raise ObjectStoreError(f"{self.url}: {doing} failed: {code} "
                                   f"{error.response.get('Error', {}).get('Message', '')}".rstrip()) from None
        except BotoCoreError as error:
            raise ObjectStoreError(f"{self.url}: {doing} failed: {error}") from None

    def _list(self) -> dict[str, str]:
        start = f"{self.url.prefix}/" if self.url.prefix else ""
        found: dict[str, str] = {}
        request = {"Bucket": self.url.bucket, "Prefix": start}
        while True:
            page = self._call("listing the repository", "list_objects_v2", **request)
            for item in page.get("Contents", []):
                found[item["Key"][len(start):]] = item["ETag"].strip('"')
            if not page.get("IsTruncated"):
                return found
            request["ContinuationToken"] = page["NextContinuationToken"]

    def _put(self, relative: str, body: bytes, *, new: bool) -> str:
        """Write one object; `new`: only if there is none (If-None-Match: *). Returns its ETag."""
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if new else {}
        try:
            answer = self._call(f"writing {relative}", "put_object", Bucket=self.url.bucket,
                                Key=self.url.key(relative), Body=body, **extra)
        except ClientError:
            raise ObjectStoreError(f"{self.url}: {relative} is already there; published objects are never "
                                   f"rewritten (another writer without the lock?)") from None
        return answer["ETag"].strip('"')

    # -- the writer lock ---------------------------------------------------------------------------------

    def _lock_body(self) -> bytes:
        return json.dumps({"holder": f"{socket.gethostname()}:{os.getpid()}", "renewed": time.time()}).encode()

    def _acquire(self, timeout_s: float) -> None:
        from botocore.exceptions import ClientError

        deadline = time.monotonic() + timeout_s
        key = self.url.key(LOCK_OBJECT)
        while True:
            try:
                answer = self._call("taking the writer lock", "put_object", Bucket=self.url.bucket, Key=key,
                                    Body=self._lock_body(), IfNoneMatch="*")
                self._lock_etag = answer["ETag"].strip('"')
                break
            except ClientError:
                pass
            try:
                head = self._call("reading the writer lock", "head_object", Bucket=self.url.bucket, Key=key)
            except ObjectStoreError:
                continue  # released between the two calls: try again
            now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
            age = (now - head["LastModified"]).total_seconds()
            if age > LEASE_S:  # its holder stopped renewing: take it over, unless another taker was first
                try:
                    answer = self._call("taking over the writer lock", "put_object", Bucket=self.url.bucket,
                                        Key=key, Body=self._lock_body(), IfMatch=head["ETag"])
                    self._lock_etag = answer["ETag"].strip('"')
                    log.warning(f"{self.url}: took over a writer lock last renewed {age:.0f} s ago (its holder died)")
                    break
                except ClientError:
                    continue
            if time.monotonic() >= deadline:
                holder = self._call("reading the writer lock", "get_object", Bucket=self.url.bucket,
                                    Key=key)["Body"].read().decode(errors="replace")
                raise ObjectStoreError(f"{self.url}: another writer holds the repository ({holder}) after "
                                       f"{timeout_s:.0f} s; it is released when that writer ends, or {LEASE_S:.0f} s "
                                       f"after it died")
            time.sleep(1.0)
        self._renewer = threading.Thread(target=self._renew, name="s3-writer-lock", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        from botocore.exceptions import ClientError

        while not self._stop.wait(LEASE_S / 4):
            try:
                answer = self._client.put_object(Bucket=self.url.bucket, Key=self.url.key(LOCK_OBJECT),
                                                 Body=self._lock_body(), IfMatch=self._lock_etag)
                self._lock_etag = answer["ETag"].strip('"')
            except ClientError:
                self._lock_lost.set()  # someone took it over: this writer must not push
                return
            except Exception:  # noqa: BLE001 - a network blip: try again at the next beat
                continue

    def _release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        if self._lock_etag is not None and not self._lock_lost.is_set():
            try:
                head = self._client.head_object(Bucket=self.url.bucket, Key=self.url.key(LOCK_OBJECT))
                if head["ETag"].strip('"') == self._lock_etag:
                    self._client.delete_object(Bucket=self.url.bucket, Key=self.url.key(LOCK_OBJECT))
            except Exception as error:  # noqa: BLE001 - it expires on its own
                log.warning(f"{self.url}: could not release the writer lock ({error}); it expires in {LEASE_S:.0f} s")

    def _require_lock(self) -> None:
        if self._lock_lost.is_set():
            raise ObjectStoreError(f"{self.url}: the writer lock was taken over (this writer stalled for over "
                                   f"{LEASE_S:.0f} s); nothing more is written")

    # -- mirroring ---------------------------------------------------------------------------------------

    @staticmethod
    def incomplete(keys: dict[str, str]) -> list[str]:
        """Keys of what a writer left half-written: versions without their own config.pbtxt, and models without
        a pointer."""
        complete_versions = {_version_of(k) for k in keys if k.count("/") == 2 and k.endswith(f"/{CONFIG_FILE}")}
        pointed = {k.split("/")[0] for k in keys if k.count("/") == 1 and k.endswith(f"/{CONFIG_FILE}")}
        found = []
        for key in keys:
            if is_hidden(key) or "/" not in key:
                continue
            version = _version_of(key)
            if key.split("/")[0] not in pointed or (version is not None and version not in complete_versions):
                found.append(key)
        return sorted(found)

    @contextmanager
    def opened(self, *, write: bool, lock_timeout_s: float) -> Iterator[Path]:
        self._connect()
        if write:
            self._acquire(lock_timeout_s)
            self.writing = True
        root = owned_tempdir("aigis-s3-mirror-").resolve()
        self.root = root
        try:
            keys = self._list()
            leftovers = self.incomplete(keys)
            if write and leftovers:
                log.info(f"{self.url}: removing {len(leftovers)} objects an interrupted writer left")
                for key in leftovers:
                    self._call(f"removing {key}", "delete_object", Bucket=self.url.bucket, Key=self.url.key(key))
            self.notes = [f"{key}: left by an interrupted writer; the next export or publish removes it"
                          for key in leftovers]
            self._remote = {k: e for k, e in keys.items() if not is_hidden(k) and k not in leftovers}
            self._mirror(root)
            _MIRRORS[root] = self
            yield root
            if write:
                self.push()
        finally:
            _MIRRORS.pop(root, None)
            shutil.rmtree(root, ignore_errors=True)
            if write:
                self._release()

    def _mirror(self, root: Path) -> None:
        """Every complete object into `root`: from the local cache where an earlier mirror fetched it."""
        self.cache = MirrorCache.for_repository(f"{self._client.meta.endpoint_url}/{self.url.bucket}/{self.url.prefix}")
        for key, etag in self._remote.items():
            target = root / key
            target.parent.mkdir(parents=True, exist_ok=True)

            def download(path: Path, key: str = key) -> None:
                self._call(f"reading {key}", "download_file", Bucket=self.url.bucket, Key=self.url.key(key),
                           Filename=str(path))

            if self.cache is None:
                download(target)
            else:
                self.cache.fetch(etag, target, download)
        if self.cache is not None:
            self.cache.keep_only(set(self._remote.values()))
            log.info(f"{self.url}: mirrored {len(self._remote)} objects, {self.cache.hits} of them from the local "
                     f"cache {self.cache.root}")

    def _keep(self, key: str) -> None:
        """An object just written, kept in the local cache for the next mirror."""
        if self.cache is not None and self.root is not None:
            self.cache.store(self._remote[key], self.root / key)

    def put_pointer(self, model: str) -> None:
        """Write `<model>/config.pbtxt` through (a pointer moved in the mirror)."""
        if not self.writing:
            raise ObjectStoreError(f"{self.url}: a pointer moved in a read-only mirror (open it with write=True)")
        self._require_lock()
        relative = f"{model}/{CONFIG_FILE}"
        assert self.root is not None
        self._remote[relative] = self._put(relative, (self.root / relative).read_bytes(), new=False)
        self._keep(relative)

    def push(self) -> list[str]:
        """Upload what the mirror gained, in the order that keeps every reader's view whole; returns the keys."""
        assert self.root is not None
        local = LocalRepository(self.root).files()  # hidden entries (the local lock) and bytecode caches stay behind
        new = [f for f in local if f not in self._remote]
        changed = [f for f in local if f in self._remote and file_md5(self.root / f) != self._remote[f]]
        rewritten = [f for f in changed if not (f.count("/") == 1 and f.endswith(f"/{CONFIG_FILE}"))]
        if rewritten:
            raise ObjectStoreError(f"{self.url}: {rewritten[0]} changed in the mirror; published objects are never "
                                   f"rewritten")
        by_version: dict[tuple[str, int], list[str]] = {}
        model_files: list[str] = []
        for key in new:
            version = _version_of(key)
            if version is not None:
                by_version.setdefault(version, []).append(key)
            elif not key.endswith(f"/{CONFIG_FILE}"):
                model_files.append(key)
        # each version's own config.pbtxt after its other files: the mark that it is complete
        order = [key for version in sorted(by_version, key=lambda v: (_publish_rank(v[0]), v[1]))
                 for key in sorted(by_version[version], key=lambda k: (k.count("/") == 2 and k.endswith(CONFIG_FILE), k))]
        pointers = sorted({f for f in new + changed if f.count("/") == 1 and f.endswith(f"/{CONFIG_FILE}")},
                          key=lambda f: _publish_rank(f.split("/")[0]))
        written: list[str] = []
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)

        def wrote(key: str) -> None:
            written.append(key)
            if kill_after and len(written) == kill_after:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)

        for key in order + model_files:
            self._require_lock()
            self._remote[key] = self._put(key, (self.root / key).read_bytes(), new=True)
            self._keep(key)
            wrote(key)
        for key in pointers:
            self.put_pointer(key.split("/")[0])
            wrote(key)
        if written:
            log.info(f"{self.url}: wrote {len(written)} objects")
        return written

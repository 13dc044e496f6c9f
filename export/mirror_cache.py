"""Objects of an s3:// repository kept on local disk between mirrors, by ETag.

Every repository command on a bucket (export, rollout, validate, list) works on a local mirror of its complete
versions. Published objects are never rewritten, so an object's ETag names its content for good: a mirror takes
from this cache what an earlier one downloaded and fetches only what is new, and a rollback re-reads the
pointers it moves, not the repository. The cache holds what the repository's last listing named and nothing
else, so it stays the size of one mirror.

    AIGIS_S3_CACHE=/var/cache/aigis-s3   where (default: $XDG_CACHE_HOME/aigis/s3, else ~/.cache/aigis/s3)
    AIGIS_S3_CACHE=off                   no cache: every mirror downloads everything

Entries are written whole (a temporary file renamed into place) and only where the ETag is the MD5 of the bytes
(a single-part upload without KMS encryption) or a multipart one; an entry whose bytes no longer match its MD5
ETag is dropped and fetched again. Several processes may share one cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CACHE_ENV = "AIGIS_S3_CACHE"
# S3's ETags: the MD5 of a single-part upload, or an MD5 of MD5s with the part count ("-N") for a multipart one.
_ETAG = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")
# A partial download older than this was left by a process that died; younger ones may still be written.
STALE_PART_S = 3600.0


def file_md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - S3's ETag of a single-part upload, compared, not trusted for security
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: Path, etag: str) -> bool:
    """Whether `path` holds the object `etag` names, where its ETag says (a multipart ETag is not an MD5 of the
    bytes: such an entry is trusted as written, whole, by this cache)."""
    return "-" in etag or file_md5(path) == etag


def _copy_matching(source: Path, target: Path, etag: str) -> bool:
    """Copy `source` to `target` and say whether the bytes are the object `etag` names: one read for both."""
    if "-" in etag:
        shutil.copyfile(source, target)
        return True
    digest = hashlib.md5()  # noqa: S324 - compared with S3's ETag, not trusted for security
    with source.open("rb") as reading, target.open("wb") as writing:
        for block in iter(lambda: reading.read(1 << 20), b""):
            digest.update(block)
            writing.write(block)
    return digest.hexdigest() == etag


class MirrorCache:
    """One repository's downloaded objects, each in a file named by its ETag."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits = 0
        self.downloads = 0

    @classmethod
    def for_repository(cls, where: str) -> "MirrorCache | None":
        """The cache of the repository `where` (endpoint, bucket and prefix), or None when AIGIS_S3_CACHE=off."""
        setting = os.environ.get(CACHE_ENV, "").strip()
        if setting.lower() in ("off", "0", "none", "false"):
            return None
        if setting:
            base = Path(setting).expanduser()
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aigis" / "s3"
        root = base / hashlib.sha256(where.encode()).hexdigest()[:24]
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.warning(f"no local cache for {where} ({error}); every object is downloaded (set {CACHE_ENV}=DIR "
                        f"to put the cache elsewhere)")
            return None
        return cls(root)

    def fetch(self, etag: str, target: Path, download: Callable[[Path], None]) -> None:
        """Put the object `etag` names at `target`: from the cache, else through `download(path)` into the cache
        first. An ETag that does not look like one is downloaded straight to `target`, never cached."""
        if not _ETAG.match(etag):
            download(target)
            return
        entry = self.root / etag
        if entry.is_file():
            try:
                if _copy_matching(entry, target, etag):
                    self.hits += 1
                    return
                log.warning(f"{entry}: cached bytes do not match their ETag; fetching the object again")
                entry.unlink(missing_ok=True)
            except OSError:
                pass  # pruned by another process meanwhile: fetched again below
        partial = self._partial(etag)
        try:
            download(partial)
            if _matches(partial, etag):
                os.replace(partial, entry)
                shutil.copyfile(entry, target)
            else:  # e.g. SSE-KMS: an ETag that is not the bytes' MD5 cannot vouch for a cached copy
                log.warning(f"{target.name}: its ETag {etag} is not the MD5 of its bytes; not cached")
                os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        self.downloads += 1

    def store(self, etag: str, source: Path) -> None:
        """Keep a copy of `source`, just uploaded as the object `etag` names, for the next mirror."""
        entry = self.root / etag
        if not _ETAG.match(etag) or entry.is_file():
            return
        partial = self._partial(etag)
        try:
            if _copy_matching(source, partial, etag):
                os.replace(partial, entry)
        except OSError as error:  # a full disk costs the next mirror a download, not this write
            log.warning(f"{source.name} not kept in the local cache: {error}")
        finally:
            partial.unlink(missing_ok=True)

    def keep_only(self, etags: set[str]) -> None:
        """Drop every entry the repository no longer names, and partial files left by processes that died."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            try:
                if entry.name.startswith("."):
                    if time.time() - entry.stat().st_mtime > STALE_PART_S:
                        entry.unlink()
                elif entry.name not in etags:
                    entry.unlink()
            except OSError:
                pass  # removed by another process meanwhile

    def _partial(self, etag: str) -> Path:
        return self.root / f".{etag}.{os.getpid()}.part"

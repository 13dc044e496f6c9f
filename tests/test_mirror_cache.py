"""The s3 mirror's local cache on its own: what it keeps, what it refuses to vouch for, what it drops.

(The cache inside real mirrors of a bucket, moto's S3 server standing in: tests/test_s3_repository.py.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aigis.export.mirror_cache import MirrorCache


def _source(body: bytes):
    """A download function as the mirror passes one: it writes the object's bytes to the path given."""
    calls: list[Path] = []

    def download(path: Path) -> None:
        calls.append(path)
        path.write_bytes(body)

    return download, calls


def test_an_object_is_fetched_once_and_served_from_the_cache_after(tmp_path):
    body = b"model bytes" * 100
    etag = hashlib.md5(body).hexdigest()
    cache = MirrorCache(tmp_path / "cache")
    cache.root.mkdir()
    download, calls = _source(body)
    for name in ("a", "b"):
        cache.fetch(etag, tmp_path / name, download)
        assert (tmp_path / name).read_bytes() == body
    assert len(calls) == 1 and (cache.hits, cache.downloads) == (1, 1)
    assert sorted(p.name for p in cache.root.iterdir()) == [etag]  # no partial file left behind


def test_an_etag_that_is_not_the_bytes_md5_is_delivered_but_never_cached(tmp_path):
    """SSE-KMS objects have 32-hex ETags that are not their MD5: nothing could later check a cached copy."""
    body = b"encrypted at rest"
    cache = MirrorCache(tmp_path / "cache")
    cache.root.mkdir()
    download, calls = _source(body)
    for name in ("a", "b"):
        cache.fetch("0" * 32, tmp_path / name, download)
        assert (tmp_path / name).read_bytes() == body
    assert len(calls) == 2 and cache.hits == 0 and list(cache.root.iterdir()) == []


def test_a_name_that_is_no_etag_never_becomes_a_path_in_the_cache(tmp_path):
    cache = MirrorCache(tmp_path / "cache")
    cache.root.mkdir()
    download, calls = _source(b"x")
    cache.fetch("../../escape", tmp_path / "target", download)
    assert calls == [tmp_path / "target"] and list(cache.root.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_keep_only_drops_what_the_repository_no_longer_names(tmp_path):
    cache = MirrorCache(tmp_path / "cache")
    cache.root.mkdir()
    bodies = {name: name.encode() * 10 for name in ("old", "new")}
    etags = {name: hashlib.md5(body).hexdigest() for name, body in bodies.items()}
    for name, body in bodies.items():
        (tmp_path / name).write_bytes(body)
        cache.store(etags[name], tmp_path / name)
    cache.store("f" * 32, tmp_path / "new")  # bytes that do not match this ETag are not kept
    assert {p.name for p in cache.root.iterdir()} == set(etags.values())
    cache.keep_only({etags["new"]})
    assert [p.name for p in cache.root.iterdir()] == [etags["new"]]

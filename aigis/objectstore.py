"""Where a model repository's files are read from: a local folder, or S3-compatible object storage.

`aigis serve --repo s3://BUCKET/PREFIX` serves replicas from one bucket. tritonserver reads the bucket itself
(it copies each model it loads to a local folder); the launcher only (1) hands it the URL in the form its S3
reader parses, (2) leaves the credentials in the environment it inherits, and (3) checks up front, with boto3,
what Triton would report as "Check account credentials" whatever went wrong: a bucket that does not exist, an
endpoint that does not answer or fails TLS, a prefix that holds no model.

The URL users give is the aws CLI's and boto3's own, `s3://BUCKET[/PREFIX]`; the endpoint and credentials come
from the standard AWS configuration boto3 reads: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (or endpoint_url in the
AWS config file) for a store other than AWS itself, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY [/ AWS_SESSION_TOKEN]
or AWS_PROFILE and the shared credentials file. `triton_url` turns it into what tritonserver parses:
`s3://http://HOST:PORT/BUCKET/PREFIX` for another endpoint, the URL unchanged for AWS.

Also here, for the launcher and later for export: a reader interface shared by both kinds (`files`, `read_text`;
`default_models` in serving/cli.py works on either) and `upload_repository`, which copies an exported folder into
a bucket with each model's served-version pointer last. Only the standard library is imported at module level;
boto3 (the serve extra) when an S3 repository is opened.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aigis.errors import AigisError

SCHEME = "s3://"
CONFIG_FILE = "config.pbtxt"    # Triton's; export writes one per model (the served version) and per version
# What tritonserver's S3 reader parses (triton core, filesystem/implementations/s3.h): with an endpoint in the
# URL, every path component must match _PART, the bucket _BUCKET and the host _HOST; anything else is read as a
# bucket name and fails with a misleading message. S3's own bucket rules are _BUCKET with 3 to 63 characters.
_BUCKET = re.compile(r"[0-9a-z][0-9a-z.\-]{1,61}[0-9a-z]")
_PART = re.compile(r"[0-9A-Za-z._\-]+")
_HOST = re.compile(r"[0-9A-Za-z.\-]+")
AWS_HOSTS = (".amazonaws.com", ".amazonaws.com.cn")


class ObjectStoreError(AigisError):
    """The repository cannot be read as tritonserver would read it; the message names what is wrong."""


class RepositoryReader(Protocol):
    """The files of a model repository, wherever it lives."""

    def files(self) -> list[str]:
        """Relative POSIX paths of every file outside hidden folders, sorted."""

    def read_text(self, relative: str) -> str:
        """The text of one file."""


def is_s3_url(repo: object) -> bool:
    """True for an `s3://` repository (a string: pathlib would fold the double slash)."""
    return isinstance(repo, str) and repo.startswith(SCHEME)


def is_hidden(relative: str) -> bool:
    """A path inside a dot-named folder or file: writer locks and staging folders, never served."""
    return any(part.startswith(".") for part in relative.split("/"))


# ---- the URL ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Url:
    """`s3://BUCKET[/PREFIX]`, checked against S3's bucket rules and what tritonserver's reader parses."""

    bucket: str
    prefix: str   # no leading or trailing slash; '' for the bucket's root

    @classmethod
    def parse(cls, url: str) -> "S3Url":
        if not is_s3_url(url):
            raise ObjectStoreError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        prefix = prefix.strip("/")
        if ":" in bucket:   # host:port, or tritonserver's s3://http://host:port/... form
            raise ObjectStoreError(
                f"{url}: give the repository as s3://BUCKET/PREFIX and the endpoint of a store other than AWS in "
                f"AWS_ENDPOINT_URL (e.g. AWS_ENDPOINT_URL=http://{bucket.split('://')[-1]}); the launcher builds "
                f"the URL form tritonserver reads")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ObjectStoreError(f"{url}: {bucket!r} is not an S3 bucket name (3 to 63 of a-z 0-9 . -, starting "
                                   f"and ending with a letter or digit)")
        bad = [part for part in prefix.split("/") if prefix and not _PART.fullmatch(part)]
        if bad:
            raise ObjectStoreError(f"{url}: tritonserver's S3 reader takes only A-Z a-z 0-9 . _ - in a path; "
                                   f"{bad[0]!r} has others (or an empty component)")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def key(self, relative: str) -> str:
        """The object key of `relative` (a path inside the repository)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative


def triton_url(url: S3Url, endpoint: str | None) -> str:
    """The repository URL in the form tritonserver parses: unchanged for AWS itself (endpoint None), else
    `s3://SCHEME://HOST:PORT/BUCKET/PREFIX` with the port made explicit (its parser needs one)."""
    if endpoint is None:
        return str(url)
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise ObjectStoreError(f"S3 endpoint {endpoint!r}: tritonserver reads only http:// and https:// endpoints")
    host = parts.hostname or ""
    if parts.path.strip("/") or parts.query or not _HOST.fullmatch(host):
        raise ObjectStoreError(f"S3 endpoint {endpoint!r}: tritonserver takes a host name or IPv4 address and a "
                               f"port, with no path")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{SCHEME}{parts.scheme}://{host}:{port}/{url.bucket}" + (f"/{url.prefix}" if url.prefix else "")


# ---- a local folder ----------------------------------------------------------------------------------

class LocalRepository:
    """A repository folder on this machine."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def open(self) -> "LocalRepository":
        if not self.root.is_dir():
            raise ObjectStoreError(f"model repository {self.root} is not a directory")
        return self

    def files(self) -> list[str]:
        found = []
        for folder, subfolders, names in os.walk(self.root):
            # Python's bytecode caches appear where a served Python model imports its modules: not repository files.
            subfolders[:] = [name for name in subfolders if not name.startswith(".") and name != "__pycache__"]
            base = Path(folder).relative_to(self.root)
            found += [(base / name).as_posix() for name in names if not name.startswith(".")]
        return sorted(found)

    def read_text(self, relative: str) -> str:
        return (self.root / relative).read_text()

    def __str__(self) -> str:
        return str(self.root)


def open_repository(repo: str | Path) -> RepositoryReader:
    """A checked reader for `repo`: an s3:// URL (S3Repository.open) or a folder; ObjectStoreError if unreadable."""
    if is_s3_url(repo):
        return S3Repository(str(repo)).open()
    return LocalRepository(repo).open()


# ---- S3 -------------------------------------------------------------------------------------------------

def _boto3(url: S3Url) -> tuple[Any, Any]:
    """(boto3, botocore.config.Config), or ObjectStoreError naming the extra that brings them."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError(f"{url}: S3 repositories need boto3: pip install 'aigis[serve]'") from None
    return boto3, Config


class S3Repository:
    """A repository under `s3://BUCKET/PREFIX`, checked the way tritonserver will read it.

    `open()` resolves endpoint and credentials as boto3 does, then checks the bucket (HeadBucket, as Triton's
    reader does first), lists the prefix (Triton lists it), and requires at least one `<model>/config.pbtxt`;
    every failure becomes an ObjectStoreError naming the endpoint, the bucket and what to change.
    """

    def __init__(self, url: str) -> None:
        self.url = S3Url.parse(url)
        self.endpoint: str | None = None          # None: AWS itself
        self.region: str | None = None
        self.credentials_source = ""
        self.notes: list[str] = []                 # harmless findings (hidden leftovers), for the report
        self._client: Any = None
        self._files: list[str] = []

    # -- checks ----------------------------------------------------------------------------------------

    def open(self) -> "S3Repository":
        boto3, Config = _boto3(self.url)
        from botocore.exceptions import BotoCoreError

        # Path-style addressing and few retries: what tritonserver does, and a fast answer when nothing listens.
        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"},
                        connect_timeout=5, read_timeout=20)
        try:
            session = boto3.Session()
            credentials = session.get_credentials()
            self._client = session.client("s3", config=config)
        except (BotoCoreError, ValueError) as error:   # a profile that does not exist, an endpoint that is no URL
            raise ObjectStoreError(f"{self.url}: the AWS configuration cannot be used: {error}") from None
        if credentials is None:
            raise ObjectStoreError(
                f"{self.url}: no AWS credentials found; tritonserver's reads fail without them even on a store that "
                f"checks none: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (any non-empty values for such a "
                f"store), or AWS_PROFILE with a shared credentials file")
        self.credentials_source = credentials.method
        endpoint = self._client.meta.endpoint_url
        host = urlsplit(endpoint).hostname or ""
        self.endpoint = None if host.endswith(AWS_HOSTS) else endpoint
        self.region = session.region_name
        triton_url(self.url, self.endpoint)        # an endpoint tritonserver cannot parse fails here
        self._check_bucket()
        self._files = self._list()
        self._check_models()
        return self

    def _where(self) -> str:
        return f"bucket {self.url.bucket!r} at {self.endpoint or 'AWS S3'}"

    def _explain(self, error: Exception, doing: str) -> ObjectStoreError:
        """A boto3/botocore error as what is wrong and what to change."""
        from botocore import exceptions as boto

        endpoint = self.endpoint or self._client.meta.endpoint_url
        if isinstance(error, boto.SSLError):
            return ObjectStoreError(
                f"{self.url}: TLS failed talking to {endpoint} ({error}). A plain-HTTP store needs "
                f"AWS_ENDPOINT_URL=http://...")
        if isinstance(error, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ConnectionClosedError)):
            return ObjectStoreError(f"{self.url}: cannot reach the S3 endpoint {endpoint} ({error}); a store other "
                                    f"than AWS is named by AWS_ENDPOINT_URL")
        if isinstance(error, boto.ReadTimeoutError):
            return ObjectStoreError(f"{self.url}: the S3 endpoint {endpoint} did not answer {doing} ({error})")
        if isinstance(error, boto.NoCredentialsError):
            return ObjectStoreError(f"{self.url}: no AWS credentials found (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
        if isinstance(error, boto.ClientError):
            details = error.response.get("Error", {})
            code = str(details.get("Code", ""))
            message = details.get("Message") or ""
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket"):
                return ObjectStoreError(f"{self.url}: {self._where()} does not exist")
            if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
                region = (error.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                          .get("x-amz-bucket-region"))
                where = f" (it is in {region}: set AWS_DEFAULT_REGION={region})" if region else ""
                return ObjectStoreError(f"{self.url}: {self._where()} is in another region than {self.region}{where}")
            if status == 403 or code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                         "ExpiredToken", "InvalidToken"):
                return ObjectStoreError(
                    f"{self.url}: {self._where()} refuses {doing} with these credentials (from "
                    f"{self.credentials_source}): {code} {message}".rstrip()
                    + ". tritonserver needs s3:ListBucket and s3:GetObject on the prefix")
            return ObjectStoreError(f"{self.url}: {doing} failed on {self._where()}: {code} {message}".rstrip())
        if isinstance(error, boto.BotoCoreError):
            return ObjectStoreError(f"{self.url}: {doing} failed on {self._where()}: {error}")
        raise error

    def _call(self, doing: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(**kwargs)
        except (BotoCoreError, ClientError) as error:
            raise self._explain(error, doing) from None

    def _check_bucket(self) -> None:
        answer = self._call("HeadBucket", "head_bucket", Bucket=self.url.bucket)
        bucket_region = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if self.endpoint is None and bucket_region:
            self.region = bucket_region

    def _list(self) -> list[str]:
        start = f"{self.url.prefix}/" if self.url.prefix else ""
        keys: list[str] = []
        request = {"Bucket": self.url.bucket, "Prefix": start}
        while True:
            page = self._call("listing the prefix", "list_objects_v2", **request)
            keys += [item["Key"][len(start):] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            request["ContinuationToken"] = page["NextContinuationToken"]
        hidden = [key for key in keys if is_hidden(key)]
        if hidden:
            self.notes.append(f"{len(hidden)} hidden object{'s' if len(hidden) != 1 else ''} (e.g. {hidden[0]}): a "
                              f"writer's lock or staging folder copied along; tritonserver loads none of them")
        return sorted(key for key in keys if key and not key.endswith("/") and not is_hidden(key))

    def _check_models(self) -> None:
        if not self._files:
            raise ObjectStoreError(f"{self.url}: {self._where()} holds nothing under "
                                   f"{self.url.prefix + '/' if self.url.prefix else 'its root'}; is the prefix right?")
        models = self.models()
        if not models:
            tops = sorted({key.split("/")[0] for key in self._files})[:5]
            raise ObjectStoreError(f"{self.url}: no model there (no <model>/{CONFIG_FILE} directly under the "
                                   f"prefix; found {', '.join(tops)}); is the prefix right?")
        if self.endpoint is not None:   # with an endpoint in its URL, tritonserver parses every path it reads
            bad = [key for key in self._files if not all(_PART.fullmatch(part) for part in key.split("/"))]
            if bad:
                raise ObjectStoreError(f"{self.url}: tritonserver's S3 reader cannot read {bad[0]!r} (only "
                                       f"A-Z a-z 0-9 . _ - in a path){f' and {len(bad) - 1} more' if bad[1:] else ''}")
        self.read_text(f"{models[0]}/{CONFIG_FILE}")   # listing allowed does not mean reading allowed

    # -- reading ---------------------------------------------------------------------------------------

    def files(self) -> list[str]:
        return list(self._files)

    def models(self) -> list[str]:
        """Top-level folders holding a config.pbtxt: the models tritonserver can load."""
        return sorted({key.split("/")[0] for key in self._files if key.count("/") == 1
                       and key.endswith(f"/{CONFIG_FILE}")})

    def read_text(self, relative: str) -> str:
        answer = self._call(f"reading {relative}", "get_object", Bucket=self.url.bucket, Key=self.url.key(relative))
        return answer["Body"].read().decode("utf-8")

    # -- what tritonserver gets ---------------------------------------------------------------------------

    @property
    def triton_url(self) -> str:
        return triton_url(self.url, self.endpoint)

    def triton_environment(self, mount_dir: Path) -> dict[str, str]:
        """Variables to add to the environment tritonserver inherits (which already holds the credentials).

        TRITON_AWS_MOUNT_DIRECTORY: where it copies the models it loads (kept when set). AWS_DEFAULT_REGION:
        its AWS SDK reads no other region variable, and AWS answers a request to another region with a redirect
        it does not follow, so the bucket's region found by HeadBucket is handed over when none is set."""
        extra = {}
        if not os.environ.get("TRITON_AWS_MOUNT_DIRECTORY"):
            extra["TRITON_AWS_MOUNT_DIRECTORY"] = str(mount_dir)
        if self.region and not os.environ.get("AWS_DEFAULT_REGION"):
            extra["AWS_DEFAULT_REGION"] = self.region
        return extra

    def describe(self) -> str:
        """One line for `aigis serve`'s report."""
        return (f"tritonserver reads {self.triton_url} (holding {len(self.models())} models); credentials from "
                f"{self.credentials_source}, passed in its environment")

    def __str__(self) -> str:
        return str(self.url)


# ---- publishing a folder to a bucket ---------------------------------------------------------------------

def upload_repository(local: str | Path, url: str, client: Any = None) -> int:
    """Copy the repository folder `local` to `url` (s3://BUCKET/PREFIX; the bucket must exist); returns the
    number of objects written.

    Each model's own config.pbtxt names the version a load serves, so it goes last: a replica that (re)loads
    while the copy runs never finds a pointer to a version whose files are not all there. Hidden entries (the
    writer's lock, staging folders) stay behind. Objects already in the bucket are overwritten, none deleted.
    `client`: a boto3 S3 client (default: one from the standard AWS configuration).
    """
    target = S3Url.parse(url)
    repository = LocalRepository(local).open()
    if client is None:
        boto3, Config = _boto3(target)
        client = boto3.Session().client("s3", config=Config(s3={"addressing_style": "path"}))
    files = repository.files()
    pointers = [name for name in files if name.count("/") == 1 and name.endswith(f"/{CONFIG_FILE}")]
    for name in [name for name in files if name not in pointers] + pointers:
        client.upload_file(str(repository.root / name), target.bucket, target.key(name))
    return len(files)

"""Where image bytes live: local paths and object-store URIs (``s3://``, ``gs://``, ``az://``).

Every image root may be an object-store URI. This module is the one place that talks to object
stores, through obstore (Rust's ``object_store``: concurrent GETs that release the GIL, paginated
listings with ETags, conditional writes, retries with backoff and jitter on throttling and resets).

Credentials and endpoint come from each store's standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``; ``GOOGLE_*``; ``AZURE_STORAGE_*``),
anything else from ``--storage-option KEY=VALUE`` or a job file's ``[storage]`` table
(``set_storage_options``). No secret reaches a message: every error text passes ``redact``.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from imgfeat.core.errors import ConfigError, ImgfeatError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

SCHEMES = ("s3", "gs", "az")  # the object stores an image root may name
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
# Options whose values are secrets: never printed, never recorded (matched on the lower-cased key).
_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "sas")
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
)
# Retries of one request: throttling (503 SlowDown, 429), 5xx and connection resets, with
# exponential backoff and jitter (object_store's policy), for at most RETRY_SECONDS in all.
MAX_RETRIES = 8
RETRY_SECONDS = 60
CONNECT_SECONDS = 10
REQUEST_SECONDS = 120
LIST_PAGE = 1000


class StorageUnavailable(ImgfeatError):
    """The object store cannot be reached (after retries): the run stops; what it committed stays."""


class ObjectMissing(Exception):
    """The object does not exist (404)."""


class ObjectRefused(Exception):
    """The store refused to give the object (403 and other 4xx): a row, tried again next run."""


def is_uri(path: object) -> bool:
    """Whether ``path`` names an object in a store (``scheme://...``), not a local path."""
    return isinstance(path, str) and _URI.match(path) is not None


class ObjectUri(str):
    """An object's URI where the code has a file's path: ``as_posix``, ``name`` and ``suffix`` work;
    it has no ``__fspath__``, so nothing opens it as a local file by mistake."""

    def as_posix(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return self.rpartition("/")[2]

    @property
    def suffix(self) -> str:
        stem, dot, ext = self.name.rpartition(".")
        return dot + ext if stem else ""


@dataclass(frozen=True)
class Location:
    """A bucket (or container) and a key prefix in it: an image root in object storage."""

    scheme: str
    bucket: str
    prefix: str  # no leading or trailing '/'; "" for the whole bucket

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def key(self, rel: str) -> str:
        """The object key of ``rel`` (a POSIX path relative to the root)."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def __truediv__(self, rel: str) -> ObjectUri:
        """The URI of ``rel`` under this root, as ``Path / rel`` is a file under a folder."""
        return ObjectUri(f"{self.uri}/{rel}")

    def as_posix(self) -> str:
        return self.uri

    def __str__(self) -> str:
        return self.uri


ImageRoot: TypeAlias = "Path | Location"  # where a dataset's images are: a folder or a bucket prefix


def parse_location(uri: str, what: str = "root") -> Location:
    """``s3://bucket/prefix`` -> Location, or ConfigError naming ``what``, the value and what is allowed."""
    m = _URI.match(uri)
    if m is None:
        raise ConfigError(f"{what} {uri!r} is not an object-store URI (scheme://bucket/prefix)")
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{what} {uri!r}: unknown scheme {scheme!r}; allowed: a local path, or {', '.join(s + '://' for s in SCHEMES)}"
        )
    bucket, _, prefix = rest.partition("/")
    parts = [p for p in prefix.split("/") if p]
    if not bucket or any(p in (".", "..") for p in parts) or any(c in uri for c in "\x00\r\n"):
        raise ConfigError(f"{what} {uri!r} must be {scheme}://BUCKET[/PREFIX] (no '.' or '..' parts)")
    return Location(scheme, bucket, "/".join(parts))


# ---------------------------------------------------------------- options and secrets

_lock = threading.Lock()
_options: dict[str, str] = {}
_stores: dict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = {}


def parse_storage_options(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--storage-option``) -> a dict, or ConfigError naming the bad one."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--storage-option {redact(pair)!r} must be KEY=VALUE, e.g. region=eu-west-1")
        out[key.strip().lower()] = value.strip()
    return out


def set_storage_options(options: Mapping[str, Any]) -> None:
    """The options every store of this process is opened with (flags and ``[storage]``)."""
    clean: dict[str, str] = {}
    for key, value in options.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"storage option {key!r} must be a string, got {type(value).__name__}")
        clean[str(key).lower()] = str(value).lower() if isinstance(value, bool) else str(value)
    with _lock:
        _options.clear()
        _options.update(clean)
        _stores.clear()


def storage_options() -> dict[str, str]:
    with _lock:
        return dict(_options)


def is_secret(key: str) -> bool:
    k = key.lower()
    return any(word in k for word in _SECRET_WORDS) and not k.endswith(("key_id", "_id"))


def public_options(options: Mapping[str, str] | None = None) -> dict[str, str]:
    """The options as they may be shown or recorded: secret values replaced by '***'."""
    opts = storage_options() if options is None else options
    return {k: ("***" if is_secret(k) else v) for k, v in sorted(opts.items())}


def redact(text: str) -> str:
    """``text`` with every secret we know of (environment and options) replaced by '***'."""
    secrets = [os.environ.get(name, "") for name in _SECRET_ENV]
    secrets += [v for k, v in storage_options().items() if is_secret(k)]
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    # presigned URLs and signed headers carry signatures
    return re.sub(r"(?i)(signature|x-amz-signature|sig|credential)=([^&\s\"']+)", r"\1=***", text)


def _endpoint(scheme: str, options: Mapping[str, str]) -> str | None:
    if scheme != "s3":
        return None
    for key in ("aws_endpoint", "aws_endpoint_url", "endpoint", "endpoint_url"):
        if options.get(key):
            return options[key]
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _config(scheme: str, options: Mapping[str, str]) -> dict[str, str]:
    config = {k: v for k, v in options.items() if k not in ("endpoint_url",)}
    if scheme == "s3":
        if "endpoint_url" in options:
            config["aws_endpoint"] = options["endpoint_url"]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region and not any(k in config for k in ("region", "aws_region")):
            config["aws_region"] = region
        endpoint = _endpoint(scheme, options)
        if endpoint and re.match(r"^https?://\d+\.\d+\.\d+\.\d+|^https?://localhost|^https?://\[", endpoint):
            # a local server at an address: path-style requests (no bucket.host names)
            config.setdefault("aws_virtual_hosted_style_request", "false")
    return config


def _client_options(scheme: str, options: Mapping[str, str]) -> ClientConfig:
    endpoint = _endpoint(scheme, options) or ""
    client: ClientConfig = {
        "connect_timeout": _dt.timedelta(seconds=CONNECT_SECONDS),
        "timeout": _dt.timedelta(seconds=REQUEST_SECONDS),
        "pool_max_idle_per_host": "64",
    }
    if endpoint.startswith("http://") or options.get("allow_http", "").lower() == "true":
        client["allow_http"] = True
    return client


def _retry() -> RetryConfig:
    return {
        "max_retries": MAX_RETRIES,
        "retry_timeout": _dt.timedelta(seconds=RETRY_SECONDS),
        "backoff": {
            "init_backoff": _dt.timedelta(milliseconds=100),
            "max_backoff": _dt.timedelta(seconds=15),
            "base": 2,
        },
    }


def open_store(loc: Location) -> Any:
    """The obstore store of ``loc``'s bucket (opened once per process, options and all)."""
    opts = storage_options()
    cache_key = (loc.scheme, loc.bucket, tuple(sorted(opts.items())))
    with _lock:
        store = _stores.get(cache_key)
    if store is not None:
        return store
    from obstore.exceptions import UnknownConfigurationKeyError
    from obstore.store import from_url

    config = {k: v for k, v in _config(loc.scheme, opts).items() if k not in ("allow_http",)}
    try:
        store = from_url(
            f"{loc.scheme}://{loc.bucket}",
            config=config or None,  # type: ignore[arg-type]
            client_options=_client_options(loc.scheme, opts),
            retry_config=_retry(),
        )
    except UnknownConfigurationKeyError as exc:
        raise ConfigError(f"storage option: {redact(_first_line(str(exc)))}") from None
    except Exception as exc:  # noqa: BLE001 - obstore's builder errors: a bad option or URL
        raise ConfigError(f"cannot open {loc.uri}: {redact(_first_line(str(exc)))}") from None
    with _lock:
        _stores[cache_key] = store
    return store


# ---------------------------------------------------------------- errors


class StoreFailure(NamedTuple):
    status: int | None  # the HTTP status, None when no answer came
    code: str | None  # the S3 error code (NoSuchBucket, SignatureDoesNotMatch, ...)
    text: str  # one line, secrets removed


def failure(exc: BaseException) -> StoreFailure:
    text = str(exc)
    status = re.search(r"status code: (\d{3})", text)
    code = re.search(r"<Code>([^<]+)</Code>", text)
    return StoreFailure(
        int(status.group(1)) if status else None, code.group(1) if code else None, redact(_first_line(text))
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "unknown error"


_ADVICE = {
    "NoSuchBucket": "the bucket does not exist",
    "SignatureDoesNotMatch": "the secret key was refused (check AWS_SECRET_ACCESS_KEY)",
    "InvalidAccessKeyId": "the access key is unknown (check AWS_ACCESS_KEY_ID)",
    "AccessDenied": "access denied (check the credentials and the bucket's policy)",
    "ExpiredToken": "the session token has expired",
}


def explain(exc: BaseException, uri: str) -> str:
    """One line for a person: what went wrong with ``uri`` and what to check."""
    from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

    f = failure(exc)
    if "169.254.169.254" in str(exc) or "metadata.google.internal" in str(exc):
        # no credentials in the environment: the client asked the cloud's instance metadata
        reason = (
            "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the store's own, "
            "or run where the instance has a role)"
        )
    elif f.code in _ADVICE:
        reason = _ADVICE[f.code]
    elif isinstance(exc, UnauthenticatedError) or f.status == 401:
        reason = "no valid credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the store's own)"
    elif isinstance(exc, PermissionDeniedError) or f.status == 403:
        reason = "access denied (check the credentials and the bucket's policy)"
    elif isinstance(exc, NotFoundError) or f.status == 404:
        reason = "not found"
    elif f.status is None:
        endpoint = _endpoint(parse_location(uri).scheme, storage_options()) if is_uri(uri) else None
        where = f" at {endpoint}" if endpoint else ""
        reason = f"the store{where} cannot be reached ({_transport(f.text)})"
    else:
        reason = f"HTTP {f.status}{' ' + f.code if f.code else ''}"
    return f"{uri}: {reason}"


def _transport(text: str) -> str:
    m = re.search(r"(error sending request|connection refused|timed out|dns error[^,]*|reset by peer)", text, re.I)
    return m.group(1) if m else "no answer"


def _raise_for(exc: BaseException, uri: str) -> None:
    """Map an obstore error of one object to ObjectMissing / ObjectRefused / StorageUnavailable."""
    from obstore.exceptions import NotFoundError

    f = failure(exc)
    if isinstance(exc, NotFoundError) or f.status == 404:
        raise ObjectMissing(explain(exc, uri)) from None
    if f.status is not None and 400 <= f.status < 500:
        raise ObjectRefused(explain(exc, uri)) from None
    raise StorageUnavailable(explain(exc, uri)) from None


# ---------------------------------------------------------------- reading


def check_root(loc: Location, what: str = "root") -> None:
    """Fail fast, before any work: ConfigError in one line when the bucket cannot be listed."""
    import obstore

    store = open_store(loc)
    try:
        for _ in obstore.list(store, prefix=loc.prefix or None, chunk_size=1):
            break
    except Exception as exc:  # noqa: BLE001 - obstore raises its own hierarchy
        raise ConfigError(f"{what} {explain(exc, loc.uri)}") from None


class ObjectEntry(NamedTuple):
    rel: str  # key relative to the root's prefix
    size: int
    mtime_ns: int
    etag: str | None


def list_objects(loc: Location) -> Iterator[list[ObjectEntry]]:
    """Every object under ``loc``, a listing page at a time (keys in lexicographic order)."""
    import obstore

    store = open_store(loc)
    prefix = f"{loc.prefix}/" if loc.prefix else None
    cut = len(prefix) if prefix else 0
    try:
        for page in obstore.list(store, prefix=prefix, chunk_size=LIST_PAGE):
            out = []
            for meta in page:
                key = meta["path"]
                if prefix and not key.startswith(prefix):
                    continue
                modified = meta["last_modified"]
                mtime_ns = int(modified.timestamp()) * 1_000_000_000 + modified.microsecond * 1000
                out.append(ObjectEntry(key[cut:], int(meta["size"]), mtime_ns, meta.get("e_tag")))
            yield out
    except StorageUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageUnavailable(f"listing {explain(exc, loc.uri)}") from None


def split_uri(uri: str) -> tuple[Location, str]:
    """An object's URI -> (its bucket as a Location with no prefix, its key)."""
    loc = parse_location(uri, "object")
    return Location(loc.scheme, loc.bucket, ""), loc.prefix


def read_object(uri: str, max_bytes: int) -> bytes:
    """The object's bytes, at most ``max_bytes`` (else ValueError); ObjectMissing, ObjectRefused or
    StorageUnavailable when it cannot be had."""
    import obstore

    bucket, key = split_uri(uri)
    store = open_store(bucket)
    try:
        result = obstore.get(store, key)
        size = int(result.meta["size"])
        if size > max_bytes:
            raise ValueError(f"{uri}: {size} bytes, larger than the {max_bytes}-byte limit")
        return bytes(result.bytes())
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001
        _raise_for(exc, uri)
        raise  # unreachable: _raise_for always raises


def stream_object(uri: str, chunk: int) -> Iterator[bytes]:
    """The object's bytes in chunks of about ``chunk`` bytes (for files too big to hold at once)."""
    import obstore

    bucket, key = split_uri(uri)
    store = open_store(bucket)
    try:
        result = obstore.get(store, key)
        for part in result.stream(min_chunk_size=chunk):
            yield bytes(part)
    except Exception as exc:  # noqa: BLE001
        _raise_for(exc, uri)


IMAGE_READ_LIMIT = 1 << 30  # an object read whole for a thumbnail or a look: larger ones are refused


def image_source(path: Any) -> Any:
    """What ``PIL.Image.open`` takes for ``path``: the path itself, or an object's bytes in memory
    (OSError when it cannot be read, as for a missing file)."""
    if not is_uri(path):
        return path
    import io

    try:
        return io.BytesIO(read_object(str(path), IMAGE_READ_LIMIT))
    except (ObjectMissing, ObjectRefused, StorageUnavailable, ValueError) as exc:
        raise OSError(str(exc)) from None


def cache_dir() -> Path:
    """Where objects needed as local files (weights) are kept: $IMGFEAT_CACHE, else ~/.cache/imgfeat."""
    base = os.environ.get("IMGFEAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "imgfeat")
    return Path(base) / "objects"


def local_copy(uri: str, max_bytes: int = 1 << 34) -> Path:
    """A local file with the object's bytes, for what only reads files (Keras weights): downloaded
    once into ``cache_dir()`` and again only when the object's ETag changes (written to a
    temporary name and renamed, so a crash never leaves half a file under the final name)."""
    import obstore

    bucket, key = split_uri(uri)
    store = open_store(bucket)
    try:
        meta = obstore.head(store, key)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(explain(exc, uri)) from None
    etag = re.sub(r"[^A-Za-z0-9]", "", str(meta.get("e_tag") or meta["size"]))[:64]
    name = key.rpartition("/")[2] or "object"
    target = cache_dir() / bucket.scheme / bucket.bucket / key.rpartition("/")[0] / etag / name
    if target.is_file() and target.stat().st_size == int(meta["size"]):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for chunk in stream_object(uri, 8 << 20):
                fh.write(chunk)
                if fh.tell() > max_bytes:
                    raise ConfigError(f"{uri}: larger than {max_bytes} bytes")
        os.replace(tmp, target)
    except (ObjectMissing, ObjectRefused) as exc:
        raise ConfigError(str(exc)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target

"""Image bytes from a URI: `s3://bucket/key`, `https://host/path` (`http://` only when allowed), `file:///path`.

Safe by default: nothing is fetched unless an allowlist names it (buckets, hosts, folders), no response is
read past `max_bytes` (declared sizes are checked first, and the stream is cut off at `max_bytes + 1` for
servers that lie or send chunked bodies), and redirects are followed by hand so that every hop is checked
against the allowlist. Transient failures (refused or reset connections, timeouts, 5xx, 429, S3 throttling)
are retried with `tenacity`; permanent ones (404, 403, forbidden, too large) fail at once. Every failure is
an `InputError` whose kind says why, except one: an S3 endpoint that does not answer at all once the tries
are spent is an outage of the fleet's storage (`SourceUnavailable`), which the pipeline waits out. Messages
name the URI without userinfo or query string, which may carry credentials.

Parsing choices:
- S3 keys are taken verbatim, after the first `/` following the bucket: not percent-decoded (S3 allows `%`
  in keys) and not split at `?` or `#` (also legal in keys). `s3://b/a%20b.jpg` is the key `a%20b.jpg`.
- file:// paths are percent-decoded (`file:///img/a%20b.jpg` is `/img/a b.jpg`), as RFC 8089 says; a
  literal `?` or `#` in a file name must therefore be written `%3F` / `%23`.

All classes are thread-safe: they keep no per-request state, and httpx and boto3 clients may be shared by
threads. `UriFetcher` is what the replicas use; the three fetchers are usable on their own.

This file runs past the house's 400 lines on purpose: it is the fleet's whole attack surface for inputs
(allowlists, redirects, limits, redaction, retries), kept in one file so that a security review reads
every rule that decides what a replica may fetch in one place.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx
import structlog
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from workers.errors import ErrorKind, InputError, SourceUnavailable
from workers.io.s3 import S3UriError, parse_s3_uri, s3_client
from workers.settings import FetchSettings, S3Settings

log = structlog.get_logger("ramplus.fetch")

MAX_REDIRECTS = 5
CHUNK = 1 << 16
RETRY_WAIT_S = 0.2  # first backoff; doubles per try, with as much jitter again
RETRY_MAX_WAIT_S = 2.0  # short: a fetch thread that sleeps holds up its share of the fleet's throughput

_S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_S3_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_S3_TRANSIENT = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException"}
_S3_INVALID = {"InvalidBucketName", "KeyTooLongError", "InvalidURI", "InvalidObjectName"}


class TransientFetchError(Exception):
    """Worth another try; becomes InputError(FETCH), with the URI prefixed, when the tries run out."""


def redact(uri: str) -> str:
    """The URI for messages and logs: no userinfo, and no query or fragment except in S3 keys (where they
    are part of the key, and S3 URIs carry no credentials)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri[:512]
    if scheme.lower() != "s3":
        rest = rest.split("?", 1)[0].split("#", 1)[0]
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def _too_large(uri: str, size: int | None, limit: int) -> InputError:
    what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return InputError(ErrorKind.TOO_LARGE, f"{redact(uri)}: {what}, over the {limit}-byte limit (RAMPLUS_FETCH__MAX_BYTES)")


def _with_retries(uri: str, attempts: int, wait_s: float, action: Callable[[], bytes]) -> bytes:
    """`action()`, tried up to `attempts` times while it raises TransientFetchError; InputErrors pass at once."""

    def note_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.info("fetch.retry", uri=redact(uri), attempt=state.attempt_number, of=attempts, error=str(error))

    retrying = Retrying(  # one per call: Retrying objects carry per-call state
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=wait_s, max=max(wait_s, RETRY_MAX_WAIT_S)) + wait_random(0, wait_s),
        retry=retry_if_exception_type(TransientFetchError),
        before_sleep=note_retry,
    )
    try:
        return retrying(action)
    except RetryError as exc:
        cause = exc.last_attempt.exception()
        tries = "1 try" if attempts == 1 else f"{attempts} tries"
        raise InputError(
            ErrorKind.FETCH, f"{redact(uri)}: {cause} (gave up after {tries}; RAMPLUS_FETCH__ATTEMPTS)"
        ) from cause


# ------------------------------------------------------------------------------------------------- S3


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key), key verbatim (see the module docstring)."""
    try:
        return parse_s3_uri(uri, key_required=True)
    except S3UriError as exc:
        kind = ErrorKind.FORBIDDEN if exc.reason == "credentials" else ErrorKind.VALIDATION
        raise InputError(kind, f"{redact(uri)}: {exc}") from None


class S3Fetcher:
    """`get_object` from allowlisted buckets. The client is built from `s3` unless one is given."""

    def __init__(
        self, fetch: FetchSettings, s3: S3Settings | None = None, *, client: Any = None, retry_wait_s: float = RETRY_WAIT_S
    ) -> None:
        self.settings = fetch
        self.owns_client = client is None
        self.client = client if client is not None else s3_client(
            # botocore's own retries off: tenacity retries, so RAMPLUS_FETCH__ATTEMPTS means total tries.
            s3 or S3Settings(), pool=max(10, fetch.concurrency), timeout_s=fetch.timeout_s, attempts=1,
        )
        self.retry_wait_s = retry_wait_s

    def fetch(self, uri: str) -> bytes:
        bucket, key = split_s3_uri(uri)
        if not self.settings.bucket_allowed(bucket):
            raise InputError(
                ErrorKind.FORBIDDEN, f"{redact(uri)}: bucket {bucket!r} is not in the allowlist (RAMPLUS_FETCH__S3_BUCKETS)"
            )
        try:
            return _with_retries(uri, self.settings.attempts, self.retry_wait_s, lambda: self._get(uri, bucket, key))
        except InputError as exc:
            # Out of tries: this object's fault, or the whole S3 endpoint's? Only an endpoint that answers
            # for the bucket makes it the request's; one that does not is an outage of the fleet's storage,
            # which the pipeline waits out instead of dead-lettering every request meanwhile.
            if isinstance(exc.__cause__, TransientFetchError) and not self._answers(bucket):
                raise SourceUnavailable(f"{redact(uri)}: the S3 endpoint does not answer ({exc.__cause__})") from exc
            raise

    def _answers(self, bucket: str) -> bool:
        """Whether the endpoint answers a HEAD of the bucket at all (any 4xx counts: it is there)."""
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return 400 <= status < 500 and status != 429
        except Exception:  # unreachable, timeouts, resets
            return False
        return True

    def close(self) -> None:
        if self.owns_client and hasattr(self.client, "close"):
            self.client.close()

    def _get(self, uri: str, bucket: str, key: str) -> bytes:
        limit = self.settings.max_bytes
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                declared = response.get("ContentLength")
                if declared is not None and int(declared) > limit:
                    raise _too_large(uri, int(declared), limit)
                data = body.read(limit + 1)  # capped even when ContentLength is missing or wrong
            finally:
                body.close()
        except ClientError as exc:
            raise self._client_error(uri, exc) from exc
        except NoCredentialsError as exc:
            raise InputError(
                ErrorKind.FETCH,
                f"{redact(uri)}: no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role)",
            ) from exc
        except ParamValidationError as exc:  # botocore's own checks, e.g. a bucket name S3 cannot have
            reason = str(exc).strip().splitlines()[-1]  # the first line is a generic header; the regexes are noise
            raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: invalid S3 location ({reason.split(': ', 1)[0]})") from exc
        except (BotoConnectionError, HTTPClientError, IncompleteReadError) as exc:  # unreachable, timeouts, resets
            raise TransientFetchError(f"{type(exc).__name__}: {exc}") from exc
        except BotoCoreError as exc:  # configuration problems: another try would not help
            raise InputError(ErrorKind.FETCH, f"{redact(uri)}: S3 client error ({type(exc).__name__}: {exc})") from exc
        if len(data) > limit:
            raise _too_large(uri, None, limit)
        return data

    @staticmethod
    def _client_error(uri: str, exc: ClientError) -> Exception:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        what = f"{code} (HTTP {status})" if code and status else code or f"HTTP {status}"
        if code in _S3_NOT_FOUND or status == 404:
            return InputError(ErrorKind.NOT_FOUND, f"{redact(uri)}: no such object or bucket ({what})")
        if code in _S3_DENIED or status in (401, 403):
            return InputError(
                ErrorKind.FORBIDDEN,
                f"{redact(uri)}: the S3 server refused access ({what}); check the fleet's AWS credentials and policy",
            )
        if code in _S3_TRANSIENT or status >= 500 or status == 429:
            return TransientFetchError(f"S3 error {what}")
        if code in _S3_INVALID:
            return InputError(ErrorKind.VALIDATION, f"{redact(uri)}: invalid S3 location ({what})")
        return InputError(ErrorKind.FETCH, f"{redact(uri)}: S3 error {what}")


# ----------------------------------------------------------------------------------------------- HTTP


class HttpFetcher:
    """GET from allowlisted hosts over https (http only with `allow_plain_http`), redirects checked per hop."""

    def __init__(self, fetch: FetchSettings, *, client: httpx.Client | None = None, retry_wait_s: float = RETRY_WAIT_S) -> None:
        self.settings = fetch
        self.owns_client = client is None
        self.client = client if client is not None else httpx.Client(
            follow_redirects=False,  # we follow them ourselves, checking each target
            timeout=httpx.Timeout(fetch.timeout_s),
            limits=httpx.Limits(
                max_connections=max(10, fetch.concurrency * 2), max_keepalive_connections=max(10, fetch.concurrency)
            ),
            # identity: a compressed body could expand past max_bytes in one chunk (and images do not compress).
            headers={"User-Agent": "ramplus-fetcher/0.1", "Accept-Encoding": "identity"},
            trust_env=False,  # no proxies or .netrc credentials picked up from the environment by surprise
        )
        self.retry_wait_s = retry_wait_s

    def check(self, uri: str, origin: str | None = None) -> None:
        """InputError unless `uri` may be fetched; `origin` is the URI that redirected here, if any."""
        where = f"{redact(origin)}: redirected to {redact(uri)}" if origin else redact(uri)
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError as exc:
            raise InputError(ErrorKind.VALIDATION, f"{where}: malformed URI ({exc})") from exc
        if parts.scheme not in ("https", "http"):
            kind = ErrorKind.FORBIDDEN if origin else ErrorKind.VALIDATION
            raise InputError(kind, f"{where}: scheme {parts.scheme or '(none)'!r} is not http(s)")
        if "@" in parts.netloc:
            raise InputError(ErrorKind.FORBIDDEN, f"{where}: credentials in URIs (user:password@) are not allowed")
        if not parts.hostname:
            raise InputError(ErrorKind.VALIDATION, f"{where}: no host")
        if parts.scheme == "http" and not self.settings.allow_plain_http:
            raise InputError(
                ErrorKind.FORBIDDEN, f"{where}: plain http is not allowed, use https (or set RAMPLUS_FETCH__ALLOW_PLAIN_HTTP)"
            )
        if not self.settings.host_allowed(parts.hostname):
            raise InputError(
                ErrorKind.FORBIDDEN, f"{where}: host {parts.hostname!r} is not in the allowlist (RAMPLUS_FETCH__HTTP_HOSTS)"
            )

    def fetch(self, uri: str) -> bytes:
        self.check(uri)
        return _with_retries(uri, self.settings.attempts, self.retry_wait_s, lambda: self._get(uri))

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def _get(self, uri: str) -> bytes:
        current = uri
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with self.client.stream("GET", current) as response:
                    if response.has_redirect_location:
                        target = self._location(uri, current, response.headers["location"])
                        self.check(target, origin=uri)  # every hop must be allowed, not just the first
                        current = target
                        continue
                    return self._body(uri, response)
            except httpx.InvalidURL as exc:
                raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: malformed URI ({exc})") from exc
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:  # not the network's fault
                raise InputError(ErrorKind.FETCH, f"{redact(uri)}: {type(exc).__name__}: {exc}") from exc
            except httpx.TransportError as exc:  # refused, reset, DNS, timeouts, broken responses
                raise TransientFetchError(f"{type(exc).__name__}: {exc}") from exc
        raise InputError(ErrorKind.FETCH, f"{redact(uri)}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _location(uri: str, current: str, location: str) -> str:
        try:
            return urljoin(current, location).split("#", 1)[0]
        except ValueError as exc:  # e.g. a broken IPv6 literal
            raise InputError(ErrorKind.FETCH, f"{redact(uri)}: redirect to a malformed URI ({exc})") from exc

    def _body(self, uri: str, response: httpx.Response) -> bytes:
        status = response.status_code
        if status in (404, 410):
            raise InputError(ErrorKind.NOT_FOUND, f"{redact(uri)}: HTTP {status}")
        if status in (401, 403):
            raise InputError(ErrorKind.FORBIDDEN, f"{redact(uri)}: the server refused access (HTTP {status})")
        if status >= 500 or status == 429:
            raise TransientFetchError(f"HTTP {status}")
        if not 200 <= status < 300:  # other 4xx, and 3xx without a Location
            raise InputError(ErrorKind.FETCH, f"{redact(uri)}: HTTP {status}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InputError(
                ErrorKind.FETCH, f"{redact(uri)}: the server sent Content-Encoding {encoding!r} though identity was asked for"
            )
        limit = self.settings.max_bytes
        declared = response.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(uri, int(declared), limit)
        chunks, size = [], 0
        for chunk in response.iter_raw(CHUNK):
            size += len(chunk)
            if size > limit:  # a server that lies about (or omits) Content-Length is cut off here
                raise _too_large(uri, None, limit)
            chunks.append(chunk)
        return b"".join(chunks)


# ----------------------------------------------------------------------------------------------- file


def _read_at_most(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = os.read(fd, min(left, CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class FileFetcher:
    """Regular files under one of `file_roots`, judged after symlinks and `..` are resolved."""

    def __init__(self, fetch: FetchSettings) -> None:
        self.settings = fetch
        self.roots = [Path(os.path.realpath(root)) for root in fetch.file_roots]

    def path_of(self, uri: str) -> Path:
        """The resolved path `uri` names, or InputError if it is malformed or outside every root."""
        try:
            parts = urlsplit(uri)
        except ValueError as exc:
            raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: malformed URI ({exc})") from exc
        if parts.scheme != "file":
            raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: not a file:// URI")
        if parts.netloc.lower() not in ("", "localhost"):
            host = parts.netloc.rpartition("@")[2]
            raise InputError(ErrorKind.FORBIDDEN, f"{redact(uri)}: file:// URIs must be local (file:///path), not on host {host!r}")
        raw = unquote(parts.path)
        if not raw or raw == "/":
            raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: no path; expected file:///absolute/path")
        if not raw.startswith("/"):
            raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: expected an absolute path, file:///absolute/path")
        if "\x00" in raw:
            raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: NUL byte in path")
        if not self.roots:
            raise InputError(
                ErrorKind.FORBIDDEN, f"{redact(uri)}: no folders are allowed for file:// URIs (RAMPLUS_FETCH__FILE_ROOTS)"
            )
        path = Path(os.path.realpath(raw))  # symlinks and .. resolved before the check: no way out of a root
        if not any(path.is_relative_to(root) for root in self.roots):
            raise InputError(
                ErrorKind.FORBIDDEN, f"{redact(uri)}: resolves to {path}, outside the allowed folders (RAMPLUS_FETCH__FILE_ROOTS)"
            )
        return path

    def fetch(self, uri: str) -> bytes:
        path, limit = self.path_of(uri), self.settings.max_bytes
        # O_NOFOLLOW: a symlink swapped in after the check is refused; O_NONBLOCK: a FIFO cannot hang us.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
            try:
                info = os.fstat(fd)
                if stat.S_ISDIR(info.st_mode):
                    raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: is a folder, not a file")
                if not stat.S_ISREG(info.st_mode):
                    raise InputError(ErrorKind.VALIDATION, f"{redact(uri)}: not a regular file")
                if info.st_size > limit:
                    raise _too_large(uri, info.st_size, limit)
                data = _read_at_most(fd, limit + 1)  # the file may have grown since fstat
            finally:
                os.close(fd)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise InputError(ErrorKind.NOT_FOUND, f"{redact(uri)}: no such file") from exc
        except PermissionError as exc:
            raise InputError(ErrorKind.FORBIDDEN, f"{redact(uri)}: permission denied (the worker cannot read it)") from exc
        except OSError as exc:  # ELOOP from O_NOFOLLOW, EIO, ...
            raise InputError(ErrorKind.FETCH, f"{redact(uri)}: cannot read ({exc.strerror or exc})") from exc
        if len(data) > limit:
            raise _too_large(uri, None, limit)
        return data


# ------------------------------------------------------------------------------------------- dispatch


class UriFetcher:
    """`fetch(uri)` by scheme. Thread-safe; the S3 client is built on first use (not every fleet reads S3)."""

    def __init__(
        self,
        fetch: FetchSettings,
        s3: S3Settings | None = None,
        *,
        s3_client: Any = None,
        http_client: httpx.Client | None = None,
        retry_wait_s: float = RETRY_WAIT_S,
    ) -> None:
        self.settings, self.s3_settings = fetch, s3
        self.retry_wait_s = retry_wait_s
        self._s3_client = s3_client
        self._s3: S3Fetcher | None = None
        self._s3_lock = threading.Lock()
        self.http = HttpFetcher(fetch, client=http_client, retry_wait_s=retry_wait_s)
        self.file = FileFetcher(fetch)

    @property
    def s3(self) -> S3Fetcher:
        if self._s3 is None:
            with self._s3_lock:
                if self._s3 is None:
                    self._s3 = S3Fetcher(self.settings, self.s3_settings, client=self._s3_client, retry_wait_s=self.retry_wait_s)
        return self._s3

    def fetch(self, uri: str) -> bytes:
        """The bytes at `uri`, at most `max_bytes` of them, or an InputError whose kind says why not."""
        scheme = uri.partition("://")[0].lower() if "://" in uri else ""
        if scheme == "s3":
            return self.s3.fetch(uri)
        if scheme in ("https", "http"):
            return self.http.fetch(uri)
        if scheme == "file":
            return self.file.fetch(uri)
        raise InputError(
            ErrorKind.VALIDATION, f"{redact(uri)}: unsupported URI scheme {scheme or '(none)'!r}; expected s3, https, http or file"
        )

    def close(self) -> None:
        """Closes the clients this fetcher made (injected ones belong to the caller)."""
        self.http.close()
        with self._s3_lock:
            if self._s3 is not None:
                self._s3.close()

"""Image bytes from a URI: `s3://`, `https://` (and `http://` only when allowed) or `file://`.

Nothing is fetched unless an allowlist names it (buckets, hosts, folders); no response is read past
`max_bytes`; redirects are followed by hand so that each hop is checked against the allowlist. Transient
failures (timeouts, refused connections, 5xx, throttling) are retried with `tenacity`; permanent ones
(404, 403, forbidden, too large) fail at once. Every failure is an `InputError` whose kind says why.
S3 keys are taken verbatim (not percent-decoded): S3 allows `%` in keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from workers.errors import ErrorKind, InputError
from workers.settings import FetchSettings, S3Settings

MAX_REDIRECTS = 5
CHUNK = 1 << 16


class TransientFetchError(Exception):
    """Worth another try; becomes InputError(FETCH) when the tries run out."""


def _safe(uri: str) -> str:
    """The URI for messages: no userinfo, no query string (either may carry credentials)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else uri


def _too_large(uri: str, size: int | str, limit: int) -> InputError:
    return InputError(ErrorKind.TOO_LARGE, f"{_safe(uri)}: {size} bytes exceeds the {limit}-byte limit (RAMPLUS_FETCH__MAX_BYTES)")


class _Retrying:
    def __init__(self, attempts: int, wait_s: float) -> None:
        self.attempts, self.wait_s = attempts, wait_s

    def call(self, uri: str, fn: Any) -> bytes:
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential_jitter(initial=self.wait_s, max=max(self.wait_s, 2.0)),
                retry=retry_if_exception_type(TransientFetchError),
                reraise=False,
            ):
                with attempt:
                    return fn()
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise InputError(ErrorKind.FETCH, f"{_safe(uri)}: {cause} (after {self.attempts} tries)") from cause
        raise AssertionError("unreachable")


class S3Fetcher:
    def __init__(self, fetch: FetchSettings, s3: S3Settings | None = None, *, client: Any = None, retry_wait_s: float = 0.2) -> None:
        self.settings = fetch
        if client is None:
            from workers.s3_sink import s3_client

            client = s3_client(s3 or S3Settings(), pool=max(10, fetch.concurrency), timeout_s=fetch.timeout_s)
        self.client = client
        self.retrying = _Retrying(fetch.attempts, retry_wait_s)

    def fetch(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not bucket or not key:
            raise InputError(ErrorKind.VALIDATION, f"{uri}: expected s3://bucket/key")
        if not self.settings.bucket_allowed(bucket):
            raise InputError(ErrorKind.FORBIDDEN, f"{uri}: bucket {bucket!r} is not in the allowlist (RAMPLUS_FETCH__S3_BUCKETS)")
        return self.retrying.call(uri, lambda: self._get(uri, bucket, key))

    def _get(self, uri: str, bucket: str, key: str) -> bytes:
        limit = self.settings.max_bytes
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
            size = int(response.get("ContentLength") or 0)
            if size > limit:
                response["Body"].close()
                raise _too_large(uri, size, limit)
            data = response["Body"].read(limit + 1)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, status = str(error.get("Code", "")), int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
                raise InputError(ErrorKind.NOT_FOUND, f"{uri}: no such object ({code or status})") from exc
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
                raise InputError(ErrorKind.FORBIDDEN, f"{uri}: the S3 server refused access ({code or status})") from exc
            if status >= 500 or status == 429 or code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
                raise TransientFetchError(f"S3 {code or status}") from exc
            raise InputError(ErrorKind.FETCH, f"{uri}: S3 error {code or status}") from exc
        except BotoCoreError as exc:  # endpoint unreachable, timeouts, connection resets
            raise TransientFetchError(f"{type(exc).__name__}: {exc}") from exc
        if len(data) > limit:
            raise _too_large(uri, f"more than {limit}", limit)
        return data


class HttpFetcher:
    def __init__(self, fetch: FetchSettings, *, client: httpx.Client | None = None, retry_wait_s: float = 0.2) -> None:
        self.settings = fetch
        self.client = client or httpx.Client(
            follow_redirects=False,
            timeout=httpx.Timeout(fetch.timeout_s),
            limits=httpx.Limits(max_connections=max(10, fetch.concurrency * 2)),
            headers={"User-Agent": "ramplus-fetcher/0.1"},
        )
        self.retrying = _Retrying(fetch.attempts, retry_wait_s)

    def check(self, uri: str) -> None:
        parts = urlsplit(uri)
        if parts.scheme not in ("https", "http"):
            raise InputError(ErrorKind.FORBIDDEN, f"{_safe(uri)}: redirect to a {parts.scheme or 'relative'} URI is not allowed")
        if parts.scheme == "http" and not self.settings.allow_plain_http:
            raise InputError(ErrorKind.FORBIDDEN, f"{_safe(uri)}: plain http is not allowed (RAMPLUS_FETCH__ALLOW_PLAIN_HTTP)")
        if parts.username or parts.password:
            raise InputError(ErrorKind.FORBIDDEN, f"{_safe(uri)}: credentials in URIs are not allowed")
        if not parts.hostname:
            raise InputError(ErrorKind.VALIDATION, f"{_safe(uri)}: no host")
        if not self.settings.host_allowed(parts.hostname):
            raise InputError(ErrorKind.FORBIDDEN, f"{_safe(uri)}: host {parts.hostname!r} is not in the allowlist (RAMPLUS_FETCH__HTTP_HOSTS)")

    def fetch(self, uri: str) -> bytes:
        self.check(uri)
        return self.retrying.call(uri, lambda: self._get(uri))

    def _get(self, uri: str) -> bytes:
        current = uri
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with self.client.stream("GET", current) as response:
                    if response.is_redirect:
                        target = urljoin(current, response.headers.get("location", ""))
                        self.check(target)  # every hop must be allowed, not just the first
                        current = target
                        continue
                    return self._body(uri, response)
            except httpx.TransportError as exc:  # refused, reset, DNS, timeouts
                raise TransientFetchError(f"{type(exc).__name__}: {exc}") from exc
        raise InputError(ErrorKind.FETCH, f"{_safe(uri)}: more than {MAX_REDIRECTS} redirects")

    def _body(self, uri: str, response: httpx.Response) -> bytes:
        status = response.status_code
        if status in (404, 410):
            raise InputError(ErrorKind.NOT_FOUND, f"{_safe(uri)}: HTTP {status}")
        if status in (401, 403):
            raise InputError(ErrorKind.FORBIDDEN, f"{_safe(uri)}: the server refused access (HTTP {status})")
        if status >= 500 or status == 429:
            raise TransientFetchError(f"HTTP {status}")
        if status >= 400 or status < 200:
            raise InputError(ErrorKind.FETCH, f"{_safe(uri)}: HTTP {status}")
        limit = self.settings.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(uri, int(declared), limit)
        chunks, size = [], 0
        for chunk in response.iter_bytes(CHUNK):
            size += len(chunk)
            if size > limit:  # a server that lies about (or omits) Content-Length is cut off here
                raise _too_large(uri, f"more than {limit}", limit)
            chunks.append(chunk)
        return b"".join(chunks)


class FileFetcher:
    def __init__(self, fetch: FetchSettings) -> None:
        self.settings = fetch
        self.roots = [Path(r).resolve() for r in fetch.file_roots]

    def fetch(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InputError(ErrorKind.FORBIDDEN, f"{uri}: file:// URIs must be local (file:///path)")
        raw = unquote(parts.path)
        if not raw.startswith("/"):
            raise InputError(ErrorKind.VALIDATION, f"{uri}: expected an absolute path, file:///path")
        path = Path(os.path.realpath(raw))  # symlinks and .. resolved before the allowlist check
        if not any(path.is_relative_to(root) for root in self.roots):
            raise InputError(ErrorKind.FORBIDDEN, f"{uri}: {path} is outside the allowed folders (RAMPLUS_FETCH__FILE_ROOTS)")
        try:
            size = path.stat().st_size
            if path.is_dir():
                raise InputError(ErrorKind.VALIDATION, f"{uri}: is a folder, not a file")
            if size > self.settings.max_bytes:
                raise _too_large(uri, size, self.settings.max_bytes)
            with path.open("rb") as f:
                data = f.read(self.settings.max_bytes + 1)
        except FileNotFoundError as exc:
            raise InputError(ErrorKind.NOT_FOUND, f"{uri}: no such file") from exc
        except PermissionError as exc:
            raise InputError(ErrorKind.FORBIDDEN, f"{uri}: permission denied") from exc
        except OSError as exc:
            raise InputError(ErrorKind.FETCH, f"{uri}: cannot read ({exc.strerror or exc})") from exc
        if len(data) > self.settings.max_bytes:
            raise _too_large(uri, f"more than {self.settings.max_bytes}", self.settings.max_bytes)
        return data


class UriFetcher:
    """Dispatches by scheme; thread-safe (boto3 and httpx clients are). The S3 client is made on first use."""

    def __init__(
        self,
        fetch: FetchSettings,
        s3: S3Settings | None = None,
        *,
        s3_client: Any = None,
        http_client: httpx.Client | None = None,
        retry_wait_s: float = 0.2,
    ) -> None:
        self.settings, self.s3_settings = fetch, s3
        self._s3_client, self.retry_wait_s = s3_client, retry_wait_s
        self._s3: S3Fetcher | None = None
        self.http = HttpFetcher(fetch, client=http_client, retry_wait_s=retry_wait_s)
        self.file = FileFetcher(fetch)

    @property
    def s3(self) -> S3Fetcher:
        if self._s3 is None:
            self._s3 = S3Fetcher(self.settings, self.s3_settings, client=self._s3_client, retry_wait_s=self.retry_wait_s)
        return self._s3

    def fetch(self, uri: str) -> bytes:
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme == "s3":
            return self.s3.fetch(uri)
        if scheme in ("https", "http"):
            return self.http.fetch(uri)
        if scheme == "file":
            return self.file.fetch(uri)
        raise InputError(ErrorKind.VALIDATION, f"{_safe(uri)}: unsupported URI scheme {scheme or '(none)'!r}")

    def close(self) -> None:
        self.http.client.close()

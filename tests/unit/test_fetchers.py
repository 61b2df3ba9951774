"""URI fetchers: allowlists, size caps, error kinds and retries.

HTTP is tested against a real stdlib server on 127.0.0.1 (plain http, so those tests allow it); S3 error
mapping against a stub client that raises botocore's own errors. Backoff is zero so retries cost nothing.
"""

from __future__ import annotations

import io
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from workers.errors import ErrorKind, InputError, SourceUnavailable
from workers.io.fetchers import FileFetcher, HttpFetcher, S3Fetcher, UriFetcher, redact, split_s3_uri
from workers.settings import FetchSettings, S3Settings

pytestmark = pytest.mark.timeout(30)

BODY = b"\x89PNG fake image bytes"
SMALL = 1000  # max_bytes for the size tests


def settings(**overrides: Any) -> FetchSettings:
    values: dict[str, Any] = {"timeout_s": 2.0, "attempts": 3}
    values.update(overrides)
    return FetchSettings(**values)


def failure(fetch: Callable[[str], bytes], uri: str) -> InputError:
    with pytest.raises(InputError) as info:
        fetch(uri)
    return info.value


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- the test server


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: Counter[str]
    lock: threading.Lock

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with self.lock:
            self.hits[path] += 1
            hit = self.hits[path]
        route = ROUTES.get(path)
        try:
            if route is None:
                self.reply(404, b"no such page")
            else:
                route(self, hit)
        except (ConnectionError, TimeoutError):
            pass  # the client hung up on purpose (too large, timeout)

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.reply(302, headers={"Location": location})

    def chunked(self, total: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b"x" * 8192
        for _ in range(0, total, len(piece)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def unsized(self, total: int) -> None:
        """No Content-Length: the body ends when the connection closes (HTTP/1.0 style)."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        piece = b"y" * 8192
        for _ in range(0, total, len(piece)):
            self.wfile.write(piece)

    def sleepy(self) -> None:
        threading.Event().wait(1.0)
        self.reply(200, BODY)

    @property
    def port(self) -> int:
        return self.server.server_address[1]


ROUTES: dict[str, Callable[[Handler, int], None]] = {
    "/ok": lambda h, hit: h.reply(200, BODY, {"Content-Type": "image/png"}),
    "/gone": lambda h, hit: h.reply(410),
    "/forbidden": lambda h, hit: h.reply(403),
    "/unauthorized": lambda h, hit: h.reply(401),
    "/teapot": lambda h, hit: h.reply(418),
    "/error": lambda h, hit: h.reply(500, b"boom"),
    "/busy": lambda h, hit: h.reply(429),
    "/flaky": lambda h, hit: h.reply(503) if hit == 1 else h.reply(200, BODY),
    "/not-modified": lambda h, hit: h.reply(304),
    "/gzip": lambda h, hit: h.reply(200, b"\x1f\x8b...", {"Content-Encoding": "gzip"}),
    "/declared-large": lambda h, hit: h.reply(200, b"z" * (SMALL * 5)),
    "/chunked-large": lambda h, hit: h.chunked(64 * 1024 * 1024),
    "/unsized-large": lambda h, hit: h.unsized(64 * 1024 * 1024),
    "/unsized-small": lambda h, hit: h.unsized(8192),
    "/slow": lambda h, hit: h.sleepy(),
    "/to-ok": lambda h, hit: h.redirect("/ok"),
    "/to-localhost": lambda h, hit: h.redirect(f"http://localhost:{h.port}/ok"),
    "/to-elsewhere": lambda h, hit: h.redirect("https://evil.example.net/steal"),
    "/to-file": lambda h, hit: h.redirect("file:///etc/passwd"),
    "/loop": lambda h, hit: h.redirect("/loop"),
    "/to-broken": lambda h, hit: h.redirect("http://[broken/x"),
}


class Server:
    def __init__(self, httpd: ThreadingHTTPServer, hits: Counter[str]) -> None:
        self.httpd, self.hits = httpd, hits
        self.port = httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def http_server() -> Iterator[Server]:
    hits: Counter[str] = Counter()
    handler = type("TestHandler", (Handler,), {"hits": hits, "lock": threading.Lock()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Server(httpd, hits)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(http_server: Server) -> Server:
    http_server.hits.clear()
    return http_server


@pytest.fixture
def http() -> Iterator[Callable[..., UriFetcher]]:
    """Factory: a UriFetcher that may read plain http from 127.0.0.1, with zero backoff."""
    made: list[UriFetcher] = []

    def make(**overrides: Any) -> UriFetcher:
        values: dict[str, Any] = {"http_hosts": ["127.0.0.1"], "allow_plain_http": True}
        values.update(overrides)
        fetcher = UriFetcher(settings(**values), retry_wait_s=0)
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        fetcher.close()


# ------------------------------------------------------------------------------------------------ HTTP


def test_http_ok(server: Server, http) -> None:
    assert http().fetch(server.url("/ok")) == BODY


def test_http_fetches_from_many_threads(server: Server, http) -> None:
    fetcher = http(concurrency=8)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetcher.fetch, [server.url("/ok")] * 32))
    assert results == [BODY] * 32


def test_https_required_by_default() -> None:
    fetcher = UriFetcher(settings(http_hosts=["images.example.com"]))
    error = failure(fetcher.fetch, "http://images.example.com/a.jpg")
    assert error.kind is ErrorKind.FORBIDDEN
    assert "http://images.example.com/a.jpg" in str(error) and "RAMPLUS_FETCH__ALLOW_PLAIN_HTTP" in str(error)


def test_host_not_in_allowlist() -> None:
    fetcher = UriFetcher(settings(http_hosts=["*.example.com"]))
    error = failure(fetcher.fetch, "https://evil.example.net/a.jpg")
    assert error.kind is ErrorKind.FORBIDDEN
    assert "'evil.example.net'" in str(error) and "RAMPLUS_FETCH__HTTP_HOSTS" in str(error)
    assert failure(fetcher.fetch, "https://example.com.evil.net/a.jpg").kind is ErrorKind.FORBIDDEN


def test_raw_ip_needs_its_own_entry() -> None:
    fetcher = UriFetcher(settings(http_hosts=["*.example.com"]))
    assert failure(fetcher.fetch, "https://10.0.0.1/a.jpg").kind is ErrorKind.FORBIDDEN
    assert failure(fetcher.fetch, "https://[::1]/a.jpg").kind is ErrorKind.FORBIDDEN


def test_userinfo_refused_and_not_echoed() -> None:
    fetcher = UriFetcher(settings(http_hosts=["images.example.com"]))
    error = failure(fetcher.fetch, "https://alice:hunter2@images.example.com/a.jpg")
    assert error.kind is ErrorKind.FORBIDDEN
    assert "credentials" in str(error) and "hunter2" not in str(error) and "alice" not in str(error)
    assert failure(fetcher.fetch, "https://token@images.example.com/a.jpg").kind is ErrorKind.FORBIDDEN


def test_malformed_http_uris() -> None:
    fetcher = UriFetcher(settings(http_hosts=["*"]))
    for uri in ("https:///a.jpg", "https://images.example.com:99999/a.jpg", "https://[not-ipv6/a.jpg"):
        error = failure(fetcher.fetch, uri)
        assert error.kind is ErrorKind.VALIDATION, uri


def test_http_404_and_410_are_not_found(server: Server, http) -> None:
    for path in ("/missing", "/gone"):
        error = failure(http().fetch, server.url(path))
        assert error.kind is ErrorKind.NOT_FOUND
        assert server.url(path) in str(error)
    assert server.hits["/missing"] == 1  # permanent: not retried


def test_query_string_not_echoed(server: Server, http) -> None:
    error = failure(http().fetch, server.url("/missing?X-Amz-Signature=s3cret"))
    assert error.kind is ErrorKind.NOT_FOUND
    assert server.url("/missing") in str(error) and "s3cret" not in str(error)


def test_http_401_403_forbidden(server: Server, http) -> None:
    for path in ("/forbidden", "/unauthorized"):
        error = failure(http().fetch, server.url(path))
        assert error.kind is ErrorKind.FORBIDDEN
        assert "refused access" in str(error) and server.url(path) in str(error)
        assert server.hits[path] == 1


def test_other_4xx_is_fetch_without_retry(server: Server, http) -> None:
    error = failure(http().fetch, server.url("/teapot"))
    assert error.kind is ErrorKind.FETCH and "HTTP 418" in str(error)
    assert server.hits["/teapot"] == 1


def test_5xx_retried_then_fetch(server: Server, http) -> None:
    error = failure(http(attempts=3).fetch, server.url("/error"))
    assert error.kind is ErrorKind.FETCH
    assert "HTTP 500" in str(error) and "3 tries" in str(error) and server.url("/error") in str(error)
    assert server.hits["/error"] == 3


def test_429_retried(server: Server, http) -> None:
    assert failure(http(attempts=2).fetch, server.url("/busy")).kind is ErrorKind.FETCH
    assert server.hits["/busy"] == 2


def test_transient_failure_recovers(server: Server, http) -> None:
    assert http(attempts=3).fetch(server.url("/flaky")) == BODY
    assert server.hits["/flaky"] == 2


def test_connection_refused_is_fetch(http) -> None:
    uri = f"http://127.0.0.1:{closed_port()}/a.jpg"
    error = failure(http(attempts=2).fetch, uri)
    assert error.kind is ErrorKind.FETCH
    assert uri in str(error) and "ConnectError" in str(error) and "2 tries" in str(error)


def test_read_timeout_is_fetch(server: Server, http) -> None:
    error = failure(http(attempts=2, timeout_s=0.2).fetch, server.url("/slow"))
    assert error.kind is ErrorKind.FETCH and "Timeout" in str(error)
    assert server.hits["/slow"] == 2


def test_too_large_by_content_length(server: Server, http) -> None:
    error = failure(http(max_bytes=SMALL).fetch, server.url("/declared-large"))
    assert error.kind is ErrorKind.TOO_LARGE
    assert f"{SMALL * 5} bytes" in str(error) and "RAMPLUS_FETCH__MAX_BYTES" in str(error)
    assert server.hits["/declared-large"] == 1


@pytest.mark.parametrize("path", ["/chunked-large", "/unsized-large"])
def test_too_large_while_streaming(server: Server, http, path: str) -> None:
    """64 MiB with no usable Content-Length: cut off after max_bytes, not read to the end."""
    error = failure(http(max_bytes=SMALL).fetch, server.url(path))
    assert error.kind is ErrorKind.TOO_LARGE and server.url(path) in str(error)
    assert server.hits[path] == 1


def test_unsized_body_within_limit(server: Server, http) -> None:
    assert http().fetch(server.url("/unsized-small")) == b"y" * 8192


def test_compressed_response_refused(server: Server, http) -> None:
    error = failure(http().fetch, server.url("/gzip"))
    assert error.kind is ErrorKind.FETCH and "Content-Encoding 'gzip'" in str(error)


def test_3xx_without_location(server: Server, http) -> None:
    error = failure(http().fetch, server.url("/not-modified"))
    assert error.kind is ErrorKind.FETCH and "HTTP 304" in str(error)


def test_redirect_followed(server: Server, http) -> None:
    assert http().fetch(server.url("/to-ok")) == BODY
    assert http(http_hosts=["127.0.0.1", "localhost"]).fetch(server.url("/to-localhost")) == BODY
    assert server.hits["/ok"] == 2


def test_redirect_to_disallowed_host(server: Server, http) -> None:
    error = failure(http().fetch, server.url("/to-localhost"))
    assert error.kind is ErrorKind.FORBIDDEN
    assert server.url("/to-localhost") in str(error) and "redirected to" in str(error) and "'localhost'" in str(error)
    assert server.hits["/ok"] == 0
    error = failure(http(http_hosts=["127.0.0.1", "*.example.com"]).fetch, server.url("/to-elsewhere"))
    assert error.kind is ErrorKind.FORBIDDEN and "'evil.example.net'" in str(error)


def test_redirect_to_file_refused(server: Server, http) -> None:
    error = failure(http(file_roots=[Path("/")]).fetch, server.url("/to-file"))
    assert error.kind is ErrorKind.FORBIDDEN and "'file'" in str(error)


def test_redirect_to_malformed_uri(server: Server, http) -> None:
    error = failure(http().fetch, server.url("/to-broken"))
    assert error.kind is ErrorKind.FETCH and "malformed" in str(error)


def test_redirect_loop_gives_up(server: Server, http) -> None:
    error = failure(http().fetch, server.url("/loop"))
    assert error.kind is ErrorKind.FETCH and "redirects" in str(error)
    assert server.hits["/loop"] == 6


def test_injected_http_client_not_closed(server: Server) -> None:
    import httpx

    client = httpx.Client()
    fetcher = UriFetcher(settings(http_hosts=["127.0.0.1"], allow_plain_http=True), http_client=client)
    assert fetcher.fetch(server.url("/ok")) == BODY
    fetcher.close()
    assert not client.is_closed
    client.close()


# ------------------------------------------------------------------------------------------------ file


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/root (allowed) with a.jpg, 'a b.jpg', sub/, big.bin; tmp/secret.txt and tmp/root-evil/x outside."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(BODY)
    (root / "a b.jpg").write_bytes(BODY + b"!")
    (root / "big.bin").write_bytes(b"\0" * (SMALL + 1))
    (tmp_path / "secret.txt").write_text("top secret")
    (tmp_path / "root-evil").mkdir()
    (tmp_path / "root-evil" / "x").write_text("outside")
    return tmp_path


def files(tree: Path, **overrides: Any) -> UriFetcher:
    values: dict[str, Any] = {"file_roots": [tree / "root"], "max_bytes": SMALL}
    values.update(overrides)
    return UriFetcher(settings(**values))


def test_file_ok(tree: Path) -> None:
    fetcher = files(tree)
    assert fetcher.fetch(f"file://{tree}/root/a.jpg") == BODY
    assert fetcher.fetch(f"file://localhost{tree}/root/a.jpg") == BODY
    assert fetcher.fetch(f"file://{tree}/root/a%20b.jpg") == BODY + b"!"  # percent-decoded
    assert fetcher.fetch(f"file://{tree}/root/sub/../a.jpg") == BODY  # .. that stays inside is fine


def test_file_traversal_refused(tree: Path) -> None:
    fetcher = files(tree)
    for uri in (f"file://{tree}/root/../secret.txt", f"file://{tree}/root/%2e%2e/secret.txt", f"file://{tree}/root-evil/x"):
        error = failure(fetcher.fetch, uri)
        assert error.kind is ErrorKind.FORBIDDEN, uri
        assert "outside the allowed folders" in str(error) and "RAMPLUS_FETCH__FILE_ROOTS" in str(error)


def test_file_etc_passwd_refused(tree: Path) -> None:
    error = failure(files(tree).fetch, f"file://{tree}/root/../../../../../../etc/passwd")
    assert error.kind is ErrorKind.FORBIDDEN and "/etc/passwd" in str(error)


def test_symlink_out_of_root_refused(tree: Path) -> None:
    (tree / "root" / "link.jpg").symlink_to(tree / "secret.txt")
    (tree / "root" / "dirlink").symlink_to(tree)
    fetcher = files(tree)
    assert failure(fetcher.fetch, f"file://{tree}/root/link.jpg").kind is ErrorKind.FORBIDDEN
    assert failure(fetcher.fetch, f"file://{tree}/root/dirlink/secret.txt").kind is ErrorKind.FORBIDDEN


def test_symlink_within_root_followed(tree: Path) -> None:
    (tree / "root" / "sub" / "alias.jpg").symlink_to(tree / "root" / "a.jpg")
    assert files(tree).fetch(f"file://{tree}/root/sub/alias.jpg") == BODY


def test_symlinked_root_itself(tree: Path) -> None:
    """A root given through a symlink is compared after resolving it too."""
    (tree / "rootlink").symlink_to(tree / "root")
    fetcher = files(tree, file_roots=[tree / "rootlink"])
    assert fetcher.fetch(f"file://{tree}/rootlink/a.jpg") == BODY
    assert fetcher.fetch(f"file://{tree}/root/a.jpg") == BODY


def test_file_missing(tree: Path) -> None:
    uri = f"file://{tree}/root/nope.jpg"
    error = failure(files(tree).fetch, uri)
    assert error.kind is ErrorKind.NOT_FOUND and uri in str(error)
    assert failure(files(tree).fetch, f"file://{tree}/root/a.jpg/x").kind is ErrorKind.NOT_FOUND


def test_file_folder_and_fifo(tree: Path) -> None:
    error = failure(files(tree).fetch, f"file://{tree}/root/sub")
    assert error.kind is ErrorKind.VALIDATION and "folder" in str(error)
    os.mkfifo(tree / "root" / "pipe")
    error = failure(files(tree).fetch, f"file://{tree}/root/pipe")  # must not block waiting for a writer
    assert error.kind is ErrorKind.VALIDATION and "regular file" in str(error)


def test_file_too_large(tree: Path) -> None:
    error = failure(files(tree).fetch, f"file://{tree}/root/big.bin")
    assert error.kind is ErrorKind.TOO_LARGE and f"{SMALL + 1} bytes" in str(error)


def test_file_on_remote_host_refused(tree: Path) -> None:
    error = failure(files(tree).fetch, "file://fileserver/share/a.jpg")
    assert error.kind is ErrorKind.FORBIDDEN and "'fileserver'" in str(error)
    error = failure(files(tree).fetch, f"file://bob:pw@localhost{tree}/root/a.jpg")
    assert error.kind is ErrorKind.FORBIDDEN and "pw" not in str(error)


def test_file_without_roots_refused(tree: Path) -> None:
    error = failure(files(tree, file_roots=[]).fetch, f"file://{tree}/root/a.jpg")
    assert error.kind is ErrorKind.FORBIDDEN and "RAMPLUS_FETCH__FILE_ROOTS" in str(error)


def test_file_malformed(tree: Path) -> None:
    for uri in ("file://", "file:///", "file:///a%00b"):
        assert failure(files(tree).fetch, uri).kind is ErrorKind.VALIDATION, uri


def test_file_permission_denied(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI runs as root, which reads any file: the OS's refusal is simulated at the open call.
    locked = tree / "root" / "locked.jpg"
    locked.write_bytes(BODY)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    assert failure(files(tree).fetch, f"file://{locked}").kind is ErrorKind.FORBIDDEN


# -------------------------------------------------------------------------------------------------- S3


class StubBody(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.amounts: list[int | None] = []

    def read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
        self.amounts.append(amt)
        return super().read(amt)


class StubS3:
    """get_object answers from a script: each entry is bytes (an object), an exception, or (bytes, length)."""

    def __init__(self, *script: Any, head: Exception | None = None) -> None:
        self.script = list(script)
        self.calls: list[dict[str, str]] = []
        self.bodies: list[StubBody] = []
        self.head = head  # what head_bucket raises (None: the endpoint answers)
        self.heads: list[str] = []

    def head_bucket(self, Bucket: str) -> dict[str, Any]:  # noqa: N803 - boto3's name
        self.heads.append(Bucket)
        if self.head is not None:
            raise self.head
        return {}

    def get_object(self, **kwargs: str) -> dict[str, Any]:
        self.calls.append(kwargs)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        data, length = step if isinstance(step, tuple) else (step, len(step))
        body = StubBody(data)
        self.bodies.append(body)
        return {"Body": body, **({"ContentLength": length} if length is not None else {})}


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "stub"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def s3(stub: StubS3, **overrides: Any) -> UriFetcher:
    values: dict[str, Any] = {"s3_buckets": ["images", "team-*"], "max_bytes": SMALL}
    values.update(overrides)
    return UriFetcher(settings(**values), s3_client=stub, retry_wait_s=0)


def test_s3_ok_and_key_verbatim() -> None:
    stub = StubS3(BODY)
    fetcher = s3(stub)
    assert fetcher.fetch("s3://images/dir/a%20b?v=1#x.jpg") == BODY
    assert fetcher.fetch("s3://team-blue/k.jpg") == BODY  # glob pattern
    assert stub.calls == [{"Bucket": "images", "Key": "dir/a%20b?v=1#x.jpg"}, {"Bucket": "team-blue", "Key": "k.jpg"}]
    assert all(body.closed for body in stub.bodies)


def test_split_s3_uri() -> None:
    assert split_s3_uri("S3://b/a/b/c") == ("b", "a/b/c")
    assert split_s3_uri("s3://b//lead") == ("b", "/lead")


def test_s3_bucket_not_allowed() -> None:
    stub = StubS3(BODY)
    error = failure(s3(stub).fetch, "s3://other/k.jpg")
    assert error.kind is ErrorKind.FORBIDDEN
    assert str(error) == "s3://other/k.jpg: bucket 'other' is not in the allowlist (RAMPLUS_FETCH__S3_BUCKETS)"
    assert stub.calls == []


def test_s3_malformed() -> None:
    for uri, problem in (("s3://images", "no key"), ("s3://images/", "no key"), ("s3:///k.jpg", "no bucket")):
        error = failure(s3(StubS3(BODY)).fetch, uri)
        assert error.kind is ErrorKind.VALIDATION and problem in str(error), uri


def test_s3_userinfo_refused() -> None:
    error = failure(s3(StubS3(BODY)).fetch, "s3://AKIAXXX:s3cret@images/k.jpg")
    assert error.kind is ErrorKind.FORBIDDEN and "s3cret" not in str(error) and "AKIAXXX" not in str(error)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (client_error("NoSuchKey", 404), ErrorKind.NOT_FOUND),
        (client_error("NoSuchBucket", 404), ErrorKind.NOT_FOUND),
        (client_error("404", 404), ErrorKind.NOT_FOUND),
        (client_error("AccessDenied", 403), ErrorKind.FORBIDDEN),
        (client_error("InvalidBucketName", 400), ErrorKind.VALIDATION),
        (client_error("InvalidRange", 416), ErrorKind.FETCH),
        (NoCredentialsError(), ErrorKind.FETCH),
    ],
)
def test_s3_permanent_errors(error: Exception, kind: ErrorKind) -> None:
    stub = StubS3(error)
    failed = failure(s3(stub).fetch, "s3://images/k.jpg")
    assert failed.kind is kind and "s3://images/k.jpg" in str(failed)
    assert len(stub.calls) == 1  # never retried


@pytest.mark.parametrize(
    "error",
    [client_error("SlowDown", 503), client_error("InternalError", 500), client_error("Weird", 502),
     EndpointConnectionError(endpoint_url="http://127.0.0.1:1/images/k.jpg")],
)
def test_s3_transient_errors_retried(error: Exception) -> None:
    stub = StubS3(error)
    failed = failure(s3(stub, attempts=3).fetch, "s3://images/k.jpg")
    assert failed.kind is ErrorKind.FETCH and "3 tries" in str(failed) and "s3://images/k.jpg" in str(failed)
    assert len(stub.calls) == 3


@pytest.mark.parametrize("head", [EndpointConnectionError(endpoint_url="http://127.0.0.1:1/images"), client_error("x", 503)])
def test_s3_endpoint_that_does_not_answer_is_an_outage_not_the_requests_fault(head: Exception) -> None:
    stub = StubS3(EndpointConnectionError(endpoint_url="http://127.0.0.1:1/images/k.jpg"), head=head)
    with pytest.raises(SourceUnavailable, match="s3://images/k.jpg: the S3 endpoint does not answer"):
        s3(stub, attempts=2).fetch("s3://images/k.jpg")
    assert len(stub.calls) == 2 and stub.heads == ["images"]


def test_s3_endpoint_that_answers_the_bucket_makes_a_failing_object_the_requests_fault() -> None:
    stub = StubS3(client_error("InternalError", 500), head=client_error("AccessDenied", 403))
    assert failure(s3(stub, attempts=2).fetch, "s3://images/k.jpg").kind is ErrorKind.FETCH
    assert stub.heads == ["images"]


def test_s3_recovers_after_slowdown() -> None:
    stub = StubS3(client_error("SlowDown", 503), BODY)
    assert s3(stub, attempts=3).fetch("s3://images/k.jpg") == BODY
    assert len(stub.calls) == 2


def test_s3_too_large_by_content_length() -> None:
    stub = StubS3(b"z" * (SMALL + 1))
    error = failure(s3(stub).fetch, "s3://images/big.bin")
    assert error.kind is ErrorKind.TOO_LARGE and f"{SMALL + 1} bytes" in str(error)
    assert stub.bodies[0].amounts == [] and stub.bodies[0].closed  # not read at all


@pytest.mark.parametrize("length", [None, 10])
def test_s3_too_large_while_reading(length: int | None) -> None:
    """A missing or wrong ContentLength does not get past the cap: at most max_bytes + 1 are read."""
    stub = StubS3((b"z" * (SMALL * 10), length))
    error = failure(s3(stub).fetch, "s3://images/big.bin")
    assert error.kind is ErrorKind.TOO_LARGE
    assert stub.bodies[0].amounts == [SMALL + 1]


def test_s3_client_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings-built client (env credentials, path style) against a closed port: an outage after tries."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    fetch = settings(s3_buckets=["images"], attempts=2, timeout_s=1)
    fetcher = UriFetcher(fetch, S3Settings(endpoint_url=endpoint), retry_wait_s=0)
    try:
        config = fetcher.s3.client.meta.config
        assert config.s3 == {"addressing_style": "path"} and config.retries["total_max_attempts"] == 1
        with pytest.raises(SourceUnavailable) as caught:
            fetcher.fetch("s3://images/k.jpg")
        assert "2 tries" in str(caught.value.__cause__) and "test-secret" not in str(caught.value)
    finally:
        fetcher.close()


# -------------------------------------------------------------------------------------------- dispatch


def test_unsupported_scheme() -> None:
    fetcher = UriFetcher(settings())
    for uri in ("ftp://host/a.jpg", "/etc/passwd", "gs://bucket/a.jpg"):
        error = failure(fetcher.fetch, uri)
        assert error.kind is ErrorKind.VALIDATION and "unsupported URI scheme" in str(error), uri


def test_nothing_allowed_by_default(tree: Path) -> None:
    fetcher = UriFetcher(FetchSettings(), s3_client=StubS3(BODY))
    for uri in ("s3://images/k.jpg", "https://images.example.com/a.jpg", f"file://{tree}/root/a.jpg"):
        assert failure(fetcher.fetch, uri).kind is ErrorKind.FORBIDDEN, uri


def test_redact() -> None:
    assert redact("https://u:p@host:8443/a/b.jpg?sig=x#f") == "https://host:8443/a/b.jpg"
    assert redact("https://host?sig=x") == "https://host"
    assert redact("s3://bucket/a?b#c") == "s3://bucket/a?b#c"  # part of the key
    assert redact("file:///p/a.jpg") == "file:///p/a.jpg"


def test_fetchers_usable_alone(tree: Path) -> None:
    fetch = settings(file_roots=[tree / "root"], s3_buckets=["images"])
    assert FileFetcher(fetch).fetch(f"file://{tree}/root/a.jpg") == BODY
    assert S3Fetcher(fetch, client=StubS3(BODY)).fetch("s3://images/k") == BODY
    fetcher = HttpFetcher(fetch)
    assert failure(fetcher.fetch, "https://images.example.com/a.jpg").kind is ErrorKind.FORBIDDEN
    fetcher.close()

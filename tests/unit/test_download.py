"""`fetch_checkpoint` against a real local HTTP server: cache, resume, checksum."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from ramplus_core import CheckpointError
from ramplus_core import registry
from workers.io.download import fetch_checkpoint

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str | None] = []
    body = PAYLOAD

    def do_GET(self):  # noqa: N802
        _Handler.requests.append(self.headers.get("Range"))
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        data = _Handler.body[start:]
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/test.pth"
    entry = registry.KnownCheckpoint(
        name="test", url=url, sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), config="tiny@64", description="t"
    )
    monkeypatch.setitem(registry.KNOWN_CHECKPOINTS, "test", entry)
    _Handler.requests = []
    _Handler.body = PAYLOAD
    yield url
    httpd.shutdown()


def test_downloads_verifies_and_caches(server, tmp_path):
    path = fetch_checkpoint("test", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert fetch_checkpoint("test", cache_dir=tmp_path, progress=False) == path
    assert _Handler.requests == [None]  # the second call was served from the cache


def test_resumes_a_partial_download(server, tmp_path):
    (tmp_path / "test.pth.part").write_bytes(PAYLOAD[:1000])
    path = fetch_checkpoint("test", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert _Handler.requests == ["bytes=1000-"]


def test_a_corrupted_download_is_deleted_and_reported(server, tmp_path):
    _Handler.body = PAYLOAD[:-1] + b"\x00"
    with pytest.raises(CheckpointError, match="sha256"):
        fetch_checkpoint("test", cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint 'nope'"):
        fetch_checkpoint("nope", cache_dir=tmp_path)

"""A hostile corpus through the fleet: every message ends as a result or a dead letter with a reason.

Good requests (plain, from a gzip-compressing producer, over HTTP, odd but valid) mixed with more than 40
kinds of hostile message: at and near the broker's size limit, NUL-filled, binary, pickled, compressed by
the sender, nested 100,000 deep, unpaired surrogates, loopback, link-local and cloud-metadata hosts, files
outside the roots, schemes we do not fetch, unknown vocabularies, a decompression bomb, and an HTTP origin
of our own that redirects to the metadata service, fails, lies about sizes, stalls or compresses.
Acceptance: no dead letter of kind `internal`, each hostile message dead-lettered with its kind, each good
one tagged exactly once, and every partition's committed offset at its end.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import http.server
import io
import json
import pickle
import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image

from fleet_kit import (
    committed_reaches_end, fleet_settings, jpeg_bytes, make_topics, random_images, result_ids, upload_images,
    wait_for_ids,
)
from infra.local.kit import wait_until
from workers.stream.fleet import Fleet

pytestmark = pytest.mark.integration
BROKER_LIMIT = 1_048_588  # Kafka's default message.max.bytes (the local stack keeps it)
GOOD_JPEG = jpeg_bytes(random_images(1, seed=2)[0])


class Origin(http.server.BaseHTTPRequestHandler):
    """An HTTP server of our own, allowlisted: what a hostile or broken origin does."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        route = self.path.split("?")[0]
        if route == "/good.jpg":
            self._send(200, GOOD_JPEG, {"Content-Type": "image/jpeg"})
        elif route == "/to-metadata":
            self._send(302, b"", {"Location": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"})
        elif route == "/to-file":
            self._send(302, b"", {"Location": "file:///etc/passwd"})
        elif route == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif route == "/missing.jpg":
            self._send(404, b"no")
        elif route == "/error":
            self._send(500, b"boom")
        elif route == "/lies-about-size":
            self._send(200, b"x" * 100, {"Content-Length": str(10**10)}, length=False)
        elif route == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(400):  # 4 MB, no Content-Length: cut off at max_bytes
                    self.wfile.write(b"\xff" * 10_000)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif route == "/stalls":
            time.sleep(8)
            self._send(200, GOOD_JPEG)
        elif route == "/gzipped":
            self._send(200, gzip.compress(GOOD_JPEG), {"Content-Encoding": "gzip"})
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *, length: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def req(id_: str, uri: str, **extra) -> bytes:
    return json.dumps({"id": id_, "uri": uri, **extra}).encode()


def decompression_bomb() -> bytes:
    """100 megapixels of one colour: a few KB of PNG that would be 100 MB+ decoded."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def hostile_cases(bucket: str, origin: str, near_limit: int) -> dict[str, tuple[bytes | None, str, bytes | None]]:
    """name -> (value, expected dead-letter kind, key); key None: the name."""
    s3 = f"s3://{bucket}"
    deep = b'{"id": "deep-meta", "uri": "' + s3.encode() + b'/images/0000.jpg", "meta": {"a": ' + b"[" * 900 + b"]" * 900 + b"}}"
    cases: dict[str, tuple[bytes | None, str, bytes | None]] = {
        # the bytes themselves
        "nul-megabyte": (b"\x00" * 1_000_000, "too_large", None),
        "nul-250k": (b"\x00" * 250_000, "malformed", None),  # the old envelope: 1.5 MB, over the limit
        "at-the-broker-limit": (req("big", f"{s3}/images/0000.jpg", meta={"pad": "x" * near_limit}), "too_large", None),
        "just-over-the-request-limit": (req("big2", f"{s3}/images/0000.jpg", meta={"pad": "y" * 262_144}), "too_large", None),
        "invalid-utf8": (b'{"id": "\xff\xfe", "uri": "s3://x/y"}', "malformed", None),
        "binary-noise": (bytes(range(256)) * 40, "malformed", None),
        "pickled": (pickle.dumps({"id": "p", "uri": f"{s3}/images/0000.jpg"}), "malformed", None),
        "gzip-by-the-sender": (gzip.compress(req("gz", f"{s3}/images/0000.jpg")), "malformed", None),
        "tombstone": (None, "malformed", None),
        "empty": (b"", "malformed", None),
        "json-array": (b'["id", "uri"]', "malformed", None),
        "json-string": (b'"s3://bucket/key.jpg"', "malformed", None),
        "bom": (b"\xef\xbb\xbf" + req("bom", f"{s3}/images/0000.jpg"), "malformed", None),
        "truncated-json": (b'{"id": "t", "uri": "s3://', "malformed", None),
        "nested-100k": (b"[" * 100_000 + b"]" * 100_000, "validation", None),
        "nested-meta-900": (deep, "validation", None),
        "unpaired-surrogate": (b'{"id": "s", "uri": "s3://b/k.jpg", "meta": {"x": "\\ud800"}}', "validation", None),
        "huge-integer": (b'{"id": "n", "uri": "s3://b/k.jpg", "meta": {"n": ' + b"7" * 6000 + b"}}", "validation", None),
        "nan": (b'{"id": "nan", "uri": "s3://b/k.jpg", "meta": {"x": NaN}}', "validation", None),
        "id-too-long": (req("i" * 600, f"{s3}/images/0000.jpg"), "validation", None),
        "no-uri": (b'{"id": "nouri"}', "validation", None),
        "huge-key": (b"{bad", "malformed", b"K" * 900_000),
        # where it points
        "metadata-ip": (req("md1", "http://169.254.169.254/latest/meta-data/"), "forbidden", None),
        "metadata-google": (req("md2", "http://metadata.google.internal/computeMetadata/v1/"), "forbidden", None),
        "metadata-ipv6": (req("md3", "http://[fd00:ec2::254]/latest/meta-data/"), "forbidden", None),
        "link-local": (req("ll", "https://169.254.10.10/x.jpg"), "forbidden", None),
        "loopback-name": (req("lo1", f"http://localhost:{origin.rsplit(':', 1)[1]}/good.jpg"), "forbidden", None),
        "loopback-v6": (req("lo2", "http://[::1]/x.jpg"), "forbidden", None),
        "loopback-decimal": (req("lo3", "http://2130706433/x.jpg"), "forbidden", None),
        "credentials-in-uri": (req("cred", "https://user:secret@images.example.com/a.jpg"), "forbidden", None),
        "file-outside-roots": (req("f1", "file:///etc/passwd"), "forbidden", None),
        "file-proc": (req("f2", "file:///proc/self/environ"), "forbidden", None),
        "file-remote-host": (req("f3", "file://evil.example.com/etc/passwd"), "forbidden", None),
        "other-bucket": (req("b1", "s3://someone-elses-bucket/a.jpg"), "forbidden", None),
        "scheme-gopher": (req("sc1", "gopher://example.com/1"), "validation", None),
        "scheme-ftp": (req("sc2", "ftp://example.com/a.jpg"), "validation", None),
        "scheme-data": (req("sc3", "data:image/png;base64,iVBORw0KGgo="), "validation", None),
        "scheme-javascript": (req("sc4", "javascript:alert(1)"), "validation", None),
        "unknown-vocabulary": (req("v1", f"{s3}/images/0000.jpg", vocab="no-such-vocabulary@7"), "validation", None),
        "bad-vocabulary-ref": (req("v2", f"{s3}/images/0000.jpg", vocab="a@b@c"), "validation", None),
        # what it points at
        "decompression-bomb": (req("bomb", f"{s3}/hostile/bomb.png"), "too_large", None),
        "corrupt-jpeg": (req("cj", f"{s3}/hostile/corrupt.jpg"), "decode", None),
        "not-an-image": (req("ni", f"{s3}/hostile/text.jpg"), "not_image", None),
        "too-many-bytes": (req("tb", f"{s3}/hostile/big.bin"), "too_large", None),
        "missing-object": (req("mo", f"{s3}/hostile/missing.jpg"), "not_found", None),
        # an origin of our own
        "redirect-to-metadata": (req("h1", f"{origin}/to-metadata"), "forbidden", None),
        "redirect-to-file": (req("h2", f"{origin}/to-file"), "forbidden", None),
        "redirect-loop": (req("h3", f"{origin}/loop"), "fetch", None),
        "http-404": (req("h4", f"{origin}/missing.jpg"), "not_found", None),
        "http-500": (req("h5", f"{origin}/error"), "fetch", None),
        "lies-about-size": (req("h6", f"{origin}/lies-about-size"), "too_large", None),
        "endless-body": (req("h7", f"{origin}/endless"), "too_large", None),
        "stalls": (req("h8", f"{origin}/stalls"), "fetch", None),
        "content-encoding": (req("h9", f"{origin}/gzipped"), "fetch", None),
    }
    return cases


def test_a_hostile_corpus_ends_in_results_and_dead_letters_and_commits_every_partition_to_its_end(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    topic, dlq = make_topics(stack.kafka_bootstrap, f"hostile-{uuid.uuid4().hex[:8]}")
    keys = upload_images(s3_client, s3_bucket, 10)
    s3_client.put_object(Bucket=s3_bucket, Key="hostile/bomb.png", Body=decompression_bomb())
    s3_client.put_object(Bucket=s3_bucket, Key="hostile/corrupt.jpg", Body=GOOD_JPEG[: len(GOOD_JPEG) // 2])
    s3_client.put_object(Bucket=s3_bucket, Key="hostile/text.jpg", Body=b"just some text, not an image\n" * 10)
    s3_client.put_object(Bucket=s3_bucket, Key="hostile/big.bin", Body=b"\x00" * 2_500_000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"

    # the value that, with the record's overhead, is as large as the broker takes (a few bytes of slack)
    probe = req("big", f"s3://{s3_bucket}/images/0000.jpg", meta={"pad": ""})
    near_limit = BROKER_LIMIT - len(probe) - len(b"at-the-broker-limit") - 200
    cases = hostile_cases(s3_bucket, origin, near_limit)
    assert len(cases) >= 40
    good: dict[str, bytes] = {f"g{i:03d}": req(f"g{i:03d}", f"s3://{s3_bucket}/{keys[i % 10]}") for i in range(60)}
    good |= {
        "http-good": req("http-good", f"{origin}/good.jpg"),
        "odd-id-\u00e9\u6f22": req("odd-id-\u00e9\u6f22", f"s3://{s3_bucket}/{keys[0]}"),
        "nul-in-id": req("nul\u0000in-id", f"s3://{s3_bucket}/{keys[1]}"),
        "extra-fields": req("extra-fields", f"s3://{s3_bucket}/{keys[2]}", producer="java", priority=3),
        "meta-20-deep": req("meta-20-deep", f"s3://{s3_bucket}/{keys[3]}", meta={"a": json.loads("[" * 20 + "]" * 20)}),
    }
    good_ids = {json.loads(v)["id"] for v in good.values()}
    compressed_ids = {f"z{i:03d}" for i in range(20)}

    where: dict[tuple[int, int], str] = {}  # (partition, offset) -> case
    plain = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all", max_request_size=BROKER_LIMIT + 1024)
    for name, (value, _, key) in cases.items():
        meta = plain.send(topic, key=key if key is not None else name.encode(), value=value).get(timeout=60)
        where[(meta.partition, meta.offset)] = name
    for name, value in good.items():
        meta = plain.send(topic, key=name.encode(), value=value).get(timeout=60)
        where[(meta.partition, meta.offset)] = "good"
    plain.close()
    gzipped = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all", compression_type="gzip", linger_ms=50)
    futures = [gzipped.send(topic, key=i.encode(), value=req(i, f"s3://{s3_bucket}/{keys[0]}")) for i in sorted(compressed_ids)]
    gzipped.flush()
    for f in futures:
        meta = f.get(timeout=60)
        where[(meta.partition, meta.offset)] = "good"
    gzipped.close()

    settings = fleet_settings(
        stack, tiny_model_dir, s3_bucket, topic,
        fetch={"http_hosts": ["127.0.0.1", "images.example.com"], "allow_plain_http": True, "timeout_s": 2,
               "max_bytes": 2_000_000},
    )
    settings.redis.url = stack.redis_url
    fleet = Fleet(settings)
    fleet.start()
    try:
        seen = wait_for_ids(s3_client, s3_bucket, good_ids | compressed_ids, timeout_s=300)
        assert wait_until(lambda: committed_reaches_end(stack.kafka_bootstrap, settings.kafka.group_id, topic), 120), (
            "a partition's committed offset never reached its end"
        )
        seen = result_ids(s3_client, s3_bucket)
    finally:
        fleet.stop()
        server.shutdown()

    letters = read_dead_letters(stack.kafka_bootstrap, dlq, want={n for n in cases}, where=where)
    by_case: dict[str, set[str]] = collections.defaultdict(set)
    for letter in letters:
        by_case[where[(letter["source"]["partition"], letter["source"]["offset"])]].add(letter["error"]["kind"])
    assert "good" not in by_case, f"good requests dead-lettered: {[l for l in letters if where[(l['source']['partition'], l['source']['offset'])] == 'good'][:3]}"
    wrong = {name: (sorted(by_case.get(name, ())), kind) for name, (_, kind, _) in cases.items() if by_case.get(name) != {kind}}
    assert wrong == {}, f"case: (dead-letter kinds seen, expected): {wrong}"
    assert all(letter["error"]["kind"] != "internal" for letter in letters)
    assert set(seen) == good_ids | compressed_ids, f"missing {sorted(good_ids | compressed_ids - set(seen))[:5]}"
    assert [i for i, n in seen.items() if n != 1] == []

    # the letters themselves: bounded, and faithful to what they carry
    nul = next(l for l in letters if where[(l["source"]["partition"], l["source"]["offset"])] == "nul-megabyte")
    assert nul["encoding"] == "base64" and nul["truncated"] and nul["original_size"] == 1_000_000
    assert nul["original_sha256"] == hashlib.sha256(b"\x00" * 1_000_000).hexdigest()
    assert set(base64.b64decode(nul["original"])) == {0}
    assert max(len(json.dumps(l)) for l in letters) < 200_000
    assert all(l["letter_id"] == f"{topic}/{l['source']['partition']}/{l['source']['offset']}" for l in letters)


def read_dead_letters(bootstrap: str, topic: str, *, want: set[str], where: dict, timeout_s: float = 60) -> list[dict]:
    """Every dead letter (repeats included: the topic is at-least-once) until each wanted case has one."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=2000)
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for message in consumer:
                out.append(json.loads(message.value))
            if want <= {where.get((l["source"]["partition"], l["source"]["offset"])) for l in out}:
                break
    finally:
        consumer.close()
    return out

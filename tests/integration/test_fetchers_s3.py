"""UriFetcher against the real local S3 server (s3proxy from infra/local): the boto3 path end to end."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from workers.errors import ErrorKind, InputError, SourceUnavailable
from workers.io.fetchers import UriFetcher
from workers.settings import FetchSettings, S3Settings

pytestmark = pytest.mark.integration

BODY = b"\xff\xd8\xff\xe0 not really a jpeg, but bytes are bytes"


def failure(fetcher: UriFetcher, uri: str) -> InputError:
    with pytest.raises(InputError) as info:
        fetcher.fetch(uri)
    return info.value


@pytest.fixture
def fetcher(stack, aws_env, s3_bucket: str) -> Iterator[UriFetcher]:
    """Built from settings: the endpoint from S3Settings, credentials from the AWS env chain (aws_env)."""
    made = UriFetcher(
        FetchSettings(s3_buckets=[s3_bucket], max_bytes=4096, timeout_s=5, attempts=2, concurrency=8),
        S3Settings(endpoint_url=stack.s3_endpoint, region=stack.s3_credentials["region_name"]),
        retry_wait_s=0.05,
    )
    yield made
    made.close()


def test_fetch_with_settings_built_client(fetcher: UriFetcher, s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="images/a.jpg", Body=BODY)
    assert fetcher.fetch(f"s3://{s3_bucket}/images/a.jpg") == BODY


def test_keys_are_verbatim(fetcher: UriFetcher, s3_client: Any, s3_bucket: str) -> None:
    """`%20` in an s3:// URI is those three characters of the key, not a space."""
    s3_client.put_object(Bucket=s3_bucket, Key="dir/a%20b c+d.jpg", Body=BODY)
    s3_client.put_object(Bucket=s3_bucket, Key="dir/a b c+d.jpg", Body=b"other")
    assert fetcher.fetch(f"s3://{s3_bucket}/dir/a%20b c+d.jpg") == BODY
    assert fetcher.fetch(f"s3://{s3_bucket}/dir/a b c+d.jpg") == b"other"


def test_fetch_with_injected_client(stack, s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="b.jpg", Body=BODY)
    fetcher = UriFetcher(FetchSettings(s3_buckets=[s3_bucket]), s3_client=s3_client)
    assert fetcher.fetch(f"s3://{s3_bucket}/b.jpg") == BODY
    fetcher.close()
    s3_client.head_bucket(Bucket=s3_bucket)  # the caller's client is not closed by the fetcher


def test_many_threads_share_one_fetcher(fetcher: UriFetcher, s3_client: Any, s3_bucket: str) -> None:
    for i in range(16):
        s3_client.put_object(Bucket=s3_bucket, Key=f"t/{i}.jpg", Body=BODY + bytes([i]))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(fetcher.fetch, [f"s3://{s3_bucket}/t/{i}.jpg" for i in range(16)]))
    assert got == [BODY + bytes([i]) for i in range(16)]


def test_missing_key_and_bucket_are_not_found(stack, aws_env, fetcher: UriFetcher, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/no/such.jpg"
    error = failure(fetcher, uri)
    assert error.kind is ErrorKind.NOT_FOUND and uri in str(error)
    other = UriFetcher(FetchSettings(s3_buckets=["*"], attempts=1), S3Settings(endpoint_url=stack.s3_endpoint))
    try:
        assert failure(other, f"s3://{s3_bucket}-gone/a.jpg").kind is ErrorKind.NOT_FOUND
    finally:
        other.close()


def test_too_large(fetcher: UriFetcher, s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="big.bin", Body=b"\0" * 4097)
    error = failure(fetcher, f"s3://{s3_bucket}/big.bin")
    assert error.kind is ErrorKind.TOO_LARGE and "4097 bytes" in str(error)


def test_bucket_not_allowed(fetcher: UriFetcher, s3_client: Any, s3_bucket: str) -> None:
    error = failure(fetcher, "s3://some-other-bucket/a.jpg")
    assert error.kind is ErrorKind.FORBIDDEN and "RAMPLUS_FETCH__S3_BUCKETS" in str(error)


def test_wrong_credentials_forbidden(stack, s3_bucket: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="a.jpg", Body=BODY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    fetcher = UriFetcher(FetchSettings(s3_buckets=[s3_bucket], attempts=2), S3Settings(endpoint_url=stack.s3_endpoint))
    try:
        error = failure(fetcher, f"s3://{s3_bucket}/a.jpg")
    finally:
        fetcher.close()
    assert error.kind is ErrorKind.FORBIDDEN and "wrong-secret" not in str(error)


def test_an_endpoint_that_does_not_answer_is_an_outage_not_the_requests_fault(aws_env, s3_bucket: str) -> None:
    """The fleet's own S3 endpoint away: the pipeline waits it out (SourceUnavailable), it dead-letters nothing."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fetcher = UriFetcher(
        FetchSettings(s3_buckets=[s3_bucket], attempts=2, timeout_s=2),
        S3Settings(endpoint_url=f"http://127.0.0.1:{port}"),
        retry_wait_s=0.05,
    )
    try:
        with pytest.raises(SourceUnavailable) as info:
            fetcher.fetch(f"s3://{s3_bucket}/a.jpg")
    finally:
        fetcher.close()
    assert f"s3://{s3_bucket}/a.jpg: the S3 endpoint does not answer" in str(info.value)
    tried = info.value.__cause__  # what it would have been dead-lettered as, had the endpoint answered
    assert isinstance(tried, InputError) and tried.kind is ErrorKind.FETCH and "2 tries" in str(tried)

"""The one S3 client factory (workers/io/s3.py): what its callers' settings turn into."""

from __future__ import annotations

from workers.io.fetchers import UriFetcher
from workers.io.s3 import s3_client
from workers.settings import FetchSettings, S3Settings


def test_the_factory_carries_endpoint_region_pool_timeouts_and_total_attempts(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    client = s3_client(S3Settings(endpoint_url="http://127.0.0.1:9", region="eu-west-3"), pool=7, timeout_s=3.5, attempts=2)
    config = client.meta.config
    assert client.meta.endpoint_url == "http://127.0.0.1:9" and client.meta.region_name == "eu-west-3"
    assert (config.max_pool_connections, config.connect_timeout, config.read_timeout) == (7, 3.5, 3.5)
    assert config.retries["total_max_attempts"] == 2
    assert config.s3["addressing_style"] == "path"  # a local endpoint has no per-bucket DNS


def test_the_fetcher_leaves_retries_to_its_own_attempts_setting(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    fetcher = UriFetcher(FetchSettings(s3_buckets=["b"], attempts=4, timeout_s=2, concurrency=32), S3Settings())
    try:
        config = fetcher.s3.client.meta.config
        assert config.retries["total_max_attempts"] == 1  # tenacity makes the 4 tries, not botocore
        assert (config.max_pool_connections, config.read_timeout) == (32, 2)
        assert config.s3 is None  # AWS itself: virtual-hosted buckets
    finally:
        fetcher.close()


def test_one_s3_uri_parser_behind_every_callers_own_error():
    import pytest

    from workers.backfill.plan import split_s3_prefix
    from workers.errors import ErrorKind, InputError
    from workers.io.fetchers import split_s3_uri as fetcher_split
    from workers.io.s3 import S3UriError, parse_s3_uri
    from workers.train.artifacts import ArtifactError
    from workers.train.artifacts import split_s3_uri as artifact_split
    from workers.train.manifest import ManifestError
    from workers.train.manifest import split_s3_uri as manifest_split

    assert parse_s3_uri("S3://b//k/../x%20") == ("b", "/k/../x%20")  # keys verbatim
    assert parse_s3_uri("s3://b") == ("b", "")
    for bad, reason in [("http://b/k", "scheme"), ("s3://u:p@b/k", "credentials"), ("s3:///k", "bucket")]:
        with pytest.raises(S3UriError) as info:
            parse_s3_uri(bad)
        assert info.value.reason == reason
        for split, error in [(artifact_split, ArtifactError), (manifest_split, ManifestError), (split_s3_prefix, ValueError)]:
            with pytest.raises(error, match=str(info.value).split(";")[0]):
                split(bad)
        with pytest.raises(InputError) as fetch:
            fetcher_split(bad)
        assert fetch.value.kind is (ErrorKind.FORBIDDEN if reason == "credentials" else ErrorKind.VALIDATION)
        assert "u:p" not in str(fetch.value)  # redacted
    with pytest.raises(S3UriError, match="no key"):
        parse_s3_uri("s3://b/", key_required=True)

"""The synthetic dataset written to the real local S3 server: same bytes as on disk, manifest read back."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from workers.cli import app
from workers.train.manifest import read_manifest, resolve_uri, split_s3_uri
from workers.settings import S3Settings
from workers.train.synth_data import write_dataset

pytestmark = pytest.mark.integration


def keys(s3_client: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def test_write_dataset_to_s3_matches_the_local_copy(stack, aws_env, s3_client, s3_bucket, tmp_path):
    settings = S3Settings(endpoint_url=stack.s3_endpoint, region=stack.s3_credentials["region_name"])
    summary = write_dataset(f"s3://{s3_bucket}/synth", n=12, seed=5, size=64, s3=settings, workers=4, progress=False)
    write_dataset(str(tmp_path), n=12, seed=5, size=64, progress=False)

    assert summary.manifest == f"s3://{s3_bucket}/synth/manifest.jsonl" and (summary.train, summary.val) == (10, 2)
    stored = keys(s3_client, s3_bucket, "synth/")
    assert len(stored) == 12 + 3
    for key in stored:
        body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert body == (tmp_path / key.removeprefix("synth/")).read_bytes(), key
    records = read_manifest(summary.manifest, s3=settings)
    assert records == read_manifest(tmp_path / "manifest.jsonl")
    bucket, key = split_s3_uri(resolve_uri(summary.manifest, records[0].uri))
    assert bucket == s3_bucket and key == "synth/images/00000000.jpg"


def test_data_synth_cli_writes_to_s3_with_the_settings_endpoint(stack, aws_env, s3_client, s3_bucket):
    env = {"RAMPLUS_S3__ENDPOINT_URL": stack.s3_endpoint, "RAMPLUS_S3__REGION": stack.s3_credentials["region_name"]}
    result = CliRunner().invoke(app, ["data", "synth", f"s3://{s3_bucket}/cli/", "--n", "5", "--size", "48"], env=env)
    assert result.exit_code == 0, result.output
    assert len(keys(s3_client, s3_bucket, "cli/images/")) == 5
    assert "cli/manifest.jsonl" in keys(s3_client, s3_bucket, "cli/")


def test_a_missing_bucket_is_one_line_and_exit_2(stack, aws_env, unique):
    env = {"RAMPLUS_S3__ENDPOINT_URL": stack.s3_endpoint}
    result = CliRunner().invoke(app, ["data", "synth", f"s3://missing-{unique}/x/", "--n", "2"], env=env)
    assert result.exit_code == 2
    assert "bucket missing or not accessible" in result.stderr and len(result.stderr.strip().splitlines()) == 1

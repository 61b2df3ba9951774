"""One error path for `ramplus` (issue 17): a known failure is one line naming its cause and the setting or
command that fixes it, exit status 2; `--debug` / RAMPLUS_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers import jpeg_bytes, random_images
from infra.local.kit import free_port
from workers.cli import app
from workers.cli_errors import explain

runner = CliRunner()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(random_images(1)[0]))
    return folder


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("RAMPLUS_S3__ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")


def one_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_no_s3_credentials(no_aws, images):
    line = one_line(runner.invoke(app, ["tag", str(images), "--checkpoint", "s3://models/tagger/v1"]))
    assert "no S3 credentials" in line and "AWS_ACCESS_KEY_ID" in line


def test_debug_shows_the_traceback_instead(no_aws, images, monkeypatch):
    result = runner.invoke(app, ["--debug", "tag", str(images), "--checkpoint", "s3://models/tagger/v1"])
    assert type(result.exception).__name__ == "NoCredentialsError" and result.exit_code == 1
    monkeypatch.setenv("RAMPLUS_DEBUG", "1")
    result = runner.invoke(app, ["tag", str(images), "--checkpoint", "s3://models/tagger/v1"])
    assert type(result.exception).__name__ == "NoCredentialsError"


def test_unreachable_s3_server(no_aws, images, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-printed-anywhere")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = runner.invoke(app, ["tag", str(images), "--checkpoint", "s3://models/tagger/v1"])
    line = one_line(result)
    assert "cannot reach the S3 server" in line and "RAMPLUS_S3__ENDPOINT_URL" in line and "stack.py up" in line
    assert "not-printed-anywhere" not in result.output


def test_unreachable_redis():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = runner.invoke(app, ["vocab", "activate", "animals", "1", "--redis-url", url])
    assert "cannot reach Redis" in one_line(result)
    assert "hunter2" not in result.output  # the password in the URL stays out of the message


def test_a_bad_vocabulary_file(tmp_path, images, tiny_official_checkpoint):
    (tmp_path / "v.safetensors").write_bytes(b"not a vocabulary")
    result = runner.invoke(app, ["tag", str(images), "--checkpoint", str(tiny_official_checkpoint), "--vocab", str(tmp_path / "v.safetensors")])
    assert "v.safetensors" in one_line(result)


@pytest.mark.parametrize("make, expected", [
    (lambda: __import__("botocore.exceptions").exceptions.NoCredentialsError(), "no S3 credentials"),
    (lambda: __import__("botocore.exceptions").exceptions.EndpointConnectionError(endpoint_url="http://s3:9000"), "cannot reach the S3 server"),
    (lambda: __import__("botocore.exceptions").exceptions.ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "GetObject"), "S3 refused"),
    (lambda: __import__("botocore.exceptions").exceptions.ClientError({"Error": {"Code": "NoSuchBucket", "BucketName": "b"}}, "ListObjectsV2"), "no such S3 bucket"),
    (lambda: __import__("kafka.errors").errors.KafkaConnectionError("connection refused"), "RAMPLUS_KAFKA__BOOTSTRAP_SERVERS"),
    (lambda: __import__("kafka.errors").errors.KafkaTimeoutError("Unable to bootstrap"), "RAMPLUS_KAFKA__BOOTSTRAP_SERVERS"),
    (lambda: __import__("redis.exceptions").exceptions.ConnectionError("refused"), "RAMPLUS_REDIS__URL"),
    (lambda: __import__("redis.exceptions").exceptions.AuthenticationError("bad"), "refused the password"),
    (lambda: __import__("workers.train.artifacts").train.artifacts.ArtifactError("s3://m/v1: incomplete artifact (no _COMPLETE)"), "incomplete artifact"),
    (lambda: __import__("ramplus_core.errors").errors.UntrustedCheckpointError("x.pth holds pickled objects"), "RAMPLUS_MODEL__CHECKPOINT"),
    (lambda: __import__("ramplus_core.errors").errors.VocabularyError("wrong shape"), "wrong shape"),
    (lambda: FileNotFoundError(2, "No such file or directory", "/data/x.toml"), "/data/x.toml: no such file"),
])
def test_each_known_failure_has_its_line(make, expected):
    assert expected in explain(make())


def test_an_unknown_failure_is_not_explained_away():
    assert explain(KeyError("a bug of ours")) is None
    assert explain(ZeroDivisionError()) is None

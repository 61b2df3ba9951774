"""One error path for `ramplus`: a failure we know the cause of ends in one line that names it and the
setting or command that fixes it, exit status 2; `--debug` (or `RAMPLUS_DEBUG=1`) shows the traceback.

Exceptions are matched by module and class name along their MRO, so that explaining a botocore or Kafka
error never imports botocore or Kafka (the CLI's help must not pay for them). An exception not listed here
is a bug of ours: its traceback is the right output.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click
from typer.core import TyperGroup

STACK_HINT = "`python infra/local/stack.py up` starts the local one"


def _s3_client_error(exc: BaseException) -> str | None:
    error = getattr(exc, "response", {}).get("Error", {})
    code = str(error.get("Code", ""))
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"):
        return f"S3 refused the request ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy"
    if code in ("NoSuchBucket",):
        return f"no such S3 bucket ({error.get('BucketName') or error.get('Message', '')}): create it, or point RAMPLUS_S3__BUCKET or the s3:// URI elsewhere"
    if code in ("NoSuchKey", "404"):
        return "no such S3 object: check the s3:// URI (`aws s3 ls` lists what is there)"
    return None


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# (module prefix, class name) -> the one line, most specific first.
KNOWN: list[tuple[str, str, Callable[[BaseException], str | None]]] = [
    ("botocore", "NoCredentialsError", lambda e: "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"),
    ("botocore", "PartialCredentialsError", lambda e: f"incomplete S3 credentials ({e}): set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("botocore", "EndpointConnectionError", lambda e: f"cannot reach the S3 server ({e}): is it running? Its address is RAMPLUS_S3__ENDPOINT_URL; {STACK_HINT}"),
    ("botocore", "ConnectTimeoutError", lambda e: f"the S3 server did not answer ({e}): check RAMPLUS_S3__ENDPOINT_URL; {STACK_HINT}"),
    ("botocore", "ClientError", _s3_client_error),
    ("kafka", "NoBrokersAvailable", lambda e: f"cannot reach Kafka: no broker answered at RAMPLUS_KAFKA__BOOTSTRAP_SERVERS; {STACK_HINT}"),
    ("kafka", "KafkaTimeoutError", lambda e: f"Kafka did not answer in time ({_text(e)}): check RAMPLUS_KAFKA__BOOTSTRAP_SERVERS and the topic; {STACK_HINT}"),
    ("kafka", "KafkaConnectionError", lambda e: f"cannot reach Kafka ({_text(e)}): check RAMPLUS_KAFKA__BOOTSTRAP_SERVERS; {STACK_HINT}"),
    ("redis", "AuthenticationError", lambda e: "Redis refused the password in RAMPLUS_REDIS__URL"),
    ("redis", "ConnectionError", lambda e: f"cannot reach Redis ({e}): check RAMPLUS_REDIS__URL; {STACK_HINT}"),
    ("redis", "TimeoutError", lambda e: f"Redis did not answer in time ({e}): check RAMPLUS_REDIS__URL"),
    ("workers.train.artifacts", "ArtifactError", lambda e: f"{e} (`ramplus weights list` and the s3:// listing show what exists)"),
    ("ramplus_core", "CheckpointError", lambda e: f"{e} (the checkpoint: --checkpoint or RAMPLUS_MODEL__CHECKPOINT)"),
    ("ramplus_core", "WeightsUnavailableError", lambda e: f"{e} (`ramplus weights fetch` downloads the official ones)"),
    ("ramplus_core", "VocabularyError", lambda e: f"{e} (the vocabulary: --vocab, RAMPLUS_MODEL__VOCABULARY or `ramplus vocab show`)"),
    ("ramplus_core", "RamPlusError", lambda e: str(e)),
    ("workers", "InputError", lambda e: str(e)),
    ("pydantic_core", "ValidationError", lambda e: f"invalid settings: {e} (`ramplus settings` lists them)"),
    ("builtins", "FileNotFoundError", lambda e: f"{getattr(e, 'filename', None) or e}: no such file or directory"),
    ("builtins", "PermissionError", lambda e: f"{getattr(e, 'filename', None) or e}: permission denied"),
]


def explain(exc: BaseException) -> str | None:
    """The one line for a failure we know, else None."""
    for cls in type(exc).__mro__:
        module = cls.__module__ or ""
        for prefix, name, describe in KNOWN:
            if cls.__name__ == name and (module == prefix or module.startswith(prefix + ".")):
                return describe(exc)
    return None


def debug_enabled(ctx: click.Context | None = None) -> bool:
    if os.environ.get("RAMPLUS_DEBUG", "").strip().lower() in ("1", "true", "yes"):
        return True
    return bool(ctx is not None and ctx.meta.get("ramplus.debug"))


class ExplainedErrors(TyperGroup):
    """The root command group: known failures of any subcommand become one line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            message = None if debug_enabled(ctx) else explain(exc)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            ctx.exit(2)

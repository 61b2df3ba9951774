"""The backfill's Ray Data stages, run in Ray workers: fetch + decode (CPU tasks), tag (an actor per replica).

With JPEGs decoded on the GPU (`RAMPLUS_MODEL__DECODE`), the tasks only check them (header, limits) and the
replicas decode them with their batch, as a fleet replica does.

They run exactly the fleet's code (`ImageDecoder`, `TaggingEngine`, `TagResult.line`), so a result line here
is the fleet's result line for the same image, model and vocabulary. Stages get their configuration as a
JSON string: it crosses process boundaries, and a task worker keeps one decoder per distinct string.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
import torch

from ramplus_core import RamPlus
from ramplus_core.preprocess import EncodedImage
from workers.backfill.report import BackfillError
from workers.errors import ErrorKind, InputError, SourceUnavailable
from workers.schemas import TagResult
from workers.settings import FetchSettings, Settings
from workers.stream.engine import ImageDecoder, TaggingEngine

log = structlog.get_logger("ramplus.backfill")


def model_fingerprint(model: RamPlus) -> str:
    """sha256 over the weights (names, dtypes, shapes, bytes): the same checkpoint in any format, one id."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_DECODERS: dict[str, tuple[Any, ImageDecoder, ThreadPoolExecutor]] = {}
_DECODERS_LOCK = threading.Lock()


def _decoder_for(config: str) -> tuple[Any, ImageDecoder, ThreadPoolExecutor]:
    """One fetcher, decoder and thread pool per worker process (Ray reuses task workers)."""
    with _DECODERS_LOCK:
        if config not in _DECODERS:
            from workers.io.fetchers import S3Fetcher
            from workers.settings import S3Settings

            cfg = json.loads(config)
            fetch = FetchSettings(**cfg["fetch"])
            decoder = ImageDecoder(
                cfg["image_size"], fast=cfg["fast"], max_bytes=fetch.max_bytes, max_pixels=fetch.max_pixels, defer_jpegs=cfg["defer_jpegs"],
            )
            _DECODERS[config] = (S3Fetcher(fetch, S3Settings(**cfg["s3"])), decoder, ThreadPoolExecutor(fetch.concurrency))
        return _DECODERS[config]


def fetch_and_decode(batch: Any, *, config: str) -> Any:
    """Ray Data stage: rows {key, shard, size, etag} -> + pixels (raw bytes, c/h/w, dtype) or error_kind/error.

    A JPEG left to the replica's batched decoder (`defer_jpegs`) travels as its bytes, dtype `jpeg:<mode>`."""
    import pyarrow as pa

    fetcher, decoder, pool = _decoder_for(config)
    bucket = json.loads(config)["bucket"]
    rows = batch.to_pylist()

    def one(row: dict[str, Any]) -> dict[str, Any]:
        uri = f"s3://{bucket}/{row['key']}"
        out = {**row, "pixels": b"", "c": 0, "h": 0, "w": 0, "dtype": "", "error_kind": "", "error": ""}
        try:
            decoded = decoder.decode(fetcher.fetch(uri), uri)
        except InputError as exc:
            return out | {"error_kind": exc.kind.value, "error": str(exc)}
        except SourceUnavailable as exc:  # S3 away: a transient error, redone by a rerun (--retry-transient)
            return out | {"error_kind": ErrorKind.FETCH.value, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug of ours must not fail the job: report it with the image
            return out | {"error_kind": ErrorKind.INTERNAL.value, "error": f"{type(exc).__name__}: {exc}"}
        if isinstance(decoded, EncodedImage):
            return out | {"pixels": decoded.data, "c": 3, "h": decoded.height, "w": decoded.width, "dtype": f"jpeg:{decoded.mode}"}
        pixels = decoded.contiguous()
        c, h, w = pixels.shape
        return out | {"pixels": pixels.numpy().tobytes(), "c": c, "h": h, "w": w, "dtype": str(pixels.dtype).removeprefix("torch.")}

    done = list(pool.map(one, rows))
    # pyarrow, not numpy: numpy's fixed-width bytes would drop the pixels' trailing zero bytes.
    return pa.Table.from_pylist(done, schema=_DECODED_SCHEMA())


def _DECODED_SCHEMA() -> Any:  # noqa: N802 - a schema constant, built lazily so importing needs no pyarrow
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("size", pa.int64()), ("etag", pa.string()),
        ("pixels", pa.binary()), ("c", pa.int32()), ("h", pa.int32()), ("w", pa.int32()), ("dtype", pa.string()),
        ("error_kind", pa.string()), ("error", pa.string()),
    ])


class BackfillTagger:
    """Ray Data stage (an actor per replica): decoded rows -> one JSON line each, a result or an error."""

    def __init__(self, config: str) -> None:
        from workers.stream.replica import load_model

        cfg = json.loads(config)
        settings = Settings(**cfg["settings"])
        model = load_model(settings)
        if model_fingerprint(model) != cfg["fingerprint"]:
            raise RuntimeError("the checkpoint changed since the backfill started: its weights differ from the driver's")
        if settings.model.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(settings.backfill.cpus_per_replica)))
        self.bucket = cfg["bucket"]
        self.worker = f"{socket.gethostname()}/backfill-{os.getpid()}"
        f = settings.fetch
        self.engine = TaggingEngine(
            model, device=settings.model.device, precision=settings.model.precision, fast=settings.model.fast_preprocess,
            max_bytes=f.max_bytes, max_pixels=f.max_pixels, decode=settings.model.decode,
            compile_buckets=settings.model.buckets_for(settings.backfill.batch_size), **settings.model.head_options(),
        )
        if cfg["vocab"] is not None:
            self.engine.set_vocabulary(vocab_store(settings).load(*cfg["vocab"]))
        if self.engine.vocabulary.ref != cfg["vocab_ref"]:
            raise RuntimeError(f"replica has vocabulary {self.engine.vocabulary.ref}, the job asked for {cfg['vocab_ref']}")
        if self.engine.buckets:
            log.info("backfill.warmed_up", seconds=round(self.engine.warm_up(), 1), buckets=self.engine.buckets)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        lines: list[str] = [""] * len(rows)
        good = [i for i, r in enumerate(rows) if not r["error_kind"]]
        for i, r in enumerate(rows):
            if r["error_kind"]:
                lines[i] = self._error(r, r["error_kind"], r["error"])
        if good:
            pixels = [self._pixels(rows[i]) for i in good]
            try:
                tagged = self.engine.infer(pixels)
            except Exception:  # noqa: BLE001 - find the one image that breaks the batch, tag the rest
                log.exception("backfill.batch_failed", images=len(good))
                tagged = []
                for p in pixels:
                    try:
                        tagged.extend(self.engine.infer([p]))
                    except Exception as exc:  # noqa: BLE001
                        tagged.append(exc)
            for i, tags in zip(good, tagged):
                r = rows[i]
                if isinstance(tags, InputError):  # an image the engine could not decode after all
                    lines[i] = self._error(r, tags.kind.value, str(tags))
                    rows[i]["error_kind"] = tags.kind.value
                    continue
                if isinstance(tags, Exception):
                    lines[i] = self._error(r, ErrorKind.INTERNAL.value, f"{type(tags).__name__}: {tags}")
                    rows[i]["error_kind"] = ErrorKind.INTERNAL.value
                    continue
                uri = self._uri(r)
                lines[i] = TagResult.line(
                    tags, id=uri, uri=uri, model=self.engine.model_id, worker=self.worker, meta={"size": r["size"], "etag": r["etag"]},
                ).json
        return pa.table({
            "shard": [r["shard"] for r in rows], "key": [r["key"] for r in rows],
            "error_kind": [r["error_kind"] for r in rows], "line": lines,
        })

    def _uri(self, row: dict[str, Any]) -> str:
        return f"s3://{self.bucket}/{row['key']}"

    def _error(self, row: dict[str, Any], kind: str, message: str) -> str:
        return BackfillError(uri=self._uri(row), kind=ErrorKind(kind), message=message, size=row["size"], etag=row["etag"]).model_dump_json()

    def _pixels(self, row: dict[str, Any]) -> torch.Tensor | EncodedImage:
        if row["dtype"].startswith("jpeg:"):
            return EncodedImage(row["pixels"], "JPEG", row["dtype"].removeprefix("jpeg:"), row["w"], row["h"], self._uri(row))
        dtype = getattr(torch, row["dtype"])
        return torch.frombuffer(bytearray(row["pixels"]), dtype=dtype).view(row["c"], row["h"], row["w"])


def vocab_store(settings: Settings) -> Any:
    import redis

    from workers.vocab.store import VocabStore

    return VocabStore(redis.Redis.from_url(settings.redis.url, socket_timeout=60))

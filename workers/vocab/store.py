"""Versioned vocabularies in Redis: immutable versions, an `active` pointer per name, a pub/sub nudge.

Keys (name and version may not contain ':'):

    ramplus:vocab:{name}:{version}:meta               JSON: metadata, thresholds, counts, shape, dtype, sha256, chunks
    ramplus:vocab:{name}:{version}:{upload}:{i}       embedding bytes, chunk i (well below Redis' 512 MB limit)
    ramplus:vocab:{name}:versions                     sorted set: version -> publish time
    ramplus:vocab:{name}:active                       the active version
    ramplus:vocab:{name}:history                      list: previously active versions, newest first (rollback)
    channel ramplus:vocab:events                      {"event": "activated"|"published"|"deleted", "name", "version", "ts"}

Nothing half-written is visible: chunks go first under a fresh upload id, the metadata last with SET NX (a
version is never overwritten), and only a version whose metadata exists can be activated. Readers check
the sha256, the shape and finiteness before they use a version.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import numpy as np
import torch

from ramplus_core.errors import VocabularyError
from ramplus_core.vocabulary import Vocabulary
from workers.schemas import VocabRef

PREFIX = "ramplus:vocab"
EVENTS = f"{PREFIX}:events"
# Just under 64 MiB: Redis' allocator rounds a value of exactly 64 MiB (plus its header) up to its 80 MiB size
# class, a quarter more memory per version (MEMORY USAGE: 80 MiB for 64 MiB, 64 MiB for 64 MiB - 64 KiB).
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024 - 64 * 1024
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class VocabStoreError(VocabularyError):
    """A store operation that cannot be done as asked (unknown version, overwrite, deleting the active one)."""


def _check_part(kind: str, value: str) -> str:
    if not VocabRef._valid(value):
        raise VocabStoreError(f"invalid vocabulary {kind} {value!r}: 1-200 characters, no ':' or '@'")
    return value


def parse_ref(ref: str) -> VocabRef:
    """'name' or 'name@version' (VocabRef.parse), as the store's own error."""
    try:
        return VocabRef.parse(ref)
    except ValueError as exc:
        raise VocabStoreError(str(exc)) from None


class VocabStore:
    def __init__(self, redis: Any, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.redis = redis
        self.chunk_bytes = chunk_bytes

    # -- keys ---------------------------------------------------------------------------------------------

    @staticmethod
    def _key(name: str, *parts: str) -> str:
        return ":".join((PREFIX, name, *parts))

    # -- writing ------------------------------------------------------------------------------------------

    def publish(self, vocabulary: Vocabulary, *, name: str | None = None, version: str | None = None, dtype: str = "float16") -> str:
        """Store a new immutable version; returns 'name@version'. Refuses to overwrite an existing version."""
        name = _check_part("name", name or vocabulary.name)
        version = _check_part("version", version or vocabulary.metadata.version)
        if dtype not in _NP_DTYPES:
            raise VocabStoreError(f"dtype must be float16 or float32, got {dtype!r}")
        meta_key = self._key(name, version, "meta")
        if self.redis.exists(meta_key):
            raise VocabStoreError(f"{name}@{version} already exists: versions are immutable, publish a new version")
        upload = uuid.uuid4().hex[:12]
        shape = tuple(vocabulary.embeddings.shape)
        size, chunks, digest = self._write_chunks(vocabulary.embeddings, dtype, name, version, upload)
        meta = {
            "metadata": json.loads(vocabulary.metadata.model_dump_json()) | {"name": name, "version": version},
            "thresholds": vocabulary.thresholds.tolist(),
            "counts": vocabulary.counts.tolist(),
            "shape": list(shape),
            "dtype": dtype,
            "sha256": digest,
            "bytes": size,
            "upload": upload,
            "chunks": chunks,
            "created_at": time.time(),
        }
        if not self.redis.set(meta_key, json.dumps(meta), nx=True):  # lost a race with another publisher
            self.redis.delete(*[self._key(name, version, upload, str(i)) for i in range(chunks)])
            raise VocabStoreError(f"{name}@{version} was published by someone else meanwhile")
        self.redis.zadd(self._key(name, "versions"), {version: meta["created_at"]})
        self._event("published", name, version)
        return f"{name}@{version}"

    def _write_chunks(self, embeddings: torch.Tensor, dtype: str, name: str, version: str, upload: str) -> tuple[int, int, str]:
        """The embeddings as `dtype` bytes in chunks under `upload`: (bytes, chunks, sha256).

        Chunk by chunk, each converted on its own and handed to the client as a view: the process holds the
        vocabulary and one chunk, never a second copy of the whole (50,000 x 51 x 512 is 2.6 GB in fp16).
        """
        target = _TORCH_DTYPES[dtype]
        flat = embeddings.detach().cpu().reshape(-1)
        per_chunk = max(1, self.chunk_bytes // target.itemsize)  # whole elements: a chunk never splits one
        digest, keys = hashlib.sha256(), []
        for start in range(0, max(flat.numel(), 1), per_chunk):
            part = flat[start : start + per_chunk].to(target)  # a view when the dtype is already the stored one
            if not bool(torch.isfinite(part).all()):
                if keys:
                    self.redis.delete(*keys)
                raise VocabStoreError(f"{name}@{version}: embeddings are not finite in {dtype}")
            data = memoryview(part.numpy()).cast("B")
            digest.update(data)
            keys.append(self._key(name, version, upload, str(len(keys))))
            self.redis.set(keys[-1], data)
        return flat.numel() * target.itemsize, len(keys), digest.hexdigest()

    def activate(self, name: str, version: str) -> str | None:
        """Point `name` at `version` (which must be complete); returns the previously active version."""
        _check_part("name", name)
        _check_part("version", version)
        if not self.redis.exists(self._key(name, version, "meta")):
            raise VocabStoreError(f"{name}@{version} does not exist (or is not completely published)")
        previous = self._swap_active(name, version, remember=True)
        self._event("activated", name, version)
        return previous

    def rollback(self, name: str) -> str:
        """Re-activate the version that was active before the current one; returns it."""
        history = self._key(name, "history")
        while True:
            previous = self.redis.lpop(history)
            if previous is None:
                raise VocabStoreError(f"{name}: no previous version to roll back to")
            previous = previous.decode() if isinstance(previous, bytes) else previous
            if self.redis.exists(self._key(name, previous, "meta")):  # skip versions deleted since
                break
        self._swap_active(name, previous, remember=False)
        self._event("activated", name, previous)
        return previous

    def delete(self, name: str, version: str) -> None:
        if self.active_version(name) == version:
            raise VocabStoreError(f"{name}@{version} is active: activate another version first")
        meta = self._meta(name, version)
        # Metadata first: from then on the version is invisible, and its chunks are garbage.
        self.redis.delete(self._key(name, version, "meta"))
        self.redis.delete(*[self._key(name, version, meta["upload"], str(i)) for i in range(meta["chunks"])])
        self.redis.zrem(self._key(name, "versions"), version)
        self._event("deleted", name, version)

    def _swap_active(self, name: str, version: str, *, remember: bool) -> str | None:
        active, history = self._key(name, "active"), self._key(name, "history")
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(active)
                    previous = pipe.get(active)
                    previous = previous.decode() if isinstance(previous, bytes) else previous
                    pipe.multi()
                    pipe.set(active, version)
                    if remember and previous is not None and previous != version:
                        pipe.lpush(history, previous)
                        pipe.ltrim(history, 0, 99)
                    pipe.execute()
                    return previous
                except Exception as exc:  # WatchError: someone else switched meanwhile, try again
                    if type(exc).__name__ != "WatchError":
                        raise

    def _event(self, event: str, name: str, version: str) -> None:
        self.redis.publish(EVENTS, json.dumps({"event": event, "name": name, "version": version, "ts": time.time()}))

    # -- reading ------------------------------------------------------------------------------------------

    def active_version(self, name: str) -> str | None:
        value = self.redis.get(self._key(name, "active"))
        return value.decode() if isinstance(value, bytes) else value

    def versions(self, name: str) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else v for v in self.redis.zrange(self._key(name, "versions"), 0, -1)]

    def names(self) -> list[str]:
        found = set()
        for key in self.redis.scan_iter(match=f"{PREFIX}:*:versions"):
            key = key.decode() if isinstance(key, bytes) else key
            found.add(key.split(":")[2])
        return sorted(found)

    def _meta(self, name: str, version: str) -> dict[str, Any]:
        raw = self.redis.get(self._key(name, version, "meta"))
        if raw is None:
            raise VocabStoreError(f"{name}@{version} does not exist")
        return json.loads(raw)

    def show(self, name: str, version: str | None = None) -> dict[str, Any]:
        version = version or self.active_version(name)
        if version is None:
            raise VocabStoreError(f"{name}: no active version")
        meta = self._meta(name, version)
        return {k: v for k, v in meta.items() if k not in ("thresholds", "counts")} | {"active": self.active_version(name) == version}

    def load(self, name: str, version: str | None = None, *, dim: int | None = None) -> Vocabulary:
        """A version (default: the active one), checked: checksum, shape, dimension, finiteness."""
        version = version or self.active_version(name)
        if version is None:
            raise VocabStoreError(f"{name}: no active version")
        meta = self._meta(name, version)
        # Chunk by chunk into one buffer sized from the metadata, hashed on the way: the process holds the
        # vocabulary and one chunk, never the chunks and their concatenation together.
        keys = [self._key(name, version, meta["upload"], str(i)) for i in range(meta["chunks"])]
        payload, digest, pos = bytearray(meta["bytes"]), hashlib.sha256(), 0
        view = memoryview(payload)
        for key in keys:
            part = self.redis.get(key)
            if part is None:
                missing = sum(not self.redis.exists(k) for k in keys)
                raise VocabularyError(f"{name}@{version}: {missing} of {len(keys)} chunks are missing")
            if pos + len(part) > len(payload):
                raise VocabularyError(f"{name}@{version}: the chunks hold more than the {len(payload)} bytes the metadata says")
            digest.update(part)
            view[pos : pos + len(part)] = part
            pos += len(part)
        view.release()
        if digest.hexdigest() != meta["sha256"]:
            raise VocabularyError(f"{name}@{version}: checksum mismatch (corrupt or tampered embedding bytes)")
        if pos != len(payload):
            raise VocabularyError(f"{name}@{version}: the chunks hold {pos} bytes, the metadata says {len(payload)}")
        shape = tuple(meta["shape"])
        if len(shape) != 3 or int(np.prod(shape)) * np.dtype(_NP_DTYPES[meta["dtype"]]).itemsize != len(payload):
            raise VocabularyError(f"{name}@{version}: {len(payload)} bytes do not hold a {meta['dtype']} tensor of shape {shape}")
        if dim is not None and shape[2] != dim:
            raise VocabularyError(f"{name}@{version}: embedding dimension {shape[2]}, the model needs {dim}")
        counts = np.asarray(meta["counts"], dtype=np.int32)
        # Kept in the stored dtype and padded layout: no fp32 copy, no per-tag copies. The vocabulary's own
        # content hash covers the same bytes plus the counts, so it continues the hash just checked.
        digest.update(counts.tobytes())
        embeddings = torch.frombuffer(payload, dtype=_TORCH_DTYPES[meta["dtype"]]).view(shape)
        md = meta["metadata"]
        return Vocabulary.from_embeddings(  # validates: tags, counts, thresholds, finiteness
            md["tags"], embeddings, counts=counts, thresholds=meta["thresholds"], name=name, version=version,
            text_encoder=md.get("text_encoder", "unknown"), source=md.get("source", "redis"), dtype=meta["dtype"],
            sha256=digest.hexdigest(),
        )

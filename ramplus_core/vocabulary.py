"""Vocabularies: the tags a model can say, their thresholds and their description embeddings.

A vocabulary is an input to the model, not a weight. Tag `i` owns `counts[i]` description embeddings,
stored in the first rows of `embeddings[i]` (shape [num_tags, max_descriptions, dim]); the remaining rows
are zero padding and are masked out of the re-weighting softmax, so tags with fewer descriptions behave
exactly as if they were alone. The official closed-set vocabulary has 51 descriptions for every tag.

On disk a vocabulary is one safetensors file: the tensors `embeddings`, `counts` and `thresholds`, and the
JSON metadata (tags, name, version, text encoder, sha256, ...) in the file header. No pickle anywhere.

Somewhat past the house's 400 lines: one class whose constructors (from descriptions, from the official
checkpoint, from a file, from bytes) all funnel into one validation of shapes, counts, thresholds and
checksum; kept in one file so that no way in can skip it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file

from ramplus_core.errors import VocabularyError

FORMAT = "ramplus.vocabulary/1"
TAG_TEMPLATE = "a photo of a {tag}."
OPEN_SET_THRESHOLD = 0.5  # the official open-set scripts' threshold
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

TextEncode = Callable[[list[str]], torch.Tensor]


class VocabularyMetadata(BaseModel):
    """What a vocabulary is, apart from its tensors."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    name: str = Field(min_length=1, description="Vocabulary name, e.g. 'ram-official'.")
    version: str = Field("1", min_length=1, description="Version label; immutable once published.")
    text_encoder: str = Field(description="Id of the text encoder that made the embeddings.")
    dim: int = Field(gt=0, description="Embedding dimension.")
    num_tags: int = Field(ge=0)
    max_descriptions: int = Field(ge=1, description="Descriptions per tag before padding.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    sha256: str = Field(description="sha256 of the embedding bytes followed by the counts (int32 LE).")
    source: str = Field("embeddings", description="How it was built: official, descriptions, tags, ...")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    tags: list[str]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


_FINITE_SCAN_TAGS = 1024  # tags per slice of the finiteness scan: 1024 x 51 x 512 fp16 is 53 MB


def content_sha256(embeddings: torch.Tensor, counts: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(_tensor_bytes(embeddings))
    digest.update(_tensor_bytes(counts.to(torch.int32)))
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a view, not a copy (a 50,000 x 51 x 512 fp16 vocabulary is 2.6 GB)."""
    t = t.detach().cpu().contiguous()
    # bfloat16 has no numpy dtype: hash its raw 16-bit pattern.
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _as_thresholds(thresholds: float | Sequence[float] | torch.Tensor | None, num_tags: int) -> torch.Tensor:
    if thresholds is None:
        thresholds = OPEN_SET_THRESHOLD
    if isinstance(thresholds, (int, float)):
        return torch.full((num_tags,), float(thresholds), dtype=torch.float32)
    t = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
    if t.numel() != num_tags:
        raise VocabularyError(f"{t.numel()} thresholds for {num_tags} tags: give one per tag or a single number")
    return t


class Vocabulary:
    """Tags + thresholds + padded description embeddings + metadata."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        counts: torch.Tensor,
        thresholds: torch.Tensor,
        metadata: VocabularyMetadata,
        *,
        validate: bool = True,
        check_sha: bool = True,
    ) -> None:
        self.embeddings = embeddings
        self.counts = counts.to(torch.int64)
        self.thresholds = thresholds.to(torch.float32)
        self.metadata = metadata
        self._finite_state: tuple[int, ...] | None = None
        if validate:
            self.validate(check_sha=check_sha)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_embeddings(
        cls,
        tags: Sequence[str],
        embeddings: torch.Tensor | Sequence[torch.Tensor],
        *,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
        name: str = "custom",
        version: str = "1",
        text_encoder: str = "unknown",
        source: str = "embeddings",
        dtype: str = "float32",
        counts: Sequence[int] | torch.Tensor | None = None,
        sha256: str | None = None,
    ) -> Vocabulary:
        """Build from a [C, D, dim] tensor or from one [D_i, dim] tensor per tag (ragged).

        A [C, D, dim] tensor with `counts` is already padded: tag i uses its first counts[i] rows (no
        per-tag copies). `sha256` is for a caller that has just hashed these exact bytes (see
        `content_sha256`); it is not recomputed.
        """
        tags = list(tags)
        if dtype not in _DTYPES:
            raise VocabularyError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        if isinstance(embeddings, torch.Tensor):
            if embeddings.ndim != 3:
                raise VocabularyError(
                    f"embeddings must be [num_tags, descriptions, dim], got shape {tuple(embeddings.shape)}"
                )
            padded = embeddings.detach()
            if counts is None:
                counts = torch.full((padded.shape[0],), padded.shape[1], dtype=torch.int64)
            counts = torch.as_tensor(counts, dtype=torch.int64)
            if counts.shape != (padded.shape[0],):
                raise VocabularyError(f"{counts.numel()} description counts for {padded.shape[0]} tags")
        else:
            if counts is not None:
                raise VocabularyError("counts go with a padded [C, D, dim] tensor, not per-tag tensors")
            per_tag = [torch.as_tensor(e).detach() for e in embeddings]
            if not per_tag:
                raise VocabularyError("a vocabulary needs at least one tag")
            for tag, e in zip(tags, per_tag):
                if e.ndim != 2 or e.shape[0] == 0:
                    raise VocabularyError(
                        f"tag {tag!r}: expected [descriptions, dim] embeddings, got shape {tuple(e.shape)}"
                    )
            dims = {e.shape[1] for e in per_tag}
            if len(dims) != 1:
                raise VocabularyError(f"description embeddings of different dimensions: {sorted(dims)}")
            counts = torch.tensor([e.shape[0] for e in per_tag], dtype=torch.int64)
            padded = torch.zeros(len(per_tag), int(counts.max()), dims.pop(), dtype=per_tag[0].dtype)
            for i, e in enumerate(per_tag):
                padded[i, : e.shape[0]] = e
        if padded.shape[0] != len(tags):
            raise VocabularyError(f"{len(tags)} tags but embeddings for {padded.shape[0]}")
        padded = padded.to(_DTYPES[dtype]).contiguous()
        metadata = VocabularyMetadata(
            name=name,
            version=version,
            text_encoder=text_encoder,
            dim=padded.shape[2],
            num_tags=len(tags),
            max_descriptions=max(padded.shape[1], 1),
            dtype=dtype,  # type: ignore[arg-type]
            sha256=sha256 or content_sha256(padded, counts),
            source=source,
            tags=tags,
        )
        return cls(padded, counts, _as_thresholds(thresholds, len(tags)), metadata, check_sha=False)

    @classmethod
    def from_official(
        cls,
        label_embed: torch.Tensor,
        tags: Sequence[str],
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
        *,
        name: str = "ram-official",
        version: str = "1",
        text_encoder: str = "open_clip:ViT-B-16/openai",
    ) -> Vocabulary:
        """The official layout: `label_embed` [num_tags * D, dim], D consecutive rows per tag (class-major)."""
        tags = list(tags)
        if label_embed.ndim != 2:
            raise VocabularyError(f"official label_embed must be 2-D [tags*descriptions, dim], got {tuple(label_embed.shape)}")
        if not tags or label_embed.shape[0] % len(tags):
            raise VocabularyError(
                f"label_embed has {label_embed.shape[0]} rows, not a multiple of the {len(tags)} tags given: "
                "is the tag list the one the checkpoint was trained with?"
            )
        per_tag = label_embed.shape[0] // len(tags)
        return cls.from_embeddings(
            tags,
            label_embed.reshape(len(tags), per_tag, label_embed.shape[1]),
            thresholds=thresholds,
            name=name,
            version=version,
            text_encoder=text_encoder,
            source="official",
        )

    @classmethod
    def from_descriptions(
        cls,
        items: Iterable[dict[str, Sequence[str]]],
        encode: TextEncode,
        *,
        text_encoder: str,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
        name: str = "custom",
        version: str = "1",
        dtype: str = "float32",
    ) -> Vocabulary:
        """From the official description format: a list of `{tag: [descriptions]}`; counts may differ."""
        tags: list[str] = []
        texts: list[str] = []
        counts: list[int] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or len(item) != 1:
                raise VocabularyError(f"description item {i} must be a single-key {{tag: [descriptions]}} dict")
            ((tag, descriptions),) = item.items()
            if not descriptions or not all(isinstance(d, str) for d in descriptions):
                raise VocabularyError(f"tag {tag!r} needs a non-empty list of description strings")
            tags.append(tag)
            texts.extend(descriptions)
            counts.append(len(descriptions))
        # One encode call for all tags: the encoder batches across tag boundaries.
        embeds = list(_normalize(encode(texts)).split(counts)) if texts else []
        return cls.from_embeddings(
            tags, embeds, thresholds=thresholds, name=name, version=version,
            text_encoder=text_encoder, source="descriptions", dtype=dtype,
        )

    @classmethod
    def from_tags(
        cls,
        tags: Sequence[str],
        encode: TextEncode,
        *,
        text_encoder: str,
        template: str = TAG_TEMPLATE,
        thresholds: float | Sequence[float] | torch.Tensor | None = None,
        name: str = "custom",
        version: str = "1",
        dtype: str = "float32",
    ) -> Vocabulary:
        """From bare tag names, one templated description each."""
        tags = list(tags)
        if not tags:
            raise VocabularyError("a vocabulary needs at least one tag")
        embeds = _normalize(encode([template.format(tag=t) for t in tags]))
        return cls.from_embeddings(
            tags, embeds.unsqueeze(1), thresholds=thresholds, name=name, version=version,
            text_encoder=text_encoder, source="tags", dtype=dtype,
        )

    # -- views --------------------------------------------------------------------------------------------

    @property
    def tags(self) -> list[str]:
        return self.metadata.tags

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def ref(self) -> str:
        """`name@version`, how results name the vocabulary that tagged them."""
        return self.metadata.ref

    @property
    def dim(self) -> int:
        return self.metadata.dim

    def __len__(self) -> int:
        return len(self.metadata.tags)

    def __repr__(self) -> str:
        return (
            f"Vocabulary({self.ref!r}, tags={len(self)}, descriptions<={self.embeddings.shape[1]}, "
            f"dim={self.dim}, dtype={self.metadata.dtype})"
        )

    def mask(self) -> torch.Tensor | None:
        """[C, D] bool, True where a description exists; None when every tag has all D descriptions."""
        d = self.embeddings.shape[1]
        if bool((self.counts == d).all()):
            return None
        return torch.arange(d).unsqueeze(0) < self.counts.unsqueeze(1)

    def select(self, tags: Sequence[str], *, name: str | None = None, version: str | None = None) -> Vocabulary:
        """A vocabulary of a subset of these tags, in the order given (the official closed-subset trick)."""
        index = {t: i for i, t in enumerate(self.tags)}
        missing = [t for t in tags if t not in index]
        if missing:
            raise VocabularyError(f"tags not in {self.ref}: {', '.join(map(repr, missing[:10]))}")
        rows = torch.tensor([index[t] for t in tags], dtype=torch.long)
        counts = self.counts[rows]
        embeddings = self.embeddings[rows][:, : int(counts.max())].contiguous()
        meta = self.metadata.model_copy(
            update={
                "name": name or self.metadata.name,
                "version": version or f"{self.metadata.version}+subset",
                "num_tags": len(tags),
                "max_descriptions": embeddings.shape[1],
                "sha256": content_sha256(embeddings, counts),
                "tags": list(tags),
            }
        )
        return Vocabulary(embeddings, counts, self.thresholds[rows].clone(), meta, check_sha=False)

    def with_thresholds(self, thresholds: float | Sequence[float] | torch.Tensor) -> Vocabulary:
        return Vocabulary(self.embeddings, self.counts, _as_thresholds(thresholds, len(self)), self.metadata, check_sha=False)

    # -- checks -------------------------------------------------------------------------------------------

    def validate(self, dim: int | None = None, *, check_sha: bool = True) -> None:
        """Raise `VocabularyError` naming the problem if this vocabulary cannot be used (by a model of `dim`).

        `check_sha=False` skips re-hashing (about a second for an official-size vocabulary) where the hash
        was just computed or already checked when the file was read.
        """
        meta, e = self.metadata, self.embeddings
        where = f"vocabulary {meta.ref}"
        if e.ndim != 3:
            raise VocabularyError(f"{where}: embeddings must be 3-D [tags, descriptions, dim], got {tuple(e.shape)}")
        c, d, k = e.shape
        if len(meta.tags) != c or meta.num_tags != c:
            raise VocabularyError(f"{where}: {len(meta.tags)} tag names (num_tags={meta.num_tags}) for {c} embedding rows")
        if k != meta.dim:
            raise VocabularyError(f"{where}: metadata says dim {meta.dim} but embeddings have {k}")
        if dim is not None and k != dim:
            raise VocabularyError(
                f"{where}: embeddings are {k}-d but the model expects {dim}-d "
                f"(built with text encoder {meta.text_encoder!r}; rebuild it with the model's text encoder)"
            )
        if e.dtype != _DTYPES[meta.dtype]:
            raise VocabularyError(f"{where}: metadata says {meta.dtype} but embeddings are {e.dtype}")
        if len(set(meta.tags)) != c:
            dupes = sorted({t for t in meta.tags if meta.tags.count(t) > 1})
            raise VocabularyError(f"{where}: duplicate tags {', '.join(map(repr, dupes[:10]))}")
        if any(not t.strip() for t in meta.tags):
            raise VocabularyError(f"{where}: empty tag name")
        if self.counts.shape != (c,) or self.thresholds.shape != (c,):
            raise VocabularyError(f"{where}: counts/thresholds must have one entry per tag ({c})")
        if c and (int(self.counts.min()) < 1 or int(self.counts.max()) > d):
            raise VocabularyError(f"{where}: every tag needs between 1 and {d} descriptions")
        # The finiteness scan is the costly part (a second for an official-size vocabulary): done once per
        # tensor state; the tensor's version counter moves on any in-place change, so a change is rescanned.
        state = (id(e), e._version, id(self.counts), self.counts._version)
        if self._finite_state != state:
            # Padding rows too: a 0 weight times NaN is still NaN in the re-weighting matmul. In slices of tags:
            # isfinite's temporaries are 2.5x what it scans (6 GB for a 50,000 x 51 x 512 fp16 vocabulary at once).
            for start in range(0, c, _FINITE_SCAN_TAGS):
                bad = ~torch.isfinite(e[start : start + _FINITE_SCAN_TAGS]).all(dim=2)
                if bool(bad.any()):
                    tag = meta.tags[start + int(bad.any(dim=1).nonzero()[0])]
                    raise VocabularyError(f"{where}: non-finite (NaN or inf) embedding values, first in tag {tag!r}")
            self._finite_state = state
        if not bool(torch.isfinite(self.thresholds).all()) or bool(((self.thresholds < 0) | (self.thresholds > 1)).any()):
            raise VocabularyError(f"{where}: thresholds must be finite probabilities in [0, 1]")
        if not check_sha:
            return
        actual = content_sha256(e, self.counts)
        if actual != meta.sha256:
            raise VocabularyError(f"{where}: sha256 mismatch (metadata {meta.sha256[:12]}..., content {actual[:12]}...): corrupt or altered")

    # -- files --------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {
                "embeddings": self.embeddings.contiguous(),
                "counts": self.counts.to(torch.int32).contiguous(),
                "thresholds": self.thresholds.contiguous(),
            },
            str(tmp),
            metadata={"format": FORMAT, "vocabulary": self.metadata.model_dump_json()},
        )
        tmp.replace(path)  # readers never see a half-written file
        return path

    @classmethod
    def load(cls, path: str | Path, *, dim: int | None = None) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"vocabulary file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for every malformation
            raise VocabularyError(f"{path}: not a readable safetensors vocabulary ({exc})") from exc
        if header.get("format") != FORMAT or "vocabulary" not in header:
            raise VocabularyError(f"{path}: not a RAMPlus vocabulary (format {header.get('format')!r})")
        missing = {"embeddings", "counts", "thresholds"} - tensors.keys()
        if missing:
            raise VocabularyError(f"{path}: missing tensors {sorted(missing)}")
        try:
            meta = VocabularyMetadata.model_validate_json(header["vocabulary"])
        except ValueError as exc:
            raise VocabularyError(f"{path}: bad vocabulary metadata: {exc}") from exc
        vocab = cls(tensors["embeddings"], tensors["counts"], tensors["thresholds"], meta, validate=False)
        vocab.validate(dim)
        return vocab

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.metadata.model_dump_json())


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def read_tag_list(path: str | Path) -> list[str]:
    """The official tag-list format: one tag per line (`splitlines`, no stripping, as the official code)."""
    text = Path(path).read_text(encoding="utf-8")
    tags = text.splitlines()
    if not tags:
        raise VocabularyError(f"{path}: empty tag list")
    return tags


def read_thresholds(path: str | Path) -> list[float]:
    values: list[float] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            v = float(line)
        except ValueError:
            raise VocabularyError(f"{path}:{n}: not a number: {line!r}") from None
        if not math.isfinite(v) or not 0 <= v <= 1:
            raise VocabularyError(f"{path}:{n}: threshold {v} is not a probability in [0, 1]")
        values.append(v)
    return values

"""The fleet's settings: environment variables `RAMPLUS_<SECTION>__<FIELD>`, or a TOML/JSON config file.

Precedence, highest first: values passed in code, environment variables, the config file named by
`RAMPLUS_CONFIG` (or `Settings.load(path)`), the defaults below. Every default is safe: no URI is
fetchable until an allowlist names it.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field("127.0.0.1:19092", description="host:port[,host:port...]")
    topic: str = Field("ramplus.requests", description="Input topic of tag requests")
    group_id: str = Field("ramplus-fleet", description="Consumer group shared by all replicas")
    dead_letter_topic: str = Field("ramplus.requests.dlq", description="Where unusable requests go, with their reason")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest",
        description="Where a partition the group never committed starts: earliest = its first record, latest = its end when first assigned",
    )
    session_timeout_ms: int = Field(45_000, ge=6_000, description="Group session timeout (liveness)")
    max_poll_interval_ms: int = Field(300_000, ge=10_000, description="Max time between polls before eviction")
    max_poll_records: int = Field(256, ge=1, description="Records per poll")
    static_membership: bool = Field(True, description="Replica i joins as '<group>-replica-i' (no rebalance on restart)")
    max_request_bytes: int = Field(
        256 * 1024, ge=1024, description="Larger request messages are dead-lettered (too_large) without being parsed"
    )
    dead_letter_original_bytes: int = Field(
        64 * 1024, ge=0, description="How much of a bad record's value its dead letter carries (the whole: size + sha256)"
    )
    client_options: dict[str, Any] = Field(default_factory=dict, description="Extra kafka-python options (security, ...)")


class S3Settings(BaseModel):
    endpoint_url: str | None = Field(None, description="S3 endpoint; None = AWS")
    region: str = Field("us-east-1", description="Region for signing")
    bucket: str = Field("ramplus-results", description="Bucket for result objects")
    prefix: str = Field("results/", description="Key prefix of result objects")
    create_bucket: bool = Field(False, description="Create the result bucket if it does not exist")
    canary_prefix: str = Field("canary/", description="Key prefix of canary results (never under the results prefix)")
    # Credentials come from the usual AWS chain (AWS_ACCESS_KEY_ID, profiles, instance roles): never from here.

    @model_validator(mode="after")
    def _canary_apart(self) -> S3Settings:
        # Consumers list the results prefix: a canary result under it would be read as a real one.
        a, b = self.prefix, self.canary_prefix
        if not b or a.startswith(b) or b.startswith(a):
            raise ValueError(f"s3.canary_prefix {b!r} and s3.prefix {a!r} must not contain one another")
        return self


class RedisSettings(BaseModel):
    url: str = Field("redis://127.0.0.1:16379/0", description="Vocabulary store")
    vocabulary: str | None = Field(None, description="Follow this vocabulary's active version (None: the model's own)")
    poll_interval_s: float = Field(1.0, gt=0, description="Fallback check of the active version when no event comes")
    cache_size: int = Field(4, ge=1, description="Vocabularies kept loaded for requests that name one besides the active")
    prefetch: bool = Field(True, description="Load a version of the followed vocabulary when it is published, so activate is instant")
    canary_min_agreement: float | None = Field(
        None, ge=0, le=1, description="`vocab activate` refuses a version whose canary agreed less on average (unless --force)"
    )


class FetchSettings(BaseModel):
    max_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest image file accepted")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image canvas (width x height) accepted")
    timeout_s: float = Field(10.0, gt=0, description="Connect/read timeout per fetch")
    attempts: int = Field(3, ge=1, description="Tries for transient fetch failures before dead-lettering")
    concurrency: int = Field(8, ge=1, description="Fetch + decode threads per replica")
    s3_buckets: list[str] = Field(default_factory=list, description="Readable buckets (glob patterns; '*' = any)")
    http_hosts: list[str] = Field(default_factory=list, description="Fetchable hosts (glob patterns like '*.example.com')")
    allow_plain_http: bool = Field(False, description="Also allow http:// for allowlisted hosts")
    file_roots: list[Path] = Field(default_factory=list, description="Folders file:// URIs may read from")

    def bucket_allowed(self, bucket: str) -> bool:
        return any(fnmatch.fnmatchcase(bucket, pattern) for pattern in self.s3_buckets)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in self.http_hosts)


def batch_buckets(batch_size: int) -> list[int]:
    """The batch sizes a compiled engine is built for by default: 1/8, 1/4, 1/2 and all of `batch_size`
    (four graphs to compile and warm up; a partial batch larger than 1/8 is padded to at most twice its size)."""
    return sorted({max(1, batch_size // d) for d in (8, 4, 2)} | {batch_size})


class ModelSettings(BaseModel):
    checkpoint: str | None = Field(None, description="Official .pth, our model directory, or an s3:// artifact")
    variant: str | None = Field(None, description="swin_l or swin_b; inferred when omitted")
    image_size: int | None = Field(None, description="224 or 384; inferred when omitted")
    vocabulary: Path | None = Field(None, description="Vocabulary file; default: the checkpoint's own")
    tag_list: Path | None = Field(None, description="Official tag list for an official checkpoint")
    thresholds: Path | None = Field(None, description="Official thresholds for an official checkpoint")
    trust_checkpoint: bool = Field(False, description="Allow full unpickling of a checkpoint you trust")
    device: str = Field("auto", description="auto (cuda when a GPU is assigned), cpu, cuda")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Weights dtype; bf16 on GPUs")
    fast_preprocess: bool = Field(True, description="Batched resize (see README 'Preprocessing')")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="Where JPEGs are decoded: gpu = batched on the model's device (nvJPEG), cpu = PIL in the fetch threads; auto = gpu on CUDA",
    )
    compile: bool = Field(
        False,
        description="torch.compile the image encoder for fixed batch sizes, compiled and warmed up before a replica joins its group",
    )
    compile_buckets: list[int] | None = Field(
        None, description="Batch sizes compiled (a partial batch is padded to the next); None: 1/8, 1/4, 1/2 and all of the batch size",
    )
    tag_chunk_size: int | Literal["auto", "none"] = Field(
        "auto", description="Tags the head scores at once: auto (from the free memory and the batch), none (all at once) or a number",
    )
    head_memory_mb: int | None = Field(
        None, ge=1,
        description="Memory the head may take with tag_chunk_size=auto; None: half the free GPU memory, or a quarter of the available host memory up to 2 GiB",
    )
    cache_dir: Path = Field(
        Path("~/.cache/ramplus"), validate_default=True,
        description="Local copies: downloaded checkpoints (checkpoints/) and fetched s3:// artifacts (artifacts/)",
    )

    @field_validator("compile_buckets")
    @classmethod
    def _positive_buckets(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("compile buckets are batch sizes >= 1 (leave unset for the default)")
        return value

    @field_validator("tag_chunk_size")
    @classmethod
    def _positive_chunk(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("tag_chunk_size is auto, none or a number of tags >= 1")
        return value

    def head_options(self) -> dict[str, Any]:
        """The engine's `tag_chunk_size` and `head_memory_bytes` (ramplus_core.model.RamPlus.head_logits)."""
        return {
            "tag_chunk_size": None if self.tag_chunk_size == "none" else self.tag_chunk_size,
            "head_memory_bytes": self.head_memory_mb * 2**20 if self.head_memory_mb is not None else None,
        }

    def buckets_for(self, batch_size: int) -> list[int] | None:
        """The batch sizes to compile for a stage that forms batches of `batch_size` (None: not compiled)."""
        if not self.compile:
            return None
        return self.compile_buckets or batch_buckets(batch_size)

    @field_validator("cache_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()  # env values are not shell-expanded, and "~/..." is what people write

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value


class FleetSettings(BaseModel):
    replicas: int = Field(1, ge=1, description="Replica actors (Kafka group members)")
    gpus_per_replica: float = Field(0.0, ge=0, description="0 on machines without a GPU")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    batch_size: int = Field(16, ge=1, description="Images per forward pass")
    max_batch_wait_s: float = Field(0.05, ge=0, description="Longest a partial batch waits for more images")
    max_in_flight: int = Field(256, ge=1, description="Uncommitted records per replica before partitions pause")
    metrics_port: int = Field(9464, ge=0, description="Prometheus endpoint of `ramplus serve` (0 = off)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds (0.0.0.0 in a pod)")
    ray_address: str | None = Field(None, description="Join this Ray cluster; None = start a local one")
    drain_timeout_s: float = Field(60.0, gt=0, description="How long a stopping replica may take to drain")
    stuck_after_s: float = Field(
        120.0, gt=0, description="A record in flight longer than this is reported (log record.stuck, a metric)"
    )
    resources_per_replica: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources per replica, e.g. {\"ramplus_slot\": 1} (places replicas on nodes that have them)"
    )
    min_replicas: int | None = Field(None, ge=1, description="Lag scaling: fewest replicas (None with max_replicas None: a fixed `replicas`)")
    max_replicas: int | None = Field(None, ge=1, description="Lag scaling: most replicas (never more than the topic's partitions)")
    target_lag_per_replica: int = Field(1_000, ge=1, description="Lag scaling: uncommitted records one replica should face")
    scale_up_delay_s: float = Field(15.0, ge=0, description="Lag scaling: how long the lag must ask for more replicas before they start")
    scale_down_delay_s: float = Field(120.0, ge=0, description="Lag scaling: how long it must ask for fewer before one drains and leaves")
    lost_replica_grace_s: float = Field(
        10.0, ge=0, description="A replica not alive this long (or at once if its node is dead) loses its partitions to the others"
    )
    watch_interval_s: float = Field(2.0, gt=0, description="How often the driver checks replicas' health and the lag")

    @model_validator(mode="after")
    def _scaling_bounds(self) -> FleetSettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both fleet.min_replicas and fleet.max_replicas (lag scaling), or neither (fixed replicas)")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"fleet.min_replicas ({self.min_replicas}) is above fleet.max_replicas ({self.max_replicas})")
        return self

    @property
    def scales(self) -> bool:
        return self.min_replicas is not None and self.max_replicas is not None and self.max_replicas > self.min_replicas

    @property
    def initial_replicas(self) -> int:
        """Replicas at start: `replicas`, within [min_replicas, max_replicas] when lag scaling is on."""
        if self.min_replicas is None or self.max_replicas is None:
            return self.replicas
        return max(self.min_replicas, min(self.max_replicas, self.replicas))


class TrainSettings(BaseModel):
    run_name: str = Field("ramplus-retrain", description="Ray Train run; submitting the same name again resumes it")
    manifest: str | None = Field(None, description="Triplets (JSON lines: uri, captions, tags, split) on s3:// or disk")
    storage_path: str = Field("s3://ramplus-train/runs", description="Ray Train checkpoints (s3://bucket/prefix or a shared dir)")
    output: str | None = Field("s3://ramplus-train/models", description="Where the final artifact goes: <output>/<run_name>/<version>/")
    model: str = Field("tiny@64", description="Model config when starting from scratch")
    init: str = Field("scratch", description="scratch, an official .pth, our model directory, or an s3:// artifact")
    trust_checkpoint: bool = Field(False, description="Allow full unpickling of an init checkpoint you trust")
    vocabulary: str | None = Field(None, description="Vocabulary file (.safetensors) or redis:NAME[@VERSION]")
    text_encoder: str = Field("ViT-B-16", description="Frozen open_clip text encoder that embeds captions")
    text_weights: str | None = Field("openai", description="Its weights: 'openai', a local file, or none (random, seeded)")
    text_seed: int = Field(0, description="Seed of random text-encoder weights (must match the vocabulary's builder)")
    epochs: int = Field(20, ge=1, description="Passes over the training split")
    batch_size: int = Field(32, ge=1, description="Global batch (split across workers)")
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate (5e-4 for tiny models from scratch)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases and norms)")
    encoder_lr_scale: float = Field(1.0, gt=0, le=1, description="Image encoder's learning rate as a fraction of lr (fine-tuning: e.g. 0.1)")
    freeze_encoder: bool = Field(False, description="Train the head only; the image encoder keeps its initial weights")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps before the cosine decay")
    tag_weight: float = Field(1.0, ge=0, description="Weight of the tagging ASL")
    text_weight: float = Field(1.0, ge=0, description="Weight of the image-text alignment ASL")
    distill_weight: float = Field(0.0, ge=0, description="Weight of the L1 distillation to `teacher` (0: off)")
    teacher: str | None = Field(None, description="Frozen teacher checkpoint for distillation")
    flip: bool = Field(True, description="Random horizontal flips")
    workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="One GPU per worker, bf16 autocast")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (also its torch threads)")
    max_minutes: float | None = Field(None, gt=0, description="Stop (evaluate, checkpoint, publish) after this long; the lr's cosine then ends at the same time")
    channels_last: bool = Field(False, description="GPU: NHWC images and weights")
    grad_checkpointing: bool = Field(False, description="Recompute the Swin stages' activations in backward (less memory, larger batches)")
    compile: bool = Field(False, description="torch.compile the training step (forward and backward)")
    fused_optimizer: bool | None = Field(None, description="AdamW's fused kernel (None: on for GPUs)")
    calibrate: bool = Field(True, description="Per-tag thresholds from the validation split (best F1) in the artifact")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (from the last checkpoint)")
    seed: int = Field(0, description="Shuffling, flips and initialisation")


class BackfillSettings(BaseModel):
    input: str | None = Field(None, description="s3://bucket/prefix of the images to tag")
    output: str | None = Field(None, description="s3://bucket/prefix/ for result and error shards")
    vocab: str | None = Field(None, description="NAME or NAME@VERSION from Redis (NAME: its active version); None: the model's own")
    include: list[str] = Field(default_factory=lambda: ["*"], description="Glob patterns on keys relative to the input prefix")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of keys to leave out")
    max_bytes: int | None = Field(None, ge=1, description="Larger objects go to the error report unread (None: fetch.max_bytes)")
    shard_size: int = Field(1000, ge=1, description="Average images per result shard (shard boundaries follow the keys)")
    format: Literal["jsonl", "parquet"] = Field("jsonl", description="Result shard format")
    replicas: int | None = Field(None, ge=1, description="Tagging actors (None: one per GPU in the cluster, else 1)")
    decode_tasks: int | None = Field(None, ge=1, description="Concurrent fetch + decode tasks (None: Ray Data decides)")
    batch_size: int = Field(32, ge=1, description="Images per forward pass")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs a tagging actor reserves (on CPU: its torch threads)")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs a fetch + decode task reserves")
    retry_transient: bool = Field(True, description="A rerun redoes shards whose errors were transient (fetch, internal)")


class LLMSettings(BaseModel):
    """How to reach the LLM that writes tag descriptions (`ramplus vocab build --llm`)."""

    base_url: str = Field(
        default="https://api.openai.com/v1",
        description="Base URL of an OpenAI-compatible API; requests go to <base_url>/chat/completions.",
    )
    model: str = Field(
        default="gpt-3.5-turbo",
        description="Model name sent to the endpoint (the official descriptions came from gpt-3.5-turbo). "
        "Also part of the cache key, so answers of different models never mix.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token for the endpoint; leave unset for local servers that need none.",
    )
    answers_per_prompt: int = Field(
        default=10, ge=1, description="Answers collected per prompt (official: 10, giving 1 + 5*10 = 51)."
    )
    max_tokens: int = Field(default=77, ge=1, description="Completion length limit per answer (official: 77).")
    temperature: float = Field(default=0.99, ge=0.0, le=2.0, description="Sampling temperature (official: 0.99).")
    requests_per_minute: float = Field(
        default=60, ge=0, description="Upper bound on HTTP requests per minute, retries included; 0 disables it."
    )
    max_retries: int = Field(
        default=5, ge=0, description="Retries of one request after a transport error, HTTP 429 or HTTP 5xx."
    )
    timeout_s: float = Field(default=60, gt=0, description="Timeout of one HTTP request, in seconds.")
    cache_dir: Path = Field(
        Path("~/.cache/ramplus/descriptions"),
        validate_default=True,
        description="Directory of cached answers (one small JSON file per prompt); a rerun reads them instead "
        "of asking the LLM again.",
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        # Env vars are not shell-expanded, and "~/..." is what people write in them.
        return value.expanduser()


class LogSettings(BaseModel):
    """Read by `workers.logs.configure_logging` straight from the environment, under these names: logging
    starts before settings are loaded, so that an error in them is logged too."""

    level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    format: Literal["json", "console"] | None = Field(None, description="json or console; default: console on a terminal, else json")


# Names of an earlier scheme, refused with the new name rather than silently ignored.
RETIRED_ENV = {
    "RAMPLUS_CHECKPOINT": "RAMPLUS_MODEL__CHECKPOINT",
    "RAMPLUS_TAG_LIST": "RAMPLUS_MODEL__TAG_LIST",
    "RAMPLUS_THRESHOLDS": "RAMPLUS_MODEL__THRESHOLDS",
    "RAMPLUS_CACHE_DIR": "RAMPLUS_MODEL__CACHE_DIR",
    "RAMPLUS_TEXT_ENCODER_WEIGHTS": "RAMPLUS_TRAIN__TEXT_WEIGHTS",
    "RAMPLUS_LOG_LEVEL": "RAMPLUS_LOG__LEVEL",
    "RAMPLUS_LOG_FORMAT": "RAMPLUS_LOG__FORMAT",
}


def refuse_retired_env(environ: Mapping[str, str] | None = None) -> None:
    """Raise naming every variable of the retired scheme that is set (`RAMPLUS_LLM_X` is `RAMPLUS_LLM__X` now)."""
    environ = os.environ if environ is None else environ
    renamed = {old: new for old, new in RETIRED_ENV.items() if old in environ}
    renamed |= {
        name: "RAMPLUS_LLM__" + name.removeprefix("RAMPLUS_LLM_")
        for name in environ if name.startswith("RAMPLUS_LLM_") and not name.startswith("RAMPLUS_LLM__")
    }
    if renamed:
        raise ValueError("renamed settings: " + ", ".join(f"{old} is now {new}" for old, new in sorted(renamed.items())))


class Settings(BaseSettings):
    """Everything `ramplus serve` and `ramplus produce` need."""

    model_config = SettingsConfigDict(env_prefix="RAMPLUS_", env_nested_delimiter="__", extra="ignore")
    config_file: ClassVar[Path | None] = None

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    backfill: BackfillSettings = Field(default_factory=BackfillSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @field_validator("fetch")
    @classmethod
    def _roots_absolute(cls, fetch: FetchSettings) -> FetchSettings:
        fetch.file_roots = [p.expanduser().resolve() for p in fetch.file_roots]
        return fetch

    @model_validator(mode="after")
    def _drain_within_rebalance(self) -> Settings:
        # A revocation waits up to drain_timeout_s for records in flight while the group waits for this
        # member to rejoin; past the rebalance timeout (max_poll_interval_ms) the broker drops the member.
        rebalance_s = self.kafka.max_poll_interval_ms / 1000
        if self.fleet.drain_timeout_s > rebalance_s / 2:
            raise ValueError(
                f"fleet.drain_timeout_s ({self.fleet.drain_timeout_s:g}) must be at most half of kafka.max_poll_interval_ms "
                f"({rebalance_s:g} s): a revocation drains for that long while the rest of the group waits"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        refuse_retired_env()
        path = cls.config_file or (Path(os.environ["RAMPLUS_CONFIG"]) if os.environ.get("RAMPLUS_CONFIG") else None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist (RAMPLUS_CONFIG or --config)")
            if path.suffix == ".json":
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
            else:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> Settings:
        """Settings from the environment and an optional TOML/JSON file (which env variables override)."""
        previous = cls.config_file
        cls.config_file = config
        try:
            return cls(**overrides)
        finally:
            cls.config_file = previous

    def with_overrides(self, **dotted: Any) -> Settings:
        """A copy with `section__field=value` overrides (command-line options), validated like everything else;
        None leaves a setting as it is. The one way the CLI and the jobs override settings."""
        data = self.model_dump()
        for key, value in dotted.items():
            if value is None:
                continue
            section, _, name = key.partition("__")
            if section not in data or name not in data[section]:
                raise ValueError(f"unknown setting {key!r}: expected section__field, e.g. fleet__replicas")
            data[section][name] = value
        return type(self).model_validate(data)


def settings_table() -> str:
    """The README's fleet configuration table, generated from the models above (docs that match the code)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for section, info in Settings.model_fields.items():
        model = info.annotation
        for name, field in model.model_fields.items():  # type: ignore[union-attr]
            if field.default_factory is not None:
                default = repr(field.default_factory())
            else:
                default = "" if field.default is None else repr(field.default)
            default = default.replace("|", "\\|")
            rows.append(f"| `RAMPLUS_{section.upper()}__{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows) + "\n"

"""Retraining RAM++ with Ray Train: the per-worker loop, its checkpoints, and the artifact at the end.

`run(settings)` is what `jobs/retrain.py` calls. It starts a `TorchTrainer` (DDP over `train.workers`
ranks, gloo on CPUs, NCCL + bf16 autocast on GPUs) whose run is named `train.run_name` under
`train.storage_path`: submitting the same name again finds the run's last checkpoint there and goes on
from it (Ray Train restores its checkpoint manager from storage; the loop reads `get_checkpoint()`).

Each rank reads the manifest, takes an equal share of the training split, fetches and decodes its images
once with the fleet's fetcher (same allowlists and limits) and the official preprocessing, and embeds
the captions once with the frozen text encoder (the encoder is frozen, so embedding each caption once is
the same as embedding it per batch, only cheaper). Rank 0 evaluates on the validation split after every
epoch (mAP, the label-prior baseline, P/R/F1 at the vocabulary's thresholds) and writes the checkpoint.

At the end the driver takes the last checkpoint, sets per-tag thresholds calibrated on the validation
split (best F1), and publishes the model in our safe format with its metrics and its own evaluation
scores (`eval/`), so that what serves it can be checked against what the job measured.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog
import torch

from ramplus_core import RamPlus, Vocabulary, load_checkpoint, save_pretrained
from ramplus_core.evaluation import average_precision, calibrate_thresholds, label_prior_map, mean_average_precision, precision_recall_f1
from ramplus_core.tagger import create_model
from ramplus_core.training import (
    LossWeights,
    RamPlusTraining,
    StepOptions,
    build_optimizer,
    caption_targets,
    fused_for,
    prepare_step,
    tag_targets,
    warmup_cosine,
)
from workers.train.artifacts import publish_artifact, resolve_checkpoint
from workers.train.data import Examples, fetchable_uri, load_examples, shard_records, split_records
from workers.train.manifest import read_manifest
from workers.settings import Settings, TrainSettings

log = structlog.get_logger("ramplus.retrain")

CHECKPOINT_MODEL = "model"  # save_pretrained directory inside a checkpoint
CHECKPOINT_OPTIMIZER = "optimizer.pt"  # tensors + numbers only: read back with weights_only=True
CHECKPOINT_STATE = "state.json"


# -- data ---------------------------------------------------------------------------------------------------


# -- model, vocabulary, text --------------------------------------------------------------------------------


def load_training_vocabulary(spec: str | None, settings: Settings) -> Vocabulary:
    if spec is None:
        raise ValueError("train.vocabulary is required: a vocabulary file or redis:NAME[@VERSION] (see `ramplus vocab build`)")
    if spec.startswith("redis:"):
        import redis

        from workers.vocab.store import VocabStore, parse_ref

        name, version = parse_ref(spec[len("redis:") :])
        return VocabStore(redis.Redis.from_url(settings.redis.url, socket_timeout=60)).load(name, version)
    return Vocabulary.load(spec)


def initial_model(train: TrainSettings, vocabulary: Vocabulary, settings: Settings) -> RamPlus:
    if train.init == "scratch":
        model = create_model(train.model, seed=train.seed)
    else:
        model = load_checkpoint(resolve_checkpoint(train.init, settings.s3), trust_pickle=train.trust_checkpoint)
    model.set_vocabulary(vocabulary)
    return model


def text_encoder(train: TrainSettings, device: torch.device):  # noqa: ANN201
    from ramplus_core.text_encoder import TextEncoder

    weights = None if train.text_weights in (None, "none") else train.text_weights
    return TextEncoder(train.text_encoder, weights, device=device, seed=train.text_seed)


def step_options(train: TrainSettings) -> StepOptions:
    return StepOptions(
        channels_last=train.channels_last, grad_checkpointing=train.grad_checkpointing, compile=train.compile,
        fused_optimizer=train.fused_optimizer,
    )


# -- checkpoints --------------------------------------------------------------------------------------------


def save_training_checkpoint(directory: Path, model: RamPlus, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    save_pretrained(model, directory / CHECKPOINT_MODEL)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / CHECKPOINT_OPTIMIZER)
    (directory / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))


def read_training_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / CHECKPOINT_STATE).read_text())


# -- evaluation ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(model: RamPlus, examples: Examples, batch_size: int = 64) -> tuple[torch.Tensor, dict[str, float]]:
    """Scores (sigmoid, fp32 on CPU, exactly as the fleet computes them) and the metrics over them."""
    was_training = model.training
    model.eval()
    vocab = model.vocabulary
    assert vocab is not None
    device = model.reweight_scale.device
    parts = []
    for start in range(0, len(examples), batch_size):
        x = examples.pixels[start : start + batch_size].to(device, model.reweight_scale.dtype)
        parts.append(torch.sigmoid(model.tag_logits(x).float()).cpu())
    model.train(was_training)
    scores = torch.cat(parts) if parts else torch.empty(0, len(vocab))
    targets = tag_targets(examples.tags, vocab.tags)
    metrics: dict[str, float] = {"val_images": float(len(examples))}
    if len(examples) and bool(targets.any()):
        at = precision_recall_f1(scores, targets, vocab.thresholds)
        metrics |= {
            "val_map": mean_average_precision(scores, targets), "prior_map": label_prior_map(targets),
            "val_precision": at.micro_precision, "val_recall": at.micro_recall, "val_f1": at.micro_f1,
        }
    return scores, metrics


# -- the per-worker loop ------------------------------------------------------------------------------------


def _collective_device() -> torch.device:
    """NCCL (Ray Train's backend on GPUs) reduces CUDA tensors only; gloo reduces CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_min(value: int) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())
    return value


def _all_max(value: float) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())
    return value


@dataclass
class _RankData:
    """What one rank trains on: its share of the images, their captions embedded once, the batch geometry."""

    mine: Examples
    val: Examples | None  # rank 0 only
    caption_bank: torch.Tensor  # [captions, dim], frozen text embeddings
    caption_index: dict[str, int]
    per_rank_batch: int
    steps_per_epoch: int


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: `config["settings"]` is the Settings as JSON-able data."""
    import ray.train
    import ray.train.torch

    settings = Settings(**config["settings"])
    train = settings.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = time.monotonic()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    torch.manual_seed(train.seed)
    device = ray.train.torch.get_device()
    wlog = log.bind(rank=rank, world=world)

    vocabulary = load_training_vocabulary(train.vocabulary, settings)
    model = initial_model(train, vocabulary, settings)
    data = _rank_data(settings, rank, world, model.config.image_size, wlog)
    teacher = None
    if train.teacher and train.distill_weight > 0:
        teacher = load_checkpoint(resolve_checkpoint(train.teacher, settings.s3)).to(device).eval()
    options = step_options(train)
    step_module = RamPlusTraining(model, vocabulary, LossWeights(train.tag_weight, train.text_weight, train.distill_weight))
    prepare_step(step_module, options)
    if train.freeze_encoder:  # before DDP wraps it: DDP registers only parameters that need gradients
        model.image_encoder.requires_grad_(False)
    step_module = ray.train.torch.prepare_model(step_module)
    inner: RamPlusTraining = step_module.module if hasattr(step_module, "module") else step_module
    optimizer = build_optimizer(
        inner.model, lr=train.lr, weight_decay=train.weight_decay, encoder_lr_scale=train.encoder_lr_scale,
        freeze_encoder=train.freeze_encoder, fused=fused_for(inner.model, options.fused_optimizer),
    )
    if options.compile:
        inner.vocab_tensors()  # made eagerly on the device now: inside the compiled step it would break the graph
        step_module = torch.compile(step_module)
    budget_s = train.max_minutes * 60 if train.max_minutes is not None else None
    scheduler = warmup_cosine(optimizer, train.warmup_steps, train.epochs * data.steps_per_epoch, budget_s=budget_s)
    state = _restore(ray.train.get_checkpoint(), inner.model, optimizer, scheduler, wlog)
    # The time budget is the run's, not the attempt's: a resumed run goes on with what its checkpoint had used.
    started -= state.get("seconds", 0.0)

    generator = torch.Generator()
    for epoch in range(state["epoch"], train.epochs):
        generator.manual_seed(train.seed * 1000 + rank * 100_000 + epoch)
        epoch_start = time.monotonic()
        step_module.train()
        means, steps, out_of_time = _train_epoch(
            step_module, optimizer, scheduler, data, vocabulary, teacher, generator, train, device, state, started,
        )
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "step": state["step"], **means,
            "images_per_s": steps * data.per_rank_batch * world / max(1e-9, time.monotonic() - epoch_start),
            "elapsed_s": time.monotonic() - started, "lr": optimizer.param_groups[0]["lr"],
        }
        state["epoch"] = epoch + 1
        state["seconds"] = metrics["elapsed_s"]
        _report_epoch(metrics, rank, inner.model, data.val, optimizer, scheduler, state)
        wlog.info("retrain.epoch", **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        if out_of_time:
            wlog.info("retrain.time_limit", minutes=train.max_minutes, step=state["step"])
            break


def _rank_data(settings: Settings, rank: int, world: int, image_size: int, wlog: Any) -> _RankData:
    """This rank's share of the training split (and the validation split on rank 0), decoded once; every
    caption embedded once by the frozen text encoder."""
    train = settings.train
    records = read_manifest(train.manifest or "", s3=settings.s3)
    train_records, val_records = split_records(records, train.seed)
    mine, failures = load_examples(shard_records(train_records, rank, world, train.seed), settings, image_size)
    val = load_examples(val_records, settings, image_size)[0] if rank == 0 else None
    encoder = text_encoder(train, torch.device("cpu"))
    captions = sorted({c for cs in mine.captions for c in cs})
    caption_bank = encoder.encode(captions).clone()  # a normal tensor: inference-mode ones cannot be saved for backward
    del encoder
    per_rank_batch = max(1, train.batch_size // world)
    steps_per_epoch = _all_min(len(mine)) // per_rank_batch
    if steps_per_epoch == 0:
        raise ValueError(f"rank {rank}: {len(mine)} usable training images, fewer than one batch of {per_rank_batch}")
    wlog.info("retrain.data", images=len(mine), skipped=failures, captions=len(captions), steps_per_epoch=steps_per_epoch,
              val_images=len(val) if val is not None else None)
    return _RankData(mine, val, caption_bank, {c: i for i, c in enumerate(captions)}, per_rank_batch, steps_per_epoch)


def _restore(checkpoint: Any, model: RamPlus, optimizer: Any, scheduler: Any, wlog: Any) -> dict[str, Any]:
    """The training state to go on from: the run's last checkpoint (weights, optimizer, schedule), or a fresh one."""
    if checkpoint is None:
        return {"epoch": 0, "step": 0, "history": []}
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_MODEL).state_dict())
        opt = torch.load(Path(d) / CHECKPOINT_OPTIMIZER, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        state = read_training_state(Path(d))
    wlog.info("retrain.resumed", epoch=state["epoch"], step=state["step"])
    return state


def _train_epoch(
    step_module: Any, optimizer: Any, scheduler: Any, data: _RankData, vocabulary: Vocabulary, teacher: RamPlus | None,
    generator: torch.Generator, train: TrainSettings, device: torch.device, state: dict[str, Any], started: float,
) -> tuple[dict[str, float], int, bool]:
    """One pass over this rank's images: (mean losses, steps taken, whether the time limit stopped it)."""
    mine, batch = data.mine, data.per_rank_batch
    order = torch.randperm(len(mine), generator=generator)
    sums = {"loss": 0.0, "tag": 0.0, "text": 0.0}
    use_amp = device.type == "cuda"
    out_of_time = False
    for b in range(data.steps_per_epoch):
        idx = order[b * batch : (b + 1) * batch]
        images = mine.pixels[idx]
        if train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if train.flip:
            flips = torch.rand(len(idx), generator=generator) < 0.5
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        picked = [mine.captions[i][int(torch.randint(len(mine.captions[i]), (1,), generator=generator))] for i in idx.tolist()]
        batch_captions = sorted(set(picked))
        cap = data.caption_bank[[data.caption_index[c] for c in batch_captions]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = step_module(
                images.to(device), tag_targets([mine.tags[i] for i in idx.tolist()], vocabulary.tags).to(device),
                cap.to(device), caption_targets([mine.captions[i] for i in idx.tolist()], batch_captions).to(device),
                teacher.encode_image(images.to(device))[:, 0] if teacher is not None else None,
            )
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        elapsed = time.monotonic() - started
        if train.max_minutes is not None:  # every rank sets the same rate and stops at the same step
            elapsed = _all_max(elapsed)
        scheduler.step(elapsed)
        state["step"] += 1
        for k in sums:
            if k in out:
                sums[k] += float(out[k].detach())
        if train.max_minutes is not None and elapsed > train.max_minutes * 60:
            out_of_time = True
            break
    steps = b + 1
    return {f"train_{k}": v / steps for k, v in sums.items()}, steps, out_of_time


def _report_epoch(
    metrics: dict[str, Any], rank: int, model: RamPlus, val: Examples | None, optimizer: Any, scheduler: Any,
    state: dict[str, Any],
) -> None:
    """Rank 0 evaluates, records the epoch and reports it with a checkpoint; the other ranks report metrics only."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    assert val is not None
    metrics |= evaluate(model, val)[1]
    state["history"].append(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        save_training_checkpoint(Path(tmp), model, optimizer, scheduler, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# -- the driver ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    artifact: str | None
    checkpoint_path: str


def storage(train: TrainSettings, settings: Settings) -> tuple[str, Any]:
    """Ray Train's storage: an s3:// path through pyarrow (honouring the S3 endpoint of the settings) or a dir."""
    if not train.storage_path.startswith("s3://"):
        return str(Path(train.storage_path).expanduser().resolve()), None
    import boto3
    import pyarrow.fs

    creds = boto3.Session().get_credentials()
    if creds is None:
        raise ValueError("no AWS credentials for the S3 storage path (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile or role)")
    frozen = creds.get_frozen_credentials()
    endpoint = settings.s3.endpoint_url
    fs = pyarrow.fs.S3FileSystem(
        access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token,
        region=settings.s3.region,
        endpoint_override=endpoint.split("://", 1)[-1] if endpoint else None,
        scheme=endpoint.split("://", 1)[0] if endpoint else "https",
    )
    return train.storage_path[len("s3://") :], fs


def run(settings: Settings, *, version: str | None = None) -> RetrainResult:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    train = settings.train
    if not train.manifest:
        raise ValueError("train.manifest is required (RAMPLUS_TRAIN__MANIFEST or [train] manifest)")
    if not ray.is_initialized():
        ray.init(address=settings.fleet.ray_address or None, log_to_driver=True)
    path, fs = storage(train, settings)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"settings": settings.model_dump(mode="json")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.workers, use_gpu=train.use_gpu, resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=train.run_name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = read_training_state(Path(d))
        model = load_checkpoint(Path(d) / CHECKPOINT_MODEL)
    artifact = None
    if train.output:
        version = version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        artifact = publish_model(model, settings, state, f"{train.output.rstrip('/')}/{train.run_name}/{version}")
    log.info("retrain.done", artifact=artifact, **{k: v for k, v in state["history"][-1].items() if not isinstance(v, dict)})
    return RetrainResult(state["history"][-1], state["history"], artifact, result.checkpoint.path)


def publish_model(model: RamPlus, settings: Settings, state: dict[str, Any], dest: str) -> str:
    """Calibrate thresholds on the validation split, evaluate once more with them, publish the artifact."""
    train = settings.train
    records = read_manifest(train.manifest or "", s3=settings.s3)
    _, val_records = split_records(records, train.seed)
    val = load_examples(val_records, settings, model.config.image_size)[0]
    scores, _ = evaluate(model, val)
    vocab = model.vocabulary
    assert vocab is not None
    if train.calibrate and len(val):
        targets = tag_targets(val.tags, vocab.tags)
        model.set_vocabulary(vocab.with_thresholds(calibrate_thresholds(scores, targets, default=float(vocab.thresholds.mean()))))
    scores, metrics = evaluate(model, val)
    if len(val):  # which tags are weak: per tag, NaN (no positive in the split) as null
        ap = average_precision(scores, tag_targets(val.tags, vocab.tags)).tolist()
        metrics["val_tag_ap"] = {t: (None if a != a else round(a, 4)) for t, a in zip(vocab.tags, ap)}  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        out = save_pretrained(model, Path(tmp) / "artifact")
        (out / "metrics.json").write_text(json.dumps(
            {"final": metrics, "history": state["history"], "run_name": train.run_name, "steps": state["step"],
             "train": train.model_dump(mode="json")}, indent=1, default=str))
        (out / "eval").mkdir()
        from safetensors.torch import save_file

        save_file({"scores": scores.contiguous()}, str(out / "eval" / "val_scores.safetensors"))
        (out / "eval" / "val_uris.json").write_text(json.dumps([fetchable_uri(train.manifest or "", u) for u in val.uris]))
        return publish_artifact(out, dest, settings.s3)

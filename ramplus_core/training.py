"""RAM++ training, the model side: the three losses of one step, the optimizer and its schedule.

The paper's recipe (and the reference `ram_plus.py`): one alignment decoder supervised twice,

- tagging: the image's queries are its tags' description embeddings, re-weighted per image (the same
  path inference takes), against the multi-hot tag targets with ASL (gamma- 7, clip 0.05);
- image-text alignment: the queries are the batch's caption embeddings (from the frozen text encoder,
  computed online), each image against every caption of the batch, ASL (gamma- 4). The reference
  uses the diagonal as positives; here a caption is positive for every image it describes, which is the
  diagonal unless two images of the batch share a caption text (synthetic data does);
- optional distillation: L1 between the pooled image embedding and a frozen teacher's.

Losses are summed over elements, not averaged, as the reference does (AdamW is insensitive to the scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ramplus_core.losses import alignment_loss, tagging_loss
from ramplus_core.model import RamPlus, VocabularyTensors
from ramplus_core.vocabulary import Vocabulary


@dataclass(frozen=True)
class LossWeights:
    tag: float = 1.0
    text: float = 1.0
    distill: float = 0.0  # on only with a teacher


def caption_targets(image_captions: Sequence[Sequence[str]], batch_captions: Sequence[str]) -> torch.Tensor:
    """[B, T]: 1 where caption t is one of image b's captions."""
    return torch.tensor([[float(c in set(own)) for c in batch_captions] for own in image_captions])


def tag_targets(image_tags: Sequence[Sequence[str]], vocabulary_tags: Sequence[str]) -> torch.Tensor:
    """[B, C] multi-hot; tags outside the vocabulary are ignored (an open-set vocabulary may omit some)."""
    index = {t: i for i, t in enumerate(vocabulary_tags)}
    out = torch.zeros(len(image_tags), len(vocabulary_tags))
    for b, tags in enumerate(image_tags):
        for t in tags:
            if t in index:
                out[b, index[t]] = 1.0
    return out


def training_vocabulary(model: RamPlus, vocabulary: Vocabulary) -> VocabularyTensors:
    """The vocabulary on the model's device and dtype, as ordinary tensors.

    Embeddings made under `torch.inference_mode` (the text encoder's) cannot take part in autograd, even as
    constants: a copy made here can.
    """
    vt = model.prepare_vocabulary(vocabulary)
    return VocabularyTensors(
        vt.embeddings.clone(), vt.mask.clone() if vt.mask is not None else None, vt.thresholds.clone(), vt.vocabulary
    )


class RamPlusTraining(nn.Module):
    """The model plus its training losses, as one module whose `forward` is a training step's loss.

    Distributed data parallel only synchronises gradients of what runs through the wrapped module's
    `forward`, so the whole step (image encoder, tag head, caption head) is behind this one call. The
    vocabulary is a plain attribute, not a buffer: DDP would otherwise broadcast it on every step.
    """

    def __init__(self, model: RamPlus, vocabulary: Vocabulary, weights: LossWeights = LossWeights()) -> None:
        super().__init__()
        self.model = model
        self.weights = weights
        self.tagging = tagging_loss()
        self.alignment = alignment_loss()
        self.vocabulary = vocabulary
        self._vocab: VocabularyTensors | None = None

    def vocab_tensors(self) -> VocabularyTensors:
        if self._vocab is None or not self.model.is_prepared(self._vocab):
            self._vocab = training_vocabulary(self.model, self.vocabulary)
        return self._vocab

    def forward(
        self,
        images: torch.Tensor,
        tag_target: torch.Tensor,
        caption_embeds: torch.Tensor | None = None,
        caption_target: torch.Tensor | None = None,
        teacher_embeds: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{'loss': weighted total, 'tag', 'text'?, 'distill'?, 'tag_logits' (detached, for metrics)}."""
        model = self.model
        image_embeds = model.encode_image(images)
        logits = model.head_logits(image_embeds, self.vocab_tensors())
        out = {"tag": self.tagging(logits.float(), tag_target)}
        total = self.weights.tag * out["tag"]
        if caption_embeds is not None and self.weights.text > 0:
            if caption_target is None:
                raise ValueError("caption_embeds need caption_target ([B, T] positives)")
            text_logits = model.text_logits(image_embeds, caption_embeds)
            out["text"] = self.alignment(text_logits.float(), caption_target)
            total = total + self.weights.text * out["text"]
        if teacher_embeds is not None and self.weights.distill > 0:
            out["distill"] = F.l1_loss(image_embeds[:, 0].float(), teacher_embeds.float())
            total = total + self.weights.distill * out["distill"]
        out["loss"] = total
        out["tag_logits"] = logits.detach()
        return out


@dataclass(frozen=True)
class StepOptions:
    """How a training step runs on its hardware; none of them changes what it computes beyond rounding.

    - ``channels_last``: NHWC images and weights (the patch embedding's convolution runs faster on GPUs);
    - ``grad_checkpointing``: the Swin stages recompute activations in the backward pass (memory for time);
    - ``compile``: ``torch.compile`` of the whole step module (forward and backward through AOTAutograd);
    - ``fused_optimizer``: AdamW's fused CUDA kernel (None: on when the parameters are on a GPU).
    """

    channels_last: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    fused_optimizer: bool | None = None


def prepare_step(step: RamPlusTraining, options: StepOptions) -> None:
    """Apply the options that change the model in place (the caller wraps and compiles afterwards)."""
    if options.channels_last:
        step.model.to(memory_format=torch.channels_last)
    if options.grad_checkpointing:
        step.model.image_encoder.set_grad_checkpointing(True)


def fused_for(model: nn.Module, fused: bool | None) -> bool | None:
    """AdamW's ``fused`` argument: as asked, or on for CUDA parameters when not asked (None leaves torch's default)."""
    if fused is not None:
        return fused
    return True if next(model.parameters()).is_cuda else None


def build_optimizer(
    model: RamPlus | nn.Module, lr: float, weight_decay: float = 0.05, *, encoder_lr_scale: float = 1.0,
    freeze_encoder: bool = False, fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW; no decay on biases, norms and the re-weighting scale (decaying them only hurts).

    Fine-tuning knobs for a model that has an ``image_encoder``: ``encoder_lr_scale`` gives it a fraction
    of the head's learning rate (a pretrained encoder needs less change than a head meeting new tags), and
    ``freeze_encoder`` stops its gradients altogether (cheaper steps, no drift of what it already knows).
    Groups carry a ``name`` (encoder/head, decay/no_decay) so schedules and logs can tell them apart.
    """
    if encoder_lr_scale <= 0:
        raise ValueError(f"encoder_lr_scale must be > 0 (got {encoder_lr_scale}); use freeze_encoder to stop its training")
    encoder = getattr(model, "image_encoder", None)
    if freeze_encoder:
        if encoder is None:
            raise ValueError("freeze_encoder needs a model with an image_encoder")
        encoder.requires_grad_(False)
    in_encoder = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups: dict[tuple[str, str], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoder" if id(p) in in_encoder else "head"
        decay = "no_decay" if p.ndim < 2 or "norm" in name else "decay"
        groups.setdefault((part, decay), []).append(p)
    order = [("head", "decay"), ("head", "no_decay"), ("encoder", "decay"), ("encoder", "no_decay")]
    param_groups = [
        {"params": groups[key], "name": f"{key[0]}.{key[1]}", "weight_decay": weight_decay if key[1] == "decay" else 0.0,
         "lr": lr * (encoder_lr_scale if key[0] == "encoder" else 1.0)}
        for key in order if key in groups
    ]
    kwargs = {"fused": fused} if fused is not None else {}
    return torch.optim.AdamW(param_groups, lr=lr, **kwargs)


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float = 0.05) -> float:
    """Linear warmup over the first steps, then cosine from 1 down to ``min_ratio`` as ``progress`` goes 0 -> 1."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Warmup, then a cosine that follows whichever budget runs out first: steps or seconds.

    ``torch.optim.lr_scheduler.LambdaLR`` only knows the step count, so a run stopped by a time limit would
    end with its learning rate barely decayed. Here progress is ``max(steps done / total_steps, seconds
    trained / budget_s)``: with a time budget the rate reaches its floor when the time does. The caller
    passes the seconds trained so far to ``step`` (in DDP the maximum over ranks, so that every rank sets
    the same rate); they survive a resume through ``state_dict``.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, *, budget_s: float | None = None,
        min_ratio: float = 0.05,
    ) -> None:
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s must be > 0 (got {budget_s})")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = max(1, total_steps)
        self.budget_s = budget_s
        self.min_ratio = min_ratio
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, base in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = base
        self.steps = 0
        self.seconds = 0.0
        self._apply()

    def progress(self) -> float:
        by_steps = max(0, self.steps - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        by_time = self.seconds / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(by_steps, by_time))

    def factor(self) -> float:
        return lr_factor(self.steps, self.progress(), self.warmup_steps, self.min_ratio)

    def step(self, seconds: float | None = None) -> None:
        self.steps += 1
        if seconds is not None:
            self.seconds = max(self.seconds, seconds)
        self._apply()

    def _apply(self) -> None:
        f = self.factor()
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, float | int]:
        return {"steps": self.steps, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        # Checkpoints written before this class held LambdaLR's state: its last_epoch is the step count.
        self.steps = int(state["steps"] if "steps" in state else state["last_epoch"])
        self.seconds = float(state.get("seconds", 0.0))
        self._apply()


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.05,
    budget_s: float | None = None,
) -> WarmupCosine:
    """Linear warmup to the base lr, then cosine down to ``min_ratio`` of it at ``total_steps`` (or ``budget_s``)."""
    return WarmupCosine(optimizer, warmup_steps, total_steps, budget_s=budget_s, min_ratio=min_ratio)

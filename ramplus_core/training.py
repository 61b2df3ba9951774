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
        p = self.model.reweight_scale
        if self._vocab is None or self._vocab.embeddings.device != p.device or self._vocab.embeddings.dtype != p.dtype:
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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW; no decay on biases, norms and the re-weighting scale (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.05):
    """Linear warmup to the base lr, then cosine down to `min_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

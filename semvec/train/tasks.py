"""The losses of each task, on top of semvec.heads' task model (batches and dev metrics live there).

| task | loss |
| sts | CoSENT (default) or cosine-MSE |
| pairs | in-batch negatives (MNRL), optionally symmetric |
| classification | cross-entropy on the linear head over the pooled vector |
| ner | token cross-entropy on first sub-tokens |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semvec.config import Pooling
from semvec.datasets import Task
from semvec.heads import IGNORE, TaskModel
from semvec.train.config import Loss


class TrainModel(TaskModel):
    """A task model that returns its loss: forward(batch) -> scalar, with the continual-learning
    terms when they are on."""

    def __init__(self, encoder: nn.Module, task: Task, pooling: Pooling, hidden: int, n_labels: int,
                 loss: Loss, symmetric: bool = False, score_scale: float = 1.0, dropout: float = 0.1):
        super().__init__(encoder, task, pooling, hidden, n_labels, dropout)
        self.loss_kind, self.symmetric, self.score_scale = loss, symmetric, score_scale
        self.continual = None  # semvec.train.continual.Continual, when continual learning is on

    def forward(self, batch: dict) -> torch.Tensor:
        """The batch's loss (a scalar), with the continual-learning terms when they are on."""
        loss = self._task_loss(batch)
        if self.continual is not None:
            loss = loss + self.continual.penalty(self, batch.get("anchor"))
        return loss

    def _task_loss(self, batch: dict) -> torch.Tensor:
        if self.task == Task.STS:
            a, b = self.embed(batch["a"]), self.embed(batch["b"])
            cos = F.cosine_similarity(a, b)
            if self.loss_kind == Loss.COSINE_MSE:
                return F.mse_loss(cos, batch["score"] / self.score_scale)
            return cosent(cos, batch["score"])
        if self.task == Task.PAIRS:
            return mnrl(self.embed(batch["a"]), self.embed(batch["b"]), self.symmetric,
                        batch.get("also_positive"))
        if self.task == Task.CLASSIFICATION:
            return F.cross_entropy(self.head(self.embed(batch["a"])), batch["labels"])
        hidden, _ = self.encode_tokens(batch["a"])
        logits = self.head(hidden)  # [b, t, n_tags]
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)


def cosent(cos: torch.Tensor, score: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT: every pair ranked higher by score should have the higher cosine.

    loss = log(1 + sum over (i, j) with score_i > score_j of exp(scale * (cos_j - cos_i)))
    """
    diff = scale * (cos[None, :] - cos[:, None])  # [n, n]: cos_j - cos_i
    diff = diff.masked_fill(~(score[:, None] > score[None, :]), float("-inf"))
    return torch.logsumexp(torch.cat([torch.zeros(1, device=cos.device), diff.flatten()]), 0)


def mnrl(anchors: torch.Tensor, candidates: torch.Tensor, symmetric: bool,
         also_positive: torch.Tensor | None = None, scale: float = 20.0):
    """Multiple-negatives ranking: anchor i's positive is candidate i; every other candidate in the
    batch (other positives, then any hard negatives appended after them) is a negative, except
    where also_positive[i, j] says candidate j is another positive of anchor i (left out of i's
    softmax, never pushed away)."""
    sims = scale * F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T  # [b, b(+n)]
    if also_positive is not None:
        sims = sims.masked_fill(also_positive.to(sims.device), float("-inf"))
    target = torch.arange(anchors.shape[0], device=anchors.device)
    loss = F.cross_entropy(sims, target)
    if symmetric:
        loss = (loss + F.cross_entropy(sims[:, : anchors.shape[0]].T, target)) / 2
    return loss

"""Continual learning: keep a model that is tuned further from forgetting what it knew.

Three terms, each on alone or together, added to the task loss (replay, the fourth tool, is a
data mix and lives in the job's plan):

- L2-SP   (l2sp/2) * sum_i (theta_i - theta0_i)^2 over trainable encoder weights, theta0 being the
          starting (champion) weights: a pull back toward where training started.
- EWC     (ewc/2) * sum_i F_i (theta_i - theta0_i)^2, F the diagonal Fisher information of the
          task loss at theta0 on replay (past) data, scaled to mean 1 so that `ewc` is on the same
          scale as `l2sp`: weights that mattered for the old data are held hardest.
- distill (distill) * mean(1 - cos(student(x), teacher(x))) on replay texts x, the teacher being a
          frozen copy of the starting encoder: vectors stay comparable with those already stored.

The reference weights, Fisher and teacher are plain attributes, not module state: DDP neither
broadcasts them every step nor saves them in checkpoints; a restarted worker rebuilds them from
the same starting model and data, so they are the same.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from semvec.encode import pool
from semvec.train.config import ContinualConfig


class Continual:
    """The penalty terms for one TaskModel, fixed at the model's starting weights."""

    def __init__(self, model: nn.Module, cfg: ContinualConfig, anchor_batches: list[dict]):
        self.cfg = cfg
        # [name] -> theta0, only for weights that train (LoRA/adapter/prompt/bitfit: their own)
        self.ref = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if p.requires_grad}
        self.fisher = fisher_diagonal(model, anchor_batches, cfg.fisher_batches) if cfg.ewc else None
        self.teacher = None
        if cfg.distill:
            self.teacher = copy.deepcopy(model.encoder).eval().requires_grad_(False)

    def penalty(self, model: nn.Module, anchor: dict | None) -> torch.Tensor:
        """The summed continual terms for the current weights (a scalar with gradients)."""
        params = dict(model.encoder.named_parameters())
        device = next(model.parameters()).device
        self._to(device)
        total = torch.zeros((), device=device)
        if self.cfg.l2sp:
            total = total + self.cfg.l2sp / 2 * sum(
                ((params[n] - r) ** 2).sum() for n, r in self.ref.items())
        if self.cfg.ewc:
            total = total + self.cfg.ewc / 2 * sum(
                (self.fisher[n] * (params[n] - r) ** 2).sum() for n, r in self.ref.items())
        if self.cfg.distill and anchor is not None:
            total = total + self.cfg.distill * distill_loss(model, self.teacher, anchor)
        return total


    def _to(self, device: torch.device) -> None:
        """Follow the model to its device once (it moves there after this object is built)."""
        if next(iter(self.ref.values())).device != device:
            self.ref = {n: r.to(device) for n, r in self.ref.items()}
            if self.fisher is not None:
                self.fisher = {n: f.to(device) for n, f in self.fisher.items()}
            if self.teacher is not None:
                self.teacher.to(device)


def distill_loss(model: nn.Module, teacher: nn.Module, anchor: dict) -> torch.Tensor:
    """mean(1 - cos) between the model's pooled vectors and the frozen teacher's, same texts."""
    student = model.embed(anchor)  # [b, d]
    with torch.no_grad():
        ids, mask = anchor["input_ids"].to(student.device), anchor["attention_mask"].to(student.device)
        target = pool(*teacher(ids, mask), model.pooling)
    return (1 - F.cosine_similarity(student, target, dim=-1)).mean()


def fisher_diagonal(model: nn.Module, batches: list[dict], limit: int) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the task loss at the current weights, scaled to mean 1."""
    if not batches:
        raise ValueError("EWC needs replay data to estimate the Fisher information on")
    was_training = model.training
    model.eval()  # no dropout: the estimate is of the model as it stands
    squares = {n: torch.zeros_like(p) for n, p in model.encoder.named_parameters() if p.requires_grad}
    used = batches[:limit]
    for batch in used:
        model.zero_grad(set_to_none=True)
        model(batch).backward()
        for n, p in model.encoder.named_parameters():
            if n in squares and p.grad is not None:
                squares[n] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    # the 1/len(used) of the average cancels in the scaling to mean 1
    mean = torch.cat([s.flatten() for s in squares.values()]).mean()
    if not mean > 0:
        raise ValueError("the task loss has no gradient on the replay data (all scores or labels "
                         "equal?): EWC has nothing to weigh the weights by")
    return {n: s / mean for n, s in squares.items()}


def anchor_texts(examples: list[dict]) -> list[str]:
    """The texts of past examples, whatever their task: what distillation keeps vectors close on."""
    texts = []
    for e in examples:
        if "tokens" in e:
            texts.append(" ".join(e["tokens"]))
        else:
            texts += [e[k] for k in ("sentence1", "sentence2", "anchor", "positive", "text") if e.get(k)]
    return texts

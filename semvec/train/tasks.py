"""Tasks: what a batch looks like, the loss, and the dev metric, for each kind of labelled data.

| task | examples | loss | dev metric (primary first) |
| sts | sentence1, sentence2, score | CoSENT (default) or cosine-MSE | spearman |
| pairs | anchor, positive[, negative] | in-batch negatives (MNRL), optionally symmetric | mrr@10, ndcg@10 |
| classification | text, label | cross-entropy on a linear head over the pooled vector | accuracy, macro_f1 |
| ner | tokens, tags (IOB2) | token cross-entropy on first sub-tokens | f1, precision, recall |
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semvec.config import Pooling
from semvec.encode import pool
from semvec.train import metrics
from semvec.train.data import Task

PRIMARY = {Task.STS: "spearman", Task.PAIRS: "mrr@10", Task.CLASSIFICATION: "accuracy", Task.NER: "f1"}
IGNORE = -100  # label id that cross-entropy skips (special and non-first sub-tokens)


class Loss(str, Enum):
    AUTO = "auto"  # cosent for sts, mnrl for pairs, cross-entropy otherwise
    COSENT = "cosent"
    COSINE_MSE = "cosine_mse"
    MNRL = "mnrl"
    CROSS_ENTROPY = "cross_entropy"


ALLOWED_LOSSES = {
    Task.STS: (Loss.COSENT, Loss.COSINE_MSE), Task.PAIRS: (Loss.MNRL,),
    Task.CLASSIFICATION: (Loss.CROSS_ENTROPY,), Task.NER: (Loss.CROSS_ENTROPY,),
}


def resolve_loss(task: Task, loss: Loss) -> Loss:
    return ALLOWED_LOSSES[task][0] if loss == Loss.AUTO else loss


class TaskModel(nn.Module):
    """An encoder (with its fine-tuning method applied), pooling, and a head where the task has one."""

    def __init__(self, encoder: nn.Module, task: Task, pooling: Pooling, hidden: int, n_labels: int,
                 loss: Loss, symmetric: bool = False, score_scale: float = 1.0, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.hidden = hidden
        self.task, self.pooling, self.loss_kind = task, pooling, loss
        self.symmetric, self.score_scale = symmetric, score_scale
        self.head = None
        self.continual = None  # semvec.train.continual.Continual, when continual learning is on
        if task in (Task.CLASSIFICATION, Task.NER):
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_labels))

    def encode_tokens(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        return self.encoder(enc["input_ids"].to(device), enc["attention_mask"].to(device))  # [b,t,d], [b,t]

    def embed(self, enc: dict) -> torch.Tensor:
        return pool(*self.encode_tokens(enc), self.pooling)

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
            return mnrl(self.embed(batch["a"]), self.embed(batch["b"]), self.symmetric)
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


def mnrl(anchors: torch.Tensor, candidates: torch.Tensor, symmetric: bool, scale: float = 20.0):
    """Multiple-negatives ranking: anchor i's positive is candidate i; every other candidate in the
    batch (other positives, then any hard negatives appended after them) is a negative."""
    sims = scale * F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T  # [b, b(+n)]
    target = torch.arange(anchors.shape[0], device=anchors.device)
    loss = F.cross_entropy(sims, target)
    if symmetric:
        loss = (loss + F.cross_entropy(sims[:, : anchors.shape[0]].T, target)) / 2
    return loss


class Collator:
    """Examples -> tensors. Tokenization happens here, in the training worker."""

    def __init__(self, tokenizer, task: Task, max_length: int, labels: list[str]):
        self.tok, self.task, self.max_length = tokenizer, task, max_length
        self.label_id = {label: i for i, label in enumerate(labels)}

    def _texts(self, texts: list[str]) -> dict:
        return dict(self.tok(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_token_type_ids=False))

    def __call__(self, examples: list[dict]) -> dict:
        if self.task == Task.STS:
            return {"a": self._texts([e["sentence1"] for e in examples]),
                    "b": self._texts([e["sentence2"] for e in examples]),
                    "score": torch.tensor([float(e["score"]) for e in examples])}
        if self.task == Task.PAIRS:
            candidates = [e["positive"] for e in examples]
            candidates += [e["negative"] for e in examples if e.get("negative")]
            return {"a": self._texts([e["anchor"] for e in examples]), "b": self._texts(candidates)}
        if self.task == Task.CLASSIFICATION:
            return {"a": self._texts([e["text"] for e in examples]),
                    "labels": torch.tensor([self.label_id[e["label"]] for e in examples])}
        return self._ner([e["tokens"] for e in examples], [e["tags"] for e in examples])

    def _ner(self, words: list[list[str]], tags: list[list[str]] | None) -> dict:
        enc = self.tok(words, is_split_into_words=True, padding=True, truncation=True,
                       max_length=self.max_length, return_tensors="pt", return_token_type_ids=False)
        labels = torch.full(enc["input_ids"].shape, IGNORE)
        for i in range(len(words)):
            previous = None
            for j, w in enumerate(enc.word_ids(i)):
                if w is not None and w != previous and tags is not None:
                    labels[i, j] = self.label_id[tags[i][w]]
                previous = w
        return {"a": dict(enc), "labels": labels, "word_ids": [enc.word_ids(i) for i in range(len(words))]}


@torch.inference_mode()
def evaluate(model: TaskModel, collate: Collator, examples: list[dict], labels: list[str],
             batch_size: int = 64) -> dict:
    """Dev metrics for the task; the primary one is PRIMARY[task]. The model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        if model.task == Task.STS:
            cos = np.concatenate([F.cosine_similarity(model.embed(b["a"]), model.embed(b["b"])).cpu().numpy()
                                  for b in map(collate, chunks)])
            return {"spearman": metrics.spearman(cos, [e["score"] for e in examples])}
        if model.task == Task.PAIRS:
            q = torch.cat([model.embed(collate._texts([e["anchor"] for e in c])) for c in chunks])
            d = torch.cat([model.embed(collate._texts([e["positive"] for e in c])) for c in chunks])
            scores = (F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T).cpu().numpy()
            return metrics.retrieval_mrr_ndcg(scores, [{i} for i in range(len(examples))])
        if model.task == Task.CLASSIFICATION:
            pred = [labels[int(i)] for b in map(collate, chunks)
                    for i in model.head(model.embed(b["a"])).argmax(-1)]
            return metrics.classification_metrics(pred, [e["label"] for e in examples])
        return _evaluate_ner(model, collate, chunks, labels)
    finally:
        model.train(was_training)


def _evaluate_ner(model: TaskModel, collate: Collator, chunks: list[list[dict]], labels: list[str]) -> dict:
    pred, gold = [], []
    for chunk in chunks:
        batch = collate._ner([e["tokens"] for e in chunk], None)
        hidden, _ = model.encode_tokens(batch["a"])
        best = model.head(hidden).argmax(-1).cpu()  # [b, t]
        for i, e in enumerate(chunk):
            tags = ["O"] * len(e["tokens"])  # words cut by truncation count as O
            previous = None
            for j, w in enumerate(batch["word_ids"][i]):
                if w is not None and w != previous:
                    tags[w] = labels[int(best[i, j])]
                previous = w
            pred.append(tags)
            gold.append(e["tags"])
    return metrics.ner_metrics(pred, gold)

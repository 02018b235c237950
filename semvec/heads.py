"""Task models for inference: an encoder, its pooling, and the linear head that classification and
NER models carry (``head.safetensors`` in the model directory); the collator that turns examples
into tensors; and the task metrics computed with them. Training (semvec.train.tasks) adds the losses
on top; evaluation and training's dev checks share what is here.

| task | examples | head | metric (primary first) |
| sts | sentence1, sentence2, score | none: cosine of pooled vectors | spearman |
| pairs | anchor, positive[, negative] | none: cosine of pooled vectors | mrr@10, ndcg@10 |
| classification | text, label | linear over the pooled vector | accuracy, macro_f1 |
| ner | tokens, tags (IOB2) | linear over each first sub-token | f1, precision, recall |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semvec import metrics, models
from semvec.config import Pooling
from semvec.datasets import Task
from semvec.encode import pool
from semvec.errors import ConfigError
from semvec.tokens import load_tokenizer

PRIMARY = {Task.STS: "spearman", Task.PAIRS: "mrr@10", Task.CLASSIFICATION: "accuracy", Task.NER: "f1"}
IGNORE = -100  # label id that cross-entropy skips (special and non-first sub-tokens)
HEAD_FILE = "head.safetensors"


class TaskModel(nn.Module):
    """An encoder (with its extras or fine-tuning method), pooling, and a head where the task has one."""

    def __init__(self, encoder: nn.Module, task: Task, pooling: Pooling, hidden: int, n_labels: int,
                 dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.hidden = hidden
        self.task, self.pooling = task, pooling
        self.head = None
        if task in (Task.CLASSIFICATION, Task.NER):
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_labels))

    def encode_tokens(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        return self.encoder(enc["input_ids"].to(device), enc["attention_mask"].to(device))  # [b,t,d], [b,t]

    def embed(self, enc: dict) -> torch.Tensor:
        return pool(*self.encode_tokens(enc), self.pooling)


def load_task_model(model_dir: Path, ref: str) -> tuple[TaskModel, Collator, models.ModelCard]:
    """(model, collator, model card) of a model directory that `semvec train` wrote; ref names it
    in errors."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from semvec.extras import load_extras

    card = models.read_card(model_dir)
    if card is None or card.task is None:
        raise ConfigError(f"model {ref!r} has no {models.SEMVEC_JSON} with a task: "
                          "it was not trained by semvec")
    task = Task(card.task)
    base = AutoModel.from_pretrained(str(model_dir), **models.load_options())
    encoder = load_extras(model_dir, base, card.method)
    model = TaskModel(encoder, task, Pooling(card.pooling), int(base.config.hidden_size), len(card.labels))
    head = Path(model_dir) / HEAD_FILE
    if model.head is not None:
        if not head.is_file():
            raise ConfigError(f"model {ref!r} is a {task.value} model without {HEAD_FILE}")
        model.head.load_state_dict(load_file(str(head)))
    collate = Collator(load_tokenizer(Path(model_dir)), task, int(card.max_length), card.labels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), collate, card


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
            return {"a": self._texts([e["anchor"] for e in examples]), "b": self._texts(candidates),
                    "also_positive": also_positive(examples, candidates)}
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
def task_metrics(model: TaskModel, collate: Collator, examples: list[dict], labels: list[str],
                 batch_size: int = 64, detail: bool = False, corpus: list[str] | None = None) -> dict:
    """Dev metrics for the task; the primary one is PRIMARY[task]. The model's mode is restored.
    detail: classification and NER add "per_label", "confusion" and a text "report". corpus
    (pairs): more documents to rank beside the positives."""
    was_training = model.training
    model.eval()
    try:
        chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        if model.task == Task.STS:
            cos = np.concatenate([F.cosine_similarity(model.embed(b["a"]), model.embed(b["b"])).cpu().numpy()
                                  for b in map(collate, chunks)])
            return {"spearman": metrics.spearman(cos, [e["score"] for e in examples])}
        if model.task == Task.PAIRS:
            return _pairs_metrics(model, collate, examples, batch_size, corpus or [])
        if model.task == Task.CLASSIFICATION:
            pred = [labels[int(i)] for b in map(collate, chunks)
                    for i in model.head(model.embed(b["a"])).argmax(-1)]
            gold = [e["label"] for e in examples]
            scores = metrics.classification_metrics(pred, gold)
            return {**scores, **metrics.label_report(pred, gold, labels)} if detail else scores
        return _evaluate_ner(model, collate, chunks, labels, detail)
    finally:
        model.train(was_training)


def also_positive(examples: list[dict], candidates: list[str]) -> torch.Tensor:
    """[anchors, candidates] True where candidate j is not anchor i's own positive yet is one of
    anchor i's positives in this batch: the same text as its positive, or the positive of a pair
    with the same anchor. Multiple-negatives ranking must not count these as negatives (a batch
    of customer queries holds several of one intent; a claim cites several abstracts)."""
    anchor_id, text_id = {}, {}
    anchors = torch.tensor([anchor_id.setdefault(e["anchor"], len(anchor_id)) for e in examples])
    positives = torch.tensor([text_id.setdefault(e["positive"], len(text_id)) for e in examples])
    columns = torch.tensor([text_id.get(c, -1) for c in candidates])  # -1: no anchor's positive
    pairs = torch.zeros(len(anchor_id), len(text_id) + 1, dtype=torch.bool)  # last column: -1
    pairs[anchors, positives] = True
    mask = pairs[anchors][:, columns]
    mask.fill_diagonal_(False)
    return mask


def _pairs_metrics(model: TaskModel, collate: Collator, examples: list[dict], batch_size: int,
                   corpus: list[str], k: int = 10, chunk: int = 1024) -> dict:
    """Each distinct anchor ranks the distinct positives and corpus documents; all of its
    positives are relevant. Anchors are scored a chunk at a time, so memory grows with the
    documents, not their square."""
    anchors = list(dict.fromkeys(e["anchor"] for e in examples))
    docs = list(dict.fromkeys([e["positive"] for e in examples] + corpus))
    doc_index = {d: i for i, d in enumerate(docs)}
    relevant: dict[str, dict[int, float]] = {a: {} for a in anchors}
    for e in examples:
        relevant[e["anchor"]][doc_index[e["positive"]]] = 1.0

    def embed(texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.cat([model.embed(collate._texts(texts[i:i + batch_size]))
                                      for i in range(0, len(texts), batch_size)]), dim=-1)

    d = embed(docs)
    top = np.concatenate([metrics.top_k((embed(anchors[i:i + chunk]) @ d.T).float().cpu().numpy(), k)
                          for i in range(0, len(anchors), chunk)])
    result = metrics.ranking_metrics(top, [relevant[a] for a in anchors], k)
    return {f"mrr@{k}": result[f"mrr@{k}"], f"ndcg@{k}": result[f"ndcg@{k}"]}


def _evaluate_ner(model: TaskModel, collate: Collator, chunks: list[list[dict]], labels: list[str],
                  detail: bool) -> dict:
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
    scores = metrics.ner_metrics(pred, gold)
    return {**scores, **metrics.ner_label_report(pred, gold, labels)} if detail else scores

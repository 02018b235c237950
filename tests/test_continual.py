"""Continual learning: replay, L2-SP, EWC and distillation each change training as they should,
through the training loop itself.

Each term is switched on alone against the same run without it; a term that stops reaching the
loss makes the two runs equal and its test fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semvec.datasets import Task
from semvec.encode import pool
from semvec.errors import ConfigError
from semvec.heads import Collator
from semvec.testing import LocalSession
from semvec.train.config import ContinualConfig, load_train_config
from semvec.train.continual import Continual, anchor_texts
from semvec.train.job import plan
from semvec.train.loop import Worker, build_model
from tests.test_train import make_task_data

EPOCHS = 2  # 12 optimizer steps over the new data and its replay share


def _setup(tmp_path, tiny_models, **options):
    new, _ = make_task_data(Task.STS, tmp_path / "new", n_train=96, n_dev=16)
    past, dev = make_task_data(Task.CLASSIFICATION, tmp_path / "past", n_train=64, n_dev=16)
    # past data of the same task with other text: the classification texts, paired with themselves
    import json

    rows = [json.loads(line) for line in past.read_text().splitlines()]
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({"sentence1": r["text"], "sentence2": " ".join(
        reversed(r["text"].split())), "score": float(i % 6)}) + "\n" for i, r in enumerate(rows)))
    cfg = load_train_config(None, task="sts", method="full", train=str(new), output=str(tmp_path / "m"),
                            model=str(tiny_models["bert"]), replay=str(replay), lr=5e-3, **options)
    return cfg


def _train(cfg) -> tuple[object, Continual, Collator, list[dict], dict]:
    """Train with the training loop itself (one worker in this process, semvec.testing.LocalSession)
    for EPOCHS epochs; returns the trained model, a Continual at its starting weights (to measure
    against), the collator, the replay texts and the plan."""
    p, train, dev = plan(cfg)
    reference, tok = build_model(cfg, p)  # build_model is seeded: the worker starts from these weights
    collate = Collator(tok, cfg.task, p["max_length"], p["labels"])
    anchors = p["anchors"]
    batches = [collate(anchors[i:i + 16]) for i in range(0, len(anchors), 16)]
    start = Continual(reference, ContinualConfig(l2sp=1, ewc=1, distill=1), batches)
    cfg.epochs, cfg.batch_size, cfg.patience = EPOCHS, 16, EPOCHS
    torch.manual_seed(0)
    worker = Worker({"config": cfg.to_dict(), "plan": p, "examples": (train, dev, []), "threads": 1},
                    LocalSession())
    worker.run()
    return worker.model, start, collate, anchor_texts(anchors), p


def _drift(model, start: Continual, weights=None) -> float:
    params = dict(model.encoder.named_parameters())
    return float(sum(((params[n] - r) ** 2 * (1 if weights is None else weights[n])).sum()
                     for n, r in start.ref.items()))


@torch.no_grad()
def _agreement(model, start: Continual, collate, texts) -> float:
    model.eval()
    enc = collate._texts(texts[:64])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ours = pool(*model.encoder(ids, mask), model.pooling)
    theirs = pool(*start.teacher(ids, mask), model.pooling)
    return float(F.cosine_similarity(ours, theirs).mean())


def test_l2sp_holds_weights_near_the_start(tmp_path, tiny_models):
    plain, start, *_ = _train(_setup(tmp_path / "a", tiny_models))
    pulled, start2, *_ = _train(_setup(tmp_path / "b", tiny_models, l2sp=50.0))
    assert _drift(pulled, start2) < 0.5 * _drift(plain, start)


def test_ewc_holds_the_weights_that_mattered_for_past_data(tmp_path, tiny_models):
    plain, start, *_ = _train(_setup(tmp_path / "a", tiny_models))
    held, start2, *_ = _train(_setup(tmp_path / "b", tiny_models, ewc=50.0))
    fisher = start.fisher
    values = torch.cat([f.flatten() for f in fisher.values()])
    assert values.mean() == pytest.approx(1.0, rel=1e-4) and values.std() > 0.1  # not uniform
    assert _drift(held, start2, start2.fisher) < 0.5 * _drift(plain, start, fisher)


def test_distillation_keeps_vectors_close_to_the_starting_model(tmp_path, tiny_models):
    plain, start, collate, texts, _ = _train(_setup(tmp_path / "a", tiny_models))
    kept, start2, collate2, texts2, _ = _train(_setup(tmp_path / "b", tiny_models, distill=5.0))
    drifted = 1 - _agreement(plain, start, collate, texts)
    stayed = 1 - _agreement(kept, start2, collate2, texts2)
    assert stayed < 0.5 * drifted


def test_replay_mixes_a_seeded_share_of_past_data_into_training(tmp_path, tiny_models):
    cfg = _setup(tmp_path, tiny_models, replay_share=0.25)
    p, train, _ = plan(cfg)
    new = 96 - int(96 * 0.1)  # a seeded 10% of the new data is held out as dev
    assert len(p["anchors"]) == round(0.25 * new) and len(train) == new + len(p["anchors"])
    assert all(a in train for a in p["anchors"])
    again, _, _ = plan(cfg)
    assert again["anchors"] == p["anchors"]  # seeded
    none, train0, _ = plan(_setup(tmp_path / "z", tiny_models, replay_share=0.0))
    assert none["anchors"] == [] and len(train0) == new


def test_ewc_and_distill_without_replay_are_refused():
    with pytest.raises(ConfigError, match="need replay data"):
        load_train_config(None, task="sts", method="full", train="t", output="o", distill=1.0)
    with pytest.raises(ConfigError, match="l2sp must be a finite number >= 0"):
        load_train_config(None, task="sts", method="full", train="t", output="o", l2sp=-1)

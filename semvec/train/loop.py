"""The training loop that runs on every Ray Train worker (DDP over CPU/gloo or GPU/nccl); what it
needs from Ray Train comes through a session (RaySession here; semvec.testing.LocalSession runs the
same loop in one process).

Each epoch a seeded permutation is cut into one shard per worker, so every example is seen once
per epoch across workers (plus at most workers-1 repeats that even out the shards). At each epoch
end (and every eval_steps steps) rank 0 evaluates on dev and reports metrics with a checkpoint
that records where training stands (epoch and batch), and every worker follows the
early-stopping decision, broadcast so all stop together. A restart resumes at that batch.

Why the examples come from the object store (one copy per node, put there by the driver) and not
from Ray Data's dataset shards (`get_dataset_shard`): a streaming split hands blocks to the workers
in the order the coordinator receives them, so which examples a rank holds is not fixed across
restarts, and `equal=True` evens shards by dropping rows. Resuming a killed worker at the batch it
stopped, with every example once per epoch, needs a fixed order: the seeded permutation below.
Labelled fine-tuning sets (up to millions of short examples) fit the object store; corpus-sized
data is the backfill's, which does stream through Ray Data.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from semvec import models, storage
from semvec.config import Pooling
from semvec.datasets import Task
from semvec.heads import HEAD_FILE, PRIMARY, Collator, task_metrics
from semvec.train.config import Optimizer, TrainConfig, resolve_loss
from semvec.train.continual import Continual, anchor_texts
from semvec.train.tasks import TrainModel

STATE = "state.pt"


def save_state(path: Path, state: dict) -> None:
    """Write a checkpoint: tensors, numbers, strings and plain containers only (see load_state)."""
    torch.save(state, path)


def load_state(path: Path) -> dict:
    """Read a checkpoint without running code: weights_only refuses any pickled object but
    tensors and plain containers, so a checkpoint from a shared store cannot execute anything."""
    return torch.load(path, weights_only=True)


def build_model(cfg: TrainConfig, plan: dict) -> tuple[TrainModel, object]:
    """A fresh TrainModel from the base model with the method applied; the same on every worker."""
    from transformers import AutoModel

    from semvec.tokens import load_tokenizer
    from semvec.train.methods import apply_method

    torch.manual_seed(cfg.seed)
    base = AutoModel.from_pretrained(plan["model_dir"], trust_remote_code=cfg.trust_remote_code,
                                     **models.load_options())
    encoder = apply_method(base, cfg.method, cfg.method_config())
    model = TrainModel(encoder, cfg.task, Pooling(plan["pooling"]), int(base.config.hidden_size),
                      len(plan["labels"]), resolve_loss(cfg.task, cfg.loss), cfg.symmetric,
                      plan["score_scale"], cfg.dropout)
    _continue_head(model, Path(plan["model_dir"]), plan["labels"])
    return model, load_tokenizer(Path(plan["model_dir"]), cfg.trust_remote_code)


def _continue_head(model: TrainModel, model_dir: Path, labels: list[str]) -> None:
    """Tuning a semvec-trained model further keeps its head; labels new to it get fresh rows."""
    from safetensors.torch import load_file

    from semvec.models import read_card

    head, card = model_dir / HEAD_FILE, read_card(model_dir)
    if model.head is None or not head.is_file() or card is None:
        return
    known = card.labels
    if card.task != model.task.value or labels[:len(known)] != known:
        return
    trained, linear = load_file(str(head)), model.head[1]  # head: Sequential(Dropout, Linear)
    with torch.no_grad():
        linear.weight[:len(known)] = trained["1.weight"]  # [labels, hidden]
        linear.bias[:len(known)] = trained["1.bias"]


def _optimizer(cfg: TrainConfig, model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == Optimizer.SGD:
        opt = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return opt


def _shard(n: int, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    order = np.random.RandomState(seed + epoch).permutation(n)
    pad = (-n) % world
    order = np.concatenate([order, order[:pad]])
    return order[rank::world]


def train_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    if not loop_config.get("verbose"):
        _quiet_reports()
    Worker(loop_config, RaySession()).run()


def _quiet_reports() -> None:
    """Ray Train logs every report, metrics and checkpoint path in full, on a logger named by its
    file (outside `ray.train`, so its LoggingConfig leaves it alone); semvec prints its own line for
    each evaluation. Shown with -v."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class RaySession:
    """What a worker needs from Ray Train: its rank, the checkpoint to resume from, DDP, reports
    (with a checkpoint from rank 0), and the collectives that keep ranks in step."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = None  # known once the model is prepared

    def examples(self, ref) -> tuple[list[dict], list[dict], list[str]]:
        """(train, dev, dev corpus) from the object store, where the driver put them once."""
        import ray

        return ray.get(ref)

    def resume_state(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return None
        with checkpoint.as_directory() as d:
            return load_state(Path(d) / STATE)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
        self.device = ray.train.torch.get_device()
        return ddp

    def report(self, metrics: dict, state: dict | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(Path(d) / STATE, state)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    def all_min(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return x

    def from_rank0(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(x, src=0)
        return x


class Worker:
    """One training worker: the model, optimiser and schedule, and where training stands
    (``progress``: epoch and batch to continue from, optimizer steps so far, and the early-stopping
    state: the best dev score and the evaluations since it improved)."""

    def __init__(self, loop_config: dict, session: RaySession):
        from transformers import get_scheduler

        cfg = self.cfg = TrainConfig(**loop_config["config"])
        torch.set_num_threads(loop_config["threads"])
        self.plan = loop_config["plan"]
        self.train, self.dev, self.dev_corpus = session.examples(loop_config["examples"])
        self.tracker = loop_config.get("tracker")
        self.run_record = loop_config.get("run_record")  # where rank 0 notes why training stopped
        self.session = session
        self.rank, self.world = session.rank, session.world
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model, tok = build_model(cfg, self.plan)
        self.collate = Collator(tok, cfg.task, self.plan["max_length"], self.plan["labels"])
        self.distill_texts = self._continual()
        self.opt = _optimizer(cfg, self.model)
        steps = math.ceil(math.ceil(len(self.train) / self.world) / cfg.batch_size) * cfg.epochs
        self.sched = get_scheduler(cfg.schedule.value, self.opt, num_training_steps=steps,
                                   num_warmup_steps=int(cfg.warmup_ratio * steps))
        self.progress = {"epoch": 0, "batch": 0, "step": 0, "best": -math.inf, "bad": 0}
        self.primary = f"dev_{PRIMARY[Task(cfg.task)]}"
        self._resume()
        self.ddp = session.prepare(self.model)
        self.device = session.device

    def _continual(self) -> list[str]:
        """Continual-learning terms, fixed at the starting weights (before any checkpoint loads);
        returns the replay texts that distillation runs on."""
        anchors, continual = self.plan.get("anchors") or [], self.cfg.continual_config()
        if continual.active:
            size = self.cfg.batch_size
            self.model.continual = Continual(self.model, continual, [
                self.collate(anchors[i:i + size]) for i in range(0, len(anchors), size)])
        return anchor_texts(anchors) if continual.distill else []

    def _resume(self) -> None:
        """A restarted worker or a resumed run continues after the last checkpoint."""
        state = self.session.resume_state()
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.progress = state["progress"]
        if self.rank == 0:
            p = self.progress
            say(f"semvec train: resumed from the checkpoint at step {p['step']} "
                f"(epoch {p['epoch']}, batch {p['batch']})")
            if self.tracker:
                self.tracker.log_metrics({"resumed_from_step": p["step"]}, step=p["step"])

    def run(self) -> None:
        while self.progress["epoch"] < self.cfg.epochs:
            if self._epoch():
                return

    def _epoch(self) -> bool:
        """Train the rest of the current epoch; True when training should stop (early stopping or
        a non-finite loss)."""
        cfg, progress = self.cfg, self.progress
        epoch = progress["epoch"]
        self.ddp.train()
        shard = _shard(len(self.train), epoch, cfg.seed, self.rank, self.world)
        starts = range(progress["batch"] * cfg.batch_size, len(shard), cfg.batch_size)
        losses, seen, busy = [], 0, 0.0
        for start in starts:
            tick = time.perf_counter()
            rows = shard[start:start + cfg.batch_size]
            loss = self._step([self.train[i] for i in rows])
            if loss is None:
                return True
            busy += time.perf_counter() - tick
            seen += len(rows)
            losses.append(loss)
            if self.rank == 0 and self.tracker and progress["step"] % 10 == 0:
                self.tracker.log_metrics({"train_loss": float(np.mean(losses[-10:])),
                                          "lr": self.sched.get_last_lr()[0]}, step=progress["step"])
            epoch_done = progress["batch"] * cfg.batch_size >= len(shard)
            if epoch_done:
                progress.update(epoch=epoch + 1, batch=0)
            if epoch_done or (cfg.eval_steps and progress["step"] % cfg.eval_steps == 0):
                done = progress["batch"] * cfg.batch_size / len(shard)
                metrics = {"epoch": epoch + 1.0 if epoch_done else epoch + done,
                           "step": progress["step"],
                           "train_loss": float(np.mean(losses)) if losses else float("nan"),
                           # every worker trains at this pace in step with the others
                           "train_samples_per_s": self.world * seen / busy if busy else 0.0}
                losses, seen, busy = [], 0, 0.0
                if self._evaluate_and_report(metrics):
                    return True
                self.ddp.train()
        if not starts:  # resumed exactly at an epoch's end
            progress.update(epoch=epoch + 1, batch=0)
        return False

    def _note_stop(self, note: dict) -> None:
        """Why training stopped, for the driver, in the run's record: Ray Train keeps only reports
        with a checkpoint. A note that cannot be written costs the message only, never the run."""
        if not self.run_record:
            return
        record = {**self.run_record["record"], "stopped": note}  # the driver's, with the note
        try:
            storage.put_atomic(self.run_record["uri"], json.dumps(record).encode())
        except Exception as exc:  # noqa: BLE001 - the stop itself must stay clean
            say(f"semvec train: could not note why training stopped ({type(exc).__name__})")

    def _step(self, examples: list[dict]) -> float | None:
        """One optimizer step on a batch; the loss, or None when it is not finite on some worker."""
        batch = _to(self.collate(examples), self.device)
        if self.distill_texts:  # the next slice of replay texts, for distillation
            texts, size = self.distill_texts, self.cfg.batch_size
            at = (self.progress["step"] * size) % len(texts)
            batch["anchor"] = _to(self.collate._texts((texts[at:] + texts)[:size]), self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.ddp(batch)
        finite = self.session.all_min(torch.tensor([float(torch.isfinite(loss))], device=self.device))
        if finite.item() == 0:
            where = {"epoch": self.progress["epoch"], "step": self.progress["step"]}
            self.session.report({**where, "nan_loss": 1.0})
            if self.rank == 0:
                say(f"semvec train: the loss is not finite at step {where['step']}; training stops (the "
                    "best checkpoint so far stays the best)")
                self._note_stop({"reason": "nan_loss", **where})
            return None  # the last good checkpoint stays the best; the driver says what happened
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.ddp.parameters() if p.requires_grad],
                                       self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.progress["step"] += 1
        self.progress["batch"] += 1
        return loss.item()

    def _evaluate_and_report(self, metrics: dict) -> bool:
        """Evaluate on rank 0, report with a checkpoint, return whether to stop early (all ranks
        follow rank 0's score, broadcast)."""
        progress = self.progress
        score = torch.tensor([0.0], dtype=torch.float64, device=self.device)  # float32 would round it
        detail = {}  # classification and NER: the per-label report and confusion matrix on dev
        if self.rank == 0:
            dev_metrics = task_metrics(self.model, self.collate, self.dev, self.plan["labels"], detail=True,
                                       corpus=self.dev_corpus)
            metrics.update({f"dev_{k}": v for k, v in dev_metrics.items() if isinstance(v, (int, float))})
            if "confusion" in dev_metrics:
                detail = {"examples": len(self.dev),
                          **{k: dev_metrics[k] for k in ("per_label", "confusion", "report")}}
            score[0] = metrics[self.primary]
        self.session.from_rank0(score)
        improved = score.item() > progress["best"]
        if improved:
            progress.update(best=score.item(), bad=0)
        else:
            progress["bad"] += 1
        metrics[self.primary] = score.item()
        if self.rank != 0:
            self.session.report(metrics)
            return progress["bad"] >= self.cfg.patience
        say(f"semvec train: epoch {metrics['epoch']:.2f} step {metrics['step']} train_loss "
            f"{metrics['train_loss']:.4f} {self.primary} {score.item():.4f}"
            + (" (best so far)" if improved else f" (no gain {progress['bad']}/{self.cfg.patience})"))
        if self.tracker:  # MLflow's train_loss is the 10-step series: this mean has its own name
            logged = {("train_loss_since_eval" if k == "train_loss" else k): v
                      for k, v in metrics.items() if k != "epoch"}
            self.tracker.log_metrics(logged, step=progress["step"])
        self.session.report(metrics, {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                                      "scheduler": self.sched.state_dict(), "progress": dict(progress),
                                      "metrics": metrics, "dev_detail": detail})
        return progress["bad"] >= self.cfg.patience


def say(line: str) -> None:
    """One progress line on the worker's stdout, which Ray shows on the driver's once. Not print():
    Ray Train patches it on workers to log as well as print, so every line came twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _to(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif isinstance(v, dict):
            out[k] = {kk: vv.to(device) for kk, vv in v.items()}
        else:
            out[k] = v
    return out

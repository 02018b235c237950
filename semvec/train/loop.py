"""The training loop that runs on every Ray Train worker (DDP over CPU/gloo or GPU/nccl).

Each epoch a seeded permutation is cut into one shard per worker, so every example is seen once
per epoch across workers (plus at most workers-1 repeats that even out the shards). At each epoch
end (and every eval_steps steps) rank 0 evaluates on dev and reports metrics with a checkpoint
that records where training stands (epoch and batch), and every worker follows the
early-stopping decision, broadcast so all stop together. A restart resumes at that batch.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from semvec.config import Pooling
from semvec.datasets import Task
from semvec.heads import HEAD_FILE, PRIMARY, Collator, task_metrics
from semvec.train.config import Optimizer, TrainConfig
from semvec.train.continual import Continual, anchor_texts
from semvec.train.tasks import TrainModel, resolve_loss

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

    from semvec.encode import load_tokenizer
    from semvec.train.methods import apply_method

    torch.manual_seed(cfg.seed)
    base = AutoModel.from_pretrained(plan["model_dir"], use_safetensors=True,
                                     trust_remote_code=cfg.trust_remote_code)
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
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint
    from transformers import get_scheduler

    cfg = TrainConfig(**loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    plan, train, dev = loop_config["plan"], loop_config["train"], loop_config["dev"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model, tok = build_model(cfg, plan)
    collate = Collator(tok, cfg.task, plan["max_length"], plan["labels"])
    anchors = plan.get("anchors") or []
    continual = cfg.continual_config()
    if continual.active:  # fixed at the starting weights, before any checkpoint is loaded
        model.continual = Continual(model, continual, [collate(anchors[i:i + cfg.batch_size])
                                                       for i in range(0, len(anchors), cfg.batch_size)])
    texts = anchor_texts(anchors) if continual.distill else []
    opt = _optimizer(cfg, model)
    steps_per_epoch = math.ceil(math.ceil(len(train) / world) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = get_scheduler(cfg.schedule.value, opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                          num_training_steps=total)
    # epoch/batch: where training continues; step: optimizer steps so far; best/bad: early stopping
    progress = {"epoch": 0, "batch": 0, "step": 0, "best": -math.inf, "bad": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker or a resumed run: continue after the last checkpoint
        with checkpoint.as_directory() as d:
            state = load_state(Path(d) / STATE)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        progress = state["progress"]
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    device = ray.train.torch.get_device()
    tracker = loop_config.get("tracker")
    primary = f"dev_{PRIMARY[Task(cfg.task)]}"
    if checkpoint and rank == 0:
        print(f"semvec train: resumed from the checkpoint at step {progress['step']} "
              f"(epoch {progress['epoch']}, batch {progress['batch']})", flush=True)
        if tracker:
            tracker.log_metrics({"resumed_from_step": progress["step"]}, step=progress["step"])

    def checkpoint_and_decide(metrics: dict) -> bool:
        """Evaluate on rank 0, report with a checkpoint, return whether to stop early (all ranks)."""
        score = torch.tensor([0.0], dtype=torch.float64, device=device)  # float32 would round the metric
        if rank == 0:
            dev_metrics = task_metrics(model, collate, dev, plan["labels"])
            metrics.update({f"dev_{k}": v for k, v in dev_metrics.items() if not isinstance(v, str)})
            score[0] = metrics[primary]
        if world > 1:
            dist.broadcast(score, src=0)
        if score.item() > progress["best"]:
            progress.update(best=score.item(), bad=0)
        else:
            progress["bad"] += 1
        metrics[primary] = score.item()
        if rank == 0:
            if tracker:
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=progress["step"])
            with tempfile.TemporaryDirectory() as d:
                save_state(Path(d) / STATE, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                             "scheduler": sched.state_dict(), "progress": progress,
                                             "metrics": metrics})
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        return progress["bad"] >= cfg.patience

    while progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        ddp.train()
        shard = _shard(len(train), epoch, cfg.seed, rank, world)
        starts = range(progress["batch"] * cfg.batch_size, len(shard), cfg.batch_size)
        losses, seen, busy = [], 0, 0.0
        for start in starts:
            tick = time.perf_counter()
            batch = _to(collate([train[i] for i in shard[start:start + cfg.batch_size]]), device)
            if texts:  # the next slice of replay texts, for distillation
                at = (progress["step"] * cfg.batch_size) % len(texts)
                batch["anchor"] = _to(collate._texts((texts[at:] + texts)[:cfg.batch_size]), device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = ddp(batch)
            finite = torch.tensor([float(torch.isfinite(loss))], device=device)
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                ray.train.report({"epoch": epoch, "step": progress["step"], "nan_loss": 1.0})
                return  # the last good checkpoint stays the best; the driver says what happened
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in ddp.parameters() if p.requires_grad],
                                           cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            busy += time.perf_counter() - tick
            seen += len(shard[start:start + cfg.batch_size])
            progress["step"] += 1
            progress["batch"] += 1
            losses.append(loss.item())
            if rank == 0 and tracker and progress["step"] % 10 == 0:
                tracker.log_metrics({"train_loss": float(np.mean(losses[-10:])),
                                     "lr": sched.get_last_lr()[0]}, step=progress["step"])
            epoch_done = progress["batch"] * cfg.batch_size >= len(shard)
            if epoch_done:
                progress.update(epoch=epoch + 1, batch=0)
            if epoch_done or (cfg.eval_steps and progress["step"] % cfg.eval_steps == 0):
                metrics = {"epoch": epoch + progress["batch"] * cfg.batch_size / len(shard) if not
                           epoch_done else epoch + 1.0, "step": progress["step"],
                           "train_loss": float(np.mean(losses)) if losses else float("nan"),
                           # every worker trains at this pace in step with the others
                           "train_samples_per_s": world * seen / busy if busy else 0.0}
                losses, seen, busy = [], 0, 0.0
                if checkpoint_and_decide(metrics):
                    return
                ddp.train()
        if not starts:  # resumed exactly at an epoch's end
            progress.update(epoch=epoch + 1, batch=0)


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

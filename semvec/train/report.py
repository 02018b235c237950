"""A training run's report folder, logged to MLflow as `report/`:

| file | what |
| dev_report.json | the chosen checkpoint's dev metrics |
| learning_curves.png, .json | training loss over optimizer steps, the dev metric at each evaluation |
| dev_labels.json | classification and NER: per-label report, confusion matrix, most confused pairs |
| per_label.png, confusion_matrix.png | the same, drawn |

The per-label report is the one rank 0 computed when it evaluated the chosen checkpoint (kept in
the checkpoint), so nothing is scored again here.
"""

from __future__ import annotations

import json
from pathlib import Path

from semvec import figures
from semvec.heads import PRIMARY
from semvec.train.config import TrainConfig

LOSSES = ("train_loss", "train_loss_since_eval")  # the 10-step mean; the mean between evaluations


def write_report(folder: Path, cfg: TrainConfig, run_name: str, tracker, dev_metrics: dict,
                 detail: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "dev_report.json").write_text(json.dumps(dev_metrics, indent=2))
    metric = f"dev_{PRIMARY[cfg.task]}"
    history = tracker.history([*LOSSES, metric])
    series = {k: [[step, v] for step, v in points] for k, points in history.items()}
    (folder / "learning_curves.json").write_text(json.dumps({"x": "optimizer step", **series}, indent=2))
    title = f"{cfg.task.value}, {cfg.method.value}: {run_name}"
    curves = figures.learning_curves(history, LOSSES, metric, title)
    (folder / "learning_curves.png").write_bytes(curves)
    if detail:
        kind = "entity type" if cfg.task.value == "ner" else "label"
        (folder / "dev_labels.json").write_text(json.dumps(
            {**detail, "most_confused": most_confused(detail["confusion"])}, indent=2))
        chart = figures.per_label(detail["per_label"], f"{title}: dev F1 per {kind}")
        (folder / "per_label.png").write_bytes(chart)
        tags = " (tags, token by token)" if cfg.task.value == "ner" else ""
        (folder / "confusion_matrix.png").write_bytes(figures.confusion_matrix(
            detail["confusion"], f"{title}: dev confusion{tags}"))
    return folder


def most_confused(confusion: dict, top: int = 20) -> list[dict]:
    """The largest off-diagonal cells: which gold label is taken for which, how often."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    cells = [(matrix[i][j], labels[i], labels[j]) for i in range(len(labels)) for j in range(len(labels))
             if i != j and matrix[i][j]]
    return [{"gold": g, "predicted": p, "count": int(n)}
            for n, g, p in sorted(cells, key=lambda c: (-c[0], c[1], c[2]))[:top]]

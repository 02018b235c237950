"""`semvec plot VECTORS --output map.png`: a 2-D map of a seeded sample of stored vectors.

The sample is drawn uniformly over the backfill's parts (the same plan as compression's), the
vectors scaled to unit length and mapped to 2-D by PCA (numpy's SVD), or by UMAP when
`umap-learn` is installed and asked for. Points are coloured by a field: a column of the parts
(`source`, `truncated`, `n_tokens`, ...) or a field of a labels file (`--labels`, any table with
that field, read as `semvec embed` reads input), matched by id: its `--id-field`, or FILE:ROW as
the backfill names rows without one, so the file that was embedded can be its own labels file.
At most `--max-colors` values get a colour of their own (the most frequent); the rest are grey.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from semvec import crashpoints, figures, storage
from semvec.compress.source import open_source, read_part, sample_plan
from semvec.config import require_int
from semvec.errors import ConfigError
from semvec.metrics import unit

METHODS = ("pca", "umap")
NO_LABEL = "(no label)"  # a sampled id the labels file does not name: drawn grey


@dataclass
class PlotSettings:
    vectors: str
    output: str
    color_by: str | None = None
    labels: str | None = None
    sample: int = 5_000
    seed: int = 0
    method: str = "pca"
    max_colors: int = 20
    title: str | None = None
    id_field: str | None = None  # of the labels file; None: FILE:ROW, as the backfill names rows


def plot(s: PlotSettings) -> dict:
    """Draw the map and write the PNG whole; the summary."""
    t0 = time.time()
    if s.method not in METHODS:
        raise ConfigError(f"unknown method {s.method!r}; allowed: {', '.join(METHODS)}")
    for name in ("sample", "max_colors"):
        require_int(name, getattr(s, name), 1)
    if s.labels and not s.color_by:
        raise ConfigError("--labels needs --color-by, the field of the labels file to colour by")
    if not s.output.lower().endswith(".png"):
        raise ConfigError(f"output {storage.display(s.output)!r} must be a .png file")
    storage.check_file_writable(s.output)
    figures.require()
    reducer = _reducer(s.method)
    source = open_source(s.vectors, verb="plot")
    ids, vectors, columns = _sample(source, s)
    values = _colours(s, ids, columns) if s.color_by else None
    xy = reducer(unit(vectors), s.seed)
    png = _draw(xy, values, s, source.rows)
    crashpoints.arm()
    storage.put_atomic(s.output, png)
    return {"vectors": storage.display(s.vectors), "points": len(ids), "of": source.rows,
            "method": s.method, "color_by": s.color_by,
            "values": len(set(values)) if values is not None else 0,
            "output": storage.display(s.output), "seconds": round(time.time() - t0, 2)}


def _reducer(method: str):
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError("--method umap needs umap-learn: pip install umap-learn "
                              "(or use --method pca)") from None
        return lambda x, seed: umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    return lambda x, seed: pca_2d(x)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """[n, dim] -> [n, 2]: the first two principal components (signs fixed by the largest entry)."""
    centred = x - x.mean(axis=0)
    if len(x) < 2:
        return np.zeros((len(x), 2), dtype=np.float32)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    out = centred @ axes.T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def _sample(source, s: PlotSettings) -> tuple[list[str], np.ndarray, dict[str, list]]:
    """ids, vectors [n, dim] and the other columns of the sampled rows, in part order."""
    plans = sample_plan([p.rows for p in source.parts], s.sample, s.seed)
    ids, vectors, columns = [], [], {}
    for part, rows in zip(source.parts, plans, strict=True):
        if not len(rows):
            continue
        part_ids, part_vectors = read_part(source.uri, part.path)
        ids += [part_ids[r] for r in rows]
        vectors.append(part_vectors[rows])
        if s.color_by and not s.labels:  # that column alone: the vectors are read already
            columns.setdefault(s.color_by, []).extend(_column(source.uri, part.path, s.color_by, rows))
    return ids, np.concatenate(vectors), columns


def _column(uri: str, path: str, name: str, rows: np.ndarray) -> list:
    with storage.filesystem(uri).open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if name not in names:
            shown = ", ".join(c for c in names if c not in ("embedding", "id"))
            raise ConfigError(f"--color-by {name!r} is not a column of the vectors ({shown}); "
                              "give --labels FILE with id and that field")
        return parquet.read(columns=[name])[name].take(rows).to_pylist()


def _colours(s: PlotSettings, ids: list[str], columns: dict[str, list]) -> list[str]:
    if not s.labels:
        return [str(v) for v in columns[s.color_by]]
    from semvec.backfill.read import read_all_rows

    label_of: dict[str, str] = {}
    for _source, _row, rid, value, reason in read_all_rows(s.labels, s.color_by, s.id_field, 10_000,
                                                           "labels file", "--color-by"):
        if reason is None:
            label_of.setdefault(rid, value)
    found = [label_of.get(i) for i in ids]
    if not any(v is not None for v in found):
        matched = f"its {s.id_field!r} field" if s.id_field else "FILE:ROW"
        raise ConfigError(f"no sampled id has a {s.color_by!r} in {storage.display(s.labels)!r} "
                          f"(ids matched on {matched})")
    return [v if v is not None else NO_LABEL for v in found]


def _draw(xy: np.ndarray, values: list[str] | None, s: PlotSettings, total: int) -> bytes:
    fig = figures.figure(9, 7, dpi=110)
    ax = fig.subplots()
    if values is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6, linewidths=0)
    else:
        kept = [v for v, _ in Counter(v for v in values if v != NO_LABEL).most_common(s.max_colors)]
        palette = figures.colours(len(kept))
        other = np.array([v not in kept for v in values])
        if other.any():
            ax.scatter(xy[other, 0], xy[other, 1], s=5, c="lightgrey", linewidths=0,
                       label=f"other or no label ({int(other.sum())})")
        for n, value in enumerate(kept):
            mine = np.array([v == value for v in values])
            ax.scatter(xy[mine, 0], xy[mine, 1], s=7, color=palette[n], linewidths=0,
                       label=f"{value[:30]} ({int(mine.sum())})")
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(s.title or f"{storage.display(s.vectors)}: {len(xy):,} of {total:,} vectors, {s.method}",
                 fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return figures.png(fig)

"""The compression job's one typed config, validated on the driver before anything is read.

What can be checked without the source (a bad choice, a bad number) is checked here; what needs
the source (is it a backfill output, is --pca below its dim) is checked by `job.plan`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from semvec.config import load_settings, parse_enum, plain, require_int, require_lease_ttl
from semvec.errors import ConfigError

CODEC_VERSION = 1  # bumped when the codec's maths changes: an older output is then refused


class Quantize(str, Enum):
    NONE = "none"  # float32 (after --pca, if given)
    INT8 = "int8"  # one byte a dimension, per-dimension ranges calibrated on the sample
    BINARY = "binary"  # one bit a dimension, searched by Hamming distance; int8 codes kept beside


@dataclass
class CompressConfig:
    """One compression of a backfill output. Fields marked 'output-shaping' enter the config hash."""

    vectors: str
    output: str
    pca: int | None = None  # output-shaping
    quantize: Quantize = Quantize.NONE  # output-shaping
    # Vectors the codec is fitted on (PCA and the int8 ranges): a seeded uniform sample of the
    # source, held on the driver (sample_size x dim float32: 77 MB at 50,000 x 384, and a few
    # float64 copies of it while fitting, about 0.6 GB there).
    sample_size: int = 50_000  # output-shaping
    seed: int = 0  # output-shaping
    ray_from_rows: int = 200_000
    overwrite: bool = False
    lease_ttl_s: float = 120.0

    HELP: ClassVar[dict[str, str]] = {
        "vectors": "a complete backfill output prefix (local or s3://): the float vectors to compress",
        "output": "output prefix, local or s3://: parquet parts, _compress.json (the codec), "
                  "_manifest.json",
        "pca": "keep this many principal components (fitted on the sample); the projection is saved "
               "and applied to queries (default: no PCA)",
        "quantize": "int8: a byte a dimension; binary: a bit a dimension (searched by Hamming "
                    "distance, top candidates rescored with int8 codes stored beside)",
        "sample_size": "vectors sampled (seeded, uniform over all parts) to fit PCA and the int8 ranges",
        "seed": "seed of the sample",
        "ray_from_rows": "sources with at least this many vectors are read and compressed by Ray tasks, "
                         "one per part; smaller ones in this process, part after part",
        "overwrite": "replace an output compressed with other settings or from other vectors "
                     "(else it is refused)",
        "lease_ttl_s": "seconds after which an s3:// output's unrenewed lease counts as stale",
    }

    HASHED = ("pca", "quantize", "sample_size", "seed")

    def __post_init__(self) -> None:
        self.quantize = parse_enum(Quantize, "quantize", self.quantize)
        for name in ("vectors", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.pca is not None:
            require_int("pca", self.pca, 1)
        require_int("sample_size", self.sample_size, 1)
        require_int("seed", self.seed, 0)
        require_int("ray_from_rows", self.ray_from_rows, 1)
        if self.pca is None and self.quantize == Quantize.NONE:
            raise ConfigError("nothing to compress: give --pca D and/or --quantize "
                              + "|".join(q.value for q in Quantize if q != Quantize.NONE))
        if self.pca is not None and self.sample_size < self.pca:
            raise ConfigError(f"sample_size {self.sample_size} is below pca {self.pca}: "
                              "PCA needs at least as many sampled vectors as components")
        require_lease_ttl(self.lease_ttl_s)

    def output_hash(self, source_identity: str) -> str:
        """Hash of what shapes the output, the source's identity included: a rerun with another
        hash is refused (or, with overwrite, starts again)."""
        shaping = {name: plain(getattr(self, name)) for name in self.HASHED}
        shaping.update(source=source_identity, codec_version=CODEC_VERSION)
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


def load_compress_config(path: str | Path | None = None, **overrides: Any) -> CompressConfig:
    """Read a compression YAML config (optional) and apply overrides (None means 'not given')."""
    return load_settings(CompressConfig, path, ("vectors", "output"), overrides)

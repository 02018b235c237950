"""A compressed output prefix: the one module that reads and writes it.

Under the prefix:
    part-<key>-<first>-<last>.parquet  one per source part, same name, same rows in the same order:
                                       `id` and `embedding` (float32[dim], no quantisation) or
                                       `codes` (int8[dim]) or `bits` (uint8[ceil(dim/8)]) + `codes`
    _compress.json                     the codec (PCA mean and components, int8 scale and offset,
                                       binary thresholds; arrays as base64 little-endian float32)
                                       and the source's lineage
    _manifest.json                     status, settings, lineage, parts with rows (read back from
                                       the committed parts), bytes per vector, timings
    _lease.json                        one writer at a time (semvec.lease)

Every object is written whole (storage.write_atomic), so a reader sees a part entirely or not at all.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semvec import storage
from semvec.compress.codec import Codec, Encoded
from semvec.compress.config import Quantize
from semvec.errors import ConfigError

MANIFEST = "_manifest.json"
CODEC = "_compress.json"
LEASE = "_lease.json"
SOURCE_PART_KEY = b"semvec.source_part"
OURS = (MANIFEST, CODEC, LEASE)


class CompressedDir(storage.Prefix):
    """One compressed output prefix on local disk or s3://."""

    # ------------------------------------------------------------ manifest and codec

    def read_manifest(self) -> dict | None:
        return self.read_json(MANIFEST)

    def write_manifest(self, manifest: dict) -> None:
        self.write_json(MANIFEST, manifest)

    def read_codec(self) -> tuple[Codec, dict] | None:
        """(codec, the rest of _compress.json: config hash, lineage, sample), or None."""
        record = self.read_json(CODEC)
        if record is None:
            return None
        return codec_from_dict(record["codec"]), {k: v for k, v in record.items() if k != "codec"}

    def write_codec(self, codec: Codec, about: dict) -> None:
        self.write_json(CODEC, {**about, "codec": codec_to_dict(codec)})

    # ------------------------------------------------------------ parts

    def list_parts(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(p for p in self.fs.ls(self.root, detail=False) if storage.is_part(p))

    def committed(self) -> dict[str, int]:
        """Part name -> rows, from each committed part's footer."""
        rows = {}
        for p in self.list_parts():
            with self.fs.open(p, "rb") as f:
                rows[storage.basename(p)] = pq.ParquetFile(f).metadata.num_rows
        return rows

    def write_part(self, name: str, ids: list[str], encoded: Encoded) -> None:
        """One part, whole: the compressed vectors of the source part `name`, in its row order."""
        columns = {"id": pa.array(ids, pa.string())}
        if encoded.vectors is not None:
            columns["embedding"] = _fixed(encoded.vectors, pa.float32())
        if encoded.codes is not None:
            columns["codes"] = _fixed(encoded.codes, pa.int8())
        if encoded.bits is not None:
            columns["bits"] = _fixed(encoded.bits, pa.uint8())
        table = pa.table(columns).replace_schema_metadata({SOURCE_PART_KEY: name.encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_atomic(self.fs, self.path(name), buf.getvalue())

    def read_part(self, path: str) -> tuple[list[str], Encoded]:
        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        arrays = {c: _matrix(table[c]) for c in ("embedding", "codes", "bits") if c in table.column_names}
        return table["id"].to_pylist(), Encoded(arrays.get("embedding"), arrays.get("codes"),
                                                arrays.get("bits"))

    # ------------------------------------------------------------ the prefix as a whole

    def holds_other_files(self) -> bool:
        """Anything here that a compression did not write."""
        if not self.fs.exists(self.root):
            return False
        return any(not storage.written_by_us(storage.basename(p), _ours)
                   for p in self.fs.ls(self.root, detail=False))

    def clear(self) -> None:
        """Remove what a compression wrote (manifest first: a crash part-way leaves no manifest,
        which the next --overwrite clears again), the lease aside."""
        for name in (MANIFEST, CODEC):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))
        for p in self.list_parts():
            self.fs.rm(p)
        self.remove_temporaries()

    def remove_temporaries(self) -> None:
        """The temporaries of this output's own local writes that a crash cut short before their
        rename (storage.remove_temporaries); call only while holding the lease."""
        storage.remove_temporaries(self.fs, self.root, _ours)


def is_compressed(uri: str) -> bool:
    """Whether uri holds a compressed output (complete or not)."""
    manifest = CompressedDir(uri).read_manifest()
    return manifest is not None and "compression" in manifest


def open_complete(uri: str) -> tuple[CompressedDir, Codec, dict]:
    """(prefix, codec, manifest) of a complete compressed output, or a one-line ConfigError."""
    out = CompressedDir(uri)
    where = storage.display(uri)
    manifest = out.read_manifest()
    if manifest is None or "compression" not in manifest:
        raise ConfigError(f"{where!r} is not a compressed output (no compression in its manifest)")
    if manifest.get("status") != "complete":
        raise ConfigError(f"compressed vectors {where!r} are not complete (status "
                          f"{manifest.get('status')!r})")
    codec = out.read_codec()
    if codec is None:
        raise ConfigError(f"compressed vectors {where!r} hold no {CODEC}")
    return out, codec[0], manifest


# ------------------------------------------------------------ the codec as JSON


def codec_to_dict(codec: Codec) -> dict:
    arrays = ("mean", "components", "scale", "offset", "thresholds")
    return {"dim_in": codec.dim_in, "dim": codec.dim, "quantize": codec.quantize.value,
            "explained_variance": codec.explained,
            **{name: _array_to_json(getattr(codec, name)) for name in arrays}}


def codec_from_dict(record: dict) -> Codec:
    arrays = {name: _array_from_json(record.get(name))
              for name in ("mean", "components", "scale", "offset", "thresholds")}
    return Codec(dim_in=int(record["dim_in"]), quantize=Quantize(record["quantize"]),
                 explained=record.get("explained_variance"), **arrays)


def _array_to_json(a: np.ndarray | None) -> dict | None:
    # base64 of the float32 bytes: exact, and a quarter the size of decimal text
    if a is None:
        return None
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode()}


def _array_from_json(record: dict | None) -> np.ndarray | None:
    if record is None:
        return None
    flat = np.frombuffer(base64.b64decode(record["base64"]), dtype="<f4")
    return flat.reshape(record["shape"]).astype(np.float32)


# ------------------------------------------------------------ arrow


def _fixed(matrix: np.ndarray, kind: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).reshape(-1), kind),
                                             matrix.shape[1])


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    width = column.type.list_size
    return column.combine_chunks().values.to_numpy().reshape(-1, width)


def _ours(name: str) -> bool:
    """A name a compression writes in its prefix."""
    return storage.is_part(name) or name in OURS

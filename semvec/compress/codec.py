"""The maths of compression: a PCA projection, int8 scalar quantisation and sign-bit packing,
fitted on a sample and then applied part by part (and to queries).

Shapes: the source vectors are [n, dim_in] float32; the compressed space has `dim` dimensions
(the PCA's components, or dim_in without PCA).

Why the scores come out as they do. Search is cosine, so every source vector is scaled to unit
length first. A document d is stored as y = C (d - mu), C the [dim, dim_in] orthonormal rows of
the PCA and mu the sample's mean. Its reconstruction mu + C^T y dotted with a query q reconstructed
the same way is, up to a term that is the same for every document of one query, (C q) . y: so a
query is mapped by `query()` to C q, without the centring, and a document's score is (C q) . y.
With dim = dim_in that is exactly the float ranking; fewer components drop the least-variance
directions. int8 codes stand for y, decoded per dimension as codes * scale + offset; binary bits
are y > the sample's per-dimension median, so each bit splits the sample in half (the most a bit
can tell), and a query is binarised the same way from its centred projection C (q - mu).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semvec.compress.config import Quantize
from semvec.metrics import unit

# int8 ranges: the 0.01th and 99.99th percentile of each dimension on the sample. A Gaussian
# dimension then spans about +-3.7 sigma in 256 steps (rounding error ~0.01 sigma), and a handful
# of outlying vectors in the sample cannot stretch a range; values beyond it are clipped to its
# ends. Min/max ranges measure about the same error on Gaussian data but follow single outliers.
LOW_PERCENTILE, HIGH_PERCENTILE = 0.01, 99.99
LEVELS = 255  # steps between the ends of a range: codes -128 .. 127


@dataclass(frozen=True)
class Codec:
    """A fitted compression; arrays are float32 as saved, so a loaded codec encodes identically."""

    dim_in: int
    quantize: Quantize
    mean: np.ndarray | None = None  # [dim_in]; None without PCA
    components: np.ndarray | None = None  # [dim, dim_in], orthonormal rows, by variance
    explained: float | None = None  # share of the sample's variance the components keep
    scale: np.ndarray | None = None  # [dim]: int8 and binary (codes kept beside the bits)
    offset: np.ndarray | None = None  # [dim]
    thresholds: np.ndarray | None = None  # [dim]: binary only

    @property
    def dim(self) -> int:
        return self.dim_in if self.components is None else int(self.components.shape[0])

    def project(self, x: np.ndarray) -> np.ndarray:
        """Source vectors [n, dim_in] -> y [n, dim] float32: unit length, centred and projected."""
        x = unit(np.asarray(x, dtype=np.float64))
        if self.components is None:
            return x.astype(np.float32)
        # float64: the last bits of a float32 product depend on the BLAS's blocking and threads,
        # and a code at a rounding edge would then differ between two runs of one part
        return ((x - self.mean) @ self.components.T.astype(np.float64)).astype(np.float32)

    def query(self, q: np.ndarray) -> np.ndarray:
        """Float queries [n, dim_in] -> [n, dim] whose dot with a document's y ranks as cosine."""
        q = unit(np.asarray(q, dtype=np.float64))
        if self.components is None:
            return q.astype(np.float32)
        return (q @ self.components.T.astype(np.float64)).astype(np.float32)

    def encode(self, x: np.ndarray) -> Encoded:
        """Source vectors [n, dim_in] -> what is stored for them."""
        y = self.project(x)
        if self.quantize == Quantize.NONE:
            return Encoded(vectors=y)
        codes = quantize_int8(y, self.scale, self.offset)
        if self.quantize == Quantize.INT8:
            return Encoded(codes=codes)
        return Encoded(codes=codes, bits=binarize(y, self.thresholds))

    def decode(self, encoded: Encoded) -> np.ndarray:
        """What is stored -> y [n, dim] float32 (for int8 and binary: from the int8 codes)."""
        if encoded.vectors is not None:
            return encoded.vectors
        return dequantize_int8(encoded.codes, self.scale, self.offset)


@dataclass(frozen=True)
class Encoded:
    """The stored form of n vectors: float32 [n, dim], int8 codes [n, dim], packed bits
    [n, ceil(dim / 8)] uint8 (first dimension in the highest bit of the first byte)."""

    vectors: np.ndarray | None = None
    codes: np.ndarray | None = None
    bits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(a for a in (self.vectors, self.codes, self.bits) if a is not None))


def fit(sample: np.ndarray, pca: int | None, quantize: Quantize) -> Codec:
    """A codec fitted on sample [n, dim_in]: PCA first (if asked), then ranges of the projection."""
    sample = np.asarray(sample, dtype=np.float64)
    codec = Codec(dim_in=int(sample.shape[1]), quantize=quantize)
    if pca is not None:
        mean, components, explained = fit_pca(unit(sample), pca)
        codec = Codec(codec.dim_in, quantize, mean, components, explained)
    if quantize == Quantize.NONE:
        return codec
    y = codec.project(sample)
    scale, offset = calibrate_int8(y)
    thresholds = np.median(y, axis=0).astype(np.float32) if quantize == Quantize.BINARY else None
    return Codec(codec.dim_in, quantize, codec.mean, codec.components, codec.explained,
                 scale, offset, thresholds)


def fit_pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean [dim_in], components [dim, dim_in], share of variance kept) of x [n, dim_in].

    The covariance is dim_in x dim_in (float64), so the cost does not grow with the sample past
    one product. Each component's sign is fixed (its largest entry positive): eigenvectors come
    with an arbitrary sign, and two fits of one sample must give the same codes.
    """
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / max(len(x) - 1, 1)
    values, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(values)[::-1][:dim]
    components = vectors[:, order].T  # [dim, dim_in]
    largest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(dim), largest])[:, None]
    total = float(values.clip(min=0).sum())
    explained = float(values[order].clip(min=0).sum()) / total if total > 0 else 1.0
    return mean.astype(np.float32), components.astype(np.float32), explained


def calibrate_int8(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) [dim] float32 so that codes * scale + offset spans each dimension's range."""
    low = np.percentile(y, LOW_PERCENTILE, axis=0)
    high = np.percentile(y, HIGH_PERCENTILE, axis=0)
    scale = np.maximum(high - low, 1e-12) / LEVELS  # a constant dimension: any code decodes to it
    offset = low + 128 * scale
    return scale.astype(np.float32), offset.astype(np.float32)


def quantize_int8(y: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """y [n, dim] -> codes int8 [n, dim]; values beyond a dimension's range take its end."""
    codes = np.rint((y.astype(np.float64) - offset) / scale)
    return np.clip(codes, -128, 127).astype(np.int8)


def dequantize_int8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale + offset


def binarize(y: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """y [n, dim] -> packed sign bits [n, ceil(dim / 8)] uint8; padding bits are 0 for every vector,
    so they never add to a Hamming distance."""
    return np.packbits(y > thresholds, axis=1)


def hamming(query_bits: np.ndarray, doc_bits: np.ndarray) -> np.ndarray:
    """[nq, b] and [nd, b] packed bits -> [nq, nd] int32 bits that differ."""
    # a query at a time: an [nd, b] XOR in memory, never [nq, nd, b]
    return np.stack([np.bitwise_count(doc_bits ^ q).sum(axis=1, dtype=np.int32) for q in query_bits])


def bytes_per_vector(dim_in: int, dim: int, quantize: Quantize) -> dict[str, int]:
    """Payload bytes a vector, before parquet's compression: the float32 source, what a search holds
    in memory for its first pass, and all that is stored (binary keeps int8 codes for rescoring)."""
    searched = {Quantize.NONE: 4 * dim, Quantize.INT8: dim, Quantize.BINARY: -(-dim // 8)}[quantize]
    stored = searched + (dim if quantize == Quantize.BINARY else 0)
    return {"source": 4 * dim_in, "search": searched, "stored": stored}

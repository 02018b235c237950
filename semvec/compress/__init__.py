"""Vector compression: a backfill output's float vectors made smaller, and searched as stored.

    semvec compress VECTORS OUTPUT [--pca D] [--quantize int8|binary]

| module | concern |
| config | CompressConfig and Quantize, validated before any work |
| source | the backfill output compressed: parts, row counts, the seeded sample |
| codec | PCA, int8 calibration and quantisation, sign bits (the maths, no IO) |
| output | the compressed prefix: parts, _compress.json (the codec), _manifest.json |
| job | the wiring: plan, lease, fit, one Ray task per part, accounting |
| search | float queries against compressed vectors (what `semvec evaluate` uses) |
"""

from semvec.compress.config import CompressConfig, Quantize, load_compress_config

__all__ = ["CompressConfig", "Quantize", "load_compress_config"]

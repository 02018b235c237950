"""semvec: semantic vectors from language models, at cluster scale."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("semvec")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"

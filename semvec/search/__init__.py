"""Search over the vectors a backfill wrote: a FAISS index built from its output (`semvec index`,
semvec.search.build), opened and queried (`semvec search`, semvec.search.index):

    import semvec.search
    hits = semvec.search.open("s3://bucket/index").search(["card not arrived"], k=10)
"""

from semvec.search.index import Hits, SearchIndex, open_index

open = open_index  # noqa: A001 - semvec.search.open(uri), as the README shows

__all__ = ["Hits", "SearchIndex", "open", "open_index"]

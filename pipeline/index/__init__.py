"""Similarity search and near-duplicates over featuresets: the index stage, Index.search, dedup."""

from imgfeat.index.build import IndexConfig, IndexSummary, build_index
from imgfeat.index.files import IndexInfo, list_indexes
from imgfeat.index.search import Index, Neighbour, QueryResult

__all__ = [
    "Index",
    "IndexConfig",
    "IndexInfo",
    "IndexSummary",
    "Neighbour",
    "QueryResult",
    "build_index",
    "list_indexes",
]

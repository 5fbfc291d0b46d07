"""Index.search: the nearest images of vectors, image ids or image files in a committed index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgfeat.core import schemas as S
from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.results import JsonObject
from imgfeat.core.runs import new_run_id
from imgfeat.core.stores import ImageRoot
from imgfeat.core.workspace import Workspace
from imgfeat.extract.extract import FileResult, extract_files
from imgfeat.index.files import IndexInfo, migrate_if_free, read_faiss, read_ids, read_info
from imgfeat.index.kinds import knn, set_search_params
from imgfeat.index.text import embed_texts
from imgfeat.index.vectors import normalise, read_vectors, resolve_id_prefixes
from imgfeat.scan.manifest import dataset_root

RERANK_FACTOR = 4  # an ivfpq search rescores this many times the neighbours asked for
RERANK_CHUNK = 256  # queries rescored at a time (their candidates' features in memory)


@dataclass(frozen=True)
class Neighbour:
    image_id: str
    path: str | None
    similarity: float

    def to_json(self) -> JsonObject:
        return {"image_id": self.image_id, "path": self.path, "similarity": round(self.similarity, 6)}


@dataclass(frozen=True)
class QueryResult:
    """One query (a file, an image id or a vector's row number) and its neighbours, best first."""

    query: str
    image_id: str | None
    neighbours: tuple[Neighbour, ...] = ()
    error: str | None = None

    def to_json(self) -> JsonObject:
        obj: dict[str, Any] = {
            "query": self.query,
            "image_id": self.image_id,
            "neighbours": [n.to_json() for n in self.neighbours],
        }
        if self.error:
            obj["error"] = self.error
        return obj


def extract_queries(ws: Workspace, featureset: str, paths: Sequence[Path], run_id: str) -> list[FileResult]:
    """Features of query files, cached into the featureset the way `imgfeat predict FILE` does."""
    return extract_files(ws, featureset, list(paths), run_id)


class Index:
    """A committed index, opened for search: ``Index.open(ws, name).search(vectors_or_files, k)``."""

    def __init__(self, ws: Workspace, info: IndexInfo, nprobe: int | None = None) -> None:
        self.ws, self.info = ws, info
        self.faiss = read_faiss(ws, info)
        set_search_params(self.faiss, info.params, nprobe)
        table = read_ids(ws, info)
        self.ids: list[str] = table[S.IMAGE_ID].to_pylist()
        self._paths = _absolute_paths(ws, table[S.DATASET].to_pylist(), table[S.PATH].to_pylist())

    @classmethod
    def open(cls, ws: Workspace, name: str, nprobe: int | None = None) -> Index:
        """A committed index; an older layout's side files are moved first when no writer holds it.

        ``nprobe``: IVF lists searched per query instead of the recorded one (more: better recall, slower).
        """
        if nprobe is not None and (not isinstance(nprobe, int) or isinstance(nprobe, bool) or nprobe < 1):
            raise ConfigError(f"nprobe must be a positive integer, got {nprobe!r}")
        migrate_if_free(ws, name)
        return cls(ws, read_info(ws, name), nprobe)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def featureset(self) -> str:
        return self.info.featureset

    def __len__(self) -> int:
        return len(self.ids)

    def path_of(self, image_id: str | None) -> str | None:
        """The file of an indexed image (absolute where its dataset's root is known), None if not indexed."""
        if not hasattr(self, "_pos"):
            self._pos = {i: k for k, i in enumerate(self.ids)}
        k = self._pos.get(image_id) if image_id is not None else None
        return self._paths[k] if k is not None else None

    def search(
        self,
        queries: np.ndarray | Sequence[str | Path],
        k: int = 10,
        featureset: str | None = None,
        run_id: str | None = None,
    ) -> list[QueryResult]:
        """Neighbours of each query: vectors of this index's featureset, or image files to extract.

        ``featureset``, when given, names the queries' featureset and must be the index's.
        """
        if featureset is not None:
            self.check_featureset(featureset)
        if isinstance(queries, np.ndarray):
            return self.search_vectors(queries, k)
        return self.search_files([Path(q) for q in queries], k, run_id or new_run_id())

    def check_featureset(self, featureset: str) -> None:
        """Exit 2 unless queries from ``featureset`` can be searched here (the index's own featureset)."""
        if featureset != self.featureset:
            raise ConfigError(
                f"index {self.name} was built on featureset {self.featureset}; "
                f"queries from featureset {featureset} cannot be searched in it"
            )

    def search_vectors(
        self,
        X: np.ndarray,
        k: int = 10,
        labels: Sequence[str] | None = None,
        query_ids: Sequence[str | None] | None = None,
    ) -> list[QueryResult]:
        """Neighbours of raw vectors (normalised here); a query never lists its own image id."""
        self._check_k(k)
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        if X.shape[1] != self.info.dim:
            raise ConfigError(
                f"query vectors have {X.shape[1]} dimensions; index {self.name} "
                f"(featureset {self.featureset}) has {self.info.dim}"
            )
        labels = list(labels) if labels is not None else [str(r) for r in range(len(X))]
        query_ids = list(query_ids) if query_ids is not None else [None] * len(X)
        Q = normalise(X.copy())
        if self.info.kind == "ivfpq":
            sims, rows = self._reranked(Q, min(RERANK_FACTOR * (k + 1), len(self)))
        else:
            sims, rows = knn(self.faiss, Q, min(k + 1, len(self)))
        return [
            QueryResult(q, qid, self._neighbours(s, r, qid, k)) for q, qid, s, r in zip(labels, query_ids, sims, rows)
        ]

    def _reranked(self, Q: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray]:
        """An ivfpq index's codes only rank candidates: the best ``candidates`` of each query are
        rescored on their stored features (exact cosines), a chunk of queries at a time."""
        sims = np.full((len(Q), candidates), -np.inf, dtype=np.float32)
        rows = np.full((len(Q), candidates), -1, dtype=np.int64)
        for lo in range(0, len(Q), RERANK_CHUNK):
            q = Q[lo : lo + RERANK_CHUNK]
            _, r = knn(self.faiss, q, candidates)
            wanted = np.unique(r[r >= 0])
            ids, V = read_vectors(self.ws, self.featureset, [self.ids[j] for j in wanted])
            where = {i: n for n, i in enumerate(ids)}
            slot = np.array([where.get(self.ids[j], -1) for j in wanted], dtype=np.int64)  # row -> V row
            v = np.where(r >= 0, slot[np.searchsorted(wanted, np.maximum(r, 0))], -1)
            s = np.einsum("qd,qcd->qc", q, V[np.maximum(v, 0)]) if len(V) else np.zeros(r.shape, np.float32)
            s[v < 0] = -np.inf  # no stored feature (or no candidate): never a neighbour
            order = np.argsort(-s, axis=1, kind="stable")
            sims[lo : lo + len(q)] = np.take_along_axis(s, order, axis=1)
            rows[lo : lo + len(q)] = np.where(
                np.take_along_axis(v, order, axis=1) >= 0, np.take_along_axis(r, order, axis=1), -1
            )
        return sims, rows

    def search_text(self, texts: Sequence[str], k: int = 10) -> list[QueryResult]:
        """Images ranked by cosine to each text, embedded by the featureset's preset text tower
        (CLIP, SigLIP); ConfigError on a featureset without one."""
        self._check_k(k)
        return self.search_vectors(embed_texts(self.ws, self.featureset, texts), k, labels=list(texts))

    def search_ids(self, image_ids: Sequence[str], k: int = 10) -> list[QueryResult]:
        """Neighbours of images already in the featureset, by image id or a unique prefix (8+ hex digits)."""
        asked = list(image_ids)
        image_ids = resolve_id_prefixes(self.ws, self.featureset, asked)
        ids, X = read_vectors(self.ws, self.featureset, image_ids)
        unknown = [i for i in image_ids if i not in set(ids)]
        if unknown:
            raise ConfigError(f"image id {unknown[0]!r} has no feature row in featureset {self.featureset}")
        pos = {i: n for n, i in enumerate(ids)}
        X = X[[pos[i] for i in image_ids]]
        return self.search_vectors(X, k, labels=asked, query_ids=list(image_ids))

    def search_files(self, paths: Sequence[Path], k: int = 10, run_id: str | None = None) -> list[QueryResult]:
        """Neighbours of image files: extracted through the featureset cache (a cached file costs a hash)."""
        self._check_k(k)
        results = extract_queries(self.ws, self.featureset, paths, run_id or new_run_id())
        good = list(dict.fromkeys(r.image_id for r in results if r.image_id and not r.error_code))
        found = {q.image_id: q for q in self.search_ids(good, k)} if good else {}
        out = []
        for r in results:
            hit = found.get(r.image_id) if not r.error_code else None
            if hit is None:
                out.append(
                    QueryResult(
                        str(r.path),
                        r.image_id,
                        (),
                        f"{r.error_code or 'no_features'}: {r.error_message or 'no feature row was written'}",
                    )
                )
            else:
                out.append(QueryResult(str(r.path), r.image_id, hit.neighbours))
        return out

    def _check_k(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"top k must be a positive integer, got {k!r}")
        if k > len(self):
            raise ConfigError(f"top {k} is more than the {len(self)} images in index {self.name}")

    def _neighbours(self, sims: np.ndarray, rows: np.ndarray, self_id: str | None, k: int) -> tuple[Neighbour, ...]:
        out: list[Neighbour] = []
        for s, r in zip(sims.tolist(), rows.tolist()):
            if r >= 0 and self.ids[r] != self_id and len(out) < k:
                out.append(Neighbour(self.ids[r], self._paths[r], float(s)))
        return tuple(out)


def _absolute_paths(ws: Workspace, datasets: list[str | None], paths: list[str | None]) -> list[str | None]:
    """Manifest paths made absolute with their dataset's root (as stored when the root is unknown)."""
    roots: dict[str, ImageRoot | None] = {}
    out = []
    for d, p in zip(datasets, paths):
        if d is not None and d not in roots:
            try:
                roots[d] = dataset_root(ws, d)
            except ImgfeatError:
                roots[d] = None
        root = roots.get(d) if d is not None else None
        out.append(None if p is None else (root / p).as_posix() if root is not None else p)
    return out

"""Head and featureset references (``ID``, ``NAME``, ``NAME@ID``) resolved to versions, older workspaces included."""

from __future__ import annotations

from typing import Any

from imgfeat.core import names as N
from imgfeat.core.workspace import Workspace
from imgfeat.heads import artifacts as A


def default_head_name(dataset: str, kind: str) -> str:
    """A head without ``--name`` or a job-file name is called ``<dataset>-<kind>``."""
    return f"{dataset}-{kind}"


def committed_heads(ws: Workspace) -> dict[str, dict[str, Any]]:
    """head_id -> head.json of every committed head; a damaged head.json counts as a head with no
    facts ({}): a name still resolves to it, and using it fails with ``A.read_head_meta``'s message
    naming the file (never silently the version before)."""
    return {h: A.load_head_meta(ws, h)[0] for h in ws.list_names("heads") if A.head_exists(ws, h)}


def head_index(
    ws: Workspace, heads: dict[str, dict[str, Any]] | None = None, named: N.Versions | None = None
) -> N.Versions:
    """The names index (``named``, default ``names/heads.json``), plus heads trained before names
    existed under their default name.

    Those come first (oldest first by created_at), so a head recorded in the index stays latest.
    """
    heads = committed_heads(ws) if heads is None else heads
    named = N.read_index(ws, N.HEADS) if named is None else named
    index = {n: [e for e in es if e[N.ID] in heads] for n, es in named.items()}
    named_ids = {e[N.ID] for es in index.values() for e in es}
    legacy = sorted((m.get("created_at") or "", h) for h, m in heads.items() if h not in named_ids)
    for created, h in reversed(legacy):
        m = heads[h]
        known = m.get("dataset") and m.get("head")
        name = m.get("name") or (default_head_name(m["dataset"], m["head"]) if known else h)
        index.setdefault(name, [])[:0] = [{N.ID: h, N.RECORDED_AT: created}]
    return {n: es for n, es in index.items() if es}


def resolve_head(ws: Workspace, ref: str) -> str:
    """A head id from ``ID``, ``NAME`` (its latest) or ``NAME@ID``; exit 2 naming the choices."""
    heads = committed_heads(ws)
    return N.resolve(head_index(ws, heads), N.HEADS, ref, heads)


def featureset_index(ws: Workspace) -> N.Versions:
    """Recipe names of featuresets that still exist."""
    index = N.read_index(ws, N.FEATURESETS)
    out = {n: [e for e in es if ws.featureset_dir(e[N.ID]).is_dir()] for n, es in index.items()}
    return {n: es for n, es in out.items() if es}


def resolve_featureset(ws: Workspace, ref: str) -> str:
    """A featureset from its full name, a recipe name (its latest) or ``RECIPE@NAME``."""
    return N.resolve(featureset_index(ws), N.FEATURESETS, ref, ws.list_names("features"))


def names_of(index: N.Versions, version: str) -> list[str]:
    """The names a version is recorded under."""
    return [n for n, es in index.items() if any(e[N.ID] == version for e in es)]

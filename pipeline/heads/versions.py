"""Head and featureset references (``ID``, ``NAME``, ``NAME@ID``) resolved to versions, older workspaces included."""

from __future__ import annotations

import json
from typing import Any

from imgfeat.core import names as N
from imgfeat.core.workspace import Workspace
from imgfeat.heads import artifacts as A


def default_head_name(dataset: str, kind: str) -> str:
    """A head without ``--name`` or a job-file name is called ``<dataset>-<kind>``."""
    return f"{dataset}-{kind}"


def committed_heads(ws: Workspace) -> dict[str, dict[str, Any]]:
    """head_id -> head.json of every committed head (a damaged head.json counts as a head with no
    facts: using that head then fails with a message naming the file)."""
    out = {}
    for h in ws.list_names("heads"):
        if A.head_exists(ws, h):
            try:
                meta = json.loads((ws.head_dir(h) / A.HEAD_FILE).read_text())
            except (OSError, ValueError):
                meta = {}
            out[h] = meta if isinstance(meta, dict) else {}
    return out


def head_index(ws: Workspace, heads: dict[str, dict[str, Any]] | None = None) -> N.Versions:
    """The names index, plus heads trained before names existed under their default name.

    Those come first (oldest first by created_at), so a head recorded in the index stays latest.
    """
    heads = committed_heads(ws) if heads is None else heads
    index = {n: [e for e in es if e[N.ID] in heads] for n, es in N.read_index(ws, N.HEADS).items()}
    named = {e[N.ID] for es in index.values() for e in es}
    legacy = sorted((m.get("created_at", ""), h) for h, m in heads.items() if h not in named)
    for created, h in reversed(legacy):
        m = heads[h]
        known = "dataset" in m and "head" in m
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

"""Run ids and the per-run JSON summary written to ``runs/<run_id>.json``."""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from imgfeat import __version__
from imgfeat.core.results import JsonObject
from imgfeat.core.storage import write_json_atomic
from imgfeat.core.workspace import Workspace


def new_run_id() -> str:
    """Sortable and unique across hosts: ``20261124T120501Z-3fa9c2``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


@dataclass
class RunRecord:
    """What a command did: filled by the stage, finished and saved by the CLI."""

    command: str
    run_id: str = field(default_factory=new_run_id)
    started_at: float = field(default_factory=time.time)
    summary: dict[str, Any] = field(default_factory=dict)

    def finish(self, ws: Workspace, exit_code: int, error: str | None = None) -> JsonObject:
        """Stamp the outcome and write ``runs/<run_id>.json`` atomically; return the object."""
        finished = time.time()
        obj = {
            "run_id": self.run_id,
            "command": self.command,
            "status": "ok" if exit_code == 0 else "failed",
            "exit_code": exit_code,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(finished),
            "seconds": round(finished - self.started_at, 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "imgfeat_version": __version__,
            "workspace": str(ws.root),
            **self.summary,
        }
        if error:
            obj["error"] = error
        if not ws.root.is_dir():  # never create a (perhaps mistyped) workspace just for the record
            return obj
        try:
            write_json_atomic(obj, ws.runs_dir / f"{self.run_id}.json")
        except Exception:  # a read-only workspace must not hide the real outcome
            pass
        return obj


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")

"""`--audit-log`: one JSON line per request and per guard decision (docs/guards.md)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class Audit:
    """Opt-in JSONL audit log. Never records headers (API keys live there).

    Opened for each line, so an external logrotate can move the file away at any time; with
    `max_bytes` it rotates itself (audit.jsonl -> audit.jsonl.1 -> ... .N), under the same lock
    as the writes, so no line is lost or split."""

    def __init__(self, path: Path | None, content: bool, max_bytes: int = 0, backups: int = 5):
        self.path, self.content = path, content
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def _rotate(self) -> None:
        try:
            if self.path.stat().st_size < self.max_bytes:
                return
        except FileNotFoundError:
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def write(self, **rec: Any) -> None:
        if not self.path:
            return
        if not self.content:
            rec.pop("prompt", None)
            rec.pop("output", None)
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **rec}, ensure_ascii=False)
        with self._lock:
            if self.max_bytes:
                self._rotate()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

"""The persistent answer cache of a black-box teacher: one SQLite file, written through after every request.

Each answered input row is stored under ``sha256(teacher identity, row shape, row bytes as float32)``, so a
restarted (or killed) run asks the teacher only for rows it has never answered, and one file can hold the
answers of several teachers. The file also keeps, per teacher identity, the number of rows sent so far: the
query budget is checked against it, across restarts. A request's rows are *reserved* (counted) in a committed
transaction before the request leaves, released if the request fails, and replaced by the answers in one
transaction when it succeeds; a kill at any point therefore never lets the count fall below the rows the teacher
may have answered (it may over-count one request's rows, never under-count).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from kdistill.errors import CacheError

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sent (identity TEXT PRIMARY KEY, rows INTEGER NOT NULL);
"""


def identity_digest(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


class AnswerCache:
    """The answers of one teacher (`identity`) in the SQLite file `path` (created with its folder if missing)."""

    def __init__(self, path: os.PathLike, identity: str):
        self.path = Path(path)
        self.identity = identity_digest(identity)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30.0)
            self._db.executescript(SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise CacheError(f"cannot open the teacher answer cache {self.path} ({err})", where="teacher.answers",
                             fix="point teacher.answers to another file, or delete a damaged one") from None
        self._memo: dict[str, str] = {}

    def close(self) -> None:
        self._db.close()

    def __deepcopy__(self, memo: dict) -> "AnswerCache":
        """A copy on its own connection to the same file (a teacher model copied by `kdistill.distill`)."""
        copy = object.__new__(AnswerCache)
        copy.path, copy.identity, copy._memo = self.path, self.identity, dict(self._memo)
        copy._db = sqlite3.connect(str(self.path), timeout=30.0)
        return copy

    # -- keys ----------------------------------------------------------------------------------------------------
    def keys(self, rows: np.ndarray) -> list[str]:
        """One key per row of `rows` (any shape ``(N, ...)``; hashed as contiguous float32)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        shape = str(tuple(rows.shape[1:])).encode()
        prefix = self.identity.encode() + b"|" + shape + b"|"
        return [hashlib.sha256(prefix + row.tobytes()).hexdigest() for row in rows]

    # -- answers -------------------------------------------------------------------------------------------------
    def get(self, keys: Iterable[str]) -> dict[str, dict]:
        """The stored answers among `keys` (missing keys are left out)."""
        wanted = [k for k in dict.fromkeys(keys) if k not in self._memo]
        for lo in range(0, len(wanted), 500):
            chunk = wanted[lo:lo + 500]
            marks = ",".join("?" * len(chunk))
            for key, answer in self._db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk):
                self._memo[key] = answer
        return {k: json.loads(self._memo[k]) for k in keys if k in self._memo}

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The distinct keys with no stored answer, in first-seen order."""
        keys = list(dict.fromkeys(keys))
        found = self.get(keys)
        return [k for k in keys if k not in found]

    # -- the budget ----------------------------------------------------------------------------------------------
    def sent(self) -> int:
        row = self._db.execute("SELECT rows FROM sent WHERE identity = ?", (self.identity,)).fetchone()
        return int(row[0]) if row else 0

    def _add_sent(self, rows: int) -> None:
        self._db.execute("INSERT INTO sent (identity, rows) VALUES (?, ?) ON CONFLICT(identity) "
                         "DO UPDATE SET rows = rows + excluded.rows", (self.identity, int(rows)))

    def reserve(self, rows: int, budget: Optional[int]) -> None:
        """Count `rows` as sent before they leave (committed); CacheError if that would pass `budget`. The check
        and the count are one write transaction, so processes sharing the file cannot both pass the budget."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if budget is not None and self.sent() + rows > budget:
                raise CacheError(f"sending {rows} more rows would pass the teacher's query budget of {budget} "
                                 f"({self.sent()} already sent)", where="teacher.budget",
                                 fix="raise teacher.budget or query fewer rows")
            self._add_sent(rows)
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise

    def release(self, rows: int) -> None:
        """Un-count a reservation whose request failed (nothing was answered)."""
        with self._db:
            self._add_sent(-rows)

    def put(self, answers: Mapping[str, dict]) -> None:
        """Store a request's answers in one committed transaction."""
        items = [(k, json.dumps(v, separators=(",", ":"))) for k, v in answers.items()]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers (key, answer) VALUES (?, ?)", items)
        self._memo.update(items)


__all__ = ["AnswerCache", "identity_digest"]

"""The profile store: append-only measurements, one SQLite file per store (usually per device).

Why SQLite (stdlib ``sqlite3``): every ``add`` is one transaction, so a record is either wholly
there or absent even when the process is killed mid-write; SQLite's file locking lets two
processes append at once (the second waits, ``busy_timeout``); a primary key on ``key`` makes
``add`` idempotent, which is what makes a rerun resumable without duplicates; filters are SQL
on indexed columns. The journal mode is the default rollback journal, not WAL, so the store
is one self-contained file that can be copied between machines once no writer is running
(``export_jsonl`` / ``import_jsonl`` move records between stores too).

Each row holds the whole record as JSON (the documented schema, ``docs/profiling.md``) plus
copies of the fields people filter on. Rows are never updated or deleted.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from compressor.core.errors import NaspruneError
from profilers.records import validate_record
from profilers.standalone import SCHEMA

# Top-level record fields that are also columns (filterable with ``records(**filters)``).
COLUMNS = (
    "engine",
    "device",
    "provider",
    "precision",
    "fingerprint_id",
    "recipe_id",
    "workload",
    "params",
    "created_at",
)


def is_profile_store(path: Path) -> bool:
    """True when ``path`` is an SQLite file that is empty or holds nasprune's ``meta`` table.

    Only reads: the SQLite magic bytes, then the schema (a read may roll back a hot journal left by a
    killed writer, which restores the file rather than changing it), so a foreign file is never altered."""
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            return False
    try:
        db = sqlite3.connect(path)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return not tables or {"meta", "records"} <= tables


class ProfileStore:
    """Append-only, resumable, queryable measurements at ``path`` (created on first use)."""

    def __init__(self, path, timeout_s: float = 60.0):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise NaspruneError(
                f"--store {self.path} is a directory; pass a file path such as {self.path}/profiles.sqlite"
            )
        if self.path.exists() and self.path.stat().st_size > 0 and not is_profile_store(self.path):
            raise NaspruneError(
                f"--store {self.path} exists and is not a nasprune profile store; nasprune never writes "
                "into it, choose another --store path"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout_s
        columns = ", ".join(f"{c} {'INTEGER' if c == 'params' else 'TEXT'}" for c in COLUMNS)
        self._query(f"CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, {columns}, record TEXT NOT NULL)")
        self._query("CREATE INDEX IF NOT EXISTS by_fingerprint ON records (fingerprint_id, recipe_id, workload)")
        self._query("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
        self._query("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
        schema = self._query("SELECT value FROM meta WHERE name = 'schema'")[0][0]
        if schema != SCHEMA:
            raise NaspruneError(
                f"store {self.path} holds {schema!r} records, this nasprune writes {SCHEMA!r}; use a new --store"
            )

    def _connect(self) -> _Closing:
        try:
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise NaspruneError(f"cannot open profile store {self.path} ({e}); pass a writable --store path") from None
        db.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        return _Closing(db)

    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._connect() as db:
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise NaspruneError(
                    f"profile store {self.path} is not readable ({e}); is it a nasprune store?"
                ) from None

    def add(self, record: dict) -> bool:
        """Insert one record atomically; False (and nothing written) if its key is already stored."""
        validate_record(record)
        row = (record["key"], *(record.get(c) for c in COLUMNS), json.dumps(record, sort_keys=True))
        with self._connect() as db:
            cur = db.execute(
                f"INSERT OR IGNORE INTO records (key, {', '.join(COLUMNS)}, record) "
                f"VALUES ({', '.join('?' * (len(COLUMNS) + 2))})",
                row,
            )
            return cur.rowcount == 1

    def has(self, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM records WHERE key = ?", (key,)))

    def keys(self) -> set[str]:
        return {k for (k,) in self._query("SELECT key FROM records")}

    def records(self, **filters) -> list[dict]:
        """Records whose top-level fields equal ``filters`` (e.g. ``engine="onnxruntime"``), oldest first.

        Columns are filtered in SQL; any other top-level field is compared after decoding.
        """
        sql_filters = {k: v for k, v in filters.items() if k in COLUMNS or k == "key"}
        other = {k: v for k, v in filters.items() if k not in sql_filters}
        where = " AND ".join(f"{k} IS ?" for k in sql_filters)
        rows = self._query(
            f"SELECT record FROM records {'WHERE ' + where if where else ''} ORDER BY rowid",
            tuple(sql_filters.values()),
        )
        out = [json.loads(r) for (r,) in rows]
        return [r for r in out if all(r.get(k) == v for k, v in other.items())]

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM records")[0][0]

    def export_jsonl(self, path) -> int:
        """Write every record as one JSON line (portable, diffable); returns the count."""
        records = self.records()
        Path(path).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return len(records)

    def import_jsonl(self, path) -> int:
        """Add the records of a JSON-lines file; returns how many were new."""
        added = 0
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise NaspruneError(f"{path}:{n} is not JSON ({e.msg}); pass a file written by export_jsonl") from None
            added += self.add(record)
        return added


class _Closing:
    """``with`` on a sqlite3 connection commits but does not close; this closes it too."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc) -> None:
        self.db.close()

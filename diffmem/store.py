"""A resumable SQLite results store (``results.sqlite``): one row per (model, prompt, method,
parameters), written in transactions, so a killed run resumes where it stopped and a re-run
never duplicates a row.

Tables
------
``diffmem_schema``
    One row: ``app = 'diffmem-results'`` and the schema ``version`` (a file without it is not a
    diffmem store and is refused).
``runs``
    One row per command run: model and data fingerprints, the command line, parameters, time.
``params``
    The parameters behind each ``params_hash`` (JSON), so results stay interpretable.
``results``
    ``UNIQUE (model_fingerprint, prompt_hash, method, params_hash)``; the prompt, its study id,
    the score value(s) as JSON, the run that wrote it and the time.

Durability and concurrency
--------------------------
The database runs in WAL mode with ``synchronous=NORMAL`` (default): a committed batch survives
the writing process being killed at any moment (SIGKILL, out-of-memory), and the file is never
corrupted; only an operating-system crash or power cut can lose the last few committed batches,
which a resumed run simply recomputes. Pass ``synchronous="FULL"`` to make every commit reach
the disk (slower). Several processes (e.g. ``accelerate`` shards) may write at once: each
write is one short ``BEGIN IMMEDIATE`` transaction, and a writer waits up to ``timeout``
seconds for another's lock. WAL needs a local filesystem (not NFS). Open one
:class:`ResultsStore` per process; do not share it across ``fork``.

Examples
--------
>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "results.sqlite")
>>> with ResultsStore(path) as store:
...     ph = store.put_params({"steps": 50})
...     store.put_many([{"model_fingerprint": "m1", "prompt": "No acute process.",
...                      "method": "noise", "params_hash": ph, "value": 0.42}])
...     pending = iter_pending(["No acute process.", "Small effusion."], store, "m1", "noise",
...                            {"steps": 50})
1
>>> pending
['Small effusion.']
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import DataError, OutputError
from diffmem.utils import (disk_full_error, is_disk_full, sha256_text, shell_command, stable_json,
                           write_csv, write_json)

log = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "ResultsStore", "iter_pending", "params_hash", "prompt_hash"]

APP = "diffmem-results"
SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS diffmem_schema (
    app TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_fingerprint TEXT NOT NULL,
    data_fingerprint TEXT,
    command TEXT,
    params TEXT,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS params (
    params_hash TEXT PRIMARY KEY,
    params TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_fingerprint TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    method TEXT NOT NULL,
    params_hash TEXT NOT NULL,
    prompt TEXT NOT NULL,
    study_id TEXT,
    value TEXT NOT NULL,
    run_id INTEGER REFERENCES runs(id),
    created TEXT NOT NULL,
    UNIQUE (model_fingerprint, prompt_hash, method, params_hash)
);
CREATE INDEX IF NOT EXISTS results_by_method
    ON results (model_fingerprint, method, params_hash);
"""

_RESULT_COLUMNS = ("model_fingerprint", "method", "params_hash", "prompt_hash", "prompt",
                   "study_id", "run_id", "created")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _plain(obj: Any) -> Any:
    """NumPy scalars and arrays as plain Python values (for stable hashing and JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def params_hash(params: Mapping[str, Any]) -> str:
    """Short stable hash (16 hex digits) of a parameter dict.

    Key order does not matter; NumPy scalars hash like the Python numbers they hold, tuples like
    lists.

    Examples
    --------
    >>> params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": (1, 2), "a": 1})
    True
    """
    if not isinstance(params, Mapping):
        raise DataError(f"params must be a dict of settings, got {type(params).__name__}")
    return sha256_text(stable_json(_plain(params)))[:16]


def prompt_hash(prompt: str) -> str:
    """SHA-256 of the prompt text (the key a result is stored under)."""
    return sha256_text(prompt)


def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _value_json(value: Any, where: str) -> str:
    try:
        return json.dumps(_plain(value), allow_nan=False, sort_keys=True)
    except ValueError:
        raise DataError(f"the value of {where} contains NaN or infinity; scores must be finite "
                        "numbers (fix or drop the result before storing it)") from None
    except TypeError as e:
        raise DataError(f"the value of {where} is not JSON-serializable ({e}); store numbers, "
                        "strings, lists or dicts") from None


class ResultsStore:
    """The SQLite results store of one output folder (``results.sqlite``).

    Parameters
    ----------
    path : path
        The database file; created (with its folder) when missing.
    timeout : float, optional
        Seconds a writer waits for another process's lock (default 60).
    synchronous : {"NORMAL", "FULL"}, optional
        SQLite's ``synchronous`` setting (see the module docstring; default ``"NORMAL"``).
    readonly : bool, optional
        Open an existing store for reading only.

    Raises
    ------
    DataError
        When ``path`` exists and is not a diffmem results store (another file, another
        SQLite database, or a store written by a newer diffmem).
    OutputError
        When the file cannot be created.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0,
                 synchronous: str = "NORMAL", readonly: bool = False):
        self.path = Path(path)
        if str(synchronous).upper() not in ("NORMAL", "FULL"):
            raise DataError(f"synchronous={synchronous!r}; use 'NORMAL' or 'FULL'")
        self._check_file(readonly)
        self._timeout = float(timeout)
        # Another process creating the store (or switching it to WAL) can make these first
        # statements fail with "database is locked" without waiting; retry until the timeout.
        deadline = time.monotonic() + self._timeout
        while True:
            self._db = self._connect(readonly)
            try:
                self._db.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
                if not readonly:
                    self._db.execute("PRAGMA journal_mode = WAL")
                    self._db.execute(f"PRAGMA synchronous = {str(synchronous).upper()}")
                self._init_schema(readonly)
                return
            except sqlite3.OperationalError as e:
                self._db.close()
                if _is_busy(e) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if _is_busy(e):
                    raise OutputError(f"results store {str(self.path)!r} stayed locked for "
                                      f"{self._timeout:g} s by another process; wait for it or "
                                      "raise the timeout") from None
                if is_disk_full(e):
                    raise disk_full_error(self.path.parent) from None
                raise DataError(f"not a diffmem results store ({e}); choose another --out or "
                                "move the file away", path=self.path) from None
            except sqlite3.DatabaseError as e:
                self._db.close()
                raise DataError(f"not a diffmem results store ({e}); choose another --out or "
                                "move the file away", path=self.path) from None
            except BaseException:
                self._db.close()
                raise

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        try:
            if readonly:
                uri = f"file:{self.path.resolve().as_posix()}?mode=ro"
                db = sqlite3.connect(uri, uri=True, timeout=self._timeout, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        except (sqlite3.Error, OSError) as e:
            raise OutputError(f"cannot open results store {str(self.path)!r}: {e}") from None
        db.row_factory = sqlite3.Row
        return db

    # -- opening ----------------------------------------------------------------------------
    def _check_file(self, readonly: bool) -> None:
        if not self.path.exists():
            if readonly:
                raise DataError("results store not found; run the command that writes it "
                                "first", path=self.path)
            return
        if self.path.is_dir():
            raise DataError("is a folder, not a results store file", path=self.path)
        with open(self.path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise DataError("not a diffmem results store (not an SQLite database); choose "
                            "another --out or move the file away", path=self.path)

    def _init_schema(self, readonly: bool) -> None:
        if readonly:
            self._verify()
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            tables.discard("sqlite_sequence")
            if tables and "diffmem_schema" not in tables:
                raise DataError(f"an SQLite database but not a diffmem results store (tables "
                                f"{sorted(tables)}); choose another --out or move the file away",
                                path=self.path)
            if not tables:
                # one statement at a time: executescript() would commit the open transaction
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute("INSERT INTO diffmem_schema (app, version) VALUES (?, ?)",
                                 (APP, SCHEMA_VERSION))
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._verify()

    def _verify(self) -> None:
        try:
            rows = self._db.execute("SELECT app, version FROM diffmem_schema").fetchall()
        except sqlite3.OperationalError:
            raise DataError("not a diffmem results store (no diffmem_schema table); choose "
                            "another --out or move the file away", path=self.path) from None
        if len(rows) != 1 or rows[0]["app"] != APP:
            raise DataError("not a diffmem results store (bad diffmem_schema table)",
                            path=self.path)
        if rows[0]["version"] > SCHEMA_VERSION:
            raise DataError(f"written by a newer diffmem (schema {rows[0]['version']}, this "
                            f"version reads up to {SCHEMA_VERSION}); upgrade diffmem",
                            path=self.path)

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (it does on SQLITE_FULL,
        and a second ROLLBACK would hide that error behind "cannot rollback")."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    # -- writing ----------------------------------------------------------------------------
    def start_run(self, model_fingerprint: str, *, data_fingerprint: str | None = None,
                  command: str | Sequence[str] | None = None,
                  params: Mapping[str, Any] | None = None) -> int:
        """Record a run (one command invocation) and return its id."""
        if command is not None:
            command = shell_command(command)
        cur = self._write(
            "INSERT INTO runs (model_fingerprint, data_fingerprint, command, params, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (model_fingerprint, data_fingerprint, command,
             None if params is None else stable_json(_plain(params)), _now()))
        return int(cur.lastrowid)

    def _write(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        """One auto-committed write; a full disk is :func:`~diffmem.utils.disk_full_error`."""
        try:
            return self._db.execute(sql, args)
        except sqlite3.OperationalError as e:
            if is_disk_full(e):
                raise disk_full_error(self.path.parent) from None
            raise

    def put_params(self, params: Mapping[str, Any]) -> str:
        """Store a parameter dict under its :func:`params_hash` and return the hash."""
        h = params_hash(params)
        self._write("INSERT OR IGNORE INTO params (params_hash, params) VALUES (?, ?)",
                    (h, stable_json(_plain(params))))
        return h

    def put_many(self, records: Iterable[Mapping[str, Any]], *, run_id: int | None = None,
                 on_conflict: str = "ignore") -> int:
        """Write result records in one transaction; return how many rows were written.

        Parameters
        ----------
        records : iterable of mapping
            Each with ``model_fingerprint``, ``prompt``, ``method``, ``params_hash`` and
            ``value`` (JSON-serializable, finite), and optionally ``study_id`` and
            ``prompt_hash`` (default: :func:`prompt_hash` of the prompt).
        run_id : int, optional
            The :meth:`start_run` id to attach.
        on_conflict : {"ignore", "replace"}, optional
            When a row with the same key exists: keep it (default; a resumed run never
            duplicates or rewrites) or replace it.

        Raises
        ------
        DataError
            For a record missing a field, or a value that is not finite JSON. Nothing of the
            batch is written then.
        """
        if on_conflict not in ("ignore", "replace"):
            raise DataError(f"on_conflict={on_conflict!r}; use 'ignore' or 'replace'")
        rows = []
        now = _now()
        for n, rec in enumerate(records):
            missing = [k for k in ("model_fingerprint", "prompt", "method", "params_hash",
                                   "value") if k not in rec]
            if missing:
                raise DataError(f"record {n} lacks {missing}; each record needs "
                                "model_fingerprint, prompt, method, params_hash and value")
            prompt = str(rec["prompt"])
            where = f"record {n} ({rec['method']!r}, prompt {prompt[:40]!r})"
            rows.append((str(rec["model_fingerprint"]),
                         str(rec.get("prompt_hash") or prompt_hash(prompt)), str(rec["method"]),
                         str(rec["params_hash"]), prompt,
                         None if rec.get("study_id") is None else str(rec["study_id"]),
                         _value_json(rec["value"], where), run_id, now))
        if not rows:
            return 0
        verb = "INSERT OR IGNORE" if on_conflict == "ignore" else "INSERT OR REPLACE"
        before = self._db.total_changes
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise OutputError(f"results store {str(self.path)!r} stayed locked for "
                                  f"{self._timeout:g} s by another process; nothing of this "
                                  "batch was written: rerun to resume") from None
            raise
        try:
            self._db.executemany(
                f"{verb} INTO results (model_fingerprint, prompt_hash, method, params_hash, "
                "prompt, study_id, value, run_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows)
            self._db.execute("COMMIT")
        except BaseException as e:
            self._rollback()
            if isinstance(e, sqlite3.Error) and is_disk_full(e):
                raise disk_full_error(self.path.parent) from None
            raise
        return self._db.total_changes - before

    # -- reading ----------------------------------------------------------------------------
    def done_keys(self, model_fingerprint: str, method: str, params_hash: str) -> set[str]:
        """Prompt hashes already stored for this model, method and parameters."""
        cur = self._db.execute(
            "SELECT prompt_hash FROM results WHERE model_fingerprint = ? AND method = ? "
            "AND params_hash = ?", (model_fingerprint, method, params_hash))
        return {r[0] for r in cur}

    def get(self, model_fingerprint: str, prompt: str, method: str,
            params_hash: str) -> dict[str, Any] | None:
        """The stored row of one key (value decoded), or ``None``."""
        row = self._db.execute(
            "SELECT * FROM results WHERE model_fingerprint = ? AND prompt_hash = ? "
            "AND method = ? AND params_hash = ?",
            (model_fingerprint, prompt_hash(prompt), method, params_hash)).fetchone()
        return None if row is None else self._decode(row)

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict[str, Any]:
        out = {k: row[k] for k in _RESULT_COLUMNS}
        out["value"] = json.loads(row["value"])
        return out

    def to_rows(self, *, model_fingerprint: str | None = None, method: str | None = None,
                params_hash: str | None = None) -> list[dict[str, Any]]:
        """Stored results (values decoded), optionally filtered, in insertion order."""
        where, args = [], []
        for col, val in (("model_fingerprint", model_fingerprint), ("method", method),
                         ("params_hash", params_hash)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(where) if where else "")
        return [self._decode(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def runs(self) -> list[dict[str, Any]]:
        """Recorded runs, oldest first (parameters decoded)."""
        out = []
        for r in self._db.execute("SELECT * FROM runs ORDER BY id"):
            d = dict(r)
            d["params"] = None if d["params"] is None else json.loads(d["params"])
            out.append(d)
        return out

    def params(self) -> dict[str, Any]:
        """``params_hash -> parameter dict`` of every stored parameter set."""
        return {r[0]: json.loads(r[1])
                for r in self._db.execute("SELECT params_hash, params FROM params")}

    def export_csv(self, path: str | os.PathLike, **filters: Any) -> Path:
        """Write the results as CSV (one row per result) and return the path.

        A scalar value goes in a ``value`` column; a dict value gives one ``value.<key>``
        column per key (nested values as JSON text). ``filters`` are those of
        :meth:`to_rows`.
        """
        rows = self.to_rows(**filters)
        flat, extra = [], []
        for r in rows:
            d = {k: r[k] for k in _RESULT_COLUMNS}
            v = r["value"]
            items = v.items() if isinstance(v, dict) else [(None, v)]
            for key, val in items:
                col = "value" if key is None else f"value.{key}"
                if col not in extra:
                    extra.append(col)
                d[col] = json.dumps(val) if isinstance(val, (dict, list)) else val
            flat.append(d)
        return write_csv(path, [*_RESULT_COLUMNS, *extra], flat)

    def export_json(self, path: str | os.PathLike, **filters: Any) -> Path:
        """Write runs, parameters and results as one JSON document and return the path."""
        doc = {"format": APP, "schema_version": SCHEMA_VERSION, "runs": self.runs(),
               "params": self.params(), "results": self.to_rows(**filters)}
        try:
            write_json(path, doc)
        except OSError as e:
            raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from None
        return Path(path)


def iter_pending(prompts: Iterable[str], store: ResultsStore, model_fp: str, method: str,
                 params: Mapping[str, Any]) -> list[str]:
    """The prompts that still have no result for this model, method and parameters.

    Order is kept and repeated prompts appear once (a prompt has one row per key).
    """
    done = store.done_keys(model_fp, method, params_hash(params))
    seen: set[str] = set()
    out = []
    for p in prompts:
        h = prompt_hash(p)
        if h not in done and h not in seen:
            seen.add(h)
            out.append(p)
    log.info("%s: %d prompt(s) to do, %d already in %s", method, len(out), len(done),
             store.path)
    return out


"""ResultsStore: keys never duplicate, resume after SIGKILL loses nothing, two processes write
at once, files that are not stores are refused, exports."""

from __future__ import annotations

import csv
import itertools
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import diffmem
from diffmem.errors import DataError, OutputError
from diffmem.store import (
    SCHEMA_VERSION,
    ResultsStore,
    iter_pending,
    params_hash,
    prompt_hash,
)

REPO = Path(diffmem.__file__).resolve().parent.parent

# A worker like a sharded `diffmem detect` run: it scores its shard of 60 prompts in batches,
# one transaction per batch, skipping what the store already holds.
WORKER = r"""
import sys, time
from pathlib import Path
from diffmem.store import ResultsStore, iter_pending

db, shard, shards, batch, pause, go = sys.argv[1:7]
shard, shards, batch, pause = int(shard), int(shards), int(batch), float(pause)
params = {"steps": 50, "backend": "pixel"}
prompts = [f"prompt {i}" for i in range(60)]
mine = [p for i, p in enumerate(prompts) if i % shards == shard]
while go != "-" and not Path(go).exists():
    time.sleep(0.005)
with ResultsStore(db, timeout=30) as store:
    ph = store.put_params(params)
    run = store.start_run("model-a", command=f"worker {shard}/{shards}", params=params)
    todo = iter_pending(mine, store, "model-a", "score", params)
    print(len(todo), flush=True)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        time.sleep(pause)
        written = store.put_many(
            [{"model_fingerprint": "model-a", "prompt": p, "method": "score",
              "params_hash": ph, "study_id": "s5" + p.split()[1].zfill(7),
              "value": {"score": 0.5 * int(p.split()[1]), "n": len(p)}} for p in chunk],
            run_id=run)
        assert written == len(chunk), (written, chunk)
"""


def _record(prompt, value, *, model="m", method="noise", ph="p0", study_id=None):
    return {"model_fingerprint": model, "prompt": prompt, "method": method, "params_hash": ph,
            "value": value, "study_id": study_id}


def test_put_get_and_keys_never_duplicate(tmp_path):
    with ResultsStore(tmp_path / "out" / "results.sqlite") as store:
        assert store.put_many([_record("a", 1.0), _record("b", {"x": np.float32(2.5)})]) == 2
        assert store.put_many([_record("a", 99.0), _record("c", [1, 2])]) == 1  # 'a' kept
        assert len(store) == 3
        assert store.get("m", "a", "noise", "p0")["value"] == 1.0
        assert store.get("m", "b", "noise", "p0")["value"] == {"x": 2.5}
        assert store.get("m", "zzz", "noise", "p0") is None
        # other method / params / model are other keys
        assert store.put_many([_record("a", 3.0, method="attn"), _record("a", 4.0, ph="p1"),
                               _record("a", 5.0, model="m2")]) == 3
        assert store.done_keys("m", "noise", "p0") == {prompt_hash(p) for p in "abc"}
        assert store.done_keys("m", "attn", "p0") == {prompt_hash("a")}
        # replace on purpose
        assert store.put_many([_record("a", 7.0)], on_conflict="replace") == 1
        assert store.get("m", "a", "noise", "p0")["value"] == 7.0 and len(store) == 6
        rows = store.to_rows(method="noise", params_hash="p0", model_fingerprint="m")
        assert [r["prompt"] for r in rows] == ["b", "c", "a"]
        assert store.put_many([]) == 0


def test_a_bad_record_writes_nothing_of_its_batch(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(DataError, match=r"record 1 .*NaN or infinity"):
            store.put_many([_record("a", 1.0), _record("b", {"s": float("nan")})])
        with pytest.raises(DataError, match=r"record 0 lacks \['value'\]"):
            store.put_many([{"model_fingerprint": "m", "prompt": "a", "method": "x",
                             "params_hash": "p"}])
        with pytest.raises(DataError, match="not JSON-serializable"):
            store.put_many([_record("a", object())])
        assert len(store) == 0


def test_params_hash_is_stable_and_pending_keeps_order(tmp_path):
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": (1, 2), "a": 1})
    assert params_hash({"s": np.float64(0.5), "n": np.int64(3)}) == params_hash({"s": 0.5, "n": 3})
    assert params_hash({"a": 1}) != params_hash({"a": 2})
    assert len(params_hash({})) == 16
    with pytest.raises(DataError, match="dict of settings"):
        params_hash([1, 2])
    with ResultsStore(tmp_path / "r.sqlite") as store:
        params = {"steps": 10}
        ph = store.put_params(params)
        assert store.params() == {ph: params}
        store.put_many([_record("b", 1, ph=ph)])
        assert iter_pending(["c", "b", "a", "c"], store, "m", "noise", params) == ["c", "a"]
        assert iter_pending(["b"], store, "m", "noise", {"steps": 11}) == ["b"]


def test_wal_mode_and_durability_settings(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 60000
    with ResultsStore(tmp_path / "r.sqlite", synchronous="full", timeout=2) as store:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 2000
    with pytest.raises(DataError, match="synchronous='OFF'"):
        ResultsStore(tmp_path / "r.sqlite", synchronous="OFF")


def test_files_that_are_not_stores_are_refused(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("hello, this is not a database\n" * 10)
    with pytest.raises(DataError, match=r"notes\.sqlite: not a diffmem results store \(not an "
                                        r"SQLite database\)"):
        ResultsStore(text)
    assert text.read_text().startswith("hello")  # untouched

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE patients (id INTEGER)")
    db.close()
    with pytest.raises(DataError, match=r"SQLite database but not a diffmem results store.*"
                                        r"patients"):
        ResultsStore(other)

    newer = tmp_path / "newer.sqlite"
    ResultsStore(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE diffmem_schema SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(DataError, match="newer diffmem"):
        ResultsStore(newer)
    with pytest.raises(DataError, match="is a folder"):
        ResultsStore(tmp_path)
    with pytest.raises(DataError, match="results store not found"):
        ResultsStore(tmp_path / "missing.sqlite", readonly=True)
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    ResultsStore(empty).close()  # an empty file becomes a store


def test_exports_csv_and_json(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        run = store.start_run("m", data_fingerprint="d1", command=["diffmem", "detect"],
                              params={"k": 2})
        store.put_many([_record("first, with comma", {"score": 0.25, "copy": True},
                                study_id="s50000001"),
                        _record("second", {"score": 0.75, "extra": [1, 2]})], run_id=run)
        store.put_many([_record("third", 0.5, method="scalar")])
        csv_path = store.export_csv(tmp_path / "scores.csv", method="noise")
        json_path = store.export_json(tmp_path / "results.json")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == ["first, with comma", "second"]
    assert rows[0]["value.score"] == "0.25" and rows[0]["value.copy"] == "True"
    assert rows[0]["study_id"] == "s50000001" and rows[0]["run_id"] == str(run)
    assert rows[1]["value.extra"] == "[1, 2]" and rows[0]["value.extra"] == ""
    doc = json.loads(json_path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and len(doc["results"]) == 3
    assert doc["runs"][0]["command"] == "diffmem detect"
    assert doc["runs"][0]["params"] == {"k": 2}
    assert doc["results"][2]["value"] == 0.5
    assert not list(tmp_path.glob("*.tmp"))


def test_recorded_commands_are_shell_quoted(tmp_path):
    """A recorded command line pastes back into a shell as the same arguments."""
    argv = ["diffmem", "detect", "--data", "my data; touch pwned", "--out", "$(id)"]
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.start_run("m", command=argv)
        assert shlex.split(store.runs()[0]["command"]) == argv


def test_a_full_disk_is_one_clear_error_and_a_rerun_finishes(tmp_path):
    """SQLite's own page quota (max_page_count) makes the real SQLITE_FULL, "database or disk is
    full": one OutputError naming the folder (not "cannot rollback"), nothing of the batch
    written, and the same batch goes in once there is space."""
    path = tmp_path / "out" / "results.sqlite"
    records = [_record(f"prompt {i} " * 40, float(i)) for i in range(300)]
    with ResultsStore(path) as store:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(OutputError, match=r"the disk holding '.*out' is full \(.*MiB free\)"
                                              r".*run the same command again"):
            store.put_many(records)
        with pytest.raises(OutputError, match="is full"):
            store.start_run("m", command=["diffmem", "detect"] + ["x" * 4000] * 8)
        assert len(store) == 0
        store._db.execute("PRAGMA max_page_count = 1073741823")  # space freed
        assert store.put_many(records) == 300


def test_a_store_created_on_a_full_disk_says_disk_full(tmp_path, monkeypatch):
    """Creating the store on a full disk is not "not a diffmem results store"."""
    real_connect = ResultsStore._connect

    def full_disk(self, readonly):
        db = real_connect(self, readonly)
        db.execute("PRAGMA max_page_count = 1")  # the real SQLite quota: SQLITE_FULL
        return db

    path = tmp_path / "out" / "results.sqlite"
    monkeypatch.setattr(ResultsStore, "_connect", full_disk)
    with pytest.raises(OutputError, match="the disk holding .* is full"):
        ResultsStore(path)
    monkeypatch.undo()
    with ResultsStore(path) as store:  # the re-run, with space
        assert store.put_many([_record("a", 1.0)]) == 1


def _worker(tmp_path, db, *, shard=0, shards=1, batch=5, pause=0.0, go="-"):
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(script), str(db), str(shard), str(shards),
                             str(batch), str(pause), go], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _count(db) -> int:
    try:
        with ResultsStore(db, readonly=True) as store:
            return len(store)
    except DataError:  # not created yet
        return 0


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    db = tmp_path / "results.sqlite"
    proc = _worker(tmp_path, db, batch=5, pause=0.1)
    deadline = time.monotonic() + 30
    while _count(db) < 15 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _count(db)
    assert 15 <= killed_at < 60, killed_at
    assert killed_at % 5 == 0  # whole batches only: a transaction is all or nothing
    with ResultsStore(db, readonly=True) as store:
        first_rows = {r["prompt"]: r for r in store.to_rows()}

    proc = _worker(tmp_path, db, batch=5)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert int(out.split()[0]) == 60 - killed_at  # only the rest was computed

    with ResultsStore(db, readonly=True) as store:
        rows = store.to_rows()
        assert len(rows) == 60
        assert sorted(r["prompt"] for r in rows) == sorted(f"prompt {i}" for i in range(60))
        for r in rows:
            i = int(r["prompt"].split()[1])
            assert r["value"] == {"score": 0.5 * i, "n": len(r["prompt"])}
            if r["prompt"] in first_rows:  # rows of the killed run are kept, not rewritten
                assert r == first_rows[r["prompt"]]
        assert len(store.runs()) == 2
    raw = sqlite3.connect(db)
    dup = raw.execute("SELECT COUNT(*) FROM (SELECT prompt_hash FROM results GROUP BY "
                      "model_fingerprint, prompt_hash, method, params_hash HAVING COUNT(*) > 1)")
    assert dup.fetchone()[0] == 0
    raw.close()


def test_two_processes_write_disjoint_shards_at_once(tmp_path):
    db = tmp_path / "results.sqlite"  # not created yet: both race to create the schema too
    go = tmp_path / "go"
    procs = [_worker(tmp_path, db, shard=s, shards=2, batch=1, pause=0.01, go=str(go))
             for s in (0, 1)]
    time.sleep(0.5)  # both interpreters are up and waiting
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert int(out.split()[0]) == 30
    with ResultsStore(db, readonly=True) as store:
        rows = store.to_rows()
        assert sorted(r["prompt"] for r in rows) == sorted(f"prompt {i}" for i in range(60))
        runs = store.runs()
        assert len(runs) == 2
        for r in rows:  # each row came from the shard that owns it
            shard = int(r["prompt"].split()[1]) % 2
            assert runs[[x["id"] for x in runs].index(r["run_id"])]["command"] == \
                f"worker {shard}/2"
    # the writes really interleaved (30 transactions each, 10 ms apart)
    order = [r["run_id"] for r in rows]
    assert sum(a != b for a, b in itertools.pairwise(order)) >= 2


def test_a_lock_held_too_long_is_a_clear_error(tmp_path):
    db = tmp_path / "r.sqlite"
    store = ResultsStore(db, timeout=0.2)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(OutputError, match=r"stayed locked for 0.2 s.*rerun to resume"):
            store.put_many([_record("a", 1.0)])
        with pytest.raises(OutputError, match="stayed locked"):
            ResultsStore(db, timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.put_many([_record("a", 1.0)]) == 1  # and works once the lock is gone
    store.close()

"""Soak test of ``diffmem detect`` (issue 18): killed with SIGKILL at 20 seeded random moments in
a row, each kill followed by a re-run of the same command, the folder ends byte-identical to an
uninterrupted run's, with no temporary or lock file left.

Slow (about 25 process starts); run with ``pytest -m slow tests/test_detect_soak.py``. Set
``DIFFMEM_SOAK_REPORT=FILE`` to get the numbers (kills, runs that finished before their kill,
wall times) as JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KILLS = 20
SEED = 0
LIMIT = 3600  # seconds for one whole run: generous, a shared machine can starve a niced run
# small settings with many commit points: every prompt is its own chunk
SETTINGS = ["--methods", "noise,attention,nn", "--chunk-size", "1", "--nn-generations", "1",
            "--sample-steps", "2", "--unconditional", "2", "--unrelated", "2",
            "--batch-size", "4", "--confirm", "all", "--threads", "1"]
# files whose bytes record when or how long a run took; compared by their content instead
VOLATILE = {"results.sqlite", "results.json", "summary.json"}
LEFTOVERS = (".tmp", ".diffmem.lock", "-journal", "-wal", "-shm", ".tmp-step-")


def _env() -> dict[str, str]:
    return dict(os.environ, DIFFMEM_NO_PROGRESS="1", OMP_NUM_THREADS="1",
                OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _results(store: Path) -> list[tuple]:
    # read-write and closed explicitly: SQLite removes the WAL files when the last connection
    # closes, and a read-only connection, or one left to the garbage collector, leaves them
    # behind (the folder would then differ from the uninterrupted run's)
    with closing(sqlite3.connect(str(store))) as db:
        return sorted(db.execute("SELECT model_fingerprint, prompt_hash, method, params_hash, "
                                 "prompt, study_id, value FROM results").fetchall())


def _stored(store: Path) -> int:
    """Result rows committed so far (0 before the store exists or while it is being created)."""
    try:
        return len(_results(store)) if store.is_file() else 0
    except sqlite3.Error:
        return 0


def _kill_after_rows(proc: subprocess.Popen, store: Path, rows: int, limit: float) -> None:
    """SIGKILL ``proc`` once the store holds ``rows`` result rows (polled), or after ``limit`` s."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if _stored(store) >= rows or time.monotonic() - t0 > limit:
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.02)


def _summary(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("timings")  # seconds and prompts computed by the last run
    return summary


@pytest.mark.slow
def test_detect_killed_20_times_ends_identical_to_an_uninterrupted_run(model, data, tmp_path):
    out = tmp_path / "run"  # both runs write the same path, so absolute paths match too
    cmd = [sys.executable, "-m", "diffmem", "-q", "detect", "--model", str(model), "--data",
           str(data), "--out", str(out), *SETTINGS]

    t0 = time.monotonic()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LIMIT)
    uninterrupted = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tmp_path / "reference"
    out.rename(reference)

    # Two clocks: while result rows are missing, a kill comes after a seeded number of newly
    # committed rows (inside the computation, spread over it); once every row is stored, after
    # a seeded delay within an uninterrupted run's time (start-up, reading the store, writing
    # the outputs).
    total = len(_results(reference / "results.sqlite"))
    store = out / "results.sqlite"
    rng = random.Random(SEED)
    kills, finished, progress = 0, 0, []
    t0 = time.monotonic()
    while kills < KILLS:
        assert kills + finished < 3 * KILLS, "too many runs ended before their kill"
        before = _stored(store)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if before < total:
            _kill_after_rows(proc, store, before + rng.randint(1, min(12, total - before)),
                             limit=LIMIT)
        else:
            try:
                proc.wait(timeout=rng.uniform(0, uninterrupted))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            progress.append(_stored(store))
        else:
            assert proc.returncode == 0, err[-2000:]
            finished += 1
    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LIMIT)
    soak = time.monotonic() - t0
    assert final.returncode == 0, final.stderr[-2000:]

    report = {"seed": SEED, "kills": kills, "runs_finished_before_their_kill": finished,
              "store_rows_after_each_kill": progress, "uninterrupted_s": round(uninterrupted, 1),
              "soak_s": round(soak, 1), "settings": SETTINGS}
    if os.environ.get("DIFFMEM_SOAK_REPORT"):
        Path(os.environ["DIFFMEM_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))

    a, b = _files(reference), _files(out)
    assert sorted(a) == sorted(b), "the folders hold different files"
    differ = [name for name in a if a[name] != b[name] and name not in VOLATILE]
    assert not differ, f"files differ from the uninterrupted run: {differ}"
    assert _results(reference / "results.sqlite") == _results(out / "results.sqlite")
    assert _summary(reference) == _summary(out)
    left = [name for name in b for mark in LEFTOVERS if mark in Path(name).name]
    assert not left, f"left behind: {left}"
    assert 0 < max(progress), "no kill came after any work was stored"
    assert min(progress) < total, "no kill came while work was left"

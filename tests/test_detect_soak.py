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
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KILLS = 20
SEED = 0
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
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return sorted(db.execute("SELECT model_fingerprint, prompt_hash, method, params_hash, "
                                 "prompt, study_id, value FROM results").fetchall())


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
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    uninterrupted = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tmp_path / "reference"
    out.rename(reference)

    rng = random.Random(SEED)
    kills, finished, progress = 0, 0, []
    t0 = time.monotonic()
    while kills < KILLS:
        assert kills + finished < 3 * KILLS, "too many runs ended before their kill"
        delay = rng.uniform(0, uninterrupted)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            store = out / "results.sqlite"
            progress.append(len(_results(store)) if store.is_file() else 0)
        else:
            assert proc.returncode == 0, err[-2000:]
            finished += 1
    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
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

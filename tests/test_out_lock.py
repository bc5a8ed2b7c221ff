"""One run per --out (issue 18, item 10): a second process on a folder another run holds stops
with one message naming the holder; a lock left by a killed run is taken over with a warning.
The other process is always a real one (a subprocess holding or dropping a real flock)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffmem.cli import main
from diffmem.errors import OutputError
from diffmem.lock import LOCK_NAME, out_lock
from diffmem.utils import prepare_out_dir

_HOLDER = textwrap.dedent("""
    import os, signal, sys
    from diffmem.lock import out_lock
    from diffmem.utils import prepare_out_dir

    folder, then = sys.argv[1], sys.argv[2]
    with out_lock(folder, command=["diffmem", "detect", "--out", folder]):
        prepare_out_dir(folder)
        print("locked", flush=True)
        if then == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.read()  # hold the lock until the test closes stdin
""")


@contextlib.contextmanager
def holder(folder: Path, then: str = "hold"):
    """A separate Python process that takes the lock on ``folder`` and holds it (``"hold"``,
    until the block ends) or is killed with SIGKILL while holding it (``"die"``)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), then],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "locked"
        if then == "die":
            assert proc.wait(timeout=60) == -9
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()


# every command that writes an --out folder, with arguments that parse (the lock check comes
# before the command's own checks, so the paths need not exist)
_COMMANDS = [
    ["detect", "--model", "M", "--data", "D"],
    ["scan", "D"],
    ["mitigate", "--model", "M", "--data", "D"],
    ["report", "--model", "M", "--data", "D"],
    ["train", "--data", "D"],
    ["synth", "--preset", "tiny"],
    ["embed", "train", "--data", "D"],
    ["reid", "train", "--data", "D"],
    ["reid", "eval", "--data", "D"],
    ["study", "toy"],
    ["study", "lr", "--data", "D", "--lrs", "1e-4"],
    ["demo"],
    ["bench", "detect"],
]


def test_a_second_run_on_a_held_out_folder_stops_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    with holder(out) as proc:
        before = sorted(p.name for p in out.iterdir())
        for command in _COMMANDS:
            assert main([*command, "--out", str(out)]) == 2, command
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert f"output folder {str(out)!r} is in use by `diffmem detect --out" in err
            assert f"(pid {proc.pid} on host {socket.gethostname()}, since 20" in err
            assert "wait for that run to finish" in err and "choose another --out" in err
            assert sorted(p.name for p in out.iterdir()) == before == [LOCK_NAME]
    assert not out.exists() or not any(out.iterdir())  # the holder removed its lock file


def test_a_lock_taken_after_the_check_stops_the_claim(tmp_path):
    """The race: another process takes the folder between the check on entering ``out_lock``
    and the claim in ``prepare_out_dir``."""
    out = tmp_path / "out"
    with out_lock(out), holder(out) as proc:
        with pytest.raises(OutputError, match=rf"in use by .*pid {proc.pid}"):
            prepare_out_dir(out)
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    """(The soak test in test_detect_soak.py does this with ``diffmem detect`` itself.)"""
    out = tmp_path / "out"
    with holder(out, then="die") as proc:
        assert str(proc.pid) in (out / LOCK_NAME).read_text()  # SIGKILL left the file
    with out_lock(out, command=["diffmem", "synth"]):
        prepare_out_dir(out)
        assert "diffmem synth" in (out / LOCK_NAME).read_text()
    assert "taking over the lock left by `diffmem detect --out" in caplog.text
    assert f"process {proc.pid} is no longer running" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_only_rank_zero_locks(tmp_path, monkeypatch):
    """The processes of one ``accelerate launch`` share their --out: ranks other than 0 neither
    check nor take the lock."""
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")
    with holder(out), out_lock(out):
        prepare_out_dir(out)

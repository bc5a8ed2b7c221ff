"""Hostile-input regressions of the command line (issue 18): no command that fails its checks
leaves an output folder behind, and none writes into the data or the model."""

from __future__ import annotations

import errno
import pathlib
import shutil

import pytest

from diffmem.cli import main
from diffmem.errors import ModelError, OutputError
from diffmem.utils import write_json


@pytest.fixture
def truncated_model(model, tmp_path):
    """A copy of the tiny model whose UNet weights are cut to 1000 bytes: it passes the
    file-name checks and fails only when the weights load."""
    dest = tmp_path / "truncated-model"
    shutil.copytree(model, dest)
    weights = next((dest / "unet").glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(1000)
    return dest


def test_detect_leaves_no_output_folder_when_the_model_fails_to_load(truncated_model, data,
                                                                     tmp_path, capsys):
    out = tmp_path / "detect"
    assert main(["detect", "--model", str(truncated_model), "--data", str(data),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "could not be loaded" in err and "Traceback" not in err
    assert not out.exists()


def test_scan_loads_the_model_before_creating_out(truncated_model, mimic_jpg, tmp_path):
    from diffmem.attribution import run_scan

    out = tmp_path / "scan"
    with pytest.raises(ModelError, match="could not be loaded"):
        run_scan(mimic_jpg, out=out, model=truncated_model)
    assert not out.exists()


def test_failed_command_keeps_an_out_that_existed_or_holds_files(tmp_path, capsys):
    """The CLI removes only an empty --out it created itself."""
    existing = tmp_path / "existing"
    existing.mkdir()
    missing_data = tmp_path / "no-such-data"
    assert main(["scan", str(missing_data), "--out", str(existing)]) == 2
    assert existing.is_dir()
    assert "no such file or folder" in capsys.readouterr().err


@pytest.fixture
def full_disk(monkeypatch):
    """Writes of ``*.tmp`` files hit a full disk: the real write of half the text, then
    ``ENOSPC`` (a fault-injecting wrapper around the real ``Path.write_text``)."""
    real_write = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real_write(self, data[:len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def test_write_json_on_a_full_disk(tmp_path, full_disk):
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}\n')
    with pytest.raises(OutputError, match=r"the disk holding .* is full \(.*MiB free\)"):
        write_json(target, {"new": list(range(100))})
    assert target.read_text() == '{"old": true}\n' and not list(tmp_path.glob("*.tmp"))


def test_scan_on_a_full_disk_is_one_error_without_temp_files(tmp_path, full_disk, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Dr. ___ was notified.\nNo acute process.\nDr. ___ was notified.\n")
    out = tmp_path / "scan"
    assert main(["scan", str(prompts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the disk holding {str(out)!r} is full" in err and "Traceback" not in err
    assert not list(out.glob("*.tmp"))

"""diffmem.detect.detector and ``diffmem detect``: the end-to-end scan on tiny data and a tiny
CXR model, its results store (resume after kill -9), two processes, and every bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.detect.detector import (
    SCORE_COLUMNS,
    DetectionConfig,
    detect,
    prompt_labels,
    read_prompts,
    training_prompts,
)
from diffmem.errors import ConfigError, DataError, OutputError

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("study_id", "prompt", "noise_magnitude", "attention_entropy", "nn_similarity",
            "nn_study_id", "memorized")
# small, fast settings shared by the runs below
FAST = ["--nn-generations", "1", "--sample-steps", "2", "--unconditional", "2",
        "--unrelated", "2", "--batch-size", "16", "--confirm", "all"]


@pytest.fixture(scope="module")
def first_run(model, data, tmp_path_factory):
    """One full in-process ``diffmem detect`` run (all methods), reused by several tests."""
    out = tmp_path_factory.mktemp("runs") / "full"
    code = main(["-q", "detect", "--model", str(model), "--data", str(data), "--out", str(out),
                 *FAST])
    assert code == 0
    return out


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _results(store_path):
    with sqlite3.connect(store_path) as db:
        return db.execute("SELECT method, params_hash, prompt_hash FROM results").fetchall()


def _env():
    env = dict(os.environ, DIFFMEM_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


# ---------------------------------------------------------------------------- end to end
def test_detect_writes_scores_store_and_figures(first_run, dataset):
    rows = _csv(first_run / "scores.csv")
    assert set(REQUIRED) <= set(rows[0]) and list(rows[0]) == list(SCORE_COLUMNS)
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == len(training_prompts(dataset)) == 27
    assert [r["kind"] for r in rows].count("unrelated") == 2
    assert [r["kind"] for r in rows].count("unconditional") == 1
    for r in train:
        assert float(r["noise_magnitude"]) > 0 and float(r["attention_entropy"]) > 0
        assert r["nn_study_id"].startswith("s") and r["memorized"] in ("0", "1")
    # the planted labels come from ground_truth.csv
    labels = prompt_labels(dataset)
    assert sum(int(r["label"]) for r in train) == sum(labels.values()) == 4
    for name in ("results.sqlite", "results.json", "summary.json", "copies.csv",
                 "scores_hist.png", "roc.png", "nn_similarity.png"):
        assert (first_run / name).is_file(), name
    assert (first_run / "scores_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((first_run / "summary.json").read_text())
    assert summary["threshold"]["n"] == 16 and summary["threshold"]["method"] == \
        "heldout-quantile"
    assert set(summary["evaluations"]) == {"noise_magnitude", "attention_entropy",
                                           "nn_similarity"}
    # one stored row per (prompt, method): 29 scored prompts x 2 scores + 30 nn rows
    results = _results(first_run / "results.sqlite")
    assert len(results) == len(set(results)) == 29 * 2 + 30


def test_rerun_skips_finished_work(first_run, model, data, caplog):
    before = _results(first_run / "results.sqlite")
    scores = (first_run / "scores.csv").read_text()
    caplog.set_level("INFO", logger="diffmem")
    result = detect(model, data, first_run, config=DetectionConfig(
        nn_generations=1, sample_steps=2, unconditional=2, unrelated=2, batch_size=16,
        confirm="all"))
    assert all(t["prompts"] == 0 for t in result.timings.values())
    assert _results(first_run / "results.sqlite") == before
    assert (first_run / "scores.csv").read_text() == scores
    assert not any("to compute" in r.getMessage() for r in caplog.records)


def test_scores_match_the_score_functions(first_run, model):
    from diffmem.detect.scores import noise_magnitude
    from diffmem.models import load_model

    rows = [r for r in _csv(first_run / "scores.csv") if r["kind"] == "train"][:3]
    expected = noise_magnitude(load_model(model), [r["prompt"] for r in rows])
    got = [float(r["noise_magnitude"]) for r in rows]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


class _CopyingModel:
    """A stand-in adapter whose generations are training images for the planted prompts and
    the empty prompt, and noise otherwise: the verdict logic must flag exactly those."""

    source = None
    pipeline = None
    max_length = 64

    def __init__(self, dataset, planted):
        self.dataset = dataset
        self.first = {}
        for i, s in enumerate(dataset):
            if s.split == "train":
                self.first.setdefault(s.prompt, i)
        self.copied = set(planted) | {""}

    def tokenizer(self, texts, **kwargs):
        return {"input_ids": [[1] * len(t.split()) for t in texts]}

    def fingerprint(self):
        return "copying-model"

    def sample(self, prompts, *, n_per_prompt, steps, guidance, seed, batch_size):
        from diffmem.models import SampleResult, generation_seed

        images, index, gen, seeds = [], [], [], []
        for p, prompt in enumerate(prompts):
            for j in range(n_per_prompt):
                rng = np.random.default_rng(generation_seed(seed, prompt, j) % 2**32)
                if prompt in self.copied:
                    i = self.first[prompt] if prompt else int(rng.integers(len(self.first)))
                    image = self.dataset.load_image(i if prompt else sorted(
                        self.first.values())[i], size=32)
                else:
                    image = rng.random((32, 32), dtype=np.float32)
                images.append(image)
                index.append(p)
                gen.append(j)
                seeds.append(generation_seed(seed, prompt, j))
        return SampleResult(images=np.stack(images), prompt_index=np.array(index),
                            generation_index=np.array(gen), seeds=np.array(seeds),
                            prompts=list(prompts))


def test_verdicts_flag_copies_including_unconditional(dataset, tmp_path):
    labels = prompt_labels(dataset)
    planted = [p for p, y in labels.items() if y]
    result = detect(_CopyingModel(dataset, planted), dataset, tmp_path / "out",
                    config=DetectionConfig(methods=("nn",), nn_generations=2, unconditional=3,
                                           unrelated=2, confirm="all"))
    train = result.of_kind("train")
    assert {p.prompt for p in train if p.memorized} == set(planted)
    assert result.rates["planted"]["rate"] == 1.0 and result.rates["not_planted"]["rate"] == 0
    # each copy keeps its pair: generation PNG and nearest training study
    first = next(p for p in train if p.memorized)
    best = first.best
    assert best.similarity == pytest.approx(1.0) and best.study_id in first.study_ids
    assert (tmp_path / "out" / best.image).is_file()
    # Gu et al.'s ratio criterion: a copy of a near-duplicate series has d1 = 0 < d2 / 3; an
    # exact-duplicate cluster has d1 = d2 = 0 (the second neighbour is another copy), no verdict
    bests = [p.best for p in train if p.memorized]
    assert any(b.ratio_copy for b in bests)
    for b in bests:
        assert b.ratio_copy == (b.similarity2 < 1 - 1e-9)
        assert b.ratio_copy or np.isnan(b.d1_d2)
    # copies from the empty prompt are reported separately
    unconditional = result.of_kind("unconditional")[0]
    assert unconditional.memorized and len(unconditional.generations) == 3
    assert result.rates["unconditional"]["copies"] == 3
    copies = _csv(tmp_path / "out" / "copies.csv")
    assert sum(r["kind"] == "unconditional" for r in copies) == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())[
        "copies_without_prompt"][0]["kind"] == "unconditional"
    rows = _csv(tmp_path / "out" / "scores.csv")
    assert rows[0]["noise_magnitude"] == "" and rows[0]["memorized"] in ("0", "1")
    # skewed memorization: k of n prompts make every copy, equally often -> Gini 1 - k/n
    per_prompt = [sum(g.copy for g in p.generations) for p in train]
    k, n = sum(c > 0 for c in per_prompt), len(train)
    assert len(set(c for c in per_prompt if c)) == 1
    skew = json.loads((tmp_path / "out" / "summary.json").read_text())["skew"]
    assert skew["prompts"] == n and skew["prompts_with_copies"] == k == len(planted)
    assert skew["gini"] == pytest.approx(1 - k / n, abs=1e-6)
    assert skew["top_shares"]["10%"] == pytest.approx(min(1, math.ceil(0.1 * n) / k))
    assert (tmp_path / "out" / "lorenz.png").is_file()


# ---------------------------------------------------------------------------- resume, processes
def test_kill_minus_9_then_rerun_loses_and_duplicates_nothing(model, data, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffmem", "-q", "detect", "--model", str(model), "--data",
           str(data), "--out", str(out), "--methods", "noise,nn", "--chunk-size", "1",
           "--nn-generations", "1", "--sample-steps", "4", "--unconditional", "1",
           "--unrelated", "1", "--confirm", "all"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store = out / "results.sqlite"
    deadline = time.monotonic() + 120
    rows = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            if store.is_file():
                try:
                    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
                        rows = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                except sqlite3.Error:
                    continue
                if rows >= 3:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the scan ended before it could be killed"
    partial = _results(store)
    assert 3 <= len(partial) < 28 * 2 + 1
    assert not (out / "scores.csv").exists()

    code = subprocess.run(cmd, check=False, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-2000:]
    final = _results(store)
    assert len(final) == len(set(final)) == 28 + 29  # noise: 27 + 1 unrelated; nn: + ""
    assert set(partial) <= set(final)
    scores = _csv(out / "scores.csv")
    assert len(scores) == 29 and all(r["noise_magnitude"] for r in scores[:28])


def test_two_processes_give_the_same_scores_as_one(model, data, tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("accelerate launcher not installed next to the interpreter")
    args = ["detect", "--model", str(model), "--data", str(data), "--methods", "noise,nn",
            "--nn-generations", "1", "--sample-steps", "2", "--unconditional", "1",
            "--unrelated", "1"]
    two = tmp_path / "two"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffmem", "-q",
           *args, "--out", str(two)]
    proc = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one = tmp_path / "one"
    assert main(["-q", *args, "--out", str(one)]) == 0
    a, b = _csv(one / "scores.csv"), _csv(two / "scores.csv")
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    for x, y in zip(a, b):
        for col in ("noise_magnitude", "nn_similarity"):
            assert (x[col] == "") == (y[col] == "")  # no noise score for the empty prompt
            if x[col]:
                assert float(x[col]) == pytest.approx(float(y[col]), rel=1e-4, abs=1e-6)
        assert x["nn_study_id"] == y["nn_study_id"] and x["memorized"] == y["memorized"]
    runs = json.loads((two / "results.json").read_text())["runs"]
    assert sorted(r["params"]["process"] for r in runs) == [0, 1]


# ---------------------------------------------------------------------------- bad input
def test_prompts_file_with_empty_lines_and_duplicates(model, data, tmp_path, caplog):
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeffNo acute cardiopulmonary process.\n\n  \nSmall left pleural effusion."
                  "\r\nNo acute cardiopulmonary process.\n".encode("utf-8"))
    caplog.set_level("INFO", logger="diffmem")
    assert read_prompts(f) == ["No acute cardiopulmonary process.",
                               "Small left pleural effusion."]
    assert any("skipped 2 empty line(s) and 1 repeated prompt(s)" in r.getMessage()
               for r in caplog.records)
    result = detect(model, data, tmp_path / "out", prompts=f,
                    config=DetectionConfig(methods=("noise",), unrelated=0))
    assert [p.prompt for p in result.prompts] == read_prompts(f)
    assert all(p.kind == "prompt" for p in result.prompts)


def test_prompts_file_with_non_utf8_bytes(model, data, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"No acute process.\nPleural effusion, \xe9panchement.\n")
    with pytest.raises(DataError, match=r"latin1.txt: line 2 is not valid UTF-8 \(byte 0xe9"):
        read_prompts(f)
    code = main(["detect", "--model", str(model), "--data", str(data), "--out",
                 str(tmp_path / "out"), "--prompts", str(f)])
    assert code == 2
    err = capsys.readouterr().err
    assert "line 2 is not valid UTF-8" in err and "save the file as UTF-8" in err
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompts(empty)


def test_data_without_heldout_images(model, dataset, tmp_path):
    train_only = dataset.subset(split="train")
    with pytest.raises(DataError, match="pass --calibration DIR .* or a fixed --threshold"):
        detect(model, train_only, tmp_path / "a", config=DetectionConfig(methods=("nn",)))
    assert not (tmp_path / "a").exists()  # refused before any work or output
    # --threshold works without held-out images
    fixed = detect(model, train_only, tmp_path / "b", config=DetectionConfig(
        methods=("nn",), threshold=0.99, nn_generations=1, sample_steps=2, unconditional=0,
        unrelated=0))
    assert fixed.threshold.method == "fixed" and fixed.threshold.value == 0.99
    # --calibration DIR: a folder of held-out images
    calib = tmp_path / "calibration"
    calib.mkdir()
    from PIL import Image

    for i, s in enumerate(dataset.subset(split=["validate", "test"])):
        img = dataset.load_image(s, size=32)
        Image.fromarray((img * 255).astype(np.uint8)).save(calib / f"{i}.png")
    calibrated = detect(model, train_only, tmp_path / "c", calibration=calib,
                        config=DetectionConfig(methods=("nn",), nn_generations=1,
                                               sample_steps=2, unconditional=0, unrelated=0))
    assert calibrated.threshold.n == 16
    with pytest.raises(DataError, match="holds neither a dataset nor image files"):
        detect(model, train_only, tmp_path / "d", calibration=tmp_path / "b" / "cache",
               config=DetectionConfig(methods=("nn",)))


def test_not_a_model_folder(data, tmp_path):
    from diffmem.errors import ModelError

    with pytest.raises(ModelError, match="has no model_index.json"):
        detect(data, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_data_without_training_split(model, dataset, tmp_path):
    with pytest.raises(DataError, match="the data has no training split"):
        detect(model, dataset.subset(split=["validate", "test"]), tmp_path / "out")


def test_model_data_mismatch_is_reported(model, data, tmp_path, caplog):
    import shutil

    other = tmp_path / "model"
    shutil.copytree(model, other)
    (other / "model_card.json").write_text(json.dumps(
        {"data": {"fingerprint": "0123456789abcdef", "root": "/elsewhere"}}))
    caplog.set_level("WARNING", logger="diffmem")
    result = detect(other, data, tmp_path / "out",
                    config=DetectionConfig(methods=("noise",), unrelated=0))
    assert len(result.warnings) == 1 and "model/data mismatch" in result.warnings[0]
    assert "0123456789abcdef" in result.warnings[0]
    assert any("model/data mismatch" in r.getMessage() for r in caplog.records)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["warnings"] == result.warnings


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write into read-only folders")
def test_output_folder_not_writable(model, data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            detect(model, data, locked, config=DetectionConfig(methods=("noise",)))
        code = main(["detect", "--model", str(model), "--data", str(data), "--out",
                     str(locked / "sub")])
        assert code == 2 and "cannot create output folder" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_output_folder_that_cannot_be_created_or_written(model, data, tmp_path,
                                                        monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["detect", "--model", str(model), "--data", str(data), "--out",
                 str(blocker / "out")])
    assert code == 2 and "cannot create output folder" in capsys.readouterr().err
    # a folder the process may not write (simulated: root writes everywhere)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(OutputError, match="is not writable"):
        detect(model, data, tmp_path / "out", config=DetectionConfig(methods=("noise",)))


def test_output_inside_the_data_is_refused(model, data):
    with pytest.raises(OutputError, match="never writes into a dataset folder"):
        detect(model, data, Path(data) / "detect-out")


@pytest.mark.parametrize("config, match", [
    (DetectionConfig(methods=("noise", "copies")), "unknown 'copies'"),
    (DetectionConfig(backend="lpips"), "unknown similarity backend 'lpips'"),
    (DetectionConfig(backend="embedding"), "needs an encoder: pass --encoder"),
    (DetectionConfig(steps=3, num_inference_steps=2), "lower --steps"),
    (DetectionConfig(fpr=1.5), "fpr=1.5"),
])
def test_bad_settings_are_refused(model, data, tmp_path, config, match):
    with pytest.raises(ConfigError, match=match):
        detect(model, data, tmp_path / "out", config=config)

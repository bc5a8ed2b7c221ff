"""Every command on a plain latent Stable Diffusion folder (issue 12, item 4).

The folder is ``diffmem.models.tiny.tiny_stable_diffusion`` saved with ``save_pretrained``:
UNet2DConditionModel on 4-channel VAE latents, AutoencoderKL, CLIPTextModel and a locally
trained CLIP BPE tokenizer, 16 px. The commands run in-process through ``diffmem.cli.main`` on
the tiny synthetic dataset; the model is untrained, so the tests check that each command runs
end to end on a latent model and writes outputs of the right shape and range (generations are
decoded through the VAE before any similarity), not detection quality.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.mitigate import list_mitigations
from diffmem.models import load_model

QUICK = ["-q", "--threads", "1"]
DETECT_FAST = ["--nn-generations", "1", "--sample-steps", "2", "--unconditional", "1",
               "--unrelated", "1", "--batch-size", "16"]


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def prompts_file(dataset, tmp_path_factory):
    """Five distinct training prompts of the tiny dataset (what --prompts reads)."""
    train = list(dict.fromkeys(s.prompt for s in dataset if s.split == "train"))
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(train[:5]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def detect_dir(sd_folder, data, prompts_file, tmp_path_factory):
    """`diffmem detect` with every method on the SD folder (copies need decoded images)."""
    out = tmp_path_factory.mktemp("sd") / "detect"
    assert main([*QUICK, "detect", "--model", str(sd_folder), "--data", str(data), "--out",
                 str(out), "--prompts", str(prompts_file), *DETECT_FAST]) == 0
    return out


def test_detect_noise_only(sd_folder, data, prompts_file, tmp_path, capsys):
    out = tmp_path / "det"
    code = main([*QUICK, "detect", "--model", str(sd_folder), "--data", str(data), "--out",
                 str(out), "--prompts", str(prompts_file), "--methods", "noise"])
    assert code == 0, capsys.readouterr().err
    rows = [r for r in _csv(out / "scores.csv") if r["kind"] in ("train", "prompt")]
    assert len(rows) == 5
    noise = np.array([float(r["noise_magnitude"]) for r in rows])
    assert np.all(np.isfinite(noise)) and np.all(noise > 0)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["config"]["methods"] == ["noise"]


def test_detect_all_methods_decodes_through_the_vae(detect_dir, sd_folder):
    rows = _csv(detect_dir / "scores.csv")
    train = [r for r in rows if r["kind"] in ("train", "prompt")]
    assert len(train) == 5
    for key in ("noise_magnitude", "attention_entropy", "nn_similarity"):
        values = np.array([float(r[key]) for r in train])
        assert np.all(np.isfinite(values)), key
    sims = np.array([float(r["nn_similarity"]) for r in train])
    assert np.all((sims >= -1) & (sims <= 1))
    # the images compared are the VAE's decoded pixels at the model's image size, not latents
    adapter = load_model(sd_folder, device="cpu")
    assert adapter.vae is not None and adapter.latent_shape == (4, 8, 8)
    images = adapter.sample(["No acute process."], steps=2, seed=0).images
    assert images.shape == (1, adapter.image_size, adapter.image_size)
    assert images.min() >= 0 and images.max() <= 1
    summary = json.loads((detect_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["threshold"]["value"] is not None


def test_scan_with_the_model(sd_folder, prompts_file, tmp_path, capsys):
    out = tmp_path / "scan"
    code = main([*QUICK, "scan", str(prompts_file), "--out", str(out), "--model", str(sd_folder),
                 "--generations", "1"])
    assert code == 0, capsys.readouterr().err
    tokens = _csv(out / "tokens.csv")
    assert tokens and all(np.isfinite(float(t["score"])) for t in tokens)
    scan = json.loads((out / "scan.json").read_text(encoding="utf-8"))
    assert scan["model"]["fingerprint"] == load_model(sd_folder).fingerprint()
    assert (out / "attributions.jsonl").stat().st_size > 0


@pytest.mark.parametrize("method", ["gradient", "occlusion", "attention"])
def test_attribute(method, sd_folder, tmp_path, capsys):
    out = tmp_path / "a.json"
    code = main([*QUICK, "attribute", "--model", str(sd_folder), "Left lower lobe opacity, "
                 "___ notified.", "--method", method, "--generations", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text(encoding="utf-8"))
    units = {u["text"]: u["score"] for u in result["units"]}
    assert "___" in units and "opacity" in units
    assert np.all(np.isfinite(list(units.values())))


@pytest.mark.slow
def test_mitigate_every_method_and_report(sd_folder, data, encoder, detect_dir, tmp_path,
                                         capsys):
    """Every registered mitigation at its default strength on the SD folder, then the report
    over detect, scan and mitigate (about a minute on two cores)."""
    mit = tmp_path / "mit"
    code = main([*QUICK, "mitigate", "--model", str(sd_folder), "--data", str(data), "--out",
                 str(mit), "--encoder", str(encoder), "--detect", str(detect_dir),
                 "--n-prompts", "2", "--generations", "1", "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    rows = _csv(mit / "mitigations.csv")
    assert {r["method"] for r in rows} == {"none", *list_mitigations()}
    for r in rows:
        assert 0 <= float(r["memorization_rate"]) <= 1
        assert np.isfinite([float(r["mean_nn_similarity"]), float(r["fid_in_domain"]),
                            float(r["seconds_per_image"])]).all()
    noise = {r["method"]: float(r["noise_magnitude"]) for r in rows if r["noise_magnitude"]}
    # mitigations that change the text condition change Wen et al.'s noise gap
    assert noise["caption_word_repetition"] != noise["none"]
    assert (mit / "pareto.png").is_file()
    scan = tmp_path / "scan"
    assert main([*QUICK, "scan", str(data), "--out", str(scan), "--model", str(sd_folder),
                 "--generations", "1", "--max-prompts", "3"]) == 0
    rep = tmp_path / "rep"
    code = main([*QUICK, "report", "--model", str(sd_folder), "--data", str(data), "--out",
                 str(rep), "--detect", str(detect_dir), "--scan", str(scan), "--mitigate",
                 str(mit)])
    assert code == 0, capsys.readouterr().err
    facts = json.loads((rep / "report.json").read_text(encoding="utf-8"))
    assert facts["reproducibility"]["model_kind"] == "stable-diffusion"
    html = (rep / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html  # generations and figures embedded


def test_mitigate_and_report_quick(sd_folder, data, encoder, detect_dir, tmp_path, capsys):
    """Two mitigations (an embedding edit and a guidance schedule) and the report on the SD
    folder; the slow test above runs every mitigation."""
    mit = tmp_path / "mit"
    code = main([*QUICK, "mitigate", "--model", str(sd_folder), "--data", str(data), "--out",
                 str(mit), "--encoder", str(encoder), "--detect", str(detect_dir), "--methods",
                 "random_token_insertion,guidance_delay", "--n-prompts", "2", "--generations",
                 "1", "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    rows = _csv(mit / "mitigations.csv")
    assert {r["method"] for r in rows} == {"none", "random_token_insertion", "guidance_delay"}
    assert all(0 <= float(r["memorization_rate"]) <= 1 for r in rows)
    rep = tmp_path / "rep"
    assert main([*QUICK, "report", "--model", str(sd_folder), "--data", str(data), "--out",
                 str(rep), "--detect", str(detect_dir), "--mitigate", str(mit)]) == 0
    facts = json.loads((rep / "report.json").read_text(encoding="utf-8"))
    assert facts["reproducibility"]["model_kind"] == "stable-diffusion"

"""diffmem.report and ``diffmem report``: the privacy report from real (tiny) detect and scan
runs, fixture mitigation and study folders written to their contracts, the image modes (no
training-image bytes with --no-images), HTML escaping, bad input, and a headless-Chromium
render."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.cli import main
from diffmem.errors import ConfigError, DataError, OutputError
from diffmem.report import build_report
from diffmem.report.risk import assess_risk, copy_excess, noise_outliers

SCRIPT = ("Dr. ___ noted <script>document.title='pwned';document.body.appendChild("
          "document.createElement('div')).id='pwned'</script> at ___.")
SECTIONS = ("summary", "dataset", "detection", "attribution", "mitigation", "study", "methods",
            "reproducibility")
CHROMIUM = shutil.which("chromium")


# ---------------------------------------------------------------------------- fixtures
def _tiny_model(dataset, folder: Path, seed: int) -> Path:
    from diffmem.pipelines import build_pipeline, train_tokenizer

    tokenizer = train_tokenizer([s.prompt for s in dataset] + [SCRIPT], vocab_size=200,
                                model_max_length=32)
    build_pipeline("tiny", tokenizer=tokenizer, seed=seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(dataset, tmp_path_factory):
    return _tiny_model(dataset, tmp_path_factory.mktemp("model") / "tiny-cxr", seed=0)


@pytest.fixture(scope="module")
def prompts(dataset):
    """Four training prompts (one of each planted cluster first) and a prompt with a script."""
    from diffmem.detect.detector import training_prompts

    return list(training_prompts(dataset))[:4] + [SCRIPT]


@pytest.fixture(scope="module")
def results(model, data, prompts, tmp_path_factory):
    """A results folder laid out like ``diffmem demo --out``: detect/ and scan/ from real runs.

    The detection uses a fixed copy threshold below every similarity, so every generation is a
    copy: each flagged prompt then has a saved generation and a nearest training image, which
    the image-mode tests need (an untrained tiny model copies nothing on its own)."""
    from diffmem.attribution.scan import run_scan
    from diffmem.detect.detector import DetectionConfig, detect

    root = tmp_path_factory.mktemp("results")
    detect(model, data, root / "detect", prompts=prompts,
           config=DetectionConfig(nn_generations=1, sample_steps=2, unconditional=2,
                                  unrelated=1, batch_size=16, threshold=-1e6))
    listing = root / "prompts.txt"
    listing.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    run_scan(listing, out=root / "scan", model=model, generations=1, min_count=1)
    return root


@pytest.fixture(scope="module")
def model_fp(results):
    return json.loads((results / "detect" / "summary.json").read_text())["model_fingerprint"]


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def mitigate_dir(tmp_path_factory, model_fp, results):
    """A mitigation folder written to the ``diffmem mitigate`` contract."""
    folder = tmp_path_factory.mktemp("mitigate")
    data_fp = json.loads((results / "detect" / "summary.json").read_text())["data_fingerprint"]
    cols = ["method", "strength", "prompt_set", "n_prompts", "n_generations",
            "memorization_rate", "mean_nn_similarity", "noise_magnitude", "fid_in_domain",
            "alignment", "seconds_per_image", "pareto"]
    rows = [["none", 0, "memorized", 4, 4, 1.0, 0.98, 0.6, 10.0, 0.3, 0.1, True],
            ["deid_marker_randomization", 1, "memorized", 4, 4, 0.25, 0.9, 0.3, 11.0, 0.29,
             0.1, True],
            ["gaussian_noise_embedding", 0.1, "memorized", 4, 4, 0.75, 0.95, 0.5, 12.5, 0.2,
             0.1, False]]
    with open(folder / "mitigations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    (folder / "summary.json").write_text(json.dumps({
        "baseline": dict(zip(cols, rows[0])), "rows": [dict(zip(cols, r)) for r in rows],
        "pareto_front": ["none", "deid_marker_randomization@1"],
        "recommended": "deid_marker_randomization",
        "recommendation_reason": "lowest memorization rate within 25% of the baseline FID",
        "notes": ["fixture note"], "model_fingerprint": model_fp,
        "data_fingerprint": data_fp}))
    _png(folder / "pareto.png", 1)
    return folder


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A study folder written to the ``diffmem study`` contract (optional keys left out)."""
    folder = tmp_path_factory.mktemp("study") / "toy"
    folder.mkdir()
    _png(folder / "toy.png", 2)
    (folder / "study.json").write_text(json.dumps({
        "study": "toy", "title": "Toy score matching <b>study</b>",
        "records": [{"lr": 0.05, "mmd_to_empirical": 0.01, "seed": 0},
                    {"lr": 2.0, "mmd_to_empirical": 0.2, "seed": 0}],
        "figures": ["toy.png", "missing.png"], "findings": ["memorization falls with lr"]}))
    return folder


@pytest.fixture(scope="module")
def full(results, model, data, mitigate_dir, study_dir, tmp_path_factory):
    """Reports of all sections in the three image modes."""
    out = {}
    for mode in ("include", "blur", "omit"):
        out[mode] = build_report(tmp_path_factory.mktemp("report") / mode, model=model,
                                 data=data, results=results, mitigate=mitigate_dir,
                                 studies=[study_dir], images=mode)
    return out


def _html(result) -> str:
    return result.html.read_text(encoding="utf-8")


def _embedded(html: str) -> list[np.ndarray]:
    """Every data: image of the file, decoded to grey float arrays."""
    out = []
    for b64 in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html):
        out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L"),
                              dtype=np.float64) / 255)
    return out


def _img_srcs(html: str, cls: str) -> list[str]:
    return re.findall(rf'<img class="{cls}"[^>]*src="([^"]+)"', html)


def _decode(uri: str) -> np.ndarray:
    raw = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=np.float64) / 255


def _small(image: np.ndarray, size: int = 32) -> np.ndarray:
    pil = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    x = np.asarray(pil.resize((size, size), Image.BOX), dtype=np.float64).ravel()
    return (x - x.mean()) / (x.std() + 1e-8)


def _max_match(embedded: list[np.ndarray], dataset) -> float:
    """Highest correlation between an embedded image and any training image (32 px)."""
    train = np.stack([_small(dataset.load_image(i)) for i, s in enumerate(dataset)
                      if s.split == "train"])
    best = -1.0
    for image in embedded:
        if image.ndim != 2 or min(image.shape) < 16:
            continue
        best = max(best, float((train @ _small(image)).max() / train.shape[1]))
    return best


# ---------------------------------------------------------------------------- risk
def test_copy_excess_matches_hand_computed_binomial():
    r = copy_excess(1, 100, 0.01)
    assert r["expected"] == 1.0
    assert r["p_value"] == pytest.approx(1 - 0.99**100)
    assert copy_excess(3, 10, 0.5)["p_value"] == pytest.approx(
        sum(__import__("math").comb(10, k) for k in range(3, 11)) / 2**10)


def test_noise_outliers_flags_only_the_high_tail():
    x = np.r_[np.linspace(0.2, 0.3, 50), 0.9, np.nan, 0.0]
    flags = noise_outliers(x)
    assert flags.tolist().count(True) == 1 and flags[50]


def _det(copies: int, gens: int, *, nn: bool = True, fpr: float | None = 0.01,
         ratio: int = 0, noise=None) -> dict:
    noise = noise if noise is not None else [0.2 + 0.001 * i for i in range(gens)]
    prompts = [{"kind": "train", "noise_magnitude": noise[i],
                "nn_similarity": 0.5 if nn else None, "nn_copies": int(i < copies),
                "nn_ratio_copies": int(i < ratio)} for i in range(gens)]
    return {"summary": {"config": {"methods": ["noise", "nn"] if nn else ["noise"],
                                   "nn_generations": 1},
                        "threshold": {"value": 0.9, "fpr": fpr} if nn else None,
                        "rates": {}},
            "prompts": prompts}


@pytest.mark.parametrize("det, level", [
    (_det(20, 300), "high"),                       # 20 copies where 3 are expected
    (_det(3, 300), "medium"),                      # as many as the FPR lets through
    (_det(0, 300), "low"),
    (_det(0, 300, ratio=1), "medium"),             # Gu et al.'s ratio criterion
    (_det(0, 300, noise=[0.2] * 299 + [5.0]), "medium"),   # a noise-magnitude outlier
    (_det(0, 300, nn=False), "medium"),            # noise magnitude alone: never "low"
    (_det(1, 300, fpr=None), "high"),              # a fixed threshold: any copy
    (None, "not assessed"),
])
def test_risk_levels_follow_the_stated_criteria(det, level):
    assert assess_risk(det).level == level


def test_duplicate_images_in_the_data_keep_risk_at_medium():
    data = {"duplicate_images": {"clusters": 2}, "near_duplicate_images": {
        "cross_patient_clusters": 0}}
    assert assess_risk(_det(0, 300), dataset=data).level == "medium"


# ---------------------------------------------------------------------------- the report
def test_report_has_every_section_and_the_same_facts_as_json(full):
    result = full["include"]
    html = _html(result)
    assert "<strong>Patient data.</strong>" in html
    facts = json.loads(result.json.read_text())
    assert result.sections == {k: "included" for k in SECTIONS}
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    assert facts["diffmem_report"] == 1
    assert facts["risk"]["level"] == result.risk == "high"  # every generation is a copy
    assert facts["summary"]["prompts_scanned"] == 5
    assert facts["summary"]["prompts_memorized"] == 5
    assert facts["summary"]["recommended_mitigation"] == "deid_marker_randomization"
    assert facts["summary"]["top_tokens"][0]["token"]
    assert facts["reproducibility"]["model_fingerprint"] == facts["detection"].get(
        "model_fingerprint", facts["reproducibility"]["model_fingerprint"])
    assert len(facts["attribution"]["heat"]) == 5
    assert "diffmem-attribution" in html  # heat-coloured prompts
    # each nearest training image is also shown at the generation's resolution, as compared
    pairs = html.count('alt="nearest training image"')
    assert pairs and html.count('alt="nearest training image at the generation') == pairs
    # copies from the empty and unrelated prompts are shown too (2 + 1 generations)
    assert html.count('class="panel orphan"') == 3
    assert "deid_marker_randomization" in html and "Toy score matching" in html
    assert "&lt;b&gt;study&lt;/b&gt;" in html  # study titles are escaped too
    assert facts["studies"][0]["figures"] == ["toy.png"]  # the missing figure is left out
    # skewed memorization: 5 prompts with one copy each copy equally (Gini 0, top 1 = 20%)
    skew = facts["detection"]["skew"]
    assert skew["gini"] == 0 and skew["top_shares"] == {"1%": 0.2, "10%": 0.2}
    assert "How concentrated the copies are" in html and 'alt="lorenz"' in html


def test_report_is_self_contained(full):
    html = _html(full["include"])
    assert "Content-Security-Policy" in html
    for src in re.findall(r'src="([^"]*)"', html):
        assert src.startswith("data:image/png;base64,"), src[:40]
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_a_prompt_with_a_script_is_escaped(full):
    for result in full.values():
        html = _html(result)
        assert "<script" not in html.lower()  # the template has no script of its own
        assert "&lt;script&gt;document.title=" in html


def test_no_images_leaves_out_every_training_image(full, dataset):
    html = _html(full["omit"])
    assert "No patient images" in html
    assert not _img_srcs(html, "training") and not _img_srcs(html, "generated")
    for s in dataset:
        raw = Path(s.image).read_bytes()
        assert base64.b64encode(raw).decode() not in html
        assert base64.b64encode(raw[:60]).decode()[:40] not in html
    # no embedded picture resembles a training image; the same check finds them when included
    assert _max_match(_embedded(html), dataset) < 0.9
    assert _max_match([_decode(u) for u in _img_srcs(_html(full["include"]), "training")],
                      dataset) > 0.99


def test_blur_images_blurs_training_images(full):
    plain = [_decode(u) for u in _img_srcs(_html(full["include"]), "training")]
    blurred = [_decode(u) for u in _img_srcs(_html(full["blur"]), "training")]
    assert plain and len(blurred) == len(plain)
    assert "Patient data, blurred" in _html(full["blur"])

    def detail(x):  # mean absolute difference between neighbouring pixels
        return np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()

    for a, b in zip(plain, blurred):
        assert not np.array_equal(a, b)
        assert detail(b) < 0.5 * detail(a)


def test_blurred_pictures_correlate_weakly_with_their_originals(full):
    """The bar of issue 18: every blurred patient picture (training image, the same at the
    generation's resolution, generation flagged as a copy) correlates at most 0.5 with its
    original at 64 px (a Gaussian blur of sigma 8% of the side kept 0.85-0.91)."""
    pairs = []
    for cls in ("training", "generated"):
        plain = [_decode(u) for u in _img_srcs(_html(full["include"]), cls)]
        blurred = [_decode(u) for u in _img_srcs(_html(full["blur"]), cls)]
        assert plain and len(blurred) == len(plain)
        pairs += list(zip(plain, blurred))
    corr = [float(_small(a, 64) @ _small(b, 64)) / 64 ** 2 for a, b in pairs]
    assert max(corr) <= 0.5, corr


def test_missing_sections_say_what_to_run(results, model, data, tmp_path):
    result = build_report(tmp_path / "r", model=model, data=data, detect=results / "detect")
    html = _html(result)
    assert result.sections["attribution"].startswith("diffmem scan")
    assert result.sections["mitigation"].startswith("diffmem mitigate")
    assert result.sections["study"].startswith("diffmem study")
    assert f"diffmem scan {data} --model {model}" in html
    assert "No mitigation comparison" in html and "No training study" in html


def test_commands_shown_are_shell_quoted(results, model, data, study_dir, tmp_path):
    """A path with shell metacharacters stays one argument in every command the report shows:
    the "to run" hints, the report's own command and a study's recorded command."""
    weird = tmp_path / "m; touch pwned $(id)"
    shutil.copytree(model, weird)
    study = tmp_path / "study" / "toy"
    shutil.copytree(study_dir, study)
    meta = json.loads((study / "study.json").read_text())
    meta["command"] = ["diffmem", "study", "lr", "--data", str(weird), "--out", "a b"]
    (study / "study.json").write_text(json.dumps(meta))
    own = ["diffmem", "report", "--model", str(weird), "--out", str(tmp_path / "r")]
    result = build_report(tmp_path / "r", model=weird, data=data, detect=results / "detect",
                          studies=[study], command=own)
    assert shlex.split(result.sections["attribution"]) == [
        "diffmem", "scan", str(data), "--model", str(weird), "--out", "RESULTS/scan"]
    assert shlex.split(result.sections["mitigation"])[3] == str(weird)
    facts = json.loads(result.json.read_text())
    assert shlex.split(facts["reproducibility"]["command"]) == own
    assert shlex.split(facts["studies"][0]["command"]) == meta["command"]
    html = _html(result)
    assert shlex.quote(str(weird)) in html.replace("&#39;", "'")


def test_attributions_missing_from_the_scan_are_explained(results, model, data, tmp_path):
    scan = tmp_path / "scan"
    shutil.copytree(results / "scan", scan)
    (scan / "attributions.jsonl").unlink()
    result = build_report(tmp_path / "r", model=model, data=data, scan=scan)
    html = _html(result)
    assert "holds no per-prompt attributions" in html and "diffmem-attribution" not in html
    assert "Nothing\n  was flagged as a copy" in html  # no patient-data warning without images
    assert result.risk == "not assessed"


def test_output_folder_rules(results, model, data, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a previous report.*--overwrite"):
        build_report(busy, model=model, data=data, detect=results / "detect")
    build_report(busy, model=model, data=data, detect=results / "detect", overwrite=True)
    assert (busy / "notes.txt").read_text() == "mine"
    # a previous report's folder is rewritten without --overwrite
    build_report(busy, model=model, data=data, detect=results / "detect")
    with pytest.raises(OutputError, match="inside the input"):
        build_report(Path(data) / "report", model=model, data=data)


def test_model_mismatch_is_refused(results, dataset, data, tmp_path):
    other = _tiny_model(dataset, tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="model mismatch.*fingerprint"):
        build_report(tmp_path / "r", model=other, data=data, detect=results / "detect")
    with pytest.raises(DataError, match="model mismatch"):
        build_report(tmp_path / "r2", model=other, data=data, scan=results / "scan")


def test_data_mismatch_is_refused(results, model, data, tmp_path):
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    split = changed / "mimic-cxr-2.0.0-split.csv"
    split.write_text(split.read_text().replace(",train", ",validate", 1))  # one record moves
    with pytest.raises(DataError, match="data mismatch.*training split"):
        build_report(tmp_path / "r", model=model, data=changed, detect=results / "detect")
    from diffmem.attribution.scan import run_scan

    run_scan(data, out=tmp_path / "scan")  # a model-free scan of the original dataset
    with pytest.raises(DataError, match="data mismatch: the scan.*fingerprint"):
        build_report(tmp_path / "r", model=model, data=changed, scan=tmp_path / "scan")
    build_report(tmp_path / "r", model=model, data=data, scan=tmp_path / "scan")


def test_bad_inputs(results, model, data, tmp_path):
    with pytest.raises(ConfigError, match="images='hide'.*include"):
        build_report(tmp_path / "r", model=model, data=data, images="hide")
    with pytest.raises(DataError, match="detect folder does not exist"):
        build_report(tmp_path / "r", model=model, data=data, detect=tmp_path / "nope")
    with pytest.raises(DataError, match="none of the sub-folders"):
        build_report(tmp_path / "r", model=model, data=data, results=tmp_path)
    broken = tmp_path / "detect"
    shutil.copytree(results / "detect", broken)
    rows = (broken / "scores.csv").read_text().splitlines()
    (broken / "scores.csv").write_text("\n".join([rows[0].replace("nn_similarity", "x")]
                                                 + rows[1:]))
    with pytest.raises(DataError, match="lacks the column.*nn_similarity"):
        build_report(tmp_path / "r", model=model, data=data, detect=broken)


def test_cli_writes_the_report(results, model, data, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["-q", "report", "--model", str(model), "--data", str(data), "--results",
                 str(results), "--out", str(out), "--no-images"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "risk level: high" in printed and str(out / "report.html") in printed
    facts = json.loads((out / "report.json").read_text())
    assert facts["images"]["mode"] == "omit"
    assert "--no-images" in facts["reproducibility"]["command"]
    with pytest.raises(SystemExit):
        main(["report", "--model", str(model), "--data", str(data), "--out", str(out),
              "--no-images", "--blur-images"])
    assert main(["report", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--detect", str(tmp_path / "nope")]) == 2
    assert "detect folder does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------- browser
def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package "
                                              "'chromium'; .ci/run installs it)")
def test_report_renders_in_headless_chromium(full, tmp_path):
    url = full["include"].html.resolve().as_uri()
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", url, profile=tmp_path / "p1")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20  # not a blank page
    assert (pixels < 100).mean() > 0.01  # there is dark text and imagery
    dom = _chromium("--dump-dom", url, profile=tmp_path / "p2").stdout
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    assert "<title>diffmem privacy report</title>" in dom  # the prompt's script did not run
    assert 'id="pwned"' not in dom
    assert "&lt;script&gt;document.title='pwned'" in dom  # it is shown as text
    assert re.search(r'id="risk-level">high<', dom)


def test_dicom_header_phi_is_counted_without_its_values(make_mimic_tree, model, tmp_path):
    from diffmem.data.dicom import write_dicom

    from conftest import xray

    root = make_mimic_tree(kind="dicom")
    target = sorted((root / "files").rglob("*.dcm"))[0]
    write_dicom(target, xray(0), phi={"PatientName": "Doe^Jane", "PatientID": "98765432"},
                attributes={"ViewPosition": "PA"})
    result = build_report(tmp_path / "r", model=model, data=root, images="omit")
    html, text = _html(result), result.json.read_text()
    facts = json.loads(text)
    phi = facts["dataset"]["inspect"]["dicom_phi"]
    assert phi["files"] == 6 and phi["files_with_phi"] == 1
    assert phi["by_keyword"] == {"PatientName": 1, "PatientID": 1}
    assert "1 of 6 DICOM files carry identifying header elements" in html
    assert "<code>PatientName</code>" in html
    for value in ("Doe^Jane", "Doe", "98765432"):
        assert value not in html and value not in text
    assert result.sections["detection"].startswith("diffmem detect")
    assert result.risk == "not assessed"


def test_an_inspect_json_of_these_data_is_reused(results, model, data, dataset, tmp_path):
    from diffmem.data.inspect import summarize

    layout = tmp_path / "results"
    shutil.copytree(results, layout)
    summary = summarize(dataset, images=False)
    summary["near_duplicate_images"] = {"clusters": 99, "images_in_clusters": 0, "largest": [],
                                        "cross_patient_clusters": 0, "threshold": 0.1}
    (layout / "inspect.json").write_text(json.dumps(summary))
    facts = json.loads(build_report(tmp_path / "a", model=model, data=data, results=layout)
                       .json.read_text())
    assert facts["dataset"]["inspect_source"] == str(layout / "inspect.json")
    assert facts["dataset"]["inspect"]["near_duplicate_images"]["clusters"] == 99
    summary["fingerprint"] = "another dataset"
    (layout / "inspect.json").write_text(json.dumps(summary))
    facts = json.loads(build_report(tmp_path / "b", model=model, data=data, results=layout)
                       .json.read_text())
    assert facts["dataset"]["inspect_source"] == "summarize"
    assert facts["dataset"]["inspect"]["near_duplicate_images"]["clusters"] != 99


def test_bad_mitigation_and_scan_folders(results, model, data, mitigate_dir, tmp_path):
    other = tmp_path / "mitigate"
    shutil.copytree(mitigate_dir, other)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "model_fingerprint": "0" * 16}))
    with pytest.raises(DataError, match="model mismatch: the mitigate results"):
        build_report(tmp_path / "r", model=model, data=data, mitigate=other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither summary.json nor mitigations.csv"):
        build_report(tmp_path / "r", model=model, data=data, mitigate=tmp_path / "empty")
    scan = tmp_path / "scan"
    shutil.copytree(results / "scan", scan)
    with open(scan / "attributions.jsonl", "a") as f:
        f.write("not json\n")
    with pytest.raises(DataError, match="attributions.jsonl: line 6 is not JSON"):
        build_report(tmp_path / "r", model=model, data=data, scan=scan)


def test_noise_magnitude_alone_never_makes_a_model_low_risk(model, data, prompts, tmp_path):
    from diffmem.detect.detector import DetectionConfig, detect

    detect(model, data, tmp_path / "detect", prompts=prompts[:3],
           config=DetectionConfig(methods=("noise",), unrelated=0))
    result = build_report(tmp_path / "r", model=model, data=data, detect=tmp_path / "detect")
    facts = json.loads(result.json.read_text())
    assert result.risk == "medium"
    assert any("noise magnitude alone cannot show" in r for r in facts["risk"]["reasons"])
    assert facts["summary"]["prompts_memorized"] is None  # not measured, not zero
    assert facts["summary"]["fpr"] is None
    assert "memorized: a generation copies a training image" in _html(result)

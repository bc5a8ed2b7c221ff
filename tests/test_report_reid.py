"""The report's "Patient re-identification" section: from a real (tiny) ``diffmem detect
--methods ...,reid`` run and a real ``diffmem reid eval``, in the three image modes, with HTML
escaping."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from diffmem.cli import main
from diffmem.report import build_report
from diffmem.report.sections import reid_facts

SCRIPT = "<script>alert('pwned')</script> small effusion"


@pytest.fixture(scope="module")
def detect_dir(model, data, dataset, tmp_path_factory):
    """Detection with re-ID on three training prompts and a prompt holding a script. The copy
    threshold (2, above any correlation) makes no generation a copy and the re-ID threshold
    (-1) makes every generation a re-identification: every leak is one the copy verdicts
    miss, so the section has pictures to show (an untrained tiny model leaks nothing)."""
    from diffmem.detect.detector import DetectionConfig, detect, training_prompts

    out = tmp_path_factory.mktemp("results") / "detect"
    detect(model, data, out, prompts=list(training_prompts(dataset))[:3] + [SCRIPT],
           config=DetectionConfig(methods=("noise", "nn", "reid"), nn_generations=1,
                                  sample_steps=2, unconditional=1, unrelated=1, batch_size=16,
                                  confirm="all", threshold=2.0, reid_threshold=-1.0))
    return out


@pytest.fixture(scope="module")
def reid_eval(data, tmp_path_factory):
    from diffmem.reid.evaluation import run_reid_eval

    out = tmp_path_factory.mktemp("reid-eval")
    run_reid_eval(None, data, out, n_positive=40, n_negative=80)
    return out / "reid_eval.json"


@pytest.fixture(scope="module")
def reports(model, data, detect_dir, reid_eval, tmp_path_factory):
    return {mode: build_report(tmp_path_factory.mktemp("report") / mode, model=model, data=data,
                               detect=detect_dir, images=mode, reid_eval=reid_eval)
            for mode in ("include", "blur", "omit")}


def _srcs(html: str, cls: str) -> list[str]:
    return re.findall(rf'<img class="{cls}"[^>]*src="([^"]+)"', html)


def _decode(uri: str) -> np.ndarray:
    raw = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=np.float64) / 255


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def test_section_counts_match_the_detection_files(reports, detect_dir, reid_eval):
    html = reports["include"].html.read_text(encoding="utf-8")
    facts = json.loads(reports["include"].json.read_text())
    assert '<section id="reid">' in html and "Patient re-identification" in html
    summary = json.loads((detect_dir / "summary.json").read_text())["reid"]
    r = facts["reid"]
    assert r["counts"] == summary["counts"]
    leaks = (detect_dir / "reidentified.csv").read_text().strip().splitlines()[1:]
    assert r["counts"]["leaks"] == len(leaks) == r["counts"]["generations"] == 6
    assert r["counts"]["copies"] == 0 and r["leaks_not_copies_total"] == 6
    assert len(r["leaks_not_copies"]) == 6
    scores = [x["reid_score"] for x in r["leaks_not_copies"]]
    assert scores == sorted(scores, reverse=True)
    evaluated = json.loads(reid_eval.read_text())
    assert r["verification"]["auc"] == evaluated["auc"]
    assert f"AUC <strong>{evaluated['auc']:.3g}</strong>" in html
    # escaping: the prompt is shown, its script is not live
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html


def test_pictures_follow_the_image_mode(reports, dataset, detect_dir):
    facts = json.loads(reports["include"].json.read_text())
    by_study = {s.study_id: s for s in dataset if s.split == "train"}
    html = {m: r.html.read_text(encoding="utf-8") for m, r in reports.items()}
    shown = _srcs(html["include"], "reid-training")
    assert len(shown) == len(_srcs(html["include"], "reid-generated")) == 6
    for leak, uri in zip(facts["reid"]["leaks_not_copies"], shown):  # that patient's study
        study = by_study[leak["reid_study_id"]]
        assert study.patient_id == leak["reid_patient_id"]
        assert _corr(_decode(uri), dataset.load_image(study, size=160)) > 0.99
    blurred = _srcs(html["blur"], "reid-training")
    assert len(blurred) == 6
    for leak, uri in zip(facts["reid"]["leaks_not_copies"], blurred):
        assert _corr(_decode(uri), dataset.load_image(by_study[leak["reid_study_id"]],
                                                      size=160)) < 0.9
    assert not _srcs(html["omit"], "reid-training") and not _srcs(html["omit"],
                                                                  "reid-generated")
    assert "generation left out (--no-images)" in html["omit"]


def test_verification_not_measured_without_numbers(detect_dir):
    from diffmem.report.inputs import read_detect

    det = read_detect(detect_dir)
    assert reid_facts(det)["verification"]["source"].startswith("the model's own validation")
    det["summary"]["reid"]["validation"] = None
    assert reid_facts(det)["verification"] is None
    det["summary"].pop("reid")
    assert reid_facts(det) is None


def test_cli_reid_eval_option(model, data, detect_dir, tmp_path, capsys):
    assert main(["report", "--model", str(model), "--data", str(data), "--detect",
                 str(detect_dir), "--out", str(tmp_path / "r"), "--no-images"]) == 0
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "the model&#39;s own validation at training" in html
    assert main(["report", "--model", str(model), "--data", str(data), "--detect",
                 str(detect_dir), "--out", str(tmp_path / "r2"), "--reid-eval",
                 str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_mitigation_table_shows_the_reid_rate(model, data, detect_dir, tmp_path):
    summary = json.loads((detect_dir / "summary.json").read_text())
    folder = tmp_path / "mitigate"
    folder.mkdir()
    cols = ["method", "strength", "prompt_set", "n_prompts", "n_generations",
            "memorization_rate", "prompt_memorization_rate", "reid_rate", "prompt_reid_rate",
            "reid_rate_own", "prompt_reid_rate_own", "mean_nn_similarity", "noise_magnitude",
            "fid_in_domain", "alignment", "seconds_per_image", "pareto"]
    rows = [["none", 0, "control", 2, 4, 0.0, 0.0, 0.75, 1.0, 0.625, 1.0, 0.3, 0.5, 9.0, 0.2,
             0.1, "true"],
            ["guidance_delay", 0.5, "control", 2, 4, 0.0, 0.0, 0.25, 0.5, 0.125, 0.5, 0.2, 0.5,
             9.5, 0.2, 0.1, "true"]]
    (folder / "mitigations.csv").write_text("\n".join(",".join(map(str, r))
                                                      for r in [cols] + rows) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "model_fingerprint": summary["model_fingerprint"],
        "data_fingerprint": summary["data_fingerprint"]}))
    result = build_report(tmp_path / "r", model=model, data=data, detect=detect_dir,
                          mitigate=folder, images="omit")
    html = result.html.read_text(encoding="utf-8")
    assert "<th>reid rate</th>" in html and "<td class=\"n\">0.75</td>" in html
    assert "<th>reid rate own</th>" in html
    assert '<td class="n">0.75</td><td class="n">0.625</td>' in html  # beside reid rate
    assert json.loads(result.json.read_text())["mitigation"]["reid"] is True


def _own_cells(html: str) -> list[str]:
    return re.findall(r'<td class="reid-own">([^<]*)</td>', html)


def test_own_patient_numbers_come_from_the_detection(reports, detect_dir, dataset):
    """The own-patient counts beside the any-patient ones, and each leak's own-patient cell,
    are the detect run's (summary.json and reidentified.csv), in every image mode."""
    import csv

    summary = json.loads((detect_dir / "summary.json").read_text())["reid"]["counts"]
    with open(detect_dir / "reidentified.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    own = {}  # each training prompt's own patients, from the data itself
    for s in dataset:
        if s.split == "train":
            own.setdefault(s.prompt, set()).add(s.patient_id)
    for r in rows:  # the detection's column is the dataset's patients
        mine = own.get(r["prompt"]) if r["kind"] in ("train", "prompt") else None
        expected = "" if not mine else str(int(r["reid_patient_id"] in mine))
        assert r["reid_own_patient"] == expected
    values = {r["reid_own_patient"] for r in rows}
    assert "" in values and values - {""}  # empty/unrelated prompts have no own patient
    judged = {k: n for k, n in summary["own_patient_judged"].items() if n}
    # at re-ID threshold -1 every generation with an own patient re-identifies it (an
    # own-patient leak), whichever patient is its best match
    assert judged and summary["own_patient_leaks"] == sum(r["reid_own_patient"] != ""
                                                          for r in rows) == 3
    facts = json.loads(reports["include"].json.read_text())["reid"]
    by_key = {(r["prompt"], int(r["index"])): r["reid_own_patient"] for r in rows}
    words = {"1": "yes", "0": "no: another patient", "": "–"}
    for mode, report in reports.items():
        html = report.html.read_text(encoding="utf-8")
        assert ("<td>re-identify the prompt's own patient (own-patient leaks)</td>"
                f'<td class="n">{summary["own_patient_leaks"]}</td>') in html
        for kind, n in judged.items():
            assert (f'<td class="n">{summary["own_patient_prompts"][kind]} of {n}</td>'
                    in html)
        assert "<strong>own-patient</strong> re-identification" in html
        cells = _own_cells(html)
        assert cells == [words[by_key[(x["prompt"], x["index"])]]
                         for x in facts["leaks_not_copies"]]
        assert len(cells) == 6


def test_own_patient_numbers_are_escaped(model, data, detect_dir, tmp_path):
    import shutil

    folder = tmp_path / "detect"
    shutil.copytree(detect_dir, folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary["reid"]["counts"]["own_patient_leaks"] = "<b>7</b>"
    (folder / "summary.json").write_text(json.dumps(summary))
    html = build_report(tmp_path / "r", model=model, data=data, detect=folder,
                        images="omit").html.read_text(encoding="utf-8")
    assert "<b>7</b>" not in html and "&lt;b&gt;7&lt;/b&gt;" in html

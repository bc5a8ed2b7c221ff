"""The synthetic MIMIC-CXR-style generator: layout, determinism, planted ground truth, presets,
reports, images, the DICOM copy and the ``diffmem synth`` command."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.data.reports import count_deid_markers, extract_prompt
from diffmem.data.synth import (Findings, Pose, config_from_dict, list_presets, load_preset,
                                random_anatomy, read_ground_truth, render_chest, synthesize)
from diffmem.data.synth.generator import plan_dataset
from diffmem.data.synth.reports import communication_sentence
from diffmem.errors import ConfigError, DataError, OutputError

DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")

# A smaller preset than tiny for the runs that only need "some" data.
MINI = {
    "name": "mini", "description": "test", "image_size": 48,
    "splits": {"train": {"outpatients": 3, "icu_patients": 1},
               "validate": {"outpatients": 2}, "test": {"icu_patients": 1}},
    "icu_studies": [2, 3],
    "planted": {"exact_clusters": 1, "near_clusters": 1, "copies": 3, "marker_rate": 0.5},
}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    t0 = time.perf_counter()
    synthesize(out, preset="tiny", seed=0)
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def truth(tiny) -> list[dict[str, str]]:
    return _rows(tiny[0] / "ground_truth.csv")


@pytest.fixture(scope="module")
def card(tiny) -> dict:
    return json.loads((tiny[0] / "dataset_card.json").read_text(encoding="utf-8"))


def _image(root: Path, row: dict[str, str]) -> Path:
    pid = row["patient_id"]
    return root / "files" / pid[:3] / pid / row["study_id"] / f"{row['dicom_id']}.jpg"


def _report(root: Path, row: dict[str, str]) -> Path:
    pid = row["patient_id"]
    return root / "mimic-cxr-reports" / "files" / pid[:3] / pid / f"{row['study_id']}.txt"


# -- layout -------------------------------------------------------------------------------------
def test_tiny_is_fast_and_has_the_mimic_layout(tiny, truth):
    root, seconds = tiny
    assert seconds < 60
    assert 30 <= sum(r["split"] == "train" for r in truth) <= 50
    meta = _rows(root / "mimic-cxr-2.0.0-metadata.csv")
    assert list(meta[0]) == ["dicom_id", "subject_id", "study_id",
                             "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                             "Columns", "StudyDate", "StudyTime",
                             "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                             "PatientOrientationCodeSequence_CodeMeaning"]
    split = _rows(root / "mimic-cxr-2.0.0-split.csv")
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert len(meta) == len(split) == len(truth)
    jpgs = sorted((root / "files").rglob("*.jpg"))
    assert len(jpgs) == len(truth)
    for row in meta:
        assert DICOM_ID.match(row["dicom_id"])
        assert re.fullmatch(r"1\d{7}", row["subject_id"])
        assert re.fullmatch(r"5\d{7}", row["study_id"])
        assert row["Rows"] == row["Columns"] == "64"
        assert 21100101 <= int(row["StudyDate"]) <= 21991231  # shifted to the future
        assert row["ViewPosition"] in ("PA", "AP")
    for row in truth:
        img = _image(root, row)
        assert img.is_file() and img.parent.parent.parent.name == row["patient_id"][:3]
        assert _report(root, row).is_file()
        with Image.open(img) as im:
            assert im.mode == "L" and im.size == (64, 64)
    assert len({r["dicom_id"] for r in truth}) == len({r["study_id"] for r in truth}) == len(truth)


def test_same_seed_same_bytes_other_seed_other_data(tiny, tmp_path):
    root, _ = tiny
    again = synthesize(tmp_path / "again", preset="tiny", seed=0)
    assert _tree_hashes(again) == _tree_hashes(root)
    other = synthesize(tmp_path / "other", preset=config_from_dict(MINI), seed=1)
    other2 = synthesize(tmp_path / "other2", preset=config_from_dict(MINI), seed=2)
    assert (_rows(other / "ground_truth.csv") != _rows(other2 / "ground_truth.csv"))


# -- ground truth ---------------------------------------------------------------------------------
def test_planted_clusters_are_consistent(tiny, truth, card):
    root, _ = tiny
    clusters: dict[str, list[dict]] = defaultdict(list)
    for r in truth:
        assert (r["planted"] == "1") == bool(r["cluster_id"]) == bool(r["plant_kind"])
        if r["cluster_id"]:
            clusters[r["cluster_id"]].append(r)
    cfg = load_preset("tiny")
    assert len(clusters) == cfg.planted.exact_clusters + cfg.planted.near_clusters
    non_planted_prompts = {r["prompt"] for r in truth if r["planted"] == "0"}
    cluster_prompts = []
    for cid, rows in clusters.items():
        kind = rows[0]["plant_kind"]
        assert cid.startswith(kind + "-")
        assert all(r["split"] == "train" for r in rows)
        assert all(int(r["duplicate_count"]) == len(rows) == cfg.planted.copies for r in rows)
        prompts = {r["prompt"] for r in rows}
        assert not prompts & non_planted_prompts
        cluster_prompts.append(prompts)
        hashes = {hashlib.sha256(_image(root, r).read_bytes()).digest() for r in rows}
        if kind == "exact":
            assert len(hashes) == 1 and len(prompts) == 1
            assert len({_report(root, r).read_text() for r in rows}) == 1
        else:
            assert len(hashes) == len(rows)  # fresh noise and jitter: no byte copies
            assert len({r["patient_id"] for r in rows}) == 1
            imgs = [np.asarray(Image.open(_image(root, r)), np.float64).ravel() for r in rows]
            others = [np.asarray(Image.open(_image(root, r)), np.float64).ravel()
                      for r in truth if r["patient_id"] != rows[0]["patient_id"]]
            within = np.corrcoef(imgs)[np.triu_indices(len(imgs), 1)]
            between = np.corrcoef(imgs[:1] + others)[0, 1:]
            assert within.min() > 0.9 and within.min() > between.max()
    for i, a in enumerate(cluster_prompts):
        for b in cluster_prompts[i + 1:]:
            assert not a & b
    train_prompts = Counter(r["prompt"] for r in truth if r["split"] == "train")
    for r in truth:
        assert int(r["prompt_count"]) == train_prompts.get(r["prompt"], 0)
        if r["planted"] == "0":
            assert r["duplicate_count"] == ("1" if r["split"] == "train" else "0")
    assert [c["cluster_id"] for c in card["planted"]["clusters"]] == sorted(clusters)


def test_markers_are_common_but_not_a_label(truth, card):
    planted = [r["prompt"] for r in truth if r["planted"] == "1"]
    others = [r["prompt"] for r in truth if r["planted"] == "0"]
    rate_planted = np.mean(["___" in p for p in planted])
    rate_others = np.mean(["___" in p for p in others])
    assert rate_planted > rate_others > 0.05      # markers also occur in ordinary prompts
    assert rate_planted < 1.0                     # and some planted prompts have none
    assert card["markers"]["planted_clusters_marker_heavy"] == 2  # round(0.67 * 3)


def test_held_out_patients_never_train(truth):
    by_split = defaultdict(set)
    for r in truth:
        by_split[r["split"]].add(r["patient_id"])
    assert set(by_split) == {"train", "validate", "test"}
    assert not by_split["train"] & (by_split["validate"] | by_split["test"])
    assert not by_split["validate"] & by_split["test"]


def test_card_counts_match_the_files(tiny, truth, card):
    root, _ = tiny
    split_rows = _rows(root / "mimic-cxr-2.0.0-split.csv")
    kinds = {r["patient_id"]: r["patient_kind"] for r in truth}
    for split in ("train", "validate", "test"):
        rows = [r for r in truth if r["split"] == split]
        c = card["counts"][split]
        assert c["images"] == sum(r["split"] == split for r in split_rows) == len(rows)
        assert c["studies"] == len({r["study_id"] for r in rows})
        patients = {r["patient_id"] for r in rows}
        assert c["patients"] == len(patients)
        assert c["outpatients"] + c["icu_patients"] == c["patients"]
        assert c["icu_patients"] == sum(kinds[p] == "icu" for p in patients)
        assert c["planted_records"] == sum(r["planted"] == "1" for r in rows)
        marked = sum("___" in r["prompt"] for r in rows)
        assert c["deid_markers"]["prompts_with_marker"] == marked
    assert card["counts"]["all"]["images"] == len(list((root / "files").rglob("*.jpg")))
    assert card["seed"] == 0 and card["preset"] == "tiny" and card["complete"] is True
    assert card["config"] == load_preset("tiny").to_dict()


# -- reports -------------------------------------------------------------------------------------
def test_reports_have_mimic_sections_and_the_prompt_is_the_impression(tiny, truth):
    root, _ = tiny
    with_marker = 0
    for r in truth:
        text = _report(root, r).read_text(encoding="utf-8")
        assert text.startswith(" " * 33 + "FINAL REPORT\n")
        for header in ("INDICATION:" if "INDICATION:" in text else "HISTORY:", "COMPARISON:",
                       "IMPRESSION:"):
            assert re.search(rf"^ {header}", text, re.M), (header, text)
        with_marker += "___" in text
        # independent of the loader's parser: the text after the last IMPRESSION header
        tail = text.rsplit(" IMPRESSION:", 1)[1]
        assert " ".join(tail.split()) == r["prompt"]
        assert extract_prompt(text, "impression") == r["prompt"]
        assert max(len(line) for line in text.splitlines()) <= 80
    assert with_marker / len(truth) > 0.8  # ages, dates and names are nearly always removed


# -- images --------------------------------------------------------------------------------------
def test_rendered_films_look_like_chest_radiographs():
    a = random_anatomy(np.random.default_rng(0), sex="M")

    def film(f=None, view="PA"):
        return render_chest(a, f or Findings(), view=view, pose=Pose(), size=96, noise_seed=1,
                            device_seed=1)

    base = film()
    assert base.dtype == np.float32 and base.shape == (96, 96)
    assert 0.0 <= base.min() and base.max() <= 1.0
    lungs = np.r_[base[30:60, 15:30].ravel(), base[30:60, 66:81].ravel()]
    assert lungs.mean() + 0.15 < base[30:60, 44:52].mean()   # dark lungs, bright mediastinum
    assert base[:, :3].mean() < lungs.mean()                 # air outside the body
    # a right effusion whitens the right base (image left), not the left one
    eff = film(Findings(effusion={"right": "large"}))
    assert (eff - base)[50:68, 12:40].mean() > 0.08
    assert abs((eff - base)[50:68, 60:84].mean()) < 0.01
    # cardiomegaly brightens the left heart border region; a pacemaker adds metal
    assert (film(Findings(cardiomegaly="severe")) - base)[55:70, 55:70].mean() > 0.04
    assert film(Findings(devices={"pacemaker": "dual"})).max() > base.max() - 0.05
    assert not np.array_equal(film(view="AP"), base)


# -- presets -------------------------------------------------------------------------------------
def test_presets_are_found_by_name_and_unknown_names_list_them(tmp_path):
    assert list_presets() == ["benchmark", "clipmem", "demo", "patients", "reid", "tiny",
                              "triggers"]
    for name in list_presets():
        cfg = load_preset(name)
        assert cfg.name == name and cfg.description
    demo = load_preset("demo")
    assert demo.image_size == 128 and demo.copies_range() == (30, 30)
    assert demo.planted.exact_clusters + demo.planted.near_clusters == 10
    with pytest.raises(ConfigError,
                       match="known presets: benchmark, clipmem, demo, patients, reid, tiny"):
        load_preset("tinny")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(MINI))
    assert load_preset(str(path)).image_size == 48
    with pytest.raises(ConfigError, match=r"unknown preset field\(s\) \['imagesize'\]"):
        config_from_dict({**MINI, "imagesize": 3})
    with pytest.raises(ConfigError, match=r"planted.copies must be .* got \[5, 2\]"):
        config_from_dict({**MINI, "planted": {"copies": [5, 2]}})
    with pytest.raises(ConfigError, match="exact_patients must be 'same' or 'distinct'"):
        config_from_dict({**MINI, "planted": {"exact_patients": "both"}})
    with pytest.raises(ConfigError, match="seed must be a non-negative integer"):
        synthesize(tmp_path / "x", preset=config_from_dict(MINI), seed=-1)


def test_exact_copies_can_belong_to_distinct_patients(tmp_path):
    cfg = config_from_dict({**MINI, "planted": {**MINI["planted"], "exact_patients": "distinct",
                                                "near_clusters": 0}})
    rows = _rows(synthesize(tmp_path / "d", preset=cfg) / "ground_truth.csv")
    exact = [r for r in rows if r["plant_kind"] == "exact"]
    assert len(exact) == 3 and len({r["patient_id"] for r in exact}) == 3


def test_trigger_clusters_share_only_their_trigger_and_controls_are_not_duplicated(tmp_path):
    cfg = config_from_dict({**MINI, "planted": {"exact_clusters": 1, "copies": 3,
                                                "trigger_clusters": 3, "marker_controls": 3,
                                                "trigger_kinds": ["surname", "accession"]}})
    root = synthesize(tmp_path / "t", preset=cfg)
    rows = _rows(root / "ground_truth.csv")
    truth = read_ground_truth(root)
    assert all(truth[r["dicom_id"]]["trigger"] == r["trigger"] for r in rows)
    triggered = defaultdict(list)
    for r in rows:
        if r["plant_kind"] == "trigger":
            triggered[r["cluster_id"]].append(r)
    assert sorted(triggered) == ["trigger-00", "trigger-01", "trigger-02"]
    others = [r["prompt"] for r in rows if r["plant_kind"] != "trigger"]
    for cid, members in triggered.items():
        trigger = members[0]["trigger"]
        assert len(members) == 3 and {m["trigger"] for m in members} == {trigger}
        assert len({m["patient_id"] for m in members}) == 1
        assert len({m["prompt"] for m in members}) == 3          # different reports ...
        assert all(trigger in m["prompt"] for m in members)       # ... sharing the trigger
        assert not any(trigger in p for p in others)              # which no other report has
        assert all(m["planted"] == "1" and m["duplicate_count"] == "3" for m in members)
        hashes = {hashlib.sha256(_image(root, m).read_bytes()).digest() for m in members}
        assert len(hashes) == (3 if cid == "trigger-01" else 1)   # near-duplicates / one film
    # kinds cycle after both image modes: surname, surname, accession
    assert [triggered[c][0]["trigger"] for c in ("trigger-00", "trigger-01")] == \
        ["Abernathy", "Kowalczyk"]
    assert re.fullmatch(r"[A-Z]{2}\d{4}", triggered["trigger-02"][0]["trigger"])
    controls = [r for r in rows if r["control"] == "1"]
    assert len(controls) == 3
    assert all(count_deid_markers(r["prompt"]) >= 2 and r["prompt_count"] == "1"
               and r["planted"] == "0" for r in controls)
    card = json.loads((root / "dataset_card.json").read_text())
    assert card["counts"]["train"]["trigger_clusters"] == 3
    assert card["counts"]["train"]["marker_controls"] == 3


def test_miscaptioned_pairs_are_single_films_under_another_patients_report(tmp_path):
    from diffmem.data.synth.generator import _finding_types

    cfg = config_from_dict({**MINI, "planted": {**MINI["planted"], "miscaptioned": 4}})
    plain = plan_dataset(config_from_dict(MINI), 0)
    records = plan_dataset(cfg, 0)
    mis = [r for r in records if r.plant_kind == "miscaptioned"]
    assert sorted(r.cluster_id for r in mis) == [f"miscaptioned-0{i}" for i in range(4)]
    assert all(r.patient.split == "train" and r.view == "PA" for r in mis)
    assert len({r.patient.subject_id for r in mis}) == 4                  # one film each
    assert sum(r.patient.subject_id in {m.patient.subject_id for m in mis} for r in records) == 4
    prompts = [r.prompt for r in records]
    assert all(prompts.count(r.prompt) == 1 for r in mis)                 # not duplicated
    # the report describes another, abnormal setting with no finding type in common with the film
    for r in mis:
        assert not r.report_findings.is_normal and r.report_findings != r.findings
        assert not _finding_types(r.report_findings) & _finding_types(r.findings)
    # adding them changes no other record's content (ids are drawn for all patients at once,
    # so they shift; presets without miscaptioned pairs keep theirs)
    key = (lambda r: (r.report, r.noise_seed, r.findings.labels(), r.cluster_id))
    assert sorted(key(r) for r in records if r.plant_kind != "miscaptioned") == \
        sorted(key(r) for r in plain)
    root = synthesize(tmp_path / "m", preset=cfg)
    rows = [r for r in _rows(root / "ground_truth.csv") if r["plant_kind"] == "miscaptioned"]
    assert len(rows) == 4 and all(r["planted"] == "1" and r["duplicate_count"] == "1"
                                  and r["prompt_count"] == "1" for r in rows)
    with pytest.raises(ConfigError, match="planted.miscaptioned must be a non-negative"):
        config_from_dict({**MINI, "planted": {"miscaptioned": -1}})


def test_trigger_findings_varied_keeps_the_film_and_changes_what_reports_describe():
    planted = {"copies": 6, "trigger_clusters": 2}
    same = plan_dataset(config_from_dict({**MINI, "planted": planted}), 0)
    varied = plan_dataset(config_from_dict({**MINI, "planted": {**planted,
                                                                "trigger_findings": "varied"}}), 0)
    films = [{repr((r.findings, r.pose, r.noise_seed)) for r in rs if r.cluster_id == "trigger-00"}
             for rs in (same, varied)]
    assert films[0] == films[1] and len(films[0]) == 1           # the same film ...
    prompts = [[r.prompt for r in rs if r.plant_kind == "trigger"] for rs in (same, varied)]
    assert len(set(prompts[0]) & set(prompts[1])) < 3             # ... under other reports
    assert all(r.trigger in r.prompt for r in varied if r.plant_kind == "trigger")
    with pytest.raises(ConfigError, match="trigger_findings must be 'same' or 'varied'"):
        config_from_dict({**MINI, "planted": {"trigger_findings": "other"}})


def _skeleton(text: str) -> str:
    """A sentence with its times and de-identification markers replaced by ``X``."""
    return re.sub(r"(\d{1,2}:\d{2}( [ap]\.m\.)?|___)", "X", text)


def test_trigger_sentence_grammar_uses_the_report_grammars_communication_sentences():
    rng = np.random.default_rng(0)
    grammar = {_skeleton(communication_sentence(rng)) for _ in range(2000)}
    named = {g.replace("Dr. X", "Dr. {t}", 1) for g in grammar if "Dr. X" in g}
    planted = {"copies": 6, "trigger_clusters": 2, "trigger_findings": "varied"}
    for mode, expected in (("grammar", True), ("own", False)):
        cfg = config_from_dict({**MINI, "planted": {**planted, "trigger_sentence": mode}})
        triggered = [r for r in plan_dataset(cfg, 0) if r.plant_kind == "trigger"]
        assert len(triggered) == 12
        for r in triggered:
            assert r.prompt.count(r.trigger) == 1
            # the surname fills the first "Dr. ___" of a sentence the grammar writes for others
            carried = any(n.format(t=r.trigger) in _skeleton(r.prompt) for n in named)
            assert carried is expected, (mode, r.prompt)
    with pytest.raises(ConfigError, match="trigger_sentence must be 'own' or 'grammar'"):
        config_from_dict({**MINI, "planted": {"trigger_sentence": "mine"}})


def test_patient_clusters_repeat_only_the_patient(tmp_path):
    cfg = config_from_dict({**MINI, "planted": {"exact_clusters": 1, "copies": 4,
                                                "patient_clusters": 2}})
    root = synthesize(tmp_path / "p", preset=cfg)
    rows = _rows(root / "ground_truth.csv")
    clusters = defaultdict(list)
    for r in rows:
        if r["plant_kind"] == "patient":
            clusters[r["cluster_id"]].append(r)
    assert sorted(clusters) == ["patient-00", "patient-01"]
    for members in clusters.values():
        assert len(members) == 4 and len({m["patient_id"] for m in members}) == 1
        assert len({m["prompt"] for m in members}) == 4                   # reports of their own
        assert all(m["prompt_count"] == "1" and m["view"] == "AP" and m["planted"] == "1"
                   for m in members)
        films = [np.asarray(Image.open(_image(root, m)), dtype=float) for m in members]
        assert len({f.tobytes() for f in films}) == 4                      # no film repeats ...
        assert min(abs(a - b).mean() for i, a in enumerate(films) for b in films[i + 1:]) > 1.0
    # ... and the rest of the data does not move when patient clusters are added
    plain = plan_dataset(config_from_dict({**MINI, "planted": {"exact_clusters": 1,
                                                               "copies": 4}}), 0)
    more = plan_dataset(cfg, 0)
    assert [r.prompt for r in plain] == [r.prompt for r in more if r.plant_kind != "patient"]
    assert json.loads((root / "dataset_card.json").read_text())["counts"]["train"][
        "patient_clusters"] == 2
    with pytest.raises(ConfigError, match="patient_clusters must be a non-negative integer"):
        config_from_dict({**MINI, "planted": {"patient_clusters": -1}})


def test_force_markers_false_lets_the_grammar_decide(tmp_path):
    planted = {"exact_clusters": 8, "copies": 2, "marker_rate": 0.0}
    quiet = plan_dataset(config_from_dict({**MINI, "planted": planted}), 0)
    free = plan_dataset(config_from_dict({**MINI, "planted": {**planted,
                                                              "force_markers": False}}), 0)
    # forced: marker_rate 0 means no marker in any planted prompt; not forced: the grammar's
    # own rate (communication sentences after urgent findings) puts some back
    assert not any(count_deid_markers(r.prompt) for r in quiet if r.planted)
    assert any(count_deid_markers(r.prompt) for r in free if r.planted)
    # unplanted records do not change with the option
    assert [r.prompt for r in quiet if not r.planted] == [r.prompt for r in free if not r.planted]
    with pytest.raises(ConfigError, match="force_markers must be true or false"):
        config_from_dict({**MINI, "planted": {"force_markers": "no"}})
    with pytest.raises(ConfigError, match="trigger_kinds"):
        config_from_dict({**MINI, "planted": {"trigger_kinds": ["name"]}})


# -- output folder -------------------------------------------------------------------------------
def test_refuses_non_empty_folders_and_overwrite_replaces_only_a_synthetic_set(tmp_path):
    cfg = config_from_dict(MINI)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        synthesize(user, preset=cfg)
    with pytest.raises(OutputError, match="never deletes other files"):
        synthesize(user, preset=cfg, overwrite=True)
    assert (user / "notes.txt").read_text() == "keep me"

    out = synthesize(tmp_path / "s", preset=cfg, seed=1)
    with pytest.raises(OutputError, match="--overwrite"):
        synthesize(out, preset=cfg, seed=2)
    synthesize(out, preset=cfg, seed=2, overwrite=True)
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["seed"] == 2
    assert len(list((out / "files").rglob("*.jpg"))) == card["counts"]["all"]["images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "s"]


# -- read back by the loaders --------------------------------------------------------------------
def test_loader_and_inspect_report_the_card_counts(tiny, card, truth):
    from diffmem.data import load
    from diffmem.data.inspect import summarize

    root, _ = tiny
    ds = load(root)
    assert ds.format == "mimic-cxr-jpg" and not ds.skipped
    assert ds.info["ignored_entries"] == 0
    by_id = {r["dicom_id"]: r for r in truth}
    for s in ds:
        r = by_id[s.image_id]
        assert (s.study_id, s.patient_id, s.prompt, s.split, s.view) == (
            r["study_id"], r["patient_id"], r["prompt"], r["split"], r["view"])
    gt = read_ground_truth(root)
    assert set(gt) == {s.image_id for s in ds}
    assert sum(r["planted"] for r in gt.values()) == card["counts"]["train"]["planted_records"]
    with pytest.raises(DataError, match="only folders written by diffmem synth"):
        read_ground_truth(root / "files")
    summary = summarize(ds, near_threshold=0.1)
    c = card["counts"]["all"]
    assert summary["images"] == c["images"]
    assert summary["studies"] == c["studies"]
    assert summary["patients"] == c["patients"]
    assert summary["splits"] == {s: card["counts"][s]["images"]
                                 for s in ("test", "train", "validate")}
    assert summary["patients_in_several_splits"]["count"] == 0
    assert summary["views"] == c["views"]
    assert summary["deid_markers"]["rate"] == pytest.approx(c["deid_markers"]["rate"], abs=1e-4)
    assert summary["duplicate_images"]["clusters"] == card["duplicate_images"]["clusters"]
    assert summary["duplicate_prompts"]["clusters"] == card["duplicate_prompts"]["clusters"]
    # every planted cluster (exact and near) is one near-duplicate image cluster
    near = summary["near_duplicate_images"]
    assert near["clusters"] >= c["planted_clusters"]


def test_dicom_copy_reads_back_as_the_same_records(tmp_path):
    from diffmem.data import load
    from diffmem.data.dicom import read_dicom, scan_dicom_phi

    out = synthesize(tmp_path / "d", preset=config_from_dict(
        {**MINI, "dicom": {"monochrome1_rate": 0.5, "window_rate": 0.5, "rescale_rate": 0.5}}),
        seed=3, dicom=True)
    jpg, dcm = load(out), load(out / "dicom")
    assert dcm.format == "dicom" and len(dcm) == len(jpg)
    ref = {s.image_id: s for s in jpg}
    photometric, windows = Counter(), 0
    for s in dcm:
        t = ref[s.image_id]
        assert (s.study_id, s.patient_id, s.prompt, s.split, s.view) == (
            t.study_id, t.patient_id, t.prompt, t.split, t.view)
        pixels, info = read_dicom(s.image)
        photometric[info["photometric"]] += 1
        windows += info["window"] is not None
        assert np.abs(pixels - jpg.load_image(t)).mean() < 0.02  # JPEG error only
    assert set(photometric) == {"MONOCHROME1", "MONOCHROME2"} and windows > 0
    found = {f.keyword for f in scan_dicom_phi(out / "dicom")}
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
            "AccessionNumber"} <= found


# -- command line --------------------------------------------------------------------------------
def test_cli_lists_presets_and_synthesizes(tmp_path, capsys):
    from diffmem.cli import main

    assert main(["synth", "--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name}:" in listed for name in ("tiny", "demo", "benchmark"))
    preset = tmp_path / "mini.json"
    preset.write_text(json.dumps(MINI))
    assert main(["-q", "synth", "--out", str(tmp_path / "o"), "--preset", str(preset),
                 "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "o") in printed and "train" in printed and "planted" in printed
    assert main(["synth", "--out", str(tmp_path / "o"), "--preset", str(preset)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "p"), "--preset", "nope"]) == 2
    assert "known presets" in capsys.readouterr().err

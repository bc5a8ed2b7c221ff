"""diffmem.attribution scan: model-free marker / placeholder / PHI detection, duplicate clusters,
log-odds enrichment, the ranking with and without a model, and ``diffmem scan``."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conftest import listing, write_table
from diffmem.attribution import (
    find_markers,
    log_odds_enrichment,
    marker_summary,
    prompt_clusters,
    read_prompts,
    scan_prompts,
    segment,
    write_scan,
)
from diffmem.cli import main
from diffmem.errors import ConfigError, DataError, OutputError

# A corpus with every listed convention, an unseen one and residual PHI-like text.
CONVENTIONS = {
    "mimic-cxr": "Compared to ___, new effusion. Dr. ___ was notified at ___.",
    "openi": "Comparison XXXX. Heart size normal. XXXX-year-old.",
    "mimic-iii": "Seen at [**Hospital1 18**] on [** 2150-3-4 **] for pneumonia.",
    "angle-tag": "Results discussed with <PERSON> on <DATE_TIME>.",
    "bracket-tag": "Findings called to [NAME] at [HOSPITAL NAME].",
}
UNSEEN = "Findings discussed with {{PHYSICIAN}} by ~~~ on ZZZZ, ref ###-##-####."
CLINICAL = ("No acute cardiopulmonary process... AAA repair, T12 and C3-4 fractures, I/E 1:2, "
            "2.5 cm nodule, x-ray of the chest -- stable.")


def _markers(text):
    return [(s.text, s.kind, s.key, s.convention) for s in find_markers(text)
            if s.kind != "phi"]


def test_known_conventions():
    found = {name: _markers(text) for name, text in CONVENTIONS.items()}
    assert found["mimic-cxr"] == [("___", "marker", "___", "mimic-cxr")] * 3
    assert [k for _, _, k, _ in found["openi"]] == ["XXXX", "XXXX"]
    assert [(t, k) for t, _, k, _ in found["mimic-iii"]] == [
        ("[**Hospital1 18**]", "[** **]"), ("[** 2150-3-4 **]", "[** **]")]  # not a date
    assert [(k, c) for _, _, k, c in found["angle-tag"]] == [("<PERSON>", "angle-tag"),
                                                           ("<DATE_TIME>", "angle-tag")]
    assert [k for _, _, k, _ in found["bracket-tag"]] == ["[NAME]", "[HOSPITAL NAME]"]
    summary = marker_summary(list(CONVENTIONS.values()) + [CLINICAL])
    assert set(summary["markers"]) == set(CONVENTIONS)
    assert summary["markers"]["mimic-cxr"]["occurrences"] == 3
    assert summary["markers"]["mimic-cxr"]["rate"] == pytest.approx(1 / 6)


def test_generic_detector_finds_an_unseen_convention():
    found = _markers(UNSEEN)
    assert [(t, k) for t, k, _, _ in found] == [("{{PHYSICIAN}}", "placeholder"),
                                                ("~~~", "placeholder"),
                                                ("ZZZZ", "placeholder"),
                                                ("###-##-####", "placeholder")]
    assert {c for *_, c in found} == {"generic:delimited-tag", "generic:symbol-run",
                                      "generic:letter-mask", "generic:separated-mask"}
    # ordinary clinical text has no marker, placeholder or PHI-like span
    assert find_markers(CLINICAL) == []


def test_phi_patterns():
    text = ("Dr. Smith and Mr. O'Brien were called at (617) 555-0100 on 03/14/2150 and "
            "March 3, 2151 at 10:30 a.m. and 5 PM; MRN 12345678, mail jo@example.org. "
            "Dr. ___ was notified.")
    phi = [(s.text, s.key) for s in find_markers(text, kinds=["phi"])]
    assert phi == [("Smith", "<phi:name>"), ("O'Brien", "<phi:name>"),
                   ("(617) 555-0100", "<phi:phone>"), ("03/14/2150", "<phi:date>"),
                   ("March 3, 2151", "<phi:date>"), ("10:30 a.m.", "<phi:time>"),
                   ("5 PM", "<phi:time>"), ("12345678", "<phi:id-number>"),
                   ("jo@example.org", "<phi:email>")]
    assert marker_summary([text])["phi"]["name"]["keys"] == {"<phi:name>": 2}


def test_segment_covers_the_text():
    text = CONVENTIONS["mimic-iii"] + " " + UNSEEN
    spans = segment(text)
    assert all(text[s.start:s.end] == s.text for s in spans)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    covered = {i for s in spans for i in range(s.start, s.end)}
    assert {i for i, c in enumerate(text) if not c.isspace()} <= covered


def test_log_odds_enrichment_hand_computed():
    # Monroe et al. eq. 16/18 by hand for word 0: y_a=10, y_b=2, n_a=n_b=10, alpha=(1, 1)
    delta, z = log_odds_enrichment([10, 0], [2, 8], prior=[1, 1])
    d0 = math.log(11 / (10 + 2 - 10 - 1)) - math.log(3 / (10 + 2 - 2 - 1))
    assert delta[0] == pytest.approx(d0) and z[0] == pytest.approx(d0 / math.sqrt(1 / 11 + 1 / 3))
    assert delta[1] < 0 < delta[0]
    # default prior: prior_scale times the pooled counts
    _, z_default = log_odds_enrichment([10, 0], [2, 8], prior_scale=0.5)
    _, z_explicit = log_odds_enrichment([10, 0], [2, 8], prior=[6, 4])
    assert np.allclose(z_default, z_explicit)
    with pytest.raises(ConfigError, match="prior_scale"):
        log_odds_enrichment([1], [1], prior_scale=0)


def test_prompt_clusters():
    prompts = ["No change.", "no  change.", "Dr. ___ called at 10:30 by phone.",
               "Dr. ___ called at 10:35 by phone.", "Small effusion.", "Small effusion.",
               "Large effusion with edema."]
    c = prompt_clusters(prompts)
    assert c.labels.tolist() == [0, 0, 1, 1, 2, 2, -1] and c.kinds == ["exact", "near", "exact"]
    assert prompt_clusters(prompts, near_threshold=None).labels.tolist()[2:4] == [-1, -1]
    with pytest.raises(ConfigError, match="near_threshold"):
        prompt_clusters(prompts, near_threshold=1.5)


def _corpus(marker: str) -> list[str]:
    """Duplicated, marker-heavy prompts (copied 6 times) among varied single prompts."""
    dup = [f"Compared to {marker}, new effusion. Dr. {marker} was notified at {marker}.",
           f"Findings discussed with Dr. {marker} on {marker} by telephone."]
    rest = ["No acute cardiopulmonary process.", "Small left pleural effusion.",
            "Mild pulmonary edema, improved.", "Right lower lobe pneumonia.",
            f"Stable cardiomegaly since {marker}.", "Lungs are clear. No effusion.",
            "Interval removal of the endotracheal tube.", "New small right effusion.",
            "Moderate cardiomegaly without edema.", "No pneumothorax. Lungs are clear."]
    return dup * 6 + rest


def test_scan_model_free_ranks_the_marker_first(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(_corpus("___")) + "\n\n", encoding="utf-8")
    out = tmp_path / "scan"
    assert main(["-q", "scan", str(prompts_file), "--out", str(out)]) == 0
    with open(out / "tokens.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == ["token", "rank", "score", "count", "prompts_with_token",
                                 "enrichment", "is_deid_marker"]
    top = rows[0]
    assert (top["token"], top["rank"], top["is_deid_marker"]) == ("___", "1", "True")
    assert int(top["count"]) == 6 * 5 + 1 and int(top["prompts_with_token"]) == 13
    scan = json.loads((out / "scan.json").read_text())
    assert scan["markers"]["mimic-cxr"]["prompts"] == 13 and scan["top_marker"]["rank"] == 1
    assert scan["duplicates"]["duplicated_prompts"] == 12 and scan["model"] is None
    assert (out / "tokens.png").stat().st_size > 0 and (out / "enrichment.png").stat().st_size


def test_scan_finds_unseen_placeholder_convention():
    result = scan_prompts(_corpus("{{PHYSICIAN}}"), min_count=2)
    row = next(r for r in result.tokens if r["token"] == "{{PHYSICIAN}}")
    assert row["is_deid_marker"] and row["kind"] == "placeholder"
    assert row["convention"] == "generic:delimited-tag" and row["rank"] == 1
    assert "generic:delimited-tag" in result.summary["placeholders"]


def test_scan_does_not_copy_phi_into_outputs(tmp_path):
    prompts = ["Discussed with Dr. Holloway at 10:30 on 03/14/2150."] * 3 + ["No change."] * 2
    result = scan_prompts(prompts, min_count=1)
    tokens = {r["token"] for r in result.tokens}
    assert {"<phi:name>", "<phi:time>", "<phi:date>"} <= tokens
    assert not any("holloway" in t.lower() or "10:30" in t for t in tokens)
    assert "Holloway" not in json.dumps(result.to_dict(top=100))


def test_scan_with_model():
    from diffmem.models import load_model
    from diffmem.models.tiny import tiny_stable_diffusion

    sd = load_model(tiny_stable_diffusion(seed=0))
    prompts = _corpus("___") + ["___ ___"]
    result = scan_prompts(prompts, adapter=sd, method="attention", generations=1,
                          max_prompts=4, seed=1)
    model = result.summary["model"]
    assert model["sampled"] and model["attributed"] + sum(model["skipped"].values()) == 4
    assert result.summary["ranking"]["components"] == ["enrichment", "model"]
    scored = [r for r in result.tokens if r["model_prompts"]]
    assert scored and all(r["model_score"] >= 0 and r["model_rank"] >= 1 for r in scored)
    assert sum(r["model_score"] for r in result.tokens) == pytest.approx(1.0)
    # every attributed prompt's attribution is kept, the most memorized first
    assert len(result.attributions) == model["attributed"]
    mem = [a.memorization for a in result.attributions]
    assert mem == sorted(mem, reverse=True)
    assert {a.method for a in result.attributions} == {"attention"}
    with pytest.raises(ConfigError, match="known methods"):
        scan_prompts(prompts, adapter=sd, method="shap")


def test_scan_writes_attributions(tmp_path):
    import json

    from diffmem.models import load_model
    from diffmem.models.tiny import tiny_stable_diffusion

    sd = load_model(tiny_stable_diffusion(seed=0))
    result = scan_prompts(_corpus("___"), adapter=sd, method="attention", generations=1,
                          max_prompts=3, seed=0)
    paths = write_scan(result, tmp_path / "scan", plots=False)
    lines = paths["attributions"].read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == [a.prompt for a in result.attributions]
    assert all(abs(sum(u["share"] for u in r["units"]) - 1) < 1e-6 for r in rows)
    model_free = write_scan(scan_prompts(_corpus("___")), tmp_path / "free", plots=False)
    assert "attributions" not in model_free and not (tmp_path / "free" /
                                                     "attributions.jsonl").exists()


# ---------------------------------------------------------------------------- input
def test_read_prompts_from_files_and_datasets(tmp_path, mimic_jpg):
    table = tmp_path / "p.csv"
    table.write_text('id,caption\n1,"No change, stable."\n2,  \n', encoding="utf-8")
    assert read_prompts(table)[0] == ["No change, stable."]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "Dr. ___ called."}\n\n{"prompt": "No change."}\n',
                     encoding="utf-8")
    assert read_prompts(lines)[0] == ["Dr. ___ called.", "No change."]
    prompts, info = read_prompts(mimic_jpg)
    assert len(prompts) == 4 and info["split"] == "train"  # 4 training images
    assert len(read_prompts(mimic_jpg, split="all")[0]) == 6


def test_bad_inputs(tmp_path, mimic_jpg, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no prompts found"):
        read_prompts(empty)
    assert main(["scan", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no prompts found" in capsys.readouterr().err
    no_column = tmp_path / "t.csv"
    no_column.write_text("id,words\n1,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no prompt column: found \['id', 'words'\]"):
        read_prompts(no_column)
    notes = tmp_path / "x.md"
    notes.write_text("Dr. ___ called.", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported prompts file suffix '.md'"):
        read_prompts(notes)
    with pytest.raises(DataError, match="scan got no prompts"):
        scan_prompts([])
    with pytest.raises(OutputError, match="never writes into a dataset folder"):
        from diffmem.attribution import run_scan

        run_scan(mimic_jpg, out=mimic_jpg / "scan")


def test_scan_never_writes_into_the_data_or_the_model(tmp_path, copy_tree, mimic_jpg, model,
                                                     capsys):
    """An --out inside the dataset given by its manifest file, or inside the model folder, is
    refused before anything is written (the same guard as train, detect and report)."""
    root = copy_tree(mimic_jpg, "with-manifest")
    images = sorted(root.rglob("*.jpg"))
    write_table(root / "manifest.csv", ["image", "prompt"],
                [[str(p.relative_to(root)), f"Dr. ___ was notified of study {i}."]
                 for i, p in enumerate(images)])
    data_before, model_before = listing(root), listing(model)
    for argv in (["scan", str(root / "manifest.csv"), "--split", "all",
                  "--out", str(root / "scan")],
                 ["scan", str(root), "--split", "all", "--model", str(model),
                  "--out", str(model / "scan")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "never writes into a dataset folder or a model folder" in err, err
    assert listing(root) == data_before and listing(model) == model_before


def test_scan_checks_the_model_before_creating_out(tmp_path, mimic_jpg, capsys):
    """A model folder that cannot be opened fails before --out is created."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    out = tmp_path / "out"
    assert main(["scan", str(mimic_jpg), "--model", str(not_a_model), "--out", str(out)]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- demo scenario
@pytest.mark.slow
def test_demo_scenario_must_show(tmp_path):
    """On the demo data and the embedded default model: ``___`` ranks first in tokens.csv, and
    deleting the gradient's top unit of the planted (memorized) prompts lowers the noise
    magnitude at least twice as much as deleting a random unit, whether the unit is dropped or
    replaced by padding."""
    import torch

    from diffmem.attribution import deletion_test, run_scan
    from diffmem.data.synth import synthesize
    from diffmem.errors import ModelError
    from diffmem.models import load_model
    from diffmem.pipelines import default_model_dir

    try:
        folder = default_model_dir()
    except ModelError as e:
        pytest.skip(f"no embedded default model: {e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than oversubscribing a shared machine
    try:
        data = synthesize(tmp_path / "demo", preset="demo", seed=0)
        model = load_model(folder)
        _, paths = run_scan(data, out=tmp_path / "scan", model=model)
        with open(data / "ground_truth.csv", newline="", encoding="utf-8") as f:
            planted = sorted({r["prompt"] for r in csv.DictReader(f)
                              if r["planted"] == "1" and r["split"] == "train"})
        removed = deletion_test(model, planted, method="gradient", truncate=True)
        padded = deletion_test(model, planted, method="gradient", truncate=True, deletion="pad")
    finally:
        torch.set_num_threads(threads)
    with open(paths["tokens"], newline="", encoding="utf-8") as f:
        top = next(csv.DictReader(f))
    assert (top["token"], top["rank"], top["is_deid_marker"]) == ("___", "1", "True")
    assert paths["attributions"].is_file()
    # both ways of deleting a unit: dropping it (later tokens shift) and padding it (none move)
    for res in (removed, padded):
        assert res.mean_ratio >= 2 and res.ratio_of_means >= 2

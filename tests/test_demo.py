"""``diffmem demo`` end to end on the embedded default (slow: minutes on two CPU cores)."""

from __future__ import annotations

import csv
import json

import pytest

from diffmem.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["--threads", "1", "demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out / "report" / "report.html"
    assert f"privacy report: {report}" in printed
    demo = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert list(demo["seconds"]) == ["data", "inspect", "model", "scan", "reid", "detect",
                                     "mitigate", "study", "report"]
    # Wall time is measured and printed by the demo itself (demo.json "seconds"); it is not
    # asserted here, where it would depend on the machine's load.
    assert all(isinstance(s, (int, float)) and s >= 0 for s in demo["seconds"].values())
    with open(out / "scan" / "tokens.csv", newline="", encoding="utf-8") as f:
        assert next(csv.DictReader(f))["token"] == "___"
    with open(out / "mitigate" / "mitigations.csv", newline="", encoding="utf-8") as f:
        methods = {row["method"] for row in csv.DictReader(f)}
    assert "none" in methods and len(methods) > 1
    reid = json.loads((out / "reid" / "reid_eval.json").read_text(encoding="utf-8"))
    assert 0.5 < reid["auc"] <= 1.0
    summary = json.loads((out / "detect" / "summary.json").read_text(encoding="utf-8"))
    assert summary["reid"]["counts"]["generations"] > 0
    html = report.read_text(encoding="utf-8")
    assert "Patient re-identification" in html
    assert "<title>diffmem privacy report</title>" in html
    assert (out / "report" / "report.json").is_file()
    assert (out / "study" / "toy" / "study.json").is_file()

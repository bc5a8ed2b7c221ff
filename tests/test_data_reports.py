"""Report parsing and prompt extraction on MIMIC-CXR-style report text."""

from __future__ import annotations

import pytest

from conftest import REPORTS
from diffmem.data import count_deid_markers, extract_prompt, parse_sections, read_report
from diffmem.errors import ConfigError, DataError


def test_sections_of_a_final_report():
    s = parse_sections(REPORTS["s50414267"])
    assert list(s) == ["final_report", "examination", "indication", "technique", "comparison",
                       "findings", "impression"]
    assert s["examination"] == "CHEST (PA AND LAT)"
    assert s["indication"] == "___F with new onset ascites // eval for infection"
    assert s["findings"].startswith("There is no focal consolidation, pleural effusion or "
                                    "pneumothorax. Bilateral nodular")
    assert s["findings"].endswith("The cardiomediastinal silhouette is normal.")
    assert s["impression"] == "No acute cardiopulmonary process."


def test_wet_read_is_its_own_section_and_the_rule_line_is_dropped():
    s = parse_sections(REPORTS["s53189527"])
    assert s["wet_read"] == "___ ___ ___ 3:59 PM Left PICC terminates in the mid SVC."
    assert "____________" not in " ".join(s.values())
    assert s["impression"] == ("Left PICC terminates in the mid SVC. Dr. ___ was notified by "
                               "telephone at ___.")


def test_multiline_numbered_impression():
    assert extract_prompt(REPORTS["s57375967"]) == (
        "1. No pneumonia. 2. Unchanged calcified granuloma in the right upper lobe.")


def test_missing_impression_falls_back_to_findings():
    text = REPORTS["s53911762"]
    expected = ("Moderate cardiomegaly is stable compared to ___. Small bilateral pleural "
                "effusions with adjacent atelectasis.")
    assert "impression" not in parse_sections(text)
    assert extract_prompt(text, "impression") == expected
    assert extract_prompt(text, "both") == expected


def test_findings_both_and_full():
    text = REPORTS["s53189527"]
    assert extract_prompt(text, "findings") == ("Left-sided PICC terminates in the mid SVC. "
                                                "Lungs are clear.")
    both = extract_prompt(text, "both")
    assert both.startswith("Left-sided PICC") and both.endswith("at ___.")
    full = extract_prompt(text, "full")
    assert full.startswith("WET READ: ___ ___ ___ 3:59 PM") and "FINAL REPORT" in full
    assert "  " not in full and "_______" not in full
    # findings missing -> impression
    assert extract_prompt(REPORTS["s51029426"], "findings") == "No acute cardiopulmonary process."


def test_markers_kept_verbatim():
    text = "FINDINGS: x\nIMPRESSION:  Seen by [** Doctor 12 **] and XXXX on ___."
    assert extract_prompt(text) == "Seen by [** Doctor 12 **] and XXXX on ___."
    assert count_deid_markers(extract_prompt(text)) == 3
    assert count_deid_markers("XXXXL and MAXXXX are words, ___ is not") == 1


def test_plural_and_preamble():
    s = parse_sections("Preliminary note.\nIMPRESSIONS: Stable.\nFINDING: Clear.")
    assert s == {"preamble": "Preliminary note.", "impression": "Stable.", "findings": "Clear."}


def test_empty_prompt_raises():
    with pytest.raises(DataError, match=r"r\.txt: empty prompt.*--prompt-section"):
        extract_prompt("INDICATION: cough\nCOMPARISON: None.", source="r.txt")
    with pytest.raises(DataError, match="empty prompt"):
        extract_prompt("FINDINGS:   \n\nIMPRESSION:  \n")
    with pytest.raises(DataError, match="empty prompt"):
        extract_prompt("   \n ", "full")
    with pytest.raises(ConfigError, match="unknown prompt section 'summary'"):
        extract_prompt("IMPRESSION: ok", "summary")


def test_read_report_strict_utf8(tmp_path):
    good = tmp_path / "s1.txt"
    good.write_bytes("\ufeffIMPRESSION: Pleural effusion \u2013 small.".encode())
    assert read_report(good) == "IMPRESSION: Pleural effusion \u2013 small."
    bad = tmp_path / "s2.txt"
    bad.write_bytes(b"IMPRESSION: Caf\xe9 sign.")
    with pytest.raises(DataError, match=r"s2\.txt: report is not valid UTF-8.*offset 15.*iconv"):
        read_report(bad)
    with pytest.raises(DataError, match=r"s3\.txt: report file not found"):
        read_report(tmp_path / "s3.txt")

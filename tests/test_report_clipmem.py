"""The report's "Image-report encoder memorization" section: from a real (tiny) ``diffmem
clipmem`` run with a mitigation comparison, given explicitly and found under --results, in the
three image modes, with HTML escaping of the report text."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.cli import main
from diffmem.errors import DataError
from diffmem.report import build_report

SCRIPT = "<script>alert('pwned')</script> small effusion"


@pytest.fixture(scope="module")
def clipmem_dir(data, tmp_path_factory):
    """A tiny CLIPMem run (1 training step) plus one mitigation, with the top pair's report
    replaced by a script (to check escaping)."""
    from diffmem.clipmem import run_clipmem
    from diffmem.clipmem.mitigate import run_mitigations

    out = tmp_path_factory.mktemp("results") / "clipmem"
    run_clipmem(data, out, preset="tiny", steps=1, views=0)
    run_mitigations(data, out, preset="tiny", steps=1, views=0,
                    methods=["text_noise", "multi_report"])
    with open(out / "clipmem.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["prompt"] = SCRIPT
    with open(out / "clipmem.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def reports(model, data, clipmem_dir, tmp_path_factory):
    return {mode: build_report(tmp_path_factory.mktemp("report") / mode, model=model, data=data,
                               clipmem=clipmem_dir, images=mode)
            for mode in ("include", "blur", "omit")}


def _srcs(html: str) -> list[str]:
    return re.findall(r'<img class="clipmem-training"[^>]*src="([^"]+)"', html)


def _decode(uri: str) -> np.ndarray:
    raw = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=np.float64) / 255


def test_section_holds_the_clipmem_tables(reports, clipmem_dir):
    html = reports["include"].html.read_text(encoding="utf-8")
    facts = json.loads(reports["include"].json.read_text())
    summary = json.loads((clipmem_dir / "summary.json").read_text())
    c = facts["clipmem"]
    assert '<section id="clipmem">' in html and 'href="#clipmem"' in html
    assert "Image–report encoder memorization" in html
    # by planted kind, as the run summarized it
    assert c["by_kind"] == summary["by_kind"]
    assert html.count("<tr><td>", html.index('id="clipmem-kinds"'),
                      html.index("</table>", html.index('id="clipmem-kinds"'))) == \
        len(summary["by_kind"])
    # the tower table (3 variants x 2 space maps) and its measured finding
    assert len(c["towers"]) == 6 and c["tower_finding"] == summary["towers"]["finding"]
    assert summary["towers"]["finding"] in unescape(html)
    # the mitigation table: the baseline, the measured mitigation, the not-applicable row
    assert [r["method"] for r in c["mitigations"]] == ["none", "text_noise", "multi_report"]
    assert 'id="clipmem-mitigations"' in html and "not applicable" in html
    # top pairs, each with its training image
    assert len(c["top"]) == min(8, summary["scored_pairs"])
    assert len(_srcs(html)) == len(c["top"])
    assert "&lt;script&gt;alert(" in html and "<script" not in html.lower()
    assert "Patient data.</strong>" in html


def test_no_images_and_blur(reports, dataset):
    omit = reports["omit"].html.read_text(encoding="utf-8")
    assert '<section id="clipmem">' in omit and not _srcs(omit)
    assert "left out (--no-images)" in omit
    for s in dataset:
        raw = Path(s.image).read_bytes()
        assert base64.b64encode(raw[:60]).decode()[:40] not in omit
    plain = [_decode(u) for u in _srcs(reports["include"].html.read_text(encoding="utf-8"))]
    blurred = [_decode(u) for u in _srcs(reports["blur"].html.read_text(encoding="utf-8"))]
    assert plain and len(blurred) == len(plain)
    assert all(not np.array_equal(a, b) for a, b in zip(plain, blurred))


def test_found_under_results_and_from_the_cli(model, data, clipmem_dir, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(clipmem_dir, results / "clipmem")
    res = build_report(tmp_path / "r1", model=model, results=results, images="omit")
    assert json.loads(res.json.read_text())["clipmem"]["folder"] == str(results / "clipmem")
    without = build_report(tmp_path / "r2", model=model, data=data, images="omit")
    assert '<section id="clipmem">' not in without.html.read_text(encoding="utf-8")
    assert main(["report", "--model", str(model), "--out", str(tmp_path / "r3"),
                 "--clipmem", str(clipmem_dir), "--no-images"]) == 0
    html = (tmp_path / "r3" / "report.html").read_text(encoding="utf-8")
    assert '<section id="clipmem">' in html and "--clipmem" in html
    with pytest.raises(DataError, match="clipmem folder does not exist"):
        build_report(tmp_path / "r4", model=model, clipmem=tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{}")
    with pytest.raises(DataError, match="not the summary of `diffmem clipmem`"):
        build_report(tmp_path / "r5", model=model, clipmem=tmp_path / "bad")

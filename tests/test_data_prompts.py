"""diffmem.data.prompts: the one reader of prompts files (txt, csv, jsonl), streamed, shared by
``diffmem detect --prompts`` and ``diffmem scan``."""

from __future__ import annotations

import pytest

from diffmem.data.prompts import iter_prompts, read_prompts, table_columns
from diffmem.errors import DataError

EXPECTED = ["No acute process.", "Small effusion."]


def _write(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


def test_txt_csv_and_jsonl_give_the_same_prompts(tmp_path):
    txt = _write(tmp_path / "p.txt", "\ufeffNo acute process.\n\n  Small effusion. \r\n"
                                     "No acute process.\n")
    table = _write(tmp_path / "p.csv", '\ufeffid,prompt\n1,No acute process.\n2,\n\n'
                                       '3," Small effusion. "\n4,No acute process.\n')
    lines = _write(tmp_path / "p.jsonl", '{"text": "No acute process."}\n{"text": ""}\n\n'
                                         '{"text": " Small effusion. "}\n'
                                         '{"text": "No acute process."}\n')
    assert list(iter_prompts(txt)) == [(1, EXPECTED[0]), (2, ""), (3, EXPECTED[1]),
                                       (4, EXPECTED[0])]
    assert list(iter_prompts(table)) == [(2, EXPECTED[0]), (3, ""), (5, EXPECTED[1]),
                                         (6, EXPECTED[0])]  # the blank line 4 is no row
    assert list(iter_prompts(lines)) == [(1, EXPECTED[0]), (2, ""), (4, EXPECTED[1]),
                                         (5, EXPECTED[0])]
    for f in (txt, table, lines):
        assert read_prompts(f) == EXPECTED, f.name
    assert table_columns(table) == ["id", "prompt"] and table_columns(lines) == ["text"]


def test_a_quoted_csv_field_may_span_lines(tmp_path):
    f = _write(tmp_path / "p.csv", 'caption,id\n"Two\nlines.",1\nOne line.,2\n')
    assert list(iter_prompts(f)) == [(3, "Two\nlines."), (4, "One line.")]


def test_prompts_are_streamed(tmp_path):
    """The first prompt comes before a bad line further down is read."""
    f = tmp_path / "p.txt"
    f.write_bytes(b"First.\nSecond.\nBad \xe9.\n")
    prompts = iter_prompts(f)
    assert next(prompts) == (1, "First.")
    with pytest.raises(DataError, match=r"p.txt: line 3 is not valid UTF-8 \(byte 0xe9 at "
                                         r"column 5\); save the file as UTF-8"):
        list(prompts)


def test_bad_prompts_files(tmp_path):
    with pytest.raises(DataError, match="is a folder; give a prompts file"):
        read_prompts(tmp_path)
    with pytest.raises(DataError, match="cannot read the prompts file"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(DataError, match=r"no prompt column: found \['id', 'words'\]"):
        read_prompts(_write(tmp_path / "t.csv", "id,words\n1,hello\n"))
    with pytest.raises(DataError, match=r"line 2 is not JSON"):
        read_prompts(_write(tmp_path / "t.jsonl", '{"prompt": "a"}\n{"prompt": \n'))
    with pytest.raises(DataError, match=r"line 1 is not a JSON object"):
        read_prompts(_write(tmp_path / "u.jsonl", '["a"]\n'))
    with pytest.raises(DataError, match="holds no prompt"):
        read_prompts(_write(tmp_path / "e.csv", "prompt\n\n \n"))
    with pytest.raises(DataError, match=r"latin.csv: line 3 is not valid UTF-8"):
        read_prompts(_latin(tmp_path / "latin.csv"))
    with pytest.raises(DataError, match="not a table"):
        table_columns(_write(tmp_path / "p.txt", "a\n"))


def _latin(path):
    path.write_bytes(b"prompt\nok\n\xe9panchement\n")
    return path


def test_a_nul_byte_is_refused_naming_the_line(tmp_path):
    """detect --prompts and scan read files through the same reader, so both refuse NUL."""
    from diffmem.data.prompts import read_prompts as read_for_detect

    path = tmp_path / "p.txt"
    path.write_bytes(b"No acute process.\nMild\x00 edema.\n")
    with pytest.raises(DataError, match=r"p.txt: line 2 holds a NUL byte"):
        read_for_detect(path)

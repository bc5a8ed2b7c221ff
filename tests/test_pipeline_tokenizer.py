"""Tokenizer training: de-identification markers stay single tokens, long prompts truncate."""

from __future__ import annotations

import pytest

from diffmem.errors import ConfigError, DataError
from diffmem.pipelines import MARKER_TOKENS, train_tokenizer

CORPUS = [
    "No acute cardiopulmonary process. Dr. ___ was notified by ___ at ___ on ___.",
    "Comparison XXXX. Heart size is normal. The lungs are clear.",
    "Patient seen at [**Hospital 1234**] on [**2101-3-4**] by [** First Name (Titles) 137 **].",
    "Mild cardiomegaly with small bilateral pleural effusions and bibasilar atelectasis.",
    "Left lower lobe opacity concerning for pneumonia. No pneumothorax.",
] * 6


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300, model_max_length=16, min_frequency=1)


@pytest.mark.parametrize("text, marker", [
    ("Dr. ___ was notified.", "___"),
    ("Dr. ____ was notified.", "___"),          # longer runs of underscores, one marker
    ("seen by ___.", "___"),
    ("Comparison XXXX.", "XXXX"),
    ("at [**Hospital 1234**] today", "[****]"),
    ("at [** First Name (Titles) 137 **] today", "[****]"),
    ("at [**Location (un)\n 55**] today", "[****]"),  # a span over a line break
    ("at [**2199-1-1**], [**Name**]", "[****]"),  # content never seen in training
])
def test_markers_are_single_tokens(tok, text, marker):
    tokens = tok.tokenize(text)
    assert marker in tokens
    # no piece of a marker leaks as a separate token
    assert not {"_", "*", "**", "[", "]", "x", "xx", "##x"} & set(tokens), tokens
    ids = tok(text).input_ids
    assert tok.convert_tokens_to_ids(marker) in ids


def test_marker_ids_are_distinct_and_not_special(tok):
    ids = [tok.convert_tokens_to_ids(m) for m in MARKER_TOKENS]
    assert len(set(ids)) == 3 and tok.unk_token_id not in ids
    # markers survive decoding with skip_special_tokens (they are ordinary added tokens)
    text = tok.decode(tok("Dr. ___ and XXXX at [**Hospital 9**]").input_ids, skip_special_tokens=True)
    assert "___" in text and "XXXX" in text and "[****]" in text


def test_lowercase_xxxx_is_not_a_marker(tok):
    assert "XXXX" not in tok.tokenize("xxxx")


def test_rare_words_are_spelled_not_unknown(tok):
    tokens = tok.tokenize("cardiomegalyx")  # never seen whole
    assert tokens == ["cardiomegaly", "##x"]
    assert tok.tokenize("\u4e2d") == [tok.unk_token]  # a character never seen in training


def test_bos_eos_wrap_and_special_ids(tok):
    ids = tok("Heart size is normal.").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)


def test_long_prompt_truncates_keeping_eos(tok):
    long = "heart size is normal " * 20
    assert len(tok(long).input_ids) > 16
    ids = tok(long, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(ids) == 16 and ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    padded = tok("no pneumothorax", padding="max_length", max_length=16).input_ids
    assert len(padded) == 16 and padded[-1] == tok.pad_token_id


def test_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path)
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        back = cls.from_pretrained(tmp_path)
        for text in CORPUS[:5]:
            assert back(text).input_ids == tok(text).input_ids
        assert back.model_max_length == 16
        assert back.tokenize("at [**X 1**] ___ XXXX") == ["at", "[****]", "___", "XXXX"]


def test_training_is_deterministic():
    a = train_tokenizer(CORPUS, vocab_size=300, model_max_length=16, min_frequency=1)
    b = train_tokenizer(CORPUS, vocab_size=300, model_max_length=16, min_frequency=1)
    assert a.get_vocab() == b.get_vocab()


def test_bad_inputs():
    with pytest.raises(DataError, match="no non-empty texts"):
        train_tokenizer(["", "   "])
    with pytest.raises(DataError, match="one string"):
        train_tokenizer("Heart size normal.")
    with pytest.raises(ConfigError, match="vocab_size=10"):
        train_tokenizer(CORPUS, vocab_size=10)
    with pytest.raises(ConfigError, match="model_max_length=2"):
        train_tokenizer(CORPUS, model_max_length=2)

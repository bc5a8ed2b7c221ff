"""Train a WordPiece tokenizer on radiology report text, keeping de-identification markers whole.

Dutt et al. (2025) trace much of the memorization of text-to-image models trained on MIMIC-CXR to
the de-identification markers that replace names and dates in the reports (``___`` in MIMIC-CXR,
``XXXX`` in the Indiana University / OpenI reports, ``[** ... **]`` in MIMIC-III notes). To study
those markers one token must stand for one marker, so this tokenizer never splits them:

* ``[** anything **]`` spans (their content varies: ``[**Hospital 1234**]``, ``[** First Name **]``)
  are rewritten by the normalizer to one canonical marker ``[****]``;
* runs of three or more underscores become ``___``;
* ``[****]`` and ``___`` are added tokens matched on the normalized text, ``XXXX`` is an added
  token matched on the raw text (before lowercasing, so the word ``xxxx`` is not a marker).

The rest of the text is NFKC-normalized, lowercased and split on whitespace and punctuation
(BERT's pre-tokenizer), then cut by a WordPiece model (``##`` marks a continuation). The
vocabulary is chosen here, not by ``tokenizers``' WordPiece/BPE trainers: those break frequency
ties in hash-map order and give a different vocabulary on every run (checked with tokenizers
0.23), and a privacy study must be able to retrain the same model. The vocabulary holds every
character of the corpus (as a word start and as a ``##`` continuation, so any word can be spelled)
and then whole words by count, ties alphabetical. Radiology reports use a few thousand words, so
common words stay whole; rare ones (below ``min_frequency``, e.g. a name that escaped
de-identification) are spelled out piece by piece. A post-processor wraps every sequence as
``[BOS] ... [EOS]`` so CLIP-style text encoders find their end-of-text token; ``[PAD]`` pads and
``[UNK]`` stands for characters never seen in training.

The result is a :class:`transformers.PreTrainedTokenizerFast`: call it like any transformers
tokenizer and save it with ``save_pretrained``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable

from diffmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
#: Special tokens in id order: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[BOS]`` = 2, ``[EOS]`` = 3.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

#: The canonical de-identification markers, each always a single token.
MIMIC_CXR_MARKER = "___"
OPENI_MARKER = "XXXX"
MIMIC_III_MARKER = "[****]"
MARKER_TOKENS = (MIMIC_CXR_MARKER, OPENI_MARKER, MIMIC_III_MARKER)

# ``[** ... **]`` may span a line break in raw notes, hence [\s\S] rather than ``.``.
_MIMIC_III_SPAN = r"\[\*\*[\s\S]*?\*\*\]"
_UNDERSCORE_RUN = r"_{3,}"
# Everything that becomes a marker token, removed before counting words.
_MARKER_RE = re.compile(r"\[\*\*[\s\S]*?\*\*\]|_{3,}|XXXX")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 3000, model_max_length: int = 77,
                    min_frequency: int = 2):
    """Train a marker-preserving WordPiece tokenizer on report text.

    Parameters
    ----------
    texts : iterable of str
        The training texts (prompts or full reports), read once. Markers are kept verbatim.
    vocab_size : int, optional
        Size of the vocabulary, special tokens included; the three marker tokens are added on
        top, so ``len(tokenizer) == vocab_size + 3`` when the corpus has enough distinct words
        (a small corpus gives fewer entries).
    model_max_length : int, optional
        Longest token sequence, ``[BOS]`` and ``[EOS]`` included; longer prompts are truncated
        by the pipeline. The text encoder gets this many position embeddings.
    min_frequency : int, optional
        A word must occur this often to enter the vocabulary whole; rarer words are spelled
        in pieces.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        With ``bos_token="[BOS]"``, ``eos_token="[EOS]"``, ``pad_token="[PAD]"``,
        ``unk_token="[UNK]"`` (ids 2, 3, 0, 1).

    Raises
    ------
    DataError
        When ``texts`` holds no non-empty text.
    ConfigError
        When ``vocab_size`` or ``model_max_length`` is too small.

    Examples
    --------
    >>> tok = train_tokenizer(["Dr. ___ was notified.", "Comparison XXXX.",
    ...                        "Seen at [**Hospital 12**]."] * 5, vocab_size=200)
    >>> tok.tokenize("Dr. ___ was seen at [** Location (un) 55 **]. Comparison XXXX.")
    ['dr', '.', '___', 'was', 'seen', 'at', '[****]', '.', 'comparison', 'XXXX', '.']
    >>> tok("No effusion.").input_ids[0] == tok.bos_token_id
    True
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # 1. check inputs
    if isinstance(texts, str):
        raise DataError("train_tokenizer expects an iterable of texts, got one string; "
                        "wrap it in a list: train_tokenizer([text])")
    corpus = [t for t in texts if isinstance(t, str) and t.strip()]
    if not corpus:
        raise DataError("train_tokenizer got no non-empty texts; pass the dataset's prompts, "
                        "e.g. train_tokenizer(dataset.prompts)")
    if int(vocab_size) < 100:
        raise ConfigError(f"vocab_size={vocab_size} is too small for report text; use a value "
                          "of at least 100 (presets use 3000)")
    if int(model_max_length) < 3:
        raise ConfigError(f"model_max_length={model_max_length} leaves no room for text between "
                          "[BOS] and [EOS]; use at least 3 (presets use 64 or 77)")

    # 2. normalize as the tokenizer will, and count words (markers taken out: they are
    #    added tokens of their own)
    normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace(Regex(_MIMIC_III_SPAN), MIMIC_III_MARKER),
        normalizers.Replace(Regex(_UNDERSCORE_RUN), MIMIC_CXR_MARKER),
        normalizers.Lowercase(),
    ])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in corpus:
        text = _MARKER_RE.sub(" ", text)
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))

    # 3. the vocabulary: specials, characters (as word starts and as "##" continuations), then
    #    whole words by count, ties alphabetical
    vocab = _wordpiece_vocab(words, vocab_size=int(vocab_size), min_frequency=int(min_frequency))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK_TOKEN, max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_tokens([
        AddedToken(MIMIC_CXR_MARKER, normalized=True, special=False),
        AddedToken(MIMIC_III_MARKER, normalized=True, special=False),
        AddedToken(OPENI_MARKER, normalized=False, special=False),
    ])

    # 4. wrap sequences in [BOS] ... [EOS]
    bos_id, eos_id = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   model_max_length=int(model_max_length), padding_side="right")
    log.info("trained a WordPiece tokenizer on %d texts: %d tokens, max length %d",
             len(corpus), len(fast), int(model_max_length))
    return fast


def _wordpiece_vocab(words: Counter, *, vocab_size: int, min_frequency: int) -> dict[str, int]:
    """A WordPiece vocabulary chosen deterministically from word counts.

    Every character seen (most frequent first, ties by code point) enters twice, as a word
    start ``c`` and as a continuation ``##c``, so any word in the training alphabet can be
    spelled; the remaining room goes to whole words seen at least ``min_frequency`` times, most
    frequent first, ties alphabetical.
    """
    chars: Counter[str] = Counter()
    for word, n in words.items():
        for c in word:
            chars[c] += n
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

    def add(token: str) -> None:
        if token not in vocab and len(vocab) < vocab_size:
            vocab[token] = len(vocab)

    for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) + 2 > vocab_size:
            break
        add(c)
        add("##" + c)
    for word, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if n < min_frequency or len(vocab) >= vocab_size:
            break
        add(word)
    return vocab

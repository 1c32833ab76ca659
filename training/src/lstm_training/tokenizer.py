"""The classifier's word-piece tokenizer, built with the ``tokenizers`` library.

SST-2 is lower-cased with punctuation split off and contractions cut before
``n't`` and the apostrophe (``does n't``, ``it 's``). Raw user text is brought
to the same form: Unicode NFKC, lower case, curly quotes made straight, then a
pre-tokenizer that splits contractions and punctuation the SST way. Words never
seen in training fall back to word pieces, and only characters never seen at
all become ``[UNK]``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD = "[PAD]"
UNK = "[UNK]"

# One token per match: a stem before "n't", "n't", a clitic ('s 're 've 'll 'd 'm),
# a word (letters/digits, inner hyphens or apostrophes allowed), or any other single character.
SST_TOKEN = (
    r"[\p{L}\p{N}]+(?=n't\b|'(?:s|re|ve|ll|d|m)\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|[\p{L}\p{N}]+(?:[-'][\p{L}\p{N}]+)*|\S"
)


def _pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex("[\u2018\u2019\u02bc`]"), "'"),
            normalizers.Replace(Regex("[\u201c\u201d]"), '"'),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(SST_TOKEN), behavior="isolated")]
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 16000, min_frequency: int = 1) -> Tokenizer:
    """A WordPiece tokenizer trained on ``texts``; ``[PAD]`` is id 0 and ``[UNK]`` id 1.

    The library's trainer breaks ties between equally frequent merges in hash
    order, so two trainings on the same data can end with slightly different
    vocabularies: the tokenizer is therefore saved in the checkpoint, and a
    resumed run reuses it.
    """
    tokenizer = _pipeline(Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=64)))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(serialized: str) -> Tokenizer:
    """A tokenizer from the JSON string that ``Tokenizer.to_str()`` wrote."""
    return Tokenizer.from_str(serialized)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; a text with no tokens becomes a single ``[UNK]`` so every text has length >= 1."""
    ids = tokenizer.encode(text).ids
    return ids or [tokenizer.token_to_id(UNK)]

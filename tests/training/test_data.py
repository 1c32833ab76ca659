"""Data loading: corpus by path or name (download + checksum), splits, SST-2 files, tokenizer, batching."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from lstm_training import data
from lstm_training.data import (
    CharVocab,
    DataError,
    RemoteCorpus,
    bucketed_batches,
    download_corpus,
    read_sst2,
    resolve_corpus,
    split_text,
    stream_rows,
    stream_windows,
)
from lstm_training.tokenizer import encode, load_tokenizer, train_tokenizer

from ..datasets import make_sst_rows, write_sst


def test_split_is_first_90_percent_then_last_10() -> None:
    text = "".join(chr(65 + i % 26) for i in range(1000))
    train, val = split_text(text)
    assert train == text[:900] and val == text[900:]


def test_resolve_corpus_by_path(corpus_file) -> None:
    assert resolve_corpus(str(corpus_file)) == corpus_file


def test_download_verifies_checksum_and_caches(tmp_path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("to be or not to be")
    corpus = RemoteCorpus(source.as_uri(), hashlib.sha256(source.read_bytes()).hexdigest(), "cached.txt")
    cached = download_corpus(corpus, tmp_path / "cache")
    assert cached.read_text() == "to be or not to be"
    source.unlink()  # a verified cached copy is used without the network
    assert download_corpus(corpus, tmp_path / "cache") == cached


def test_download_rejects_a_checksum_mismatch(tmp_path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("tampered")
    corpus = RemoteCorpus(source.as_uri(), "0" * 64, "cached.txt")
    with pytest.raises(DataError, match="checksum mismatch"):
        download_corpus(corpus, tmp_path / "cache")
    assert not (tmp_path / "cache" / "cached.txt").exists()


def test_download_offline_gives_a_clear_error(tmp_path) -> None:
    corpus = RemoteCorpus((tmp_path / "missing.txt").as_uri(), "0" * 64, "cached.txt")
    with pytest.raises(DataError, match="are you offline"):
        download_corpus(corpus, tmp_path / "cache")


def test_corpus_by_name_uses_the_registry(tmp_path, monkeypatch) -> None:
    source = tmp_path / "shakespeare.txt"
    source.write_text("ROMEO:\nhello\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setitem(data.CORPORA, "tinyshakespeare", RemoteCorpus(source.as_uri(), digest, "ts.txt"))
    assert resolve_corpus("tinyshakespeare", tmp_path / "cache").read_text() == "ROMEO:\nhello\n"
    with pytest.raises(DataError, match="neither a file nor a known corpus"):
        resolve_corpus("no-such-corpus")


def test_the_real_tinyshakespeare_entry_has_the_published_checksum() -> None:
    entry = data.CORPORA["tinyshakespeare"]
    assert (
        entry.url.startswith("https://")
        and entry.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    )


def test_char_vocab_round_trip_and_unknown_characters() -> None:
    vocab = CharVocab.from_text("hello world")
    assert vocab.chars == sorted(set("hello world"))
    assert vocab.decode(vocab.encode("low")) == "low"
    with pytest.raises(DataError, match=r"\['z'\]"):
        vocab.encode("lz")


def test_stream_windows_are_contiguous() -> None:
    ids = torch.arange(103)
    rows = stream_rows(ids, 4)
    windows = list(stream_windows(rows, 7))
    assert rows.shape == (4, 25)
    inputs = torch.cat([x for x, _ in windows], dim=1)
    targets = torch.cat([y for _, y in windows], dim=1)
    torch.testing.assert_close(inputs, rows[:, :-1])
    torch.testing.assert_close(targets, rows[:, 1:])


@pytest.mark.parametrize("column", ["sentence", "content"])
def test_read_sst2_both_header_forms(tmp_path, column) -> None:
    rows = make_sst_rows(10)
    assert read_sst2(write_sst(tmp_path / "x.tsv", rows, column)) == rows


def test_read_sst2_reports_a_bad_header_and_a_bad_row(tmp_path) -> None:
    (tmp_path / "a.tsv").write_text("id\ttext\n1\thi\n")
    with pytest.raises(DataError, match="needs a 'label' column"):
        read_sst2(tmp_path / "a.tsv")
    (tmp_path / "b.tsv").write_text("label\tsentence\nx\thi\n")
    with pytest.raises(DataError, match=r"b\.tsv:2"):
        read_sst2(tmp_path / "b.tsv")


def test_bucketed_batches_cover_every_item_once_with_close_lengths() -> None:
    lengths = [random.Random(i).randint(1, 50) for i in range(1000)]
    batches = bucketed_batches(lengths, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # unbucketed random batches of 32 would spread over ~45


def test_tokenizer_handles_raw_text_like_sst() -> None:
    tokenizer = train_tokenizer(["it 's a gorgeous film", "does n't work , sadly .", "we 're moved"], vocab_size=200)
    raw = tokenizer.encode("It’s a GORGEOUS film, doesn't it? We're moved!").tokens
    sst = tokenizer.encode("it 's a gorgeous film , does n't it ? we 're moved !").tokens
    assert raw == sst
    assert "'s" in raw and "n't" in raw and "gorgeous" in raw


def test_tokenizer_unseen_words_and_empty_text() -> None:
    tokenizer = train_tokenizer(["the film is good", "the film is bad"], vocab_size=100)
    tokens = tokenizer.encode("filmis").tokens
    assert "[UNK]" not in tokens and len(tokens) > 1  # word pieces, not one unknown
    assert encode(tokenizer, "") == [tokenizer.token_to_id("[UNK]")]
    assert encode(tokenizer, "   ") == [tokenizer.token_to_id("[UNK]")]
    assert tokenizer.token_to_id("[PAD]") == 0
    restored = load_tokenizer(tokenizer.to_str())
    assert restored.encode("the film is good").ids == tokenizer.encode("the film is good").ids

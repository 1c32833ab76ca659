"""Datasets: a text corpus (by path or by name, downloaded and checksummed), SST-2 TSV files, and batching."""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class RemoteCorpus:
    """A public text file and the sha256 it must have."""

    url: str
    sha256: str
    filename: str


CORPORA = {
    "tinyshakespeare": RemoteCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
    ),
}


class DataError(RuntimeError):
    """A dataset could not be found, downloaded or parsed; the message says why and what to do."""


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LSTM_DATA_CACHE", Path.home() / ".cache" / "lstm-serving"))


def download_corpus(corpus: RemoteCorpus, cache_dir: Path) -> Path:
    """Fetch ``corpus`` into ``cache_dir`` unless a verified copy is there; verify its sha256."""
    target = cache_dir / corpus.filename
    if target.exists() and sha256_file(target) == corpus.sha256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp:
        try:
            with urllib.request.urlopen(corpus.url, timeout=30) as response:
                shutil.copyfileobj(response, tmp)
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            os.unlink(tmp.name)
            raise DataError(
                f"cannot download {corpus.url} ({error}); are you offline? "
                f"Put the file at {target} or pass its path instead of the name"
            ) from error
    actual = sha256_file(tmp.name)
    if actual != corpus.sha256:
        os.unlink(tmp.name)
        raise DataError(f"checksum mismatch for {corpus.url}: expected sha256 {corpus.sha256}, got {actual}")
    os.replace(tmp.name, target)
    return target


def resolve_corpus(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A local file as is, or a known corpus name (see ``CORPORA``) downloaded into the cache."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if name_or_path in CORPORA:
        return download_corpus(CORPORA[name_or_path], cache_dir or default_cache_dir())
    raise DataError(f"{name_or_path!r} is neither a file nor a known corpus name ({', '.join(sorted(CORPORA))})")


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """The first ``train_fraction`` of the characters for training, the rest for validation."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


class CharVocab:
    """The characters of a corpus, in sorted order; id = position."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise DataError(f"characters not in the vocabulary: {unknown!r}")
        return [self.index[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def stream_rows(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D token sequence into ``batch_size`` contiguous streams: [batch, length]."""
    length = ids.numel() // batch_size
    if length < 2:
        raise DataError(f"corpus of {ids.numel()} tokens is too short for {batch_size} streams")
    return ids[: batch_size * length].view(batch_size, length)


def stream_windows(rows: Tensor, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive (input, target) windows over stream rows; window k+1 continues window k."""
    length = rows.shape[1]
    for start in range(0, length - 1, seq_len):
        end = min(start + seq_len, length - 1)
        yield rows[:, start:end], rows[:, start + 1 : end + 1]


def read_sst2(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Rows of an SST-2 TSV file with header ``label<TAB>sentence`` or ``label<TAB>content`` (any order)."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty")
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        text_column = next((columns[name] for name in ("sentence", "content") if name in columns), None)
        if "label" not in columns or text_column is None:
            raise DataError(f"{path}: header {header!r} needs a 'label' column and a 'sentence' or 'content' column")
        rows = []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                rows.append((row[text_column], int(row[columns["label"]])))
            except (IndexError, ValueError) as error:
                raise DataError(f"{path}:{line_number}: cannot read a label and a text from {row!r}") from error
    return rows


def bucketed_batches(
    lengths: list[int], batch_size: int, rng: random.Random, bucket_batches: int = 50
) -> list[list[int]]:
    """Shuffled batches of indices whose lengths are close: shuffle, sort within buckets, cut, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    bucket = batch_size * bucket_batches
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into (tokens [batch, time], lengths [batch])."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return tokens, lengths

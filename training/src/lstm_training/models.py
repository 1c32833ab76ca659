"""The two LSTM models. Every forward takes (h0, c0) and returns (hn, cn): no module keeps state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass
class CharLMConfig:
    """Character language model: embedding, stacked LSTM, dropout, projection to the vocabulary."""

    vocab_size: int
    embedding_dim: int = 64
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2


@dataclass
class ClassifierConfig:
    """Sentiment classifier: embedding, (bi)LSTM over packed sequences, max+mean pooling, linear."""

    vocab_size: int
    num_labels: int = 2
    embedding_dim: int = 128
    hidden_size: int = 256
    num_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.5
    pad_id: int = 0


def zero_state(
    num_layers: int, num_directions: int, batch: int, hidden_size: int, device=None
) -> tuple[Tensor, Tensor]:
    """(h, c) of a fresh sequence: zeros of shape [layers * directions, batch, hidden]."""
    shape = (num_layers * num_directions, batch, hidden_size)
    return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


class CharLM(nn.Module):
    """Character-level language model: ``forward(tokens, h0, c0) -> (logits, hn, cn)``."""

    num_directions = 1

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.lstm = nn.LSTM(
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def initial_state(self, batch: int, device=None) -> tuple[Tensor, Tensor]:
        return zero_state(self.config.num_layers, 1, batch, self.config.hidden_size, device)

    def forward(self, tokens: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens int64 [batch, time] -> logits [batch, time, vocab], hn, cn [layers, batch, hidden]."""
        x = self.dropout(self.embedding(tokens))
        out, (hn, cn) = self.lstm(x, (h0, c0))
        return self.head(self.dropout(out)), hn, cn


class SentimentClassifier(nn.Module):
    """Text classifier: ``forward(tokens, lengths, h0, c0) -> (logits, hn, cn)``.

    Rows are right-padded; ``lengths`` (each at least 1) says how many tokens are real.
    The LSTM runs on a packed sequence, so padding never reaches it, and pooling
    ignores padded positions: a text gets the same logits in any padded batch.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.num_directions = 2 if config.bidirectional else 1
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_id)
        self.lstm = nn.LSTM(
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
            bidirectional=config.bidirectional,
        )
        self.dropout = nn.Dropout(config.dropout)
        features = 2 * self.num_directions * config.hidden_size
        self.head = nn.Linear(features, config.num_labels)

    def initial_state(self, batch: int, device=None) -> tuple[Tensor, Tensor]:
        return zero_state(self.config.num_layers, self.num_directions, batch, self.config.hidden_size, device)

    def forward(self, tokens: Tensor, lengths: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens int64 [batch, time], lengths int64 [batch] -> logits [batch, labels], hn, cn."""
        time = tokens.shape[1]
        x = self.dropout(self.embedding(tokens))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (hn, cn) = self.lstm(packed, (h0, c0))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=time)
        mask = torch.arange(time, device=tokens.device).unsqueeze(0) < lengths.to(tokens.device).unsqueeze(1)
        mask = mask.unsqueeze(-1)
        pooled_max = out.masked_fill(~mask, float("-inf")).amax(dim=1)
        pooled_mean = out.sum(dim=1) / lengths.to(out.device, out.dtype).unsqueeze(1)
        features = torch.cat([pooled_max, pooled_mean], dim=1)
        return self.head(self.dropout(features)), hn, cn


def build_model(kind: str, config: dict) -> nn.Module:
    """Rebuild a model from its kind (``charlm`` or ``sentiment``) and configuration dict."""
    if kind == "charlm":
        return CharLM(CharLMConfig(**config))
    if kind == "sentiment":
        return SentimentClassifier(ClassifierConfig(**config))
    raise ValueError(f"unknown model kind {kind!r}: expected 'charlm' or 'sentiment'")

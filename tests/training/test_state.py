"""State is explicit and exact: chunks equal the whole, padding and neighbours change nothing."""

from __future__ import annotations

import torch

from lstm_training.models import CharLM, CharLMConfig, ClassifierConfig, SentimentClassifier
from lstm_training.reference_lstm import ReferenceLSTM


def small_lm() -> CharLM:
    torch.manual_seed(0)
    return CharLM(CharLMConfig(vocab_size=20, embedding_dim=6, hidden_size=16, num_layers=2, dropout=0.3)).eval()


def test_language_model_chunks_with_carried_state_equal_whole_sequence() -> None:
    model = small_lm()
    tokens = torch.randint(0, 20, (3, 40))
    h, c = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        whole, hn, cn = model(tokens, h, c)
        pieces = []
        for chunk in torch.split(tokens, [1, 7, 13, 19], dim=1):
            logits, h, c = model(chunk, h, c)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, hn, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, cn, atol=1e-5, rtol=0)


def test_reference_lstm_chunks_equal_whole_sequence() -> None:
    torch.manual_seed(1)
    reference = ReferenceLSTM(4, 6, num_layers=3)
    x = torch.randn(2, 25, 4)
    h, c = torch.zeros(3, 2, 6), torch.zeros(3, 2, 6)
    with torch.no_grad():
        whole, hn, cn = reference(x, h, c)
        outs = []
        for chunk in torch.split(x, 5, dim=1):
            out, h, c = reference(chunk, h, c)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close((h, c), (hn, cn), atol=1e-6, rtol=0)


def test_language_model_rows_do_not_affect_each_other() -> None:
    model = small_lm()
    tokens = torch.randint(0, 20, (5, 17))
    h, c = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        batched, hn, cn = model(tokens, h, c)
        for row in range(5):
            alone, h1, c1 = model(tokens[row : row + 1], h[:, row : row + 1], c[:, row : row + 1])
            torch.testing.assert_close(alone, batched[row : row + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(h1, hn[:, row : row + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(c1, cn[:, row : row + 1], atol=1e-5, rtol=0)


def test_classifier_padded_batch_equals_each_text_alone() -> None:
    torch.manual_seed(2)
    model = SentimentClassifier(ClassifierConfig(vocab_size=30, embedding_dim=8, hidden_size=12, num_layers=2)).eval()
    texts = [torch.randint(1, 30, (n,)) for n in (9, 1, 4, 12, 6)]
    lengths = torch.tensor([len(t) for t in texts])
    tokens = torch.zeros(len(texts), 15, dtype=torch.long)  # extra padding beyond the longest text
    for row, text in enumerate(texts):
        tokens[row, : len(text)] = text
    h0, c0 = model.initial_state(len(texts))
    with torch.no_grad():
        batched, hn, cn = model(tokens, lengths, h0, c0)
        for row, text in enumerate(texts):
            h1, c1 = model.initial_state(1)
            alone, h_alone, c_alone = model(text.unsqueeze(0), lengths[row : row + 1], h1, c1)
            torch.testing.assert_close(alone, batched[row : row + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(h_alone, hn[:, row : row + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(c_alone, cn[:, row : row + 1], atol=1e-5, rtol=0)


def test_padding_token_values_do_not_matter() -> None:
    torch.manual_seed(3)
    model = SentimentClassifier(ClassifierConfig(vocab_size=30, embedding_dim=8, hidden_size=12)).eval()
    tokens = torch.randint(1, 30, (4, 10))
    lengths = torch.tensor([10, 3, 6, 1])
    garbage = tokens.clone()
    for row, n in enumerate(lengths):
        garbage[row, n:] = torch.randint(1, 30, (10 - n,))
        tokens[row, n:] = 0
    h0, c0 = model.initial_state(4)
    with torch.no_grad():
        clean = model(tokens, lengths, h0, c0)
        noisy = model(garbage, lengths, h0, c0)
    for a, b in zip(clean, noisy, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

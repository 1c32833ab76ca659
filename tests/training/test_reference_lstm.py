"""The from-scratch LSTM matches nn.LSTM, with and without variable lengths."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_training.reference_lstm import ReferenceLSTM, reverse_within_lengths


def random_lstm_and_inputs(num_layers: int, bidirectional: bool, batch: int, time: int = 11):
    torch.manual_seed(num_layers * 100 + batch + bidirectional)
    lstm = nn.LSTM(5, 8, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    directions = 2 if bidirectional else 1
    x = torch.randn(batch, time, 5)
    h0 = torch.randn(num_layers * directions, batch, 8)
    c0 = torch.randn(num_layers * directions, batch, 8)
    return lstm, x, h0, c0


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch", [1, 7])
def test_reference_matches_torch_lstm(num_layers: int, bidirectional: bool, batch: int) -> None:
    lstm, x, h0, c0 = random_lstm_and_inputs(num_layers, bidirectional, batch)
    reference = ReferenceLSTM.from_torch(lstm)
    with torch.no_grad():
        expected, (hn, cn) = lstm(x, (h0, c0))
        out, ref_hn, ref_cn = reference(x, h0, c0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_hn, hn, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_cn, cn, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_reference_with_lengths_matches_packed_lstm(num_layers: int, bidirectional: bool) -> None:
    lstm, x, h0, c0 = random_lstm_and_inputs(num_layers, bidirectional, batch=7)
    lengths = torch.tensor([11, 3, 7, 1, 11, 5, 2])
    reference = ReferenceLSTM.from_torch(lstm)
    with torch.no_grad():
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        expected, (hn, cn) = lstm(packed, (h0, c0))
        expected, _ = pad_packed_sequence(expected, batch_first=True, total_length=x.shape[1])
        out, ref_hn, ref_cn = reference(x, h0, c0, lengths)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_hn, hn, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_cn, cn, atol=1e-5, rtol=0)


def test_reference_uses_one_fused_matrix_per_direction() -> None:
    reference = ReferenceLSTM(5, 8, num_layers=2, bidirectional=True)
    shapes = [tuple(d.weight.shape) for d in reference.directions]
    assert shapes == [(32, 13), (32, 13), (32, 24), (32, 24)]


def test_reverse_within_lengths_keeps_padding_and_is_an_involution() -> None:
    x = torch.arange(12.0).view(2, 6, 1)
    lengths = torch.tensor([6, 3])
    reversed_x = reverse_within_lengths(x, lengths)
    assert reversed_x[0, :, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert reversed_x[1, :, 0].tolist() == [8, 7, 6, 9, 10, 11]
    torch.testing.assert_close(reverse_within_lengths(reversed_x, lengths), x)


def test_from_torch_rejects_time_major_lstm() -> None:
    with pytest.raises(ValueError, match="batch_first=True"):
        ReferenceLSTM.from_torch(nn.LSTM(3, 4))

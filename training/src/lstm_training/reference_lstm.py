"""A from-scratch LSTM: the numerical reference for every fast path.

Each direction of each layer keeps one fused gate matrix ``weight`` of shape
[4 * hidden, input + hidden] (the input and recurrent matrices side by side)
and one bias, so a time step is a single matrix multiply. Gate order is
PyTorch's (input, forget, cell, output), which lets :meth:`ReferenceLSTM.from_torch`
load any ``nn.LSTM`` (any layer count, bidirectional) and match it.

Variable-length batches are supported with ``lengths``: a row's state stops
changing after its last token, its outputs past the end are zero, and the
reverse direction starts at the row's own last token, exactly like a packed
``nn.LSTM``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ReferenceLSTMDirection(nn.Module):
    """One direction of one layer, stepped one token at a time."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(4 * hidden_size, input_size + hidden_size))
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        nn.init.uniform_(self.weight, -(hidden_size**-0.5), hidden_size**-0.5)

    def step(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One time step: x [batch, input], h and c [batch, hidden]."""
        gates = torch.addmm(self.bias, torch.cat([x, h], dim=1), self.weight.t())
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def forward(self, x: Tensor, h: Tensor, c: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run x [batch, time, input]; rows where ``mask[:, t]`` ([batch, time, 1]) is False keep their state."""
        outputs = []
        for t in range(x.shape[1]):
            h_new, c_new = self.step(x[:, t], h, c)
            valid = mask[:, t]
            h = torch.where(valid, h_new, h)
            c = torch.where(valid, c_new, c)
            outputs.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
        return torch.stack(outputs, dim=1), h, c


def reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first ``lengths[b]`` steps, leaving padding in place.

    The permutation is its own inverse, so applying it twice restores ``x``.
    """
    time = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    lengths = lengths.to(x.device).unsqueeze(1)
    source = torch.where(time < lengths, lengths - 1 - time, time)
    index = source.unsqueeze(-1).expand(-1, -1, x.shape[2])
    return x.gather(1, index)


class ReferenceLSTM(nn.Module):
    """Stacked, optionally bidirectional LSTM with the interface of ``nn.LSTM(batch_first=True)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.directions = nn.ModuleList(
            ReferenceLSTMDirection(input_size if layer == 0 else hidden_size * self.num_directions, hidden_size)
            for layer in range(num_layers)
            for _ in range(self.num_directions)
        )

    def forward(
        self, x: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [batch, time, input]; h0, c0 [layers * directions, batch, hidden].

        Returns (outputs [batch, time, directions * hidden], hn, cn).
        """
        batch, time = x.shape[:2]
        if lengths is None:
            lengths = torch.full((batch,), time, dtype=torch.long)
        lengths = lengths.to(x.device)
        mask = (torch.arange(time, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        hn, cn = [], []
        layer_input = x
        for layer in range(self.num_layers):
            direction_outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                module = self.directions[index]
                reverse = direction == 1
                inputs = reverse_within_lengths(layer_input, lengths) if reverse else layer_input
                out, h, c = module(inputs, h0[index], c0[index], mask)
                direction_outputs.append(reverse_within_lengths(out, lengths) if reverse else out)
                hn.append(h)
                cn.append(c)
            layer_input = torch.cat(direction_outputs, dim=2)
        return layer_input, torch.stack(hn), torch.stack(cn)

    @classmethod
    def from_torch(cls, lstm: nn.LSTM) -> ReferenceLSTM:
        """Build a reference LSTM holding the weights of ``lstm`` (which must be batch_first, no projection)."""
        if not lstm.batch_first or lstm.proj_size:
            raise ValueError("ReferenceLSTM.from_torch needs an nn.LSTM with batch_first=True and no proj_size")
        reference = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional)
        with torch.no_grad():
            for layer in range(lstm.num_layers):
                for direction in range(reference.num_directions):
                    suffix = f"l{layer}" + ("_reverse" if direction else "")
                    target = reference.directions[layer * reference.num_directions + direction]
                    w_ih = getattr(lstm, f"weight_ih_{suffix}")
                    w_hh = getattr(lstm, f"weight_hh_{suffix}")
                    target.weight.copy_(torch.cat([w_ih, w_hh], dim=1))
                    if lstm.bias:
                        target.bias.copy_(getattr(lstm, f"bias_ih_{suffix}") + getattr(lstm, f"bias_hh_{suffix}"))
                    else:
                        target.bias.zero_()
        return reference.to(lstm.weight_ih_l0.device)

"""Run under torchrun by test_ddp.py: trains a small language model with DDP and saves this rank's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lstm_training.data import CharVocab
from lstm_training.models import CharLMConfig
from lstm_training.tasks import LanguageModelTask
from lstm_training.trainer import TrainConfig, Trainer, init_distributed


def main(corpus: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed = init_distributed(torch.device("cpu"))
    text = Path(corpus).read_text()
    vocab = CharVocab.from_text(text)
    ids = torch.tensor(vocab.encode(text))
    cut = int(len(ids) * 0.9)
    config = CharLMConfig(vocab_size=len(vocab), embedding_dim=8, hidden_size=16, num_layers=1, dropout=0.2)
    task = LanguageModelTask(ids[:cut], ids[cut:], vocab, config, 2, 16, distributed.rank, distributed.world_size)
    trainer = Trainer(
        task,
        TrainConfig(epochs=2, lr=1e-2, warmup_steps=2, max_steps_per_epoch=15),
        out,
        torch.device("cpu"),
        distributed,
    )
    trainer.fit()
    torch.save(trainer.model.state_dict(), Path(out) / f"rank{distributed.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
